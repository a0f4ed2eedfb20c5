"""Maintenance mode and evacuation (usher.controller.maintenance) on an
in-process grid of real libvirt test hosts (tests/grid.py): holds, bounded
concurrency, VMs that cannot move and why, leaving maintenance, resuming
after a controller restart."""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from usher import states
from usher.controller.core import Controller
from usher.controller.known_lnms import KnownLNMs
from usher.controller.recovery import Recovery
from usher.errors import InvalidRequest, NoSuchLNM
from usher.vmset import Selection

from tests.e2e import wait_for
from tests.grid import DOMAIN, Grid
from tests.test_failures_controller import hosts_of


@pytest_twisted.async_yield_fixture
async def grid(tmp_path):
    g = Grid(reactor, tmp_path, controller_options={
        "known_lnms": KnownLNMs(str(tmp_path / "lnms.json"))})
    await g.start()
    yield g
    await g.stop()


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


async def start_on(grid, lnm, count, cluster="web"):
    result = await grid.controller.start("alice", False, [], [lnm],
                                         {"cluster": cluster, "count": count})
    assert result["failed"] == [], result
    return sorted(s["name"] for s in result["started"])


@pytest_twisted.ensureDeferred
async def test_an_evacuation_moves_every_vm_off_and_nothing_lands_there(grid):
    c = grid.controller
    names = await start_on(grid, "lnm1", 6)
    status = await c.maintenance.set("lnm1", True, by="root", reason="new disks",
                                     evacuate=True)
    assert status["maintenance"] and status["reason"] == "new disks"
    await c.maintenance.wait("lnm1")
    status = c.maintenance.status("lnm1")
    assert status["done"] and not status["evacuating"]
    assert status["total"] == 6 and status["failed"] == [] and status["waiting"] == 0
    assert sorted(m["name"] for m in status["moved"]) == names
    assert all(m["to"] in ("lnm2", "lnm3") for m in status["moved"])
    assert c.state.lnms["lnm1"].vms == set()
    for name in names:
        assert len(await hosts_of(grid, name)) == 1
        assert await hosts_of(grid, name) != ["lnm1"]
    # Still held: new VMs go elsewhere, and one asked for there is refused.
    hold = c.holds.get("lnm1", "maintenance")
    assert hold["evacuate"] is False and hold["by"] == "root"
    assert hold["evacuated"] == {"moved": 6, "failed": 0}
    more = await c.start("alice", False, [], [], {"cluster": "more", "count": 3})
    assert all(s["lnm"] != "lnm1" for s in more["started"])
    refused = await c.start("alice", False, ["x"], ["lnm1"], {})
    assert refused["started"] == [] and "in maintenance: new disks" in \
        refused["failed"][0]["error"]


@pytest_twisted.ensureDeferred
async def test_leaving_maintenance_makes_the_lnm_a_target_again(grid):
    c = grid.controller
    await c.maintenance.set("lnm2", True, by="root")
    refused = await c.start("alice", False, ["a"], ["lnm2"], {})
    assert refused["started"] == []
    status = await c.maintenance.set("lnm2", False, by="root")
    assert not status["maintenance"] and not c.holds.held("lnm2")
    started = await c.start("alice", False, ["b"], ["lnm2"], {})
    assert started["started"] == [{"name": full("b"), "lnm": "lnm2"}]


@pytest_twisted.ensureDeferred
async def test_at_most_concurrency_moves_run_at_once(grid):
    c = grid.controller
    names = await start_on(grid, "lnm1", 7)
    running, peak = [0], [0]
    real = c.migrations.migrate

    async def counted(*args, **kwargs):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        try:
            # Long enough for the others to start if nothing held them back.
            await task.deferLater(reactor, 0.02, lambda: None)
            return await real(*args, **kwargs)
        finally:
            running[0] -= 1
    c.migrations.migrate = counted
    await c.maintenance.set("lnm1", True, by="root", evacuate=True, concurrency=2)
    assert c.maintenance.status("lnm1")["concurrency"] == 2
    await c.maintenance.wait("lnm1")
    assert peak[0] == 2
    assert sorted(m["name"] for m in c.maintenance.status("lnm1")["moved"]) == names


class Pin:
    """A migrate_request plugin that keeps one VM where it is."""
    name = "pin"

    def __init__(self, vm):
        self.vm = vm

    def entry_point(self, event):
        if self.vm in event.request.vms:
            event.request.drop(self.vm, "pinned to its host by the site")


@pytest_twisted.ensureDeferred
async def test_vms_that_cannot_move_are_listed_with_why_and_the_others_move(grid):
    c = grid.controller
    names = await start_on(grid, "lnm1", 4)
    off = names[0]
    await c.op_on("alice", False, "shutdown", Selection(names=[off]))
    # A migrate_request plugin refuses one of them.
    refused = names[1]

    c.chains.add(Pin(refused), "migrate_request", order=1)
    await c.maintenance.set("lnm1", True, by="root", evacuate=True)
    await c.maintenance.wait("lnm1")
    status = c.maintenance.status("lnm1")
    failed = {f["name"]: f["error"] for f in status["failed"]}
    assert set(failed) == {off, refused}
    assert "cannot migrate a VM that is shutoff" in failed[off]
    assert "pinned to its host by the site" in failed[refused]
    assert sorted(m["name"] for m in status["moved"]) == names[2:]


