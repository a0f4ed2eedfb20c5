"""Selecting VMs by the LNM they are on (a selection's "lnms"): the
Selection itself, the controller's list, op_on and migrate on an in-process
grid, and the client library through the real client port."""

import pytest
import pytest_twisted
from usher import states
from usher.errors import InvalidRequest, NoSuchLNM, NoSuchVM
from usher.vmset import Budget, Limits, Selection

from tests.e2e import wait_for
from tests.grid import DOMAIN
from tests.test_failures_controller import grid  # noqa: F401 (the fixture)


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def rec(short, lnm, owner="alice", cluster="web"):
    return {"name": full(short, owner), "lnm": lnm, "owner": owner, "cluster": cluster,
            "state": "run"}


RECORDS = {r["name"]: r for r in (rec("1.web", "lnm1"), rec("2.web", "lnm2"),
                                  rec("3.web", "lnm3"), rec("1.db", "lnm1", cluster="db"))}


def picked(selection):
    chosen, unknown = selection.pick(RECORDS, lambda n: n if "." in n[2:] and n.endswith(
        DOMAIN) else full(n))
    return sorted(r["name"] for r in chosen), unknown


# -- the Selection ----------------------------------------------------------------------

def test_lnms_alone_select_every_vm_on_them():
    assert picked(Selection(lnms=["lnm1"])) == ([full("1.db"), full("1.web")], [])
    assert picked(Selection(lnms=["lnm[2-3]"])) == ([full("2.web"), full("3.web")], [])
    assert picked(Selection(lnms=["~[13]$"])) == (
        [full("1.db"), full("1.web"), full("3.web")], [])
    assert picked(Selection(lnms=["/^lnm2$/"])) == ([full("2.web")], [])
    assert Selection(lnms=["lnm1"]) and Selection(lnms=["lnm1"]).lnms_only


def test_lnms_filter_names_clusters_and_regexes():
    assert picked(Selection(clusters=["web"], lnms=["lnm1", "lnm2"])) == (
        [full("1.web"), full("2.web")], [])
    assert picked(Selection(names=["[1-3].web"], lnms=["lnm3"])) == ([full("3.web")], [])
    assert picked(Selection(regex=r"^1\.", lnms=["lnm1"])) == (
        [full("1.db"), full("1.web")], [])
    assert picked(Selection(everything=True, lnms=["lnm2"])) == ([full("2.web")], [])
    # A name that is not on those LNMs is left out, not unknown.
    assert picked(Selection(names=["2.web"], lnms=["lnm1"])) == ([], [])
    assert not Selection(clusters=["web"], lnms=["lnm1"]).lnms_only


def test_lnms_travel_on_the_wire_and_are_checked():
    wire = Selection(clusters=["web"], lnms=["lnm1", "~x"]).to_wire()
    assert wire["lnms"] == ["lnm1", "~x"]
    assert "lnms" not in Selection(clusters=["web"]).to_wire()   # as before issue 15
    again = Selection.from_wire(wire)
    assert again.lnms == ["lnm1", "~x"] and again.clusters == ["web"]
    assert Selection.from_wire({"lnms": ["lnm2"]}).lnms_only
    for bad in ({"lnms": "lnm1"}, {"lnms": [3]}, {"lnms": ["/(bad/"]},
                {"lnms": ["lnm[1-"]}):
        with pytest.raises(InvalidRequest):
            Selection.from_wire(bad)


def test_lnm_names_and_patterns_count_against_the_budget():
    with pytest.raises(InvalidRequest, match="too many names"):
        Selection(names=["[1-5].web"], lnms=["lnm[1-6]"], budget=Budget(Limits(10, 32)))
    with pytest.raises(InvalidRequest, match="too many ranges"):
        Selection(lnms=["~a", "~b", "~c"], budget=Budget(Limits(100, 2)))


def test_matching_lnms_refuses_an_explicit_unknown_name():
    selection = Selection(lnms=["lnm1", "~9$", "nosuch"])
    with pytest.raises(NoSuchLNM, match="no such LNM: nosuch"):
        selection.matching_lnms(["lnm1", "lnm2", "lnm9"])
    assert Selection(lnms=["lnm1", "~9$"]).matching_lnms(["lnm1", "lnm2", "lnm9"]) == [
        "lnm1", "lnm9"]


# -- the controller -----------------------------------------------------------------------

