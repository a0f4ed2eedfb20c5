"""The LNM core (usher.lnm.node): cache, Table 2, change detection, reporting.

Runs against ``tests.fakes.FakeVMM``, an in-memory IVMM, with task.Clock
driving scans and flushes.
"""

import pytest
import pytest_twisted
from twisted.internet import defer, task

from usher import states
from usher.errors import (InvalidRequest, MigrationUnsupported, NoSuchVM, OperationFailed,
                          Unavailable)
from usher.lnm.node import NodeManager
from usher.protocol import REPORT_BATCH

from tests.fakes import (VM, FakeVMM, HeldReporter, RecordingReporter, echo_acks, record,
                         result_of)

# -- helpers ----------------------------------------------------------------------

SCAN = 10.0
REPORT = 0.5


def pending(coroutine):
    """Start work expected to wait; -> its Deferred (checked unfired)."""
    d = defer.Deferred.fromCoroutine(coroutine)
    fired = []
    d.addBoth(lambda r: fired.append(r) or r)
    assert not fired, f"finished too early: {fired}"
    return d



@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def vmm():
    return FakeVMM()


@pytest.fixture
def manager(vmm, clock):
    node = NodeManager(vmm, name="lnm1", clock=clock, scan_interval=SCAN,
                       report_interval=REPORT, migration_uri="qemu+tcp://lnm1/system")
    result_of(node.startup())
    yield node
    if node._running:
        vmm.release()
        result_of(node.shutdown())


@pytest.fixture
def reporter(manager):
    reporter = RecordingReporter(echo_acks)
    manager.set_reporter(reporter)
    return reporter


def running_vm(manager, name=VM):
    result_of(manager.receive([record(name)]))
    return result_of(manager.start(name))


# -- Table 2: the cache and operations ---------------------------------------------

def test_receive_then_start_boots_the_vm_and_caches_the_new_state(manager, vmm, clock,
                                                                 reporter):
    assert result_of(manager.receive([record()])) == 1
    info = result_of(manager.start(VM))
    assert info["state"] == states.RUN and info["memory_mib"] == 128
    assert vmm.domains[VM]["metadata"] == {"owner": "alice", "cluster": "web"}
    vm = manager.cached_vm(VM)
    assert vm.record["state"] == states.RUN
    assert vm.observed["state"] == states.RUN
    # The start result told the controller: nothing to report.
    clock.advance(SCAN)
    assert reporter.batches == []


def test_start_refuses_a_vm_that_was_not_received(manager, vmm):
    with pytest.raises(NoSuchVM, match="receive"):
        result_of(manager.start("2.web.alice.usher.local"))
    assert not [c for c in vmm.calls if c[0] == "create"]
    assert vmm.domains == {}


def test_start_is_idempotent(manager, vmm):
    first = running_vm(manager)
    second = result_of(manager.start(VM))
    assert second == first
    assert list(vmm.domains) == [VM]


def test_each_operation_returns_the_new_domain_info(manager, vmm, clock, reporter):
    running_vm(manager)
    for operation, expected in [("pause", states.PAUSED), ("resume", states.RUN),
                                ("reboot", states.RUN), ("hibernate", states.HIBERNATED),
                                ("restore", states.RUN), ("shutdown", states.SHUTOFF),
                                ("cycle", states.RUN), ("destroy", states.SHUTOFF),
                                ("destroy", states.SHUTOFF)]:
        info = result_of(manager.op_on(operation, VM))
        assert info["state"] == expected, operation
        assert vmm.domains[VM]["state"] == expected
        assert manager.cached_vm(VM).record["state"] == expected
    assert result_of(manager.op_on("delete", VM)) is None
    assert VM not in vmm.domains
    assert manager.cached_vm(VM) is None
    clock.advance(SCAN)
    assert reporter.batches == []


