"""The shipped policy plugins, through the client API on an in-process grid:
capacity (overcommit, reservations, guarantees) and the per-LNM reasons of
every refusal, the caller's suggestion, round-robin, pack, spread,
least-loaded, limits ("do the best I can", roles, queries), swapping the
placement policy while running, and the rebalancer."""

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, task

from usher import states
from usher.errors import ConfigError, InvalidRequest, Rejected, Unavailable
from usher.settings import REQUEST_EVENTS
from usher.vmset import Selection

from tests.fakes import FakeMonitoring
from tests.e2e import wait_for
from tests.grid import DOMAIN

PLACEMENT_EVENTS = ["start_request", "migrate_request"]


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def config_file(tmp_path, name, text):
    path = Path(tmp_path) / f"{name}-{abs(hash(text))}.config"
    path.write_text(text, encoding="utf-8")
    return str(path)


def registrations(tmp_path, placement="roundrobin", placement_config="", authz="open_authz",
                  authz_config=""):
    regs = {authz: {"plugin": authz, "events": list(REQUEST_EVENTS), "order": None,
                    "config": config_file(tmp_path, authz, authz_config) if authz_config
                    else None}}
    if placement:
        regs[placement] = {"plugin": placement, "events": PLACEMENT_EVENTS, "order": None,
                           "config": config_file(tmp_path, placement, placement_config)
                           if placement_config else None}
    return regs


def hosts_of(result):
    return {s["name"]: s["lnm"] for s in result["started"]}


def per_host(result):
    counts = {}
    for host in hosts_of(result).values():
        counts[host] = counts.get(host, 0) + 1
    return counts


async def seen(client, result):
    """Wait until the client's cache (kept by the controller's pushes) has
    the VMs a start reported."""
    names = [s["name"] for s in result["started"]]
    await wait_for(lambda: all(client.vms.get(n, {}).get("state") == states.RUN
                               for n in names))


def errors(result):
    return {f["name"]: f["error"] for f in result["failed"]}


# -- capacity, overcommit, reservations, guarantees -----------------------------------

@pytest_twisted.ensureDeferred
async def test_placement_respects_capacity_and_names_each_lnms_problem(tmp_path,
                                                                        client_grids):
    grid = await client_grids(cpus=2, memory_mib=1024, registrations=registrations(
        tmp_path, "roundrobin", "cpu_overcommit = 4\n"))
    alice = await grid.connected("alice")
    result = await alice.start(cluster="web", count=7, args={"memory_mib": 512})
    await seen(alice, result)
    assert per_host(result) == {"lnm1": 2, "lnm2": 2, "lnm3": 2}
    # Committed (VMs' configured memory), which placement counts; hosts with
    # the same reason are named together.
    full_host = ("memory: needs 512 MiB, 0 MiB uncommitted (VMs' configured memory commits "
                 "1024 of 1024 MiB)")
    assert errors(result) == {full("7.web"): (
        f"no LNM can start it (512 MiB and 1 vCPU): lnm1, lnm2, lnm3: {full_host}")}

    await alice.delete(Selection(clusters=["web"]), {"force": True})
    result = await alice.start(["big"], args={"memory_mib": 64, "vcpus": 9})
    cpus = ("CPUs: needs 9 vCPUs, 8 uncommitted (VMs' vCPUs commit 0 of 2 CPUs, "
            "overcommit x4)")
    assert errors(result) == {full("big"): f"no LNM can start it (64 MiB and 9 vCPUs): "
                                           f"lnm1, lnm2, lnm3: {cpus}"}


