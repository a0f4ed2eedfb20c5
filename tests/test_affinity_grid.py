"""Affinity on an in-process grid (real controller, real LNMs on libvirt
test hosts, the real client boundary): start --affinity, the affinity
request, migrations, a migrate off a host in maintenance as evacuation does,
an HA-style restart (a start request with relocate) and the rebalancer; then
end to end through real processes and the real ush, the rule surviving a
controller restart."""

import os

import pytest
import pytest_twisted
from twisted.internet import task

from usher import states
from usher.controller.events import Event, Request
from usher.errors import InvalidRequest
from usher.settings import REQUEST_EVENTS
from usher.vmset import Selection

from tests.e2e import RunningSandbox, parse_json, wait_for
from tests.grid import DOMAIN

RULE_DB = "affinity apart of cluster db (alice)"


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def registrations(tmp_path, placement_config=""):
    config = None
    if placement_config:
        config = str(tmp_path / "roundrobin.config")
        with open(config, "w", encoding="utf-8") as f:
            f.write(placement_config)
    return {"open_authz": {"plugin": "open_authz", "events": list(REQUEST_EVENTS),
                           "order": None, "config": None},
            "roundrobin": {"plugin": "roundrobin",
                           "events": ["start_request", "migrate_request"],
                           "order": None, "config": config}}


def hosts_of(result):
    return {s["name"]: s["lnm"] for s in result["started"]}


def errors(result):
    return {f["name"]: f["error"] for f in result["failed"]}


@pytest_twisted.ensureDeferred
async def test_start_with_affinity_apart_then_migrations_and_evacuation_honour_it(
        tmp_path, client_grids):
    grid = await client_grids(lnms=3, registrations=registrations(tmp_path))
    alice = await grid.connected("alice")
    result = await alice.start(cluster="db", count=4, args={"affinity": "apart"})
    placed = hosts_of(result)
    assert sorted(placed.values()) == ["lnm1", "lnm2", "lnm3"]
    assert list(errors(result)) == [full("4.db")]
    assert RULE_DB in errors(result)[full("4.db")]
    assert "affinity" not in grid.controller.state.vms[full("1.db")]["args"]
    shown = await alice.affinity("db")
    assert (shown["rule"], shown["vms"], shown["honoured"]) == ("apart", 3, True)

    # a start asking for another rule of the non-empty cluster is refused whole
    with pytest.raises(InvalidRequest, match="has the rule affinity apart"):
        await alice.start(cluster="db", count=1, args={"affinity": "together"})

    # a migration onto a host with a VM of the cluster is refused, naming the rule
    vm = full("1.db")
    other = placed[full("2.db")]
    await wait_for(lambda: alice.vms.get(vm, {}).get("state") == states.RUN)
    moved = await alice.migrate([vm], [other])
    assert moved["migrated"] == [] and RULE_DB in errors(moved)[vm]
    assert other in errors(moved)[vm]

    # evacuation-style: the host goes into maintenance, the system migrates
    # its VM with no suggestion: a fourth host (added now) is the only target
    await grid.grid.add_lnm("lnm4")
    source = placed[vm]
    grid.controller.holds.hold(source, "maintenance", reason="evacuating", evacuate=True)
    result = await grid.controller.migrate("usher", True, Selection(names=[vm]))
    assert result["migrated"] == [{"name": vm, "from": source, "to": "lnm4"}]
    # the next one has nowhere to go: refused, each host with its reason
    stuck = placed[full("2.db")]
    grid.controller.holds.hold(stuck, "maintenance", reason="evacuating")
    result = await grid.controller.migrate("usher", True, Selection(names=[full("2.db")]))
    error = errors(result)[full("2.db")]
    assert "lnm4: runs 1.db of cluster db, kept apart" in error
    assert f"{source}: in maintenance: evacuating" in error


@pytest_twisted.ensureDeferred
async def test_together_and_best_effort_through_the_client(tmp_path, client_grids):
    grid = await client_grids(lnms=3, registrations=registrations(
        tmp_path, "affinity = best_effort\n"))
    alice = await grid.connected("alice")
    result = await alice.start(cluster="web", count=3, args={"affinity": "together"})
    assert len(set(hosts_of(result).values())) == 1
    home = hosts_of(result)[full("1.web")]
    await wait_for(lambda: all(alice.vms.get(full(f"{i}.web"), {}).get("state") == states.RUN
                               for i in (1, 2, 3)))
    target = "lnm2" if home != "lnm2" else "lnm3"
    moved = await alice.migrate(Selection(clusters=["web"]), [target])
    assert {m["to"] for m in moved["migrated"]} == {target} and len(moved["migrated"]) == 3

    # best effort: a fourth VM apart on three hosts starts, with a note
    await alice.affinity("db", "apart")
    result = await alice.start(cluster="db", count=4)
    assert len(result["started"]) == 4 and not result["failed"]
    assert any("against its cluster's affinity rule" in n and "best_effort" in n
               for n in result["notes"])
    assert (await alice.affinity("db"))["honoured"] is False
    assert (await alice.affinity("db", "none"))["rule"] is None