def test_op_on_refuses_unknown_operations_and_vms(manager, vmm):
    running_vm(manager)
    calls = len(vmm.calls)
    with pytest.raises(InvalidRequest, match="unknown operation 'explode'"):
        result_of(manager.op_on("explode", VM))
    with pytest.raises(NoSuchVM):
        result_of(manager.op_on("pause", "nope"))
    assert len(vmm.calls) == calls


def test_delete_of_a_vm_already_gone_succeeds(manager, vmm):
    running_vm(manager)
    vmm.remove_domain(VM)
    assert result_of(manager.op_on("delete", VM)) is None
    assert manager.cached_vm(VM) is None


def test_delete_refuses_a_running_vm_and_destroy_keeps_it(manager, vmm):
    running_vm(manager)
    with pytest.raises(OperationFailed, match="cannot delete"):
        result_of(manager.op_on("delete", VM))
    assert vmm.domains[VM]["state"] == states.RUN
    assert result_of(manager.op_on("destroy", VM))["state"] == states.SHUTOFF
    assert manager.cached_vm(VM).record["state"] == states.SHUTOFF
    # Started again from its kept definition.
    assert result_of(manager.start(VM))["state"] == states.RUN


def test_operations_on_one_vm_run_one_at_a_time(manager, vmm):
    running_vm(manager)
    result_of(manager.op_on("shutdown", VM))
    vmm.hold = True
    delete = pending(manager.op_on("delete", VM))
    pause = pending(manager.op_on("pause", VM))
    assert [c[1] for c in vmm.calls if c[0] == "operate"] == ["shutdown", "delete"]
    vmm.hold = False
    vmm.release()
    assert result_of(delete) is None
    with pytest.raises(NoSuchVM, match="before pause could run"):
        result_of(pause)
    assert [c[1] for c in vmm.calls if c[0] == "operate"] == ["shutdown", "delete"]


def test_failed_operation_reports_what_the_host_now_shows(manager, vmm, clock, reporter):
    running_vm(manager)
    vmm.set_state(VM, states.SHUTOFF, emit=False)   # changed behind our back
    with pytest.raises(OperationFailed, match="cannot pause"):
        result_of(manager.op_on("pause", VM))
    clock.advance(REPORT)
    assert [(c["name"], c["state"]) for c in reporter.reported] == [(VM, states.SHUTOFF)]


def test_migrate_removes_the_vm_and_refuses_bad_targets(manager, vmm):
    running_vm(manager)
    with pytest.raises(InvalidRequest, match="migration_uri"):
        result_of(manager.migrate(VM, {"name": "lnm2"}))
    with pytest.raises(InvalidRequest, match="LNM it runs on"):
        result_of(manager.migrate(VM, {"migration_uri": "qemu+tcp://lnm1/system"}))
    assert result_of(manager.migrate(VM, {"migration_uri": "qemu+tcp://lnm2/system"})) is None
    assert ("migrate", VM, "qemu+tcp://lnm2/system") in vmm.calls
    assert manager.cached_vm(VM) is None and VM not in vmm.domains


def test_migration_unsupported_leaves_the_vm_in_place(clock):
    vmm = FakeVMM(live_migration=False)
    node = NodeManager(vmm, name="lnm1", clock=clock, scan_interval=SCAN,
                       report_interval=REPORT)
    result_of(node.startup())
    running_vm(node)
    with pytest.raises(MigrationUnsupported):
        result_of(node.migrate(VM, {"migration_uri": "test:///elsewhere"}))
    assert node.cached_vm(VM).record["state"] == states.RUN
    assert vmm.domains[VM]["state"] == states.RUN
    assert node.pending_changes == {}