@pytest_twisted.ensureDeferred
async def test_overcommit_host_reservations_and_guaranteed_vms(tmp_path, client_grids):
    grid = await client_grids(lnms=1, cpus=2, memory_mib=1024, registrations=registrations(
        tmp_path, "roundrobin", "memory_overcommit = 2.0\nreserved_memory_mib = 256\n"))
    alice = await grid.connected("alice")
    # 1024 MiB - 256 reserved = 768 usable, x2 for ordinary VMs: six of 256 MiB
    result = await alice.start(cluster="a", count=7, args={"memory_mib": 256})
    await seen(alice, result)
    assert len(result["started"]) == 6
    assert errors(result) == {full("7.a"): (
        "no LNM can start it (256 MiB and 1 vCPU): lnm1: memory: needs 256 MiB, 0 MiB "
        "uncommitted (VMs' configured memory commits 768 of 1024 MiB, 256 reserved for the "
        "host, overcommit x2)")}
    await alice.delete(Selection(clusters=["a"]), {"force": True})

    # guaranteed VMs count in full, on physical CPUs and memory
    result = await alice.start(["g1"], args={"memory_mib": 256, "vcpus": 3,
                                             "guaranteed": "yes"})
    assert errors(result)[full("g1")].endswith(
        "lnm1: CPUs: needs 3 vCPUs, 2 uncommitted (VMs' vCPUs commit 0 of 2 CPUs, "
        "guaranteed: no overcommit)")
    result = await alice.start(["g2"], args={"memory_mib": 512, "guaranteed": "yes"})
    assert hosts_of(result) == {full("g2"): "lnm1"}
    # 768 - 512 guaranteed leaves 256 physical MiB: 512 MiB of ordinary VMs
    result = await alice.start(cluster="b", count=3, args={"memory_mib": 256})
    assert len(result["started"]) == 2
    assert "memory: needs 256 MiB, 0 MiB uncommitted" in errors(result)[full("3.b")]
    result = await alice.start(["g3"], args={"memory_mib": 256, "guaranteed": "yes"})
    assert errors(result)[full("g3")].endswith(
        "lnm1: memory: needs 256 MiB, 0 MiB uncommitted (VMs' configured memory commits 768 "
        "of 1024 MiB, 256 reserved for the host, guaranteed: no overcommit)")
    assert grid.controller.state.vms[full("g2")]["args"]["guaranteed"] == "yes"


@pytest_twisted.ensureDeferred
async def test_the_callers_suggestion_require_prefer_ignore_and_avoided_hosts(tmp_path,
                                                                              client_grids):
    grid = await client_grids(cpus=2, memory_mib=1024, registrations=registrations(tmp_path))
    root = await grid.connected("root")
    alice = await grid.connected("alice")
    result = await alice.start(cluster="a", count=2, lnms=["lnm2"], args={"memory_mib": 512})
    await seen(alice, result)
    assert set(hosts_of(result).values()) == {"lnm2"}
    result = await alice.start(["x"], lnms=["lnm2"], args={"memory_mib": 512})
    assert errors(result) == {full("x"): "no suggested LNM can start it (512 MiB and 1 vCPU): "
                                         "lnm2: memory: needs 512 MiB, 0 MiB uncommitted "
                                         "(VMs' configured memory commits 1024 of 1024 MiB)"}

    async def swap(text):
        await root.unregister_plugin("roundrobin")
        for event in PLACEMENT_EVENTS:
            await root.register_plugin("roundrobin", event,
                                       config_file(tmp_path, "roundrobin", text))

    await swap("suggestion = prefer\n")
    result = await alice.start(["y"], lnms=["lnm2"], args={"memory_mib": 512})
    assert hosts_of(result)[full("y")] in ("lnm1", "lnm3")
    await swap("suggestion = ignore\navoid = lnm1\n")
    result = await alice.start(cluster="b", count=4, lnms=["lnm1"], args={"memory_mib": 512})
    assert "round-robin: suggested LNMs are ignored by this site's policy" in result["notes"]
    assert set(hosts_of(result).values()) == {"lnm3"}
    assert "lnm1: being drained (listed in avoid); lnm2, lnm3: memory" in errors(result)[
        full("3.b")]
    # a migration never targets an avoided host
    moved = await alice.migrate([full("1.a")], [])
    assert moved["migrated"] == [] and "lnm1: being drained" in moved["failed"][0]["error"]