@pytest_twisted.ensureDeferred
async def test_an_ha_style_restart_through_the_start_chain_honours_apart(tmp_path,
                                                                          client_grids):
    grid = await client_grids(lnms=4, registrations=registrations(tmp_path))
    alice = await grid.connected("alice")
    result = await alice.start(cluster="db", count=3, args={"affinity": "apart"},
                               lnms=[])
    placed = hosts_of(result)
    lost_host = placed[full("1.db")]
    grid.grid.cut(lost_host)
    await wait_for(lambda: grid.controller.state.vms[full("1.db")]["state"] == states.LOST)
    # what part B's restart_elsewhere asks of the chain
    request = Request("start", "usher", admin=True, vms=[full("1.db")],
                      records={full("1.db"): dict(grid.controller.state.vms[full("1.db")])})
    request.relocate = {full("1.db"): lost_host}
    await grid.controller.chains.fire_request(Event("start_request", grid.controller.api,
                                                    request=request))
    free = ({"lnm1", "lnm2", "lnm3", "lnm4"} - set(placed.values())).pop()
    assert request.placement == {full("1.db"): free}


@pytest_twisted.ensureDeferred
async def test_the_rebalancer_does_not_drain_against_a_rule(tmp_path, client_grids):
    grid = await client_grids(lnms=3, registrations=registrations(tmp_path))
    alice = await grid.connected("alice")
    await alice.start(cluster="db", count=3, args={"affinity": "apart"})
    where = {full(f"{i}.db"): grid.controller.state.vms[full(f"{i}.db")]["lnm"]
             for i in (1, 2, 3)}
    await grid.grid.add_lnm("lnm4")
    config = tmp_path / "rebalancer.config"
    config.write_text("interval = 10\ndrain = lnm1, lnm2\nbalance = never\n")
    grid.controller.chains.clock = task.Clock()
    plugin = grid.registry.register("rebalancer", "timer", str(config))
    plugin.clock = task.Clock()
    grid.controller.chains.clock.advance(10)
    await plugin.idle()
    # one of the two drained hosts' VMs goes to lnm4; the other has nowhere
    moves = [(m.vm, m.target, m.outcome) for m in plugin.history]
    assert len(moves) == 1 and moves[0][1:] == ("lnm4", "migrated")
    now = {n: grid.controller.state.vms[n]["lnm"] for n in where}
    assert len(set(now.values())) == 3


@pytest_twisted.ensureDeferred
async def test_end_to_end_with_real_processes_and_the_real_ush(tmp_path):
    box = await RunningSandbox(tmp_path / "box", lnms=3).start()
    try:
        started = parse_json(await box.ush("start", "-n", "db", "-c", "4",
                                           "--affinity", "apart"))
        ok = [s for s in started if "lnm" in s]
        refused = [s for s in started if "error" in s]
        assert sorted(s["lnm"] for s in ok) == sorted(box.description["lnms"])
        assert len(refused) == 1 and RULE_DB in refused[0]["error"]
        shown = await box.ush("affinity", "-n", "db", json_output=False)
        assert shown.returncode == 0, shown.stderr
        assert "cluster db (alice): affinity apart" in shown.stdout
        assert "3 VMs" in shown.stdout
        usage = await box.ush("affinity", "-n", "db", "sideways", json_output=False)
        assert usage.returncode == 2
        # the rule is in the controller's state directory and survives a restart
        state_dir = [os.path.join(root) for root, _dirs, files in os.walk(box.dir)
                     if "affinity.json" in files]
        assert state_dir, "affinity.json was not written"
        await box.kill("usherctrl")
        box.restart("usherctrl")

        async def read_again():
            done = await box.ush("affinity", "-n", "db")
            return done
        for _ in range(100):
            done = await read_again()
            if done.returncode == 0:
                break
        assert parse_json(done)["rule"] == "apart"
        cleared = parse_json(await box.ush("affinity", "-n", "db", "none"))
        assert cleared["rule"] is None
    finally:
        await box.stop()