def test_export_then_import_moves_a_vm_between_managers(manager, vmm, clock):
    running_vm(manager)
    exported = result_of(manager.export_image(VM))
    assert exported["image"].startswith(b"IMAGE:")
    assert manager.cached_vm(VM) is None and VM not in vmm.domains

    other_vmm = FakeVMM(uri="fake:///host2")
    other = NodeManager(other_vmm, name="lnm2", clock=clock, scan_interval=SCAN,
                        report_interval=REPORT)
    result_of(other.startup())
    with pytest.raises(NoSuchVM):
        result_of(other.import_image(VM, exported))
    result_of(other.receive([record(state=states.MIGRATING)]))
    info = result_of(other.import_image(VM, exported))
    assert info["state"] == states.RUN and other_vmm.domains[VM]["memory_mib"] == 128
    assert other.cached_vm(VM).record["state"] == states.RUN
    result_of(other.shutdown())


def test_receive_is_all_or_nothing(manager):
    with pytest.raises(InvalidRequest, match="unknown state 'flying'"):
        result_of(manager.receive([record("a"), record("b", state="flying")]))
    with pytest.raises(InvalidRequest, match="memory_mib"):
        result_of(manager.receive([record("a", memory_mib="lots")]))
    assert manager.cached_names() == []


def test_details_node_info_and_listing(manager, vmm):
    running_vm(manager)
    vmm.add_domain("foreign", states.PAUSED)
    details = result_of(manager.get_details(VM))
    assert details["state"] == states.RUN and details["owner"] == "alice"
    assert details["lnm"] == "lnm1" and details["cached"] is True
    assert result_of(manager.get_details("foreign"))["cached"] is False
    with pytest.raises(NoSuchVM):
        result_of(manager.get_details("nothing"))
    info = result_of(manager.get_node_info())
    assert info["name"] == "lnm1" and info["migration_uri"] == "qemu+tcp://lnm1/system"
    assert info["cpus"] == 4
    assert result_of(manager.get_node_status())["vms"] == 1
    # No monitor: every figure unavailable (tests/test_monitor.py has the rest).
    status = result_of(manager.get_status(VM))
    assert status["name"] == VM and status["cpu"] is None and status["source"] is None
    names = sorted(d["name"] for d in result_of(manager.list_vms()))
    assert names == sorted([VM, "foreign"])


# -- change detection ---------------------------------------------------------------

def test_event_is_reported_at_the_next_flush_and_acknowledged(manager, vmm, clock,
                                                              reporter):
    running_vm(manager)
    vmm.set_state(VM, states.PAUSED)           # someone paused it outside Usher
    assert manager.pending_changes[VM]["state"] == states.PAUSED
    assert reporter.batches == []
    clock.advance(REPORT)
    assert reporter.batches == [[{
        "name": VM, "state": states.PAUSED, "uuid": vmm.domains[VM]["uuid"],
        "memory_mib": 128, "vcpus": 2, "metadata": {"owner": "alice", "cluster": "web"}}]]
    # The acknowledgment replaced the cached record.
    assert manager.cached_vm(VM).record["version"] == 2
    assert manager.cached_vm(VM).record["state"] == states.PAUSED
    assert manager.pending_changes == {}
    clock.advance(SCAN)
    assert len(reporter.batches) == 1


def test_scan_catches_changes_without_events(manager, vmm, clock, reporter):
    running_vm(manager)
    vmm.set_state(VM, states.SHUTOFF, emit=False)   # e.g. a guest shutdown: no event
    clock.advance(REPORT)
    assert reporter.batches == []
    clock.advance(SCAN)
    clock.advance(REPORT)
    assert [(c["name"], c["state"]) for c in reporter.reported] == [(VM, states.SHUTOFF)]


def test_reports_go_in_batches_the_controller_takes(manager, vmm, clock):
    """At most REPORT_BATCH changes per report (the controller refuses more
    than its lnm_max_report_changes); a domain whose name the controller
    would refuse is left out, not sent to spoil the whole report."""
    reporter = RecordingReporter()
    manager.set_reporter(reporter)
    for i in range(REPORT_BATCH + 10):
        vmm.add_domain(f"s{i}.example.org")
    vmm.add_domain("has space")
    clock.advance(SCAN)
    for _ in range(3):
        clock.advance(REPORT)
    assert [len(batch) for batch in reporter.batches] == [REPORT_BATCH, 10]
    assert "has space" not in {c["name"] for c in reporter.reported}
    assert "has space" not in {d["name"] for d in result_of(manager.list_vms())}