@pytest_twisted.ensureDeferred
async def test_a_vm_started_again_needs_room_on_its_own_host(tmp_path, client_grids):
    grid = await client_grids(lnms=2, cpus=2, memory_mib=1024,
                              registrations=registrations(tmp_path, "pack"))
    alice = await grid.connected("alice")
    await seen(alice, await alice.start(["old"], args={"memory_mib": 512}))
    await alice.shutdown([full("old")])
    await wait_for(lambda: alice.vms[full("old")]["state"] == states.SHUTOFF)
    result = await alice.start(cluster="new", count=2, args={"memory_mib": 512})
    await seen(alice, result)
    assert set(hosts_of(result).values()) == {"lnm1"}       # pack: the shut-off VM holds none
    result = await alice.start(["old"])
    assert errors(result) == {full("old"): "cannot start it again on its host lnm1: memory: "
                                           "needs 512 MiB, 0 MiB uncommitted (VMs' configured "
                                           "memory commits 1024 of 1024 MiB)"}
    await alice.delete([full("1.new")], {"force": True})
    result = await alice.start(["old"])
    assert hosts_of(result) == {full("old"): "lnm1"}


@pytest_twisted.ensureDeferred
async def test_a_vm_on_its_way_holds_room_on_its_target_until_it_arrives(tmp_path,
                                                                          client_grids):
    grid = await client_grids(lnms=2, cpus=2, memory_mib=1024,
                              registrations=registrations(tmp_path, "roundrobin"))
    alice = await grid.connected("alice")
    await seen(alice, await alice.start(["mover"], lnms=["lnm1"], args={"memory_mib": 768}))
    gate = defer.Deferred()
    grid.grid.to_lnm("lnm1").hang["export_image"] = gate     # the move stops half-way
    moving = defer.ensureDeferred(alice.migrate([full("mover")], ["lnm2"]))
    await wait_for(lambda: grid.controller.state.incoming == {full("mover"): "lnm2"})
    result = await alice.start(["late"], lnms=["lnm2"], args={"memory_mib": 512})
    assert errors(result) == {full("late"): "no suggested LNM can start it (512 MiB and 1 vCPU): "
                                            "lnm2: memory: needs 512 MiB, 256 MiB uncommitted "
                                            "(VMs' configured memory commits 768 of 1024 MiB)"}

    gate.callback(None)
    moved = await moving
    assert moved["migrated"] == [{"name": full("mover"), "from": "lnm1", "to": "lnm2"}]
    assert grid.controller.state.incoming == {}
    result = await alice.start(["late"], args={"memory_mib": 512})
    assert hosts_of(result) == {full("late"): "lnm1"}   # room only where it left


# -- round-robin, pack, spread ------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_pack_consolidates_onto_the_fewest_active_hosts(tmp_path, client_grids):
    grid = await client_grids(cpus=2, memory_mib=1024,
                              registrations=registrations(tmp_path, "pack"))
    alice = await grid.connected("alice")
    result = await alice.start(["first"], lnms=["lnm3"], args={"memory_mib": 256})
    assert hosts_of(result) == {full("first"): "lnm3"}
    result = await alice.start(cluster="web", count=5, args={"memory_mib": 256})
    # lnm3 fills up (4 x 256 MiB), then the largest idle host (by name) opens
    assert per_host(result) == {"lnm3": 3, "lnm1": 2}
    result = await alice.start(cluster="db", count=2, args={"memory_mib": 256})
    assert per_host(result) == {"lnm1": 2}