@pytest_twisted.ensureDeferred
async def test_no_host_with_room_is_a_reason(grid):
    c = grid.controller
    names = await start_on(grid, "lnm1", 2)
    for other in ("lnm2", "lnm3"):
        c.holds.hold(other, "powered_down", reason="saving power")
    await c.maintenance.set("lnm1", True, by="root", evacuate=True)
    await c.maintenance.wait("lnm1")
    status = c.maintenance.status("lnm1")
    assert status["moved"] == [] and sorted(f["name"] for f in status["failed"]) == names
    assert all(f["error"] for f in status["failed"])
    assert await hosts_of(grid, names[0]) == ["lnm1"]


@pytest_twisted.ensureDeferred
async def test_evacuating_an_empty_lnm_is_done_at_once(grid):
    c = grid.controller
    status = await c.maintenance.set("lnm3", True, by="root", evacuate=True)
    assert status["done"] and status["total"] == 0 and status["moved"] == []


@pytest_twisted.ensureDeferred
async def test_leaving_maintenance_stops_an_evacuation_under_way(grid):
    c = grid.controller
    await start_on(grid, "lnm1", 6)
    gate = defer.Deferred()
    real = c.migrations.migrate

    async def held(*args, **kwargs):
        await gate
        return await real(*args, **kwargs)
    c.migrations.migrate = held
    await c.maintenance.set("lnm1", True, by="root", evacuate=True, concurrency=1)
    await task.deferLater(reactor, 0, lambda: None)
    status = await c.maintenance.set("lnm1", False, by="root")
    assert not status["maintenance"] and status["waiting"] == 0
    gate.callback(None)
    await c.maintenance.wait("lnm1")
    status = c.maintenance.status("lnm1")
    assert status["done"] and status["stopped"] and len(status["moved"]) == 1
    assert len(c.state.lnms["lnm1"].vms) == 5


@pytest_twisted.ensureDeferred
async def test_an_evacuation_asked_again_while_a_stopped_one_finishes_runs_after_it(grid):
    c = grid.controller
    await start_on(grid, "lnm1", 4)
    gate = defer.Deferred()
    real = c.migrations.migrate
    calls = []

    async def held(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            await gate
        return await real(*args, **kwargs)
    c.migrations.migrate = held
    await c.maintenance.set("lnm1", True, by="root", evacuate=True, concurrency=1)
    await task.deferLater(reactor, 0, lambda: None)
    await c.maintenance.set("lnm1", False, by="root")            # stopped, one move running
    status = await c.maintenance.set("lnm1", True, by="root", evacuate=True)
    assert c.holds.get("lnm1", "maintenance")["evacuate"] is True
    gate.callback(None)
    await wait_for(lambda: not c.state.lnms["lnm1"].vms, timeout=20)
    await c.maintenance.wait("lnm1")
    status = c.maintenance.status("lnm1")
    assert status["done"] and not status["stopped"] and status["failed"] == []
    assert c.holds.get("lnm1", "maintenance")["evacuate"] is False


@pytest_twisted.ensureDeferred
async def test_bad_requests_are_refused(grid):
    c = grid.controller
    with pytest.raises(NoSuchLNM):
        await c.maintenance.set("nosuch", True, by="root")
    for bad in (0, 65, "2", True):
        with pytest.raises(InvalidRequest):
            await c.maintenance.set("lnm1", True, by="root", concurrency=bad)
    with pytest.raises(InvalidRequest):
        await c.maintenance.set("lnm1", True, by="root", reason="x" * 201)
    assert not c.holds.held("lnm1")


@pytest_twisted.ensureDeferred
async def test_an_evacuation_resumes_after_a_controller_restart(grid, tmp_path):
    c = grid.controller
    names = await start_on(grid, "lnm1", 4)
    # The controller dies with the evacuation asked for and nothing moved.
    c.holds.hold("lnm1", "maintenance", reason="r", by="root", since=1.0, evacuate=True)
    fresh = Controller(domain=DOMAIN, clock=reactor,
                       known_lnms=KnownLNMs(str(tmp_path / "lnms.json")))
    fresh.plugins = grid.controller.plugins.__class__(
        fresh.chains, fresh.api, load_config=lambda *a, **k: {})
    from usher.settings import default_plugin_registrations
    fresh.plugins.register_configured(default_plugin_registrations())
    fresh.recovery = Recovery(["lnm1", "lnm2", "lnm3"], clock=task.Clock(), window=30,
                              on_done=fresh.resolve_soon)
    fresh.watch_lnms(fresh.recovery)
    assert fresh.holds.get("lnm1", "maintenance")["evacuate"] is True
    for name in ("lnm1", "lnm2", "lnm3"):
        await grid.attach(name, fresh)
    await wait_for(lambda: fresh.maintenance.status("lnm1")["done"], timeout=30)
    status = fresh.maintenance.status("lnm1")
    assert sorted(m["name"] for m in status["moved"]) == names, status
    assert fresh.state.lnms["lnm1"].vms == set()
    assert fresh.holds.get("lnm1", "maintenance")["evacuate"] is False
    for name in names:
        assert len(await hosts_of(grid, name)) == 1


def test_an_unknown_lnm_has_no_status():
    c = Controller(domain=DOMAIN, clock=task.Clock())
    with pytest.raises(NoSuchLNM):
        c.maintenance.status("lnm1")