def test_vanished_vm_is_reported_once_with_state_none(manager, vmm, clock, reporter):
    running_vm(manager)
    uuid = vmm.domains[VM]["uuid"]
    vmm.remove_domain(VM)
    clock.advance(SCAN)
    clock.advance(REPORT)
    assert reporter.reported == [{"name": VM, "state": None, "uuid": uuid, "memory_mib": 128,
                                  "vcpus": 2, "metadata": {"owner": "alice",
                                                           "cluster": "web"}}]
    # The controller keeps it as missing: consistent, never reported again.
    assert manager.cached_vm(VM).record["state"] == states.MISSING
    clock.advance(SCAN)
    clock.advance(SCAN)
    assert len(reporter.reported) == 1


def test_vanished_vm_the_controller_drops_leaves_the_cache(manager, vmm, clock):
    reporter = RecordingReporter()           # acknowledges with no records
    manager.set_reporter(reporter)
    running_vm(manager)
    vmm.remove_domain(VM, emit=True)
    clock.advance(REPORT)
    assert reporter.reported[0]["state"] is None
    assert manager.cached_vm(VM) is None


def test_unexpected_vm_is_reported_with_its_metadata(manager, vmm, clock, reporter):
    reporter.acks = lambda changes: []       # the controller leaves it unmanaged
    vmm.add_domain("intruder", states.RUN, {"owner": "bob"})
    clock.advance(SCAN)
    clock.advance(REPORT)
    assert [(c["name"], c["state"], c["metadata"]) for c in reporter.reported] == [
        ("intruder", states.RUN, {"owner": "bob"})]
    assert manager.cached_vm("intruder") is None
    clock.advance(SCAN)
    assert len(reporter.reported) == 1
    # A later change of an unmanaged VM is news again.
    vmm.set_state("intruder", states.PAUSED)
    clock.advance(REPORT)
    assert [c["state"] for c in reporter.reported] == [states.RUN, states.PAUSED]


def test_unexpected_vm_adopted_by_the_acknowledgment_is_cached(manager, vmm, clock,
                                                               reporter):
    name = "3.db.carol.usher.local"
    vmm.add_domain(name, states.RUN, {"owner": "carol", "cluster": "db"}, emit=True)
    clock.advance(REPORT)
    assert reporter.reported[0]["name"] == name
    assert manager.cached_vm(name).record["state"] == states.RUN
    assert manager.cached_vm(name).record["version"] == 2


def test_domains_present_at_startup_are_the_baseline_not_news(vmm, clock):
    vmm.add_domain("old-one", states.RUN)
    node = NodeManager(vmm, name="lnm1", clock=clock, scan_interval=SCAN,
                       report_interval=REPORT)
    reporter = RecordingReporter()
    node.set_reporter(reporter)
    result_of(node.startup())
    clock.advance(SCAN)
    clock.advance(REPORT)
    assert reporter.batches == []
    result_of(node.shutdown())


def test_received_record_that_disagrees_with_the_host_is_reported(manager, vmm, clock,
                                                                  reporter):
    running_vm(manager)
    # After a reconnection the controller sends what it believes: lost.
    result_of(manager.receive([record(state=states.LOST)]))
    clock.advance(REPORT)
    assert [(c["name"], c["state"]) for c in reporter.reported] == [(VM, states.RUN)]
    assert manager.cached_vm(VM).record["state"] == states.RUN


def test_record_for_a_vm_not_started_yet_is_not_reported_missing(manager, clock,
                                                                  reporter):
    result_of(manager.receive([record(state=states.STARTING)]))
    clock.advance(SCAN)
    clock.advance(REPORT)
    assert reporter.batches == []