async def populate(c):
    for user, lnm, count in (("alice", "lnm1", 3), ("alice", "lnm2", 2), ("bob", "lnm1", 2)):
        result = await c.start(user, False, [], [lnm], {"cluster": f"on{lnm}", "count": count})
        assert result["failed"] == [], result


def names(records):
    return sorted(r["name"] for r in records)


@pytest_twisted.ensureDeferred
async def test_list_by_lnm_shows_what_the_caller_may_see(grid):
    c = grid.controller
    await populate(c)
    mine = await c.list("alice", False, {"lnms": ["lnm1"]})
    assert names(mine) == [full(f"{i}.onlnm1") for i in (1, 2, 3)]
    everyone = await c.list("root", True, {"lnms": ["lnm1"]})
    assert names(everyone) == sorted([full(f"{i}.onlnm1") for i in (1, 2, 3)]
                                     + [full(f"{i}.onlnm1", "bob") for i in (1, 2)])
    assert names(await c.list("alice", False, {"lnms": ["~[12]$"],
                                               "clusters": ["onlnm2"]})) == [
        full("1.onlnm2"), full("2.onlnm2")]
    assert await c.list("alice", False, {"lnms": ["lnm3"]}) == []
    with pytest.raises(NoSuchLNM, match="no such LNM: lnm9"):
        await c.list("alice", False, {"lnms": ["lnm9"]})


@pytest_twisted.ensureDeferred
async def test_an_operation_on_the_vms_of_an_lnm(grid):
    c = grid.controller
    await populate(c)
    result = await c.op_on("alice", False, "pause", {"lnms": ["lnm1"]})
    assert names(result["done"]) == [full(f"{i}.onlnm1") for i in (1, 2, 3)]
    assert c.state.vms[full("1.onlnm1", "bob")]["state"] == states.RUN     # not alice's
    assert c.state.vms[full("1.onlnm2")]["state"] == states.RUN           # not on lnm1
    # A named VM elsewhere is filtered out: nothing matches.
    with pytest.raises(NoSuchVM):
        await c.op_on("alice", False, "pause", {"names": ["1.onlnm2"], "lnms": ["lnm1"]})
    with pytest.raises(NoSuchLNM, match="no such LNM"):
        await c.op_on("alice", False, "resume", {"lnms": ["nosuch"]})


@pytest_twisted.ensureDeferred
async def test_migrate_from_an_lnm_empties_it_of_the_callers_vms(grid):
    c = grid.controller
    await populate(c)
    result = await c.migrate("alice", False, {"lnms": ["lnm1"]}, ["lnm3"])
    assert names(result["migrated"]) == [full(f"{i}.onlnm1") for i in (1, 2, 3)]
    assert all(m["from"] == "lnm1" and m["to"] == "lnm3" for m in result["migrated"])
    assert sorted(c.state.lnms["lnm1"].vms) == [full(f"{i}.onlnm1", "bob") for i in (1, 2)]
    # Alone (no target given): placement chooses; an administrator moves everyone's.
    result = await c.migrate("root", True, {"lnms": ["lnm1"]}, [])
    assert len(result["migrated"]) == 2 and c.state.lnms["lnm1"].vms == set()


@pytest_twisted.ensureDeferred
async def test_the_client_library_selects_by_lnm(client_grids):
    grid = await client_grids()
    alice = await grid.connected("alice")
    await alice.start(cluster="a", count=2, lnms=["lnm1"])
    await alice.start(cluster="b", count=1, lnms=["lnm2"])
    await wait_for(lambda: len(alice.vms) == 3)
    on1 = Selection(lnms=["lnm1"])
    assert names(alice.select(None, lnms=["lnm2"])) == [full("1.b")]
    assert names(alice.select(Selection(clusters=["a", "b"]), lnms=["~1$"])) == [
        full("1.a"), full("2.a")]
    assert names(await alice.list(on1)) == [full("1.a"), full("2.a")]
    with pytest.raises(NoSuchLNM, match="no such LNM"):
        await alice.list(Selection(lnms=["lnm7"]))
    result = await alice.op_on("pause", on1)
    assert names(result["done"]) == [full("1.a"), full("2.a")]
    result = await alice.migrate(on1, ["lnm3"])
    assert names(result["migrated"]) == [full("1.a"), full("2.a")]
    assert grid.controller.state.lnms["lnm1"].vms == set()