@pytest_twisted.ensureDeferred
async def test_spread_puts_a_clusters_vms_on_separate_hosts(tmp_path, client_grids):
    grid = await client_grids(registrations=registrations(tmp_path, "spread"))
    alice = await grid.connected("alice")
    await alice.start(cluster="other", count=2, lnms=["lnm1"])
    result = await alice.start(cluster="web", count=3)
    assert sorted(hosts_of(result).values()) == ["lnm1", "lnm2", "lnm3"]
    assert result["notes"] == []
    result = await alice.start(cluster="web", count=2)
    # the emptiest hosts get the second VMs of the cluster, and the user is told
    assert sorted(hosts_of(result).values()) == ["lnm2", "lnm3"]
    assert result["notes"] == ["spread: cluster web has more VMs than hosts with room; "
                               "some VMs share a host"]


@pytest_twisted.ensureDeferred
async def test_strict_spread_refuses_hosts_already_running_the_cluster(tmp_path, client_grids):
    grid = await client_grids(registrations=registrations(tmp_path, "spread", "strict = yes\n"))
    alice = await grid.connected("alice")
    result = await alice.start(cluster="db", count=4)
    assert len(result["started"]) == 3
    one = "already runs 1 VM of virtual cluster db (spread is strict)"
    assert errors(result) == {full("4.db"): f"no LNM can start it (256 MiB and 1 vCPU): "
                                            f"lnm1, lnm2, lnm3: {one}"}


@pytest_twisted.ensureDeferred
async def test_swapping_the_placement_policy_while_running(tmp_path, client_grids):
    grid = await client_grids(registrations=registrations(tmp_path, "roundrobin"))
    root = await grid.connected("root")
    alice = await grid.connected("alice")
    result = await alice.start(cluster="rr", count=3)
    assert sorted(hosts_of(result).values()) == ["lnm1", "lnm2", "lnm3"]

    await root.unregister_plugin("roundrobin")
    for event in PLACEMENT_EVENTS:
        await root.register_plugin("pack", event)
    result = await alice.start(cluster="packed", count=3)
    assert len(set(hosts_of(result).values())) == 1

    await root.unregister_plugin("pack")
    for event in PLACEMENT_EVENTS:
        await root.register_plugin("spread", event)
    result = await alice.start(cluster="spread", count=3)
    assert sorted(hosts_of(result).values()) == ["lnm1", "lnm2", "lnm3"]

    await root.unregister_plugin("spread")
    result = await alice.start(["nowhere"])
    assert errors(result) == {full("nowhere"): "no placement: no plugin placed it"}


# -- least-loaded ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_least_loaded_follows_the_monitoring_figures(tmp_path, client_grids):
    grid = await client_grids(cpus=2, registrations=registrations(tmp_path, "leastloaded",
                                                                  "max_load = 0.5\n"))
    monitoring = FakeMonitoring(grid.controller.monitoring, hosts={"lnm1": 90.0,
                                                                   "lnm2": 10.0})
    grid.controller.monitoring = monitoring
    alice = await grid.connected("alice")
    result = await alice.start(["a"])
    assert hosts_of(result) == {full("a"): "lnm2"} and result["notes"] == []
    # lnm2 at 10 % plus one new busy vCPU of 2 = 60 %: over max_load for a second
    # VM; lnm1 is over it already; lnm3 reports nothing and comes last
    result = await alice.start(cluster="b", count=2)
    assert hosts_of(result) == {full("1.b"): "lnm2", full("2.b"): "lnm3"}
    assert result["notes"] == ["least-loaded: no load data from lnm3; VMs placed there by "
                               "allocated capacity"]
    monitoring.hosts = {"lnm1": 20.0, "lnm2": 5.0, "lnm3": 45.0}
    result = await alice.start(cluster="c", count=3)
    assert hosts_of(result) == {full("1.c"): "lnm2", full("2.c"): "lnm1", full("3.c"): "lnm3"}