def test_events_during_an_operation_are_not_reported(manager, vmm, clock, reporter):
    running_vm(manager)
    vmm.hold = True
    d = pending(manager.op_on("reboot", VM))
    vmm.emit(VM, states.SHUTOFF)               # the reboot's own transitions
    vmm.emit(VM, states.RUN)
    clock.advance(REPORT)
    assert manager.pending_changes == {}
    vmm.hold = False
    vmm.release()
    assert result_of(d)["state"] == states.RUN
    clock.advance(SCAN)
    assert reporter.batches == []


def test_a_late_event_cannot_report_a_state_that_is_over(manager, vmm, clock, reporter):
    running_vm(manager)
    result_of(manager.op_on("pause", VM))
    result_of(manager.op_on("resume", VM))
    vmm.emit(VM, states.PAUSED)                # the pause's event, delivered late
    clock.advance(REPORT)
    assert manager.pending_changes == {} and reporter.batches == []


def test_a_burst_of_events_reads_the_domain_at_most_twice(manager, vmm, clock, reporter):
    running_vm(manager)
    vmm.hold = True
    for state in (states.PAUSED, states.RUN, states.PAUSED):
        vmm.set_state(VM, state)
    assert [c for c in vmm.calls if c[0] == "domain_info"] == [("domain_info", VM)]
    vmm.release()                              # the first read is stale: read again
    assert len([c for c in vmm.calls if c[0] == "domain_info"]) == 2
    vmm.hold = False
    vmm.release()
    clock.advance(REPORT)
    assert [(c["name"], c["state"]) for c in reporter.reported] == [(VM, states.PAUSED)]


def test_a_scan_older_than_an_operation_does_not_undo_it(manager, vmm, clock, reporter):
    running_vm(manager)
    vmm.hold = True
    clock.advance(SCAN)                        # scan asks list_domains: held
    scan_call = vmm.held.pop()
    op = pending(manager.op_on("pause", VM))
    vmm.release()                              # the pause completes first
    assert result_of(op)["state"] == states.PAUSED
    # The stale listing (answered now, from before the pause) says "run".
    stale = [dict(vmm.domains[VM], state=states.RUN)]
    scan_call[0].callback(stale)
    vmm.hold = False
    assert manager.cached_vm(VM).observed["state"] == states.PAUSED
    clock.advance(REPORT)
    assert reporter.batches == []


# -- reporting -------------------------------------------------------------------------

def test_failed_report_is_retried_at_the_next_flush(manager, vmm, clock, reporter):
    running_vm(manager)
    reporter.failing = Unavailable("report: no answer within 60 s")
    vmm.set_state(VM, states.PAUSED)
    clock.advance(REPORT)
    assert len(reporter.batches) == 1 and VM in manager.pending_changes
    reporter.failing = None
    clock.advance(REPORT)
    assert len(reporter.batches) == 2
    assert reporter.batches[1] == reporter.batches[0]
    assert manager.pending_changes == {}
    clock.advance(REPORT)
    assert len(reporter.batches) == 2


def test_detached_changes_keep_the_latest_per_vm_until_reattached(manager, vmm, clock):
    running_vm(manager)
    running_vm(manager, "2.web.alice.usher.local")
    vmm.set_state(VM, states.PAUSED)
    vmm.set_state(VM, states.SHUTOFF)
    vmm.set_state("2.web.alice.usher.local", states.PAUSED)
    vmm.set_state("2.web.alice.usher.local", states.RUN)   # back as the controller knows it
    clock.advance(SCAN)
    assert {n: c["state"] for n, c in manager.pending_changes.items()} == {
        VM: states.SHUTOFF}
    reporter = RecordingReporter(echo_acks)
    manager.set_reporter(reporter)
    clock.advance(REPORT)
    assert [(c["name"], c["state"]) for c in reporter.reported] == [(VM, states.SHUTOFF)]


