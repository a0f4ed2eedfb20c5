"""The controller under failures, on an in-process grid (tests/grid.py): real
NodeManagers on real libvirt test hosts behind links (tests.wire) that fail
the way links fail — the request lost, the answer lost, the LNM silent. Asserts
exact states and, on the hosts themselves, that no VM runs twice or
nowhere."""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from usher import states
from usher.controller.core import Controller
from usher.controller.liveness import LNMLiveness
from usher.controller.lnm_input import LNMLimits
from usher.controller.lnm_link import NodeReporter
from usher.controller.recovery import Recovery
from usher.errors import OperationFailed, Unavailable
from usher.records import encode_chunks, encode_object
from usher.vmset import Selection

from tests.e2e import wait_for
from tests.grid import DOMAIN, Grid
from tests.hostile import LogCapture


async def reattach(grid, name, controller=None):
    """The LNM connects (again): a new session, a new handle. -> its connection."""
    return await grid.attach(name, controller)


@pytest_twisted.async_yield_fixture
async def grid(tmp_path):
    g = Grid(reactor, tmp_path)
    await g.start()
    yield g
    await g.stop()


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


async def hosts_of(grid, name):
    """The LNMs whose hypervisor has a domain ``name`` (asked of libvirt)."""
    found = []
    for lnm, vmm in sorted(grid.vmms.items()):
        if name in [d["name"] for d in await vmm.list_domains()]:
            found.append(lnm)
    return found


async def start_one(grid, short, lnm):
    result = await grid.controller.start("alice", False, [short], [lnm], {})
    assert result["failed"] == [], result
    return full(short)


# -- start ------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_start_whose_answer_is_lost_is_lost_then_found_running(grid):
    c = grid.controller
    grid.to_lnm("lnm1").lose_answer.add("start_many")
    result = await c.start("alice", False, ["x1"], ["lnm1"], {})
    vm = full("x1")
    assert result["started"] == []
    [failure] = result["failed"]
    assert failure["name"] == vm and "outcome is unknown" in failure["error"]
    assert c.state.vms[vm]["state"] == states.LOST
    assert not c.state.lnms["lnm1"].connected          # resynchronising
    with pytest.raises(Exception, match="already exists"):
        await c.start("alice", False, ["x1"], ["lnm2"], {})   # a retry copies nothing
    await reattach(grid, "lnm1")
    assert c.state.vms[vm]["state"] == states.RUN
    assert await hosts_of(grid, vm) == ["lnm1"]


@pytest_twisted.ensureDeferred
async def test_a_start_whose_request_is_lost_disappears_when_the_lnm_returns(grid):
    c = grid.controller
    grid.to_lnm("lnm1").lose_request.add("start_many")
    result = await c.start("alice", False, ["x2"], ["lnm1"], {})
    vm = full("x2")
    assert "outcome is unknown" in result["failed"][0]["error"]
    assert c.state.vms[vm]["state"] == states.LOST
    await reattach(grid, "lnm1")
    assert vm not in c.state.vms                       # it never was: not "missing"
    assert await hosts_of(grid, vm) == []
    assert grid.nodes["lnm1"].cached_names() == []


@pytest_twisted.ensureDeferred
async def test_a_start_never_sent_fails_at_once_and_leaves_nothing(grid):
    c = grid.controller
    grid.to_lnm("lnm1").not_sent.add("start_many")
    result = await c.start("alice", False, ["x3"], ["lnm1"], {})
    assert result["failed"] == [{"name": full("x3"), "error": "LNM lnm1 disconnected before "
                                 f"{full('x3')} could be started; nothing was done",
                                 "code": "unavailable"}]
    assert full("x3") not in c.state.vms and c.state.lnms["lnm1"].connected


@pytest_twisted.ensureDeferred
async def test_an_unanswered_operation_resynchronises_the_lnm(grid):
    c = grid.controller
    vm = await start_one(grid, "op1", "lnm2")
    grid.to_lnm("lnm2").lose_answer.add("op_on")
    result = await c.op_on("alice", False, "pause", Selection(names=[vm]))
    assert result["done"] == [] and "outcome is unknown" in result["failed"][0]["error"]
    assert c.state.vms[vm]["state"] == states.LOST
    await reattach(grid, "lnm2")
    assert c.state.vms[vm]["state"] == states.PAUSED   # it did happen