@pytest_twisted.ensureDeferred
async def test_least_loaded_refusals_name_each_lnm_including_missing_figures(tmp_path,
                                                                            client_grids):
    grid = await client_grids(cpus=2, registrations=registrations(
        tmp_path, "leastloaded", "max_load = 0.5\nwithout_data = refuse\n"))
    monitoring = FakeMonitoring(grid.controller.monitoring, hosts={"lnm1": 90.0,
                                                                   "lnm2": 10.0})
    grid.controller.monitoring = monitoring
    alice = await grid.connected("alice")
    result = await alice.start(cluster="b", count=2)
    assert hosts_of(result) == {full("1.b"): "lnm2"}
    assert errors(result) == {full("2.b"): (
        "no LNM can start it (256 MiB and 1 vCPU): lnm1: load 0.90 is at or above the limit "
        "0.50 (1-minute CPU average); lnm2: load 0.60 is at or above the limit 0.50 "
        "(1-minute CPU average); lnm3: no load data (no recent 1-minute CPU average from "
        "its LNM)")}
    monitoring.age = 1000      # stale figures are no figures
    result = await alice.start(["c"])
    assert "lnm1, lnm2, lnm3: no load data" in errors(result)[full("c")]
    # the real monitoring, before any LNM has reported: no data anywhere
    grid.controller.monitoring = monitoring._real
    result = await alice.start(["d"])
    assert "lnm1, lnm2, lnm3: no load data" in errors(result)[full("d")]


# -- limits -------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_limits_do_the_best_they_can_and_report_what_was_done(tmp_path, client_grids):
    grid = await client_grids(registrations=registrations(
        tmp_path, authz="limits",
        authz_config="max_vms_per_user = 5\nmax_vms_per_cluster = 3\n"))
    root = await grid.connected("root")
    alice = await grid.connected("alice")
    assert len((await alice.start(cluster="a", count=3))["started"]) == 3
    result = await alice.start(cluster="a", count=2)
    assert result["started"] == []
    assert errors(result) == {
        full("4.a"): "over the limit: at most 3 VMs per virtual cluster (a has 3)",
        full("5.a"): "over the limit: at most 3 VMs per virtual cluster (a has 3)"}
    assert result["notes"] == ["limits: 0 of 2 VMs allowed; 2 left out (at most 3 VMs per "
                               "virtual cluster (a has 3))"]
    result = await alice.start(cluster="b", count=4)
    assert sorted(hosts_of(result)) == [full("1.b"), full("2.b")]
    assert errors(result)[full("3.b")] == "over the limit: at most 5 VMs per user (alice has 5)"
    assert result["notes"] == ["limits: 2 of 4 VMs allowed; 2 left out (at most 5 VMs per "
                               "user (alice has 5))"]
    # administrators are exempt (admins_exempt), also when starting for a user
    assert len((await root.start(cluster="big", count=8))["started"]) == 8


@pytest_twisted.ensureDeferred
async def test_limits_on_memory_count_vms_started_again(tmp_path, client_grids):
    grid = await client_grids(registrations=registrations(
        tmp_path, authz="limits", authz_config="max_memory_per_user = 1024\n"
                                              "[users]\n[[bob]]\nmax_memory_per_user = 0\n"))
    alice = await grid.connected("alice")
    bob = await grid.connected("bob")
    result = await alice.start(cluster="m", count=3, args={"memory_mib": 512})
    await seen(alice, result)
    assert len(result["started"]) == 2
    assert errors(result)[full("3.m")] == (
        "over the limit: at most 1024 MiB of memory per user (alice's running VMs use "
        "1024 MiB, this VM needs 512 MiB)")
    await alice.shutdown([full("1.m")])
    await wait_for(lambda: alice.vms[full("1.m")]["state"] == states.SHUTOFF)
    assert len((await alice.start(["extra"], args={"memory_mib": 512}))["started"]) == 1
    result = await alice.start(["1.m"])          # started again: counted too
    assert "at most 1024 MiB of memory per user" in errors(result)[full("1.m")]
    assert grid.controller.state.vms[full("1.m")]["state"] == states.SHUTOFF
    # bob's override lifts the limit for him
    assert len((await bob.start(cluster="m", count=3, args={"memory_mib": 512}))["started"]) \
        == 3


