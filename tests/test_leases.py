"""Leases through the in-process grid and real clients: the start's lease
and the site's policy, warnings to the owner's sessions only, the expiry
action, persistence across a controller restart, renewals and their bound,
hostile query arguments -- on a task.Clock."""

import pytest
import pytest_twisted
from twisted.internet import task

from usher.cliargs import duration_seconds, format_duration
from usher.controller.plugin_api import thread_pool_runner
from usher.errors import ConfigError, InvalidRequest, NoSuchVM, PermissionDenied, Rejected

from tests.e2e import wait_for
from tests.grid import DOMAIN
from tests.test_plugins_policies import config_file, full, registrations

LEASE_EVENTS = ("start_request", "start_complete", "vm_removed", "timer")


def test_durations_read_and_spell_back():
    assert [duration_seconds(t) for t in ("90s", "30m", "2h", "1d", "1h30m", "600", " 2H ")] == [
        90, 1800, 7200, 86400, 5400, 600, 7200]
    assert [format_duration(s) for s in (90, 5400, 86400, 0)] == ["1m30s", "1h30m", "1d", "0s"]
    for bad in ("", "h", "2x", "30m1h", "1h1h", "-5m", "2 h", "\u00b2", "1.5h", None, True,
                "9" * 40):
        with pytest.raises(ValueError):
            duration_seconds(bad)
    with pytest.raises(ValueError, match="shorter than 1s"):
        duration_seconds("0s")
    with pytest.raises(ValueError, match="longer than 366d"):
        duration_seconds("400d")


class Notices:
    """What one client was told (its notices), as ush would print them."""

    def __init__(self, client):
        self.seen = []
        client.on_connection(lambda state, detail: state == "notice"
                             and self.seen.append(detail))


async def lease_grid(client_grids, tmp_path, text="", *, state_dir=None, **kwargs):
    options = {"state_dir": str(state_dir)} if state_dir is not None else {}
    grid = await client_grids(registrations=registrations(tmp_path),
                              controller_options=options, **kwargs)
    grid.controller.api.run_in_thread = thread_pool_runner(_reactor(), grid.grid.pool)
    clock = task.Clock()
    clock.advance(1_000_000)
    plugin = register(grid, tmp_path, text, clock)
    await plugin.store.loaded
    return grid, plugin, clock


def _reactor():
    from twisted.internet import reactor
    return reactor


def register(grid, tmp_path, text, clock):
    path = config_file(tmp_path, "leases", text or "# defaults\n")
    grid.controller.chains.clock = task.Clock()         # the timer's own clock (not used)
    plugin = None
    for event in LEASE_EVENTS:
        plugin = grid.registry.register("leases", event, path)
    plugin.clock = clock
    return plugin


@pytest_twisted.ensureDeferred
async def test_a_lease_warns_its_owner_only_then_its_action_runs(tmp_path, client_grids):
    grid, plugin, clock = await lease_grid(client_grids, tmp_path,
                                           "warn_before = 1h, 10m\naction = shutdown\n")
    alice, alice2, bob = [await grid.connected(u) for u in ("alice", "alice", "bob")]
    told = [Notices(c) for c in (alice, alice2, bob)]
    result = await alice.start(cluster="web", count=2, args={"lease": "2h"})
    assert len(result["started"]) == 2
    assert any("lease: 2h" in note for note in result["notes"])
    await bob.start(["b1"])                              # no lease (no default)
    assert sorted(plugin.leases) == [full("1.web"), full("2.web")]
    assert "lease" not in grid.controller.state.vms[full("1.web")]["args"]

    clock.advance(duration_seconds("50m"))              # 1h10m left: nothing yet
    await plugin.tick()
    clock.advance(duration_seconds("11m"))              # 59m left: the 1h warning
    await plugin.tick()
    await plugin.tick()                                  # once only
    await wait_for(lambda: len(told[0].seen) == 1 and len(told[1].seen) == 1)
    assert told[0].seen == told[1].seen
    assert told[0].seen[0].startswith("lease: the leases of 2 VMs end (1.web.alice")
    assert "in 59m" in told[0].seen[0] and "shut down" in told[0].seen[0]
    clock.advance(duration_seconds("50m"))              # 9m left: the 10m warning
    await plugin.tick()
    await wait_for(lambda: len(told[0].seen) == 2)

    clock.advance(duration_seconds("10m"))              # ended
    await plugin.tick()
    await plugin.idle()
    assert plugin.actions == [("shutdown", [full("1.web"), full("2.web")])]
    assert {grid.controller.state.vms[full(n)]["state"] for n in ("1.web", "2.web")} == {
        "shutoff"}
    assert plugin.leases == {}
    await wait_for(lambda: any("were shut down" in n for n in told[0].seen))
    assert grid.controller.state.vms[full("b1", "bob")]["state"] == "run"
    await grid.grid.settle()
    assert told[2].seen == []                            # never another user's news