# -- recovery ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_while_recovering_starts_are_refused_and_listings_wait(grid):
    c = grid.controller
    clock = task.Clock()
    c.recovery = Recovery(["lnm1", "lnm9"], clock=clock, window=30)
    c.watch_lnms(c.recovery)
    with pytest.raises(Unavailable, match="recovering.*lnm1, lnm9"):
        await c.start("alice", False, ["r1"], [], {})
    listing = defer.Deferred.fromCoroutine(c.list("alice", False, None))
    await reattach(grid, "lnm1")
    assert not listing.called
    clock.advance(30)                                  # lnm9 never came back
    assert await listing == []
    assert (await c.start("alice", False, ["r1"], [], {}))["failed"] == []


# -- migration: never two copies, never none ----------------------------------------

async def migrate(grid, vm, target):
    return await grid.controller.migrate("alice", False, Selection(names=[vm]), [target])


async def settled(grid, vm, predicate):
    await wait_for(lambda: predicate(grid.controller.state.vms.get(vm)), timeout=5)


@pytest_twisted.ensureDeferred
async def test_migration_import_answer_lost_the_vm_is_found_on_the_target(grid):
    vm = await start_one(grid, "m1", "lnm1")
    grid.to_lnm("lnm2").lose_answer.add("import_image")
    result = await migrate(grid, vm, "lnm2")
    assert result["migrated"] == [] and "outcome is unknown" in result["failed"][0]["error"]
    assert grid.controller.state.vms[vm]["state"] == states.LOST
    assert grid.nodes["lnm1"].retained_exports() == [vm]     # not put back: it may run there
    await reattach(grid, "lnm2")
    await settled(grid, vm, lambda r: r["state"] == states.RUN and r["lnm"] == "lnm2")
    await wait_for(lambda: grid.nodes["lnm1"].retained_exports() == [])
    assert await hosts_of(grid, vm) == ["lnm2"]


@pytest_twisted.ensureDeferred
async def test_migration_import_request_lost_the_vm_comes_back_to_its_source(grid):
    vm = await start_one(grid, "m2", "lnm1")
    grid.to_lnm("lnm2").lose_request.add("import_image")
    result = await migrate(grid, vm, "lnm2")
    assert "outcome is unknown" in result["failed"][0]["error"]
    assert await hosts_of(grid, vm) == []              # only the kept export, on lnm1
    await reattach(grid, "lnm2")
    await settled(grid, vm, lambda r: r["state"] == states.RUN and r["lnm"] == "lnm1")
    assert await hosts_of(grid, vm) == ["lnm1"]
    assert grid.nodes["lnm1"].retained_exports() == []


@pytest_twisted.ensureDeferred
async def test_migration_refused_by_the_target_puts_the_vm_back_at_once(grid):
    vm = await start_one(grid, "m3", "lnm1")
    grid.to_lnm("lnm2").refuse["import_image"] = OperationFailed("no room")
    result = await migrate(grid, vm, "lnm2")
    assert result["failed"] == [{"name": vm, "error": "migration to lnm2 failed: no room",
                                 "code": "operation_failed"}]
    assert grid.controller.state.vms[vm]["state"] == states.RUN
    assert grid.controller.state.vms[vm]["lnm"] == "lnm1"
    assert await hosts_of(grid, vm) == ["lnm1"]
    assert grid.nodes["lnm1"].retained_exports() == []


@pytest_twisted.ensureDeferred
async def test_migration_export_answer_lost_the_source_puts_the_vm_back(grid):
    vm = await start_one(grid, "m4", "lnm1")
    grid.to_lnm("lnm1").lose_answer.add("export_image")
    result = await migrate(grid, vm, "lnm2")
    assert "outcome is unknown" in result["failed"][0]["error"]
    assert grid.controller.state.vms[vm]["state"] == states.LOST
    await reattach(grid, "lnm1")
    await settled(grid, vm, lambda r: r["state"] == states.RUN and r["lnm"] == "lnm1")
    assert await hosts_of(grid, vm) == ["lnm1"]