@pytest_twisted.ensureDeferred
async def test_limits_roles_and_what_queries_return(tmp_path, client_grids):
    grid = await client_grids(registrations=registrations(
        tmp_path, authz="limits", authz_config="denied = reboot\nguarantees_for = admins\n"
                                              "max_vcpus_per_vm = 2\n"))
    root = await grid.connected("root")
    alice = await grid.connected("alice")
    bob = await grid.connected("bob")
    await seen(alice, await alice.start(["a1"], lnms=["lnm1"]))
    await bob.start(["b1"])
    await seen(root, await root.start(["r1"], lnms=["lnm1"]))
    with pytest.raises(Rejected, match=r"only administrators may migrate VMs \(rejected by "
                                       r"limits\)"):
        await alice.migrate([full("a1")], ["lnm2"])
    moved = await root.migrate(["r1"], ["lnm2"])
    assert moved["migrated"] == [{"name": full("r1", "root"), "from": "lnm1", "to": "lnm2"}]
    with pytest.raises(Rejected, match="reboot requests are disabled by this site's policy"):
        await root.reboot(["r1"])
    with pytest.raises(Rejected, match="guaranteed resources are not available to you"):
        await alice.start(["g"], args={"guaranteed": "yes"})
    assert len((await root.start(["g"], args={"guaranteed": "yes"}))["started"]) == 1
    with pytest.raises(Rejected, match=r"a VM may have at most 2 vCPUs \(asked for 4\)"):
        await alice.start(["wide"], args={"vcpus": 4})
    # ordinary users see their own VMs; administrators see everything
    assert [r["name"] for r in await alice.list(remote=True)] == [full("a1")]
    assert {r["name"] for r in await root.list(remote=True)} == {
        full("a1"), full("b1", "bob"), full("g", "root"), full("r1", "root")}


@pytest_twisted.ensureDeferred
async def test_limits_reject_mode_and_open_queries(tmp_path, client_grids):
    # list_scope = all shows what the site's user_visibility lets users see.
    grid = await client_grids(registrations=registrations(
        tmp_path, authz="limits", authz_config="on_excess = reject\nmax_vms_per_user = 3\n"
                                              "list_scope = all\nadmin_only =\n"),
        controller_options={"user_visibility": "all"})
    alice = await grid.connected("alice")
    bob = await grid.connected("bob")
    await bob.start(["b1"])
    with pytest.raises(Rejected, match=r"the request exceeds your limits: at most 3 VMs per "
                                       r"user \(alice has 3\) \(1 of 4 VMs over the limit\)"):
        await alice.start(cluster="x", count=4)
    assert not grid.controller.state.owned_by("alice")
    await seen(alice, await alice.start(cluster="x", count=2, lnms=["lnm1"]))
    assert {r["name"] for r in await alice.list(remote=True)} == {
        full("1.x"), full("2.x"), full("b1", "bob")}
    moved = await alice.migrate([full("1.x")], ["lnm2"])      # admin_only is empty
    assert moved["migrated"][0]["to"] == "lnm2"