@pytest_twisted.ensureDeferred
async def test_the_timer_drives_the_leases_and_delete_removes_the_vm(tmp_path, client_grids):
    grid, plugin, clock = await lease_grid(client_grids, tmp_path,
                                           "interval = 30\naction = delete\n"
                                           "default_lease = 90s\n")
    alice = await grid.connected("alice")
    await alice.start(["short"])
    timers = grid.controller.chains.clock
    plugin.clock = timers                                # one clock for both
    plugin.store.leases[full("short")]["expires"] = timers.seconds() + 90
    timers.advance(30)
    timers.advance(30)
    assert full("short") in grid.controller.state.vms
    timers.advance(30)
    await plugin.idle()
    assert full("short") not in grid.controller.state.vms     # running: forced
    assert plugin.actions == [("delete", [full("short")])]


@pytest_twisted.ensureDeferred
async def test_a_destroy_action_powers_the_vm_off_and_keeps_it(tmp_path, client_grids):
    from twisted.logger import LogLevel, globalLogPublisher
    warnings = []

    def observe(event):
        if (event.get("log_namespace") == "usher.plugins.leases"
                and event.get("log_level") == LogLevel.warn):
            warnings.append(event["log_format"])
    globalLogPublisher.addObserver(observe)
    try:
        grid, plugin, clock = await lease_grid(client_grids, tmp_path, "action = destroy\n")
    finally:
        globalLogPublisher.removeObserver(observe)
    # Once, at configure time: destroy no longer removes (issue 17).
    assert warnings == ["leases: action = destroy powers an expired VM off and keeps it, with "
                        "its disk, IP address and DNS name (destroy no longer removes VMs); "
                        "for the expired VMs to be removed, set action = delete"]
    alice = await grid.connected("alice")
    told = Notices(alice)
    await alice.start(["kept"], args={"lease": "1h"})
    clock.advance(3600)
    await plugin.tick()
    await plugin.idle()
    assert grid.controller.state.vms[full("kept")]["state"] == "shutoff"
    assert plugin.actions == [("destroy", [full("kept")])]
    await wait_for(lambda: any("powered off" in n for n in told.seen))


@pytest_twisted.ensureDeferred
async def test_policy_required_default_and_max(tmp_path, client_grids):
    grid, plugin, clock = await lease_grid(client_grids, tmp_path,
                                           "required = yes\nmax_lease = 1d\n")
    alice = await grid.connected("alice")
    with pytest.raises(Rejected, match="requires a lease on every VM: start with --lease "
                                       r"DURATION \(at most 1d\)"):
        await alice.start(["a"])
    with pytest.raises(Rejected, match=r"a lease of 2d is longer than this site allows "
                                       r"\(max_lease 1d\)"):
        await alice.start(["a"], args={"lease": "2d"})
    with pytest.raises(Rejected, match="lease: 'soon' is not a duration"):
        await alice.start(["a"], args={"lease": "soon"})
    assert grid.controller.state.vms == {}
    await alice.start(["a"], args={"lease": "1d"})
    assert plugin.leases[full("a")]["expires"] == clock.seconds() + 86400


def test_bad_configurations_name_the_key(tmp_path):
    from usher.plugins.leases.policy import LeasePolicy
    for text, key in (({"max_lease": "forever"}, "max_lease"),
                      ({"warn_before": ["1h", "x"]}, "warn_before"),
                      ({"default_lease": "2d", "max_lease": "1d"}, "default_lease")):
        with pytest.raises(ConfigError, match=f"leases: {key}: "):
            LeasePolicy(text)


@pytest_twisted.ensureDeferred
async def test_a_bad_configuration_file_is_refused_naming_it(tmp_path, client_grids):
    grid = await client_grids(registrations=registrations(tmp_path))
    path = config_file(tmp_path, "leases", "max_lease = 3 weeks\n")
    with pytest.raises(ConfigError, match=r"leases-.*\.config: leases: max_lease: "):
        grid.registry.register("leases", "start_request", path)