@pytest_twisted.ensureDeferred
async def test_a_restarted_controller_finishes_a_migration_cut_short(grid):
    """The controller died between the import and telling the source: the
    new one, once every LNM is back, finds the VM on the target and lets
    the source forget its export. Not before: the source reattached first."""
    vm = await start_one(grid, "m5", "lnm1")
    payload = await grid.nodes["lnm1"].export_image(vm)
    record = dict(grid.controller.state.vms[vm], lnm="lnm2")
    await grid.nodes["lnm2"].receive([record])
    await grid.nodes["lnm2"].import_image(vm, payload)
    # kill -9: a new controller, recovering, sees the LNMs come back one by one.
    fresh = Controller(domain=DOMAIN, clock=reactor)
    clock = task.Clock()
    fresh.recovery = Recovery(["lnm1", "lnm2", "lnm3"], clock=clock, window=30,
                              on_done=fresh.resolve_soon)
    fresh.watch_lnms(fresh.recovery)
    for name in ("lnm1", "lnm3"):
        await reattach(grid, name, fresh)
    await task.deferLater(reactor, 0.05, lambda: None)
    assert grid.nodes["lnm1"].retained_exports() == [vm]     # lnm2 not back: wait
    await reattach(grid, "lnm2", fresh)
    await wait_for(lambda: grid.nodes["lnm1"].retained_exports() == [], timeout=5)
    assert fresh.state.vms[vm]["lnm"] == "lnm2" and fresh.state.vms[vm]["state"] == states.RUN
    assert await hosts_of(grid, vm) == ["lnm2"]


@pytest_twisted.ensureDeferred
async def test_a_restarted_controller_puts_back_a_vm_found_nowhere(grid):
    vm = await start_one(grid, "m6", "lnm1")
    await grid.nodes["lnm1"].export_image(vm)
    # As RecoveryService makes it: recovering, expecting the LNMs it knew
    # (their first inventories vouch for their VMs).
    fresh = Controller(domain=DOMAIN, clock=reactor)
    fresh.recovery = Recovery(["lnm1", "lnm2", "lnm3"], clock=task.Clock(), window=30,
                              on_done=fresh.resolve_soon)
    fresh.watch_lnms(fresh.recovery)
    for name in ("lnm1", "lnm2", "lnm3"):
        await reattach(grid, name, fresh)
    await wait_for(lambda: fresh.state.vms.get(vm, {}).get("state") == states.RUN, timeout=5)
    assert fresh.state.vms[vm]["lnm"] == "lnm1"
    assert await hosts_of(grid, vm) == ["lnm1"]


# -- liveness ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_silent_lnm_is_detached_after_the_timeout(grid):
    c = grid.controller
    vm = await start_one(grid, "live1", "lnm3")
    clock = task.Clock()
    liveness = LNMLiveness(c, clock=clock, interval=1, timeout=3)
    c.watch_lnms(liveness)
    link = await reattach(grid, "lnm3")
    assert liveness.watching("lnm3")

    async def seconds(*steps):
        for step in steps:          # each ping's answer crosses before the next tick
            clock.advance(step)
            await grid.settle()

    await seconds(1, 1, 1, 1)
    assert c.state.lnms["lnm3"].connected              # answering
    link.to_lnm.hang["ping"] = defer.Deferred()        # silent from now on
    await seconds(1, 1)
    assert c.state.lnms["lnm3"].connected
    await seconds(1, 1)
    assert not c.state.lnms["lnm3"].connected and link.lost
    assert c.state.vms[vm]["state"] == states.LOST     # lost, never shutoff
    assert not liveness.watching("lnm3")
    liveness.stop()


# -- errors no one expected ----------------------------------------------------------

def break_handle(grid, lnm, method, error):
    """The controller's handle on ``lnm`` raises ``error`` from ``method``:
    a bug no one expected, on the controller's side of the link."""
    async def broken(*args):
        raise error
    setattr(grid.controller.state.lnms[lnm].handle, method, broken)


def failures_logged(logged, kind):
    return [e for e in logged.events
            if "log_failure" in e and e["log_failure"].check(kind) is not None]