@pytest_twisted.ensureDeferred
async def test_limits_destroy_covers_delete(tmp_path, client_grids):
    """A site configured before issue 17 (limits on destroy_request only, when
    destroy removed VMs): its destroy restrictions cover delete too."""
    from plugins.limits import Plugin
    from usher.controller.events import Event, Request
    regs = registrations(tmp_path, authz="limits", authz_config="admin_only = destroy\n")
    regs["limits"]["events"] = ["destroy_request"]
    grid = await client_grids(registrations=regs)
    root = await grid.connected("root")
    alice = await grid.connected("alice")
    await seen(alice, await alice.start(["a1"]))
    await seen(root, await root.start(["r1"]))
    with pytest.raises(Rejected, match=r"only administrators may delete VMs \(rejected by "
                                       r"limits\)"):
        await alice.op_on("delete", [full("a1")], {"force": True})
    assert sorted(grid.controller.state.vms) == [full("a1"), full("r1", "root")]
    deleted = await root.op_on("delete", [full("a1")], {"force": True})
    assert deleted["done"] == [{"name": full("a1"), "state": None}], deleted
    # denied = destroy: nobody deletes either.
    plugin = Plugin({"denied": ["destroy"]}, grid.controller.api)
    request = Request("delete", "root", admin=True, vms=[full("r1", "root")])
    plugin.entry_point(Event("delete_request", grid.controller.api, request=request))
    assert request.rejected == "delete requests are disabled by this site's policy"


@pytest_twisted.ensureDeferred
async def test_limits_refuses_a_bad_configuration(tmp_path, client_grids):
    grid = await client_grids()
    root = await grid.connected("root")
    bad = config_file(tmp_path, "limits", "admin_only = migrate, teleport\n")
    with pytest.raises(ConfigError, match=r"limits: admin_only: unknown request kind\(s\) "
                                          r"'teleport'"):
        await root.register_plugin("limits", "start_request", bad)
    with pytest.raises(InvalidRequest, match="no such plugin"):
        await root.register_plugin("limit", "start_request")


# -- rebalancer ---------------------------------------------------------------------------------

async def rebalancer_grid(client_grids, tmp_path, text, **grid_kwargs):
    grid = await client_grids(registrations=registrations(tmp_path), **grid_kwargs)
    grid.controller.chains.clock = task.Clock()      # the timer's clock
    plugin = grid.registry.register("rebalancer", "timer",
                                    config_file(tmp_path, "rebalancer", text))
    for event in ("lnm_connected", "lnm_disconnected", "vm_removed"):
        grid.registry.register("rebalancer", event, config_file(tmp_path, "rebalancer", text))
    plugin.clock = task.Clock()                      # settling and migration timeouts
    return grid, plugin


def where(grid, *names):
    return [grid.controller.state.vms[n]["lnm"] for n in names]


@pytest_twisted.ensureDeferred
async def test_rebalancer_moves_a_vm_off_a_host_under_sustained_load(tmp_path, client_grids):
    grid, plugin = await rebalancer_grid(client_grids, tmp_path,
                                         "interval = 10\nsustain = 2\nbalance = never\n")
    alice = await grid.connected("alice")
    await alice.start(cluster="hot", count=2, lnms=["lnm1"])
    monitoring = FakeMonitoring(grid.controller.monitoring,
                                hosts={"lnm1": 95.0, "lnm2": 20.0, "lnm3": 55.0})
    grid.controller.monitoring = monitoring
    timers = grid.controller.chains.clock
    timers.advance(10)                     # one pass above high_load: not sustained yet
    assert plugin.history == []
    monitoring.hosts["lnm1"] = 50.0        # a dip resets the count
    timers.advance(10)
    monitoring.hosts["lnm1"] = 95.0
    timers.advance(10)
    assert plugin.history == []
    timers.advance(10)
    # the smallest VM (by name among equals) goes to the least loaded host
    # whose load stays under target_load (lnm3 at 55 % + 1/8 would not)
    assert [(m.vm, m.source, m.target) for m in plugin.history] == [
        (full("1.hot"), "lnm1", "lnm2")]
    await plugin.idle()
    assert plugin.history[0].outcome == "migrated"
    assert where(grid, full("1.hot"), full("2.hot")) == ["lnm2", "lnm1"]
    await wait_for(lambda: alice.vms.get(full("1.hot"), {}).get("lnm") == "lnm2")  # seen
    timers.advance(10)                     # the count starts again after a move
    assert len(plugin.history) == 1
    # with per-VM figures, the busiest VM goes
    monitoring.vms = {full("2.hot"): 300.0}
    await alice.start(["cool"], lnms=["lnm1"])
    timers.advance(20)
    assert [m.vm for m in plugin.history] == [full("1.hot"), full("2.hot")]
    await plugin.idle()