@pytest_twisted.ensureDeferred
async def test_renewals_owner_admin_and_the_bound(tmp_path, client_grids):
    grid, plugin, clock = await lease_grid(client_grids, tmp_path,
                                           "max_lease = 4h\nwarn_before = 1h, 10m\n")
    alice, bob, root = [await grid.connected(u) for u in ("alice", "bob", "root")]
    await alice.start(cluster="web", count=2, args={"lease": "30m"})
    await bob.start(["b1"], args={"lease": "1h"})
    now = clock.seconds()
    mine = await alice.query("leases.list")
    assert [(r["name"], r["remaining"]) for r in mine] == [(full("1.web"), 1800),
                                                           (full("2.web"), 1800)]
    assert {r["name"] for r in await root.query("leases.list")} == {
        full("1.web"), full("2.web"), full("b1", "bob")}
    # A 30-minute lease is not warned of as ending within the hour.
    assert plugin.leases[full("1.web")]["warned"] == [3600]

    renewed = await alice.query("leases.renew", cluster="web", duration="3h")
    assert [r["expires"] for r in renewed] == [now + 3 * 3600] * 2
    assert plugin.leases[full("1.web")]["warned"] == []
    renewed = await alice.query("leases.renew", vms=["1.web"], duration="4h")
    assert renewed[0]["name"] == full("1.web") and renewed[0]["remaining"] == 4 * 3600
    with pytest.raises(Rejected, match=r"longer than this site allows \(max_lease 4h\)"):
        await alice.query("leases.renew", vms=["1.web"], duration="4h1s")
    with pytest.raises(PermissionDenied, match="b1.bob.usher.test does not belong to alice"):
        await alice.query("leases.renew", vms=[full("b1", "bob")], duration="1h")
    with pytest.raises(PermissionDenied, match="only administrators"):
        await alice.query("leases.list", cluster="default", owner="bob")
    with pytest.raises(NoSuchVM):
        await alice.query("leases.renew", vms=["nosuch"], duration="1h")
    assert plugin.leases[full("b1", "bob")]["expires"] == now + 3600
    again = await root.query("leases.renew", vms=[full("b1", "bob")], duration="2h")
    assert again[0]["owner"] == "bob" and again[0]["remaining"] == 7200
    # A VM without a lease is shown as such, and may be given one.
    await alice.start(["free"])
    shown = await alice.query("leases.list", vms=["free"])
    assert shown[0]["expires"] is None
    await alice.query("leases.renew", vms=["free"], duration="1h")
    assert plugin.leases[full("free")]["expires"] == clock.seconds() + 3600


@pytest_twisted.ensureDeferred
async def test_hostile_query_arguments_are_refused(tmp_path, client_grids):
    grid, plugin, clock = await lease_grid(client_grids, tmp_path)
    alice = await grid.connected("alice")
    await alice.start(["a"], args={"lease": "1h"})
    before = dict(plugin.leases[full("a")])
    hostile = [
        ("leases.renew", {"vms": ["a"]}, "duration is missing"),
        ("leases.renew", {"duration": "1h"}, "name the VMs"),
        ("leases.renew", {"vms": ["a"], "duration": 3600.5}, "duration"),
        ("leases.renew", {"vms": ["a"], "duration": ["1h"]}, "duration"),
        ("leases.renew", {"vms": ["a"], "duration": "-1h"}, "not a duration"),
        ("leases.renew", {"vms": ["a"], "duration": "0s"}, "shorter than"),
        ("leases.renew", {"vms": "a", "duration": "1h"}, "non-empty list"),
        ("leases.renew", {"vms": [], "duration": "1h"}, "non-empty list"),
        ("leases.renew", {"vms": [7], "duration": "1h"}, "strings"),
        ("leases.renew", {"vms": ["x" * 300], "duration": "1h"}, "strings of 1 to 255"),
        ("leases.renew", {"vms": ["a"] * 1001, "duration": "1h"}, "at most 1000"),
        ("leases.renew", {"vms": ["a"], "cluster": "c", "duration": "1h"}, "not both"),
        ("leases.renew", {"cluster": "Bad Name!", "duration": "1h"}, "invalid cluster"),
        ("leases.renew", {"cluster": {"x": 1}, "duration": "1h"}, "cluster"),
        ("leases.renew", {"vms": ["a"], "duration": "1h", "expires": 1e18}, "unknown arg"),
        ("leases.list", {"owner": "../root"}, "invalid user"),
        ("leases.list", {"owner": 5}, "owner must be"),
        ("leases.list", {"vms": ["a.bob." + DOMAIN]}, "does not belong"),
    ]
    for query, args, message in hostile:
        with pytest.raises((InvalidRequest, PermissionDenied, NoSuchVM), match=message):
            await alice.query(query, **args)
    assert plugin.leases[full("a")] == before