@pytest_twisted.ensureDeferred
async def test_an_unexpected_error_under_a_start_is_reported_logged_and_settled(grid):
    c = grid.controller
    break_handle(grid, "lnm1", "start_many", RuntimeError("boom"))
    with LogCapture() as logged:
        result = await c.start("alice", False, ["u1", "u2"], ["lnm1"], {})
    assert result["started"] == []
    assert sorted(f["name"] for f in result["failed"]) == [full("u1"), full("u2")]
    assert all("RuntimeError: boom" in f["error"] for f in result["failed"])
    assert failures_logged(logged, RuntimeError)
    # Its outcome unknown, never left starting: lost until the LNM says.
    for vm in (full("u1"), full("u2")):
        assert c.state.vms[vm]["state"] == states.LOST
    await reattach(grid, "lnm1")
    assert full("u1") not in c.state.vms and full("u2") not in c.state.vms   # never started


@pytest_twisted.ensureDeferred
async def test_an_unexpected_error_before_a_start_is_sent_leaves_nothing(grid):
    c = grid.controller
    break_handle(grid, "lnm2", "receive", RuntimeError("bad records"))
    with LogCapture() as logged:
        result = await c.start("alice", False, ["u3"], ["lnm2"], {})
    assert result["started"] == [] and [f["name"] for f in result["failed"]] == [full("u3")]
    assert failures_logged(logged, RuntimeError)
    assert full("u3") not in c.state.vms


@pytest_twisted.ensureDeferred
async def test_an_unexpected_error_while_placing_a_vm_fails_that_vm_only(grid, monkeypatch):
    c = grid.controller
    place = c.starts._place

    def broken(name, *args):
        if name == full("u5"):
            raise RuntimeError("placement bug")
        return place(name, *args)
    monkeypatch.setattr(c.starts, "_place", broken)
    with LogCapture() as logged:
        result = await c.start("alice", False, ["u4", "u5"], ["lnm3"], {})
    assert [s["name"] for s in result["started"]] == [full("u4")]
    assert [f["name"] for f in result["failed"]] == [full("u5")]
    assert failures_logged(logged, RuntimeError)
    assert full("u5") not in c.state.vms
    assert all(r["state"] != states.STARTING for r in c.state.vms.values())


@pytest_twisted.ensureDeferred
async def test_an_unexpected_error_under_an_operation_is_reported_and_logged(grid):
    c = grid.controller
    vm = await start_one(grid, "u6", "lnm2")
    break_handle(grid, "lnm2", "op_on", RuntimeError("boom"))
    with LogCapture() as logged:
        result = await c.op_on("alice", False, "pause", Selection(names=[vm]))
    assert result["done"] == []
    [failure] = result["failed"]
    assert failure["name"] == vm and "RuntimeError: boom" in failure["error"]
    assert failures_logged(logged, RuntimeError)
    await reattach(grid, "lnm2")                       # its inventory settles it
    assert c.state.vms[vm]["state"] == states.RUN


class _BrokenController:
    domain = DOMAIN
    lnm_limits = LNMLimits()

    def lnm_report(self, lnm, changes):
        raise RuntimeError("report bug")

    def lnm_status_report(self, lnm, node, vms, kept=()):
        raise RuntimeError("status bug")

    def lnm_refused(self, lnm, what, error):
        raise AssertionError("nothing was refused")


def test_the_lnm_report_port_logs_an_unexpected_error_and_answers_cleanly():
    reporter = NodeReporter(_BrokenController(), "lnm1")
    change = {"name": full("r1"), "state": states.RUN}
    with LogCapture() as logged:
        answers = [reporter.remote_report(encode_chunks([change])),
                   reporter.remote_report_status(encode_object({}), encode_chunks([]))]
    for d, what in zip(answers, ("report", "report_status")):
        failure = []
        d.addErrback(failure.append)
        [failure] = failure
        assert failure.check(OperationFailed)
        assert str(failure.value) == (f"{what}: internal error on the controller "
                                      "(see its log)")
    assert len(failures_logged(logged, RuntimeError)) == 2


# -- delete -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_deleting_a_vm_that_went_missing_while_its_lnm_was_away_is_done(grid):
    c = grid.controller
    vm = await start_one(grid, "gone1", "lnm1")
    grid.cut("lnm1")
    await grid.remove_on_host("lnm1", vm)     # behind Usher's back
    await reattach(grid, "lnm1")
    assert c.state.vms[vm]["state"] == states.MISSING
    result = await c.op_on("alice", False, "delete", Selection(names=[vm]))
    assert result["failed"] == []
    assert result["done"] == [{"name": vm, "state": None}]
    [note] = result["notes"]
    assert vm in note and "no longer on LNM lnm1" in note
    assert vm not in c.state.vms