def test_acknowledgment_that_disagrees_does_not_loop(manager, vmm, clock):
    running_vm(manager)
    reporter = RecordingReporter(lambda changes: [record(c["name"], states.RUN, version=9)
                                                  for c in changes])
    manager.set_reporter(reporter)
    vmm.set_state(VM, states.PAUSED)
    for _ in range(5):
        clock.advance(REPORT)
    clock.advance(SCAN)
    assert len(reporter.batches) == 1
    assert manager.cached_vm(VM).record["version"] == 9


def test_change_during_a_report_in_flight_is_sent_next(manager, vmm, clock):
    running_vm(manager)
    reporter = HeldReporter()
    answers = reporter.answers
    manager.set_reporter(reporter)
    vmm.set_state(VM, states.PAUSED)
    clock.advance(REPORT)
    vmm.set_state(VM, states.RUN)              # while the report is in flight
    clock.advance(REPORT)
    assert len(reporter.batches) == 1          # one batch at a time
    answers[0].callback(None)
    assert manager.pending_changes[VM]["state"] == states.RUN
    clock.advance(REPORT)
    assert [c["state"] for c in reporter.reported] == [states.PAUSED, states.RUN]
    answers[1].callback(None)
    assert manager.pending_changes == {}


def test_drain_waits_for_the_report_in_flight_and_sends_what_came_meanwhile(manager, vmm,
                                                                           clock):
    """What a plain flush cannot promise: a flush while a batch is in flight
    returns at once, leaving the newer change for a later turn."""
    running_vm(manager)
    reporter = HeldReporter()
    answers = reporter.answers
    manager.set_reporter(reporter)
    vmm.set_state(VM, states.PAUSED)
    clock.advance(REPORT)                       # first batch in flight
    vmm.set_state(VM, states.RUN)
    drained = pending(manager.drain())
    answers[0].callback(None)                   # drain now sends the second itself
    assert [c["state"] for c in reporter.reported] == [states.PAUSED, states.RUN]
    assert not drained.called
    answers[1].callback(None)
    assert result_of(drained) is True
    assert manager.pending_changes == {}


def test_drain_gives_up_after_its_rounds_when_reports_keep_failing(manager, vmm, clock):
    running_vm(manager)
    reporter = RecordingReporter(echo_acks)
    reporter.failing = RuntimeError("controller away")
    manager.set_reporter(reporter)
    vmm.set_state(VM, states.PAUSED)
    assert result_of(manager.drain(rounds=3)) is False
    assert len(reporter.batches) == 3
    assert manager.pending_changes[VM]["state"] == states.PAUSED


# -- lifecycle -------------------------------------------------------------------------

def test_shutdown_waits_for_operations_and_refuses_new_ones(manager, vmm, clock):
    running_vm(manager)
    vmm.hold = True
    op = pending(manager.op_on("pause", VM))
    stopping = pending(manager.shutdown())
    with pytest.raises(Unavailable, match="shutting down"):
        result_of(manager.op_on("resume", VM))
    vmm.release()
    assert result_of(op)["state"] == states.PAUSED
    assert result_of(stopping) is None
    calls = len(vmm.calls)
    clock.advance(SCAN * 3)
    assert len(vmm.calls) == calls             # no more scans


# -- against the real LibvirtVMM on libvirt's test driver --------------------------------

FOREIGN_XML = """<domain type='test'>
  <name>foreign</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type>hvm</type></os>
</domain>"""