@pytest_twisted.ensureDeferred
async def test_rebalancer_failing_and_hanging_migrations_do_not_block_the_rest(tmp_path,
                                                                              client_grids):
    grid, plugin = await rebalancer_grid(
        client_grids, tmp_path, "interval = 10\nsustain = 1\nbalance = never\nmax_concurrent = 2\n"
        "max_per_pass = 3\nmigration_timeout = 60\nretry_after = 1000\n", lnms=4)
    alice = await grid.connected("alice")
    for vm, host in (("a", "lnm1"), ("b", "lnm2"), ("c", "lnm3")):
        await alice.start([vm], lnms=[host])
    grid.controller.monitoring = FakeMonitoring(
        grid.controller.monitoring, hosts={"lnm1": 99.0, "lnm2": 98.0, "lnm3": 97.0,
                                           "lnm4": 0.0})
    grid.grid.to_lnm("lnm1").broken = True           # a's migration fails
    hung = defer.Deferred()
    grid.grid.to_lnm("lnm2").hang["export_image"] = hung    # b's migration never ends

    timers = grid.controller.chains.clock
    timers.advance(10)
    assert [m.vm for m in plugin.history] == [full("a"), full("b")]   # two slots
    await wait_for(lambda: plugin.history[0].outcome is not None)
    assert plugin.history[0].outcome == "failed"
    assert "export_image: peer disconnected" in plugin.history[0].error
    timers.advance(10)      # a's failure freed a slot: c moves while b still hangs
    assert [m.vm for m in plugin.history] == [full("a"), full("b"), full("c")]
    await wait_for(lambda: plugin.history[2].outcome is not None)
    assert plugin.history[2].outcome == "migrated" and where(grid, full("c")) == ["lnm4"]
    timers.advance(10)      # a is left alone after failing; b holds a slot
    assert len(plugin.history) == 3
    plugin.clock.advance(60)
    assert plugin.history[1].outcome == "timed out" and not plugin.in_flight
    hung.errback(Unavailable("export_image: gave up"))
    await wait_for(lambda: plugin.history[1].outcome == "failed")
    assert grid.controller.state.vms[full("b")]["state"] == states.RUN


@pytest_twisted.ensureDeferred
async def test_rebalancer_balances_when_a_host_joins_and_drains_hosts(tmp_path, client_grids):
    grid, plugin = await rebalancer_grid(
        client_grids, tmp_path, "interval = 10\nmax_concurrent = 4\nsettle = 5\n",
        lnms=2, cpus=2, memory_mib=1024)
    alice = await grid.connected("alice")
    await alice.start(cluster="w", count=4, lnms=["lnm1"])
    await grid.grid.add_lnm("lnm3")
    plugin.clock.advance(4)
    assert plugin.history == []            # waits for changes to settle
    plugin.clock.advance(1)
    assert [(m.source, m.target) for m in plugin.history] == [("lnm1", "lnm2"),
                                                              ("lnm1", "lnm3")]
    await plugin.idle()
    names = [full(f"{i}.w") for i in range(1, 5)]
    assert sorted(where(grid, *names)) == ["lnm1", "lnm1", "lnm2", "lnm3"]

    grid.registry.unregister("rebalancer")
    plugin = grid.registry.register("rebalancer", "timer", config_file(
        tmp_path, "rebalancer", "interval = 10\ndrain = lnm1\nbalance = never\n"))
    grid.controller.chains.clock.advance(10)
    await plugin.idle()
    assert "lnm1" not in where(grid, *names)
    assert {m.reason for m in plugin.history} == {"draining lnm1"}