@pytest_twisted.ensureDeferred
async def test_leases_survive_a_controller_restart(tmp_path, client_grids):
    state_dir = tmp_path / "ctrl-state"
    grid, plugin, clock = await lease_grid(client_grids, tmp_path, state_dir=state_dir)
    alice = await grid.connected("alice")
    await alice.start(cluster="keep", count=2, args={"lease": "2h"})
    await alice.start(["gone"], args={"lease": "1h"})
    expires = plugin.leases[full("1.keep")]["expires"]
    await plugin.store.flushed()
    assert (state_dir / "leases.json").exists()
    grid.registry.unregister_all()

    # A new controller (its state rebuilt from the LNMs: "gone" did not come back).
    from usher.config import load_plugin_config
    from usher.controller.core import Controller
    from usher.controller.plugins import PluginRegistry
    restarted = Controller(domain=DOMAIN, clock=_reactor(), admins=["root"],
                           state_dir=str(state_dir))
    restarted.plugins = PluginRegistry(restarted.chains, restarted.api,
                                       load_config=load_plugin_config)
    restarted.api.run_in_thread = grid.controller.api.run_in_thread
    for name in (full("1.keep"), full("2.keep")):
        old = grid.controller.state.vms[name]
        restarted.state.add(restarted.state.new_record(
            name, state=old["state"], lnm=old["lnm"], cluster=old["cluster"],
            memory_mib=old["memory_mib"], vcpus=old["vcpus"], uuid=old["uuid"]))
    path = config_file(tmp_path, "leases", "# defaults\n")
    again = None
    for event in LEASE_EVENTS:
        again = restarted.plugins.register("leases", event, path)
    try:
        again.clock = clock
        await again.store.loaded
        assert again.leases[full("1.keep")]["expires"] == expires
        assert full("gone") in again.leases
        await again.tick()                              # settled: "gone" is dropped
        assert sorted(again.leases) == [full("1.keep"), full("2.keep")]
        await again.store.flushed()
        from usher.persist import read_json
        assert sorted(read_json(str(state_dir / "leases.json"))["leases"]) == [
            full("1.keep"), full("2.keep")]
    finally:
        restarted.plugins.unregister_all()


@pytest_twisted.ensureDeferred
async def test_a_vm_removed_takes_its_lease_and_a_vm_at_rest_simply_ends(tmp_path,
                                                                         client_grids):
    grid, plugin, clock = await lease_grid(client_grids, tmp_path)
    alice = await grid.connected("alice")
    told = Notices(alice)
    await alice.start(["x", "y"], args={"lease": "1h"})
    await alice.delete([full("x")], {"force": True})
    assert list(plugin.leases) == [full("y")]
    await alice.shutdown([full("y")])
    clock.advance(3600)
    await plugin.tick()
    await plugin.idle()
    assert plugin.leases == {}
    await wait_for(lambda: any("was already at rest" in n for n in told.seen))


@pytest_twisted.ensureDeferred
async def test_an_ha_restart_keeps_the_lease_even_where_one_is_required(tmp_path, client_grids):
    """The VM restarted off a fenced host is the same VM: neither refused for
    want of a lease nor given a fresh one."""
    grid, plugin, clock = await lease_grid(client_grids, tmp_path,
                                           "required = yes\ndefault_lease = 1h\n")
    alice = await grid.connected("alice")
    result = await alice.start(["h1"], lnms=["lnm1"], args={"lease": "2h"})
    assert [s["lnm"] for s in result["started"]] == ["lnm1"]
    expires = plugin.leases[full("h1")]["expires"]
    clock.advance(600)
    c = grid.controller
    grid.grid.cut("lnm1")
    await wait_for(lambda: c.state.vms[full("h1")]["state"] == "lost")
    c.confirm_fenced("lnm1", evidence="pdu off", by="root")
    restarted = await c.restart_elsewhere([full("h1")])
    assert restarted["failed"] == [] and restarted["started"][0]["lnm"] != "lnm1"
    assert plugin.leases[full("h1")]["expires"] == expires