@pytest.fixture
def real_node(tmp_path, clock):
    """A NodeManager on a LibvirtVMM over a fresh test-driver host. The VMM
    uses the real reactor and a thread pool; scans and flushes are called
    directly (the clock never advances), so nothing depends on timing."""
    from twisted.internet import reactor
    from twisted.python.threadpool import ThreadPool

    from usher.lnm.libvirt_vmm import LibvirtVMM
    from usher.lnm.testhost import write_test_host

    uri = write_test_host(tmp_path / "host.xml", hostname="real1", cpus=4,
                          memory_mib=4096, model="test-model")
    pool = ThreadPool(minthreads=0, maxthreads=2, name="test-lnm")
    pool.start()
    # Without events: their arrival time would race the direct scans below
    # (the event path runs on FakeVMM above).
    vmm = LibvirtVMM(uri, reactor=reactor, pool=pool, state_dir=tmp_path / "state",
                     events=False)
    node = NodeManager(vmm, name="real1", clock=clock, scan_interval=SCAN,
                       report_interval=REPORT)
    reporter = RecordingReporter(echo_acks)
    node.set_reporter(reporter)
    yield node, vmm, reporter
    pool.stop()


async def _started(node, vmm):
    await vmm.connect()
    await node.startup()


async def _on_host(vmm, fn, *args):
    """Change the simulated host behind the LNM's back (same connection: a
    test-driver host exists only inside the connection that opened it)."""
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThreadPool
    return await deferToThreadPool(reactor, vmm._pool, fn, vmm.libvirt_connection, *args)


@pytest_twisted.ensureDeferred
async def test_real_driver_operations_settle_the_cache_and_report_nothing(real_node):
    node, vmm, reporter = real_node
    await _started(node, vmm)
    assert await node.receive([record()]) == 1
    started = await node.start(VM)
    assert started["state"] == states.RUN
    assert started["metadata"] == {"owner": "alice", "cluster": "web"}
    assert (await node.start(VM))["uuid"] == started["uuid"]          # idempotent
    for operation, expected in [("pause", states.PAUSED), ("resume", states.RUN),
                                ("hibernate", states.HIBERNATED), ("restore", states.RUN),
                                ("shutdown", states.SHUTOFF), ("cycle", states.RUN)]:
        info = await node.op_on(operation, VM)
        assert info["state"] == expected, operation
        assert node.cached_vm(VM).record["state"] == expected
    await node.scan()
    await node.drain()
    assert reporter.batches == []
    with pytest.raises(MigrationUnsupported):
        await node.migrate(VM, {"migration_uri": "test:///elsewhere"})
    assert (await node.op_on("destroy", VM))["state"] == states.SHUTOFF
    assert [d["state"] for d in await vmm.list_domains()] == [states.SHUTOFF]
    assert (await node.start(VM))["state"] == states.RUN
    with pytest.raises(InvalidRequest, match="cannot delete"):
        await node.op_on("delete", VM)
    await node.op_on("destroy", VM)
    assert await node.op_on("delete", VM) is None
    assert node.cached_vm(VM) is None
    assert await vmm.list_domains() == []
    await node.shutdown()
    await vmm.close()


@pytest_twisted.ensureDeferred
async def test_real_driver_outside_changes_are_reported(real_node):
    node, vmm, reporter = real_node
    await _started(node, vmm)
    await node.receive([record()])
    await node.start(VM)
    # Paused, then a domain nobody asked for, behind Usher's back.
    await _on_host(vmm, lambda conn: conn.lookupByName(VM).suspend())
    await _on_host(vmm, lambda conn: conn.createXML(FOREIGN_XML, 0))
    await node.scan()
    await node.drain()
    assert sorted((c["name"], c["state"], c["metadata"]) for c in reporter.reported) == [
        (VM, states.PAUSED, {"owner": "alice", "cluster": "web"}),
        ("foreign", states.RUN, {})]
    # The VM vanishes.
    await _on_host(vmm, lambda conn: conn.lookupByName(VM).destroy())
    await _on_host(vmm, lambda conn: conn.lookupByName(VM).undefine())
    await node.scan()
    await node.drain()
    assert (VM, None) in [(c["name"], c["state"]) for c in reporter.batches[-1]]
    assert node.cached_vm(VM).record["state"] == states.MISSING
    await node.shutdown()
    await vmm.close()
