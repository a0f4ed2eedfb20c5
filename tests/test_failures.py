"""Failures, piece by piece (README, "Failures and recovery"): heartbeats,
the LNM's controller sessions, kept exports and hypervisor loss, the link's
early redial, the recovery listener and announcer over real TLS, the
recovery tracker. Deterministic: task.Clock and in-memory doubles, real TLS
on 127.0.0.1 where TLS is the point. The controller's side is in
test_failures_controller.py, whole systems in test_failures_e2e.py.
"""

import types

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.spread import pb
from twisted.test.iosim import connectedServerAndClient

from test_lnm_link import Harness, RETRY
from test_lnm_node import REPORT, SCAN, pending, result_of
from usher import pki, states
from usher.controller.recovery import Recovery, RecoveryAnnouncer, announce
from usher.errors import NoSuchVM, Unavailable
from usher.liveness import HeardBroker, Heartbeat, ping_peer
from usher.lnm.node import NodeManager
from usher.lnm.recovery import RecoveryListener

from tests.fakes import VM, FakeVMM, RecordingReporter, echo_acks, record

from tests import libvirtd


# -- Heartbeat ---------------------------------------------------------------------

class Peer:
    """A ping target that answers at once, never, or fails."""

    def __init__(self):
        self.mode = "answer"
        self.pings = 0
        self.unanswered = []

    def ping(self):
        self.pings += 1
        if self.mode == "answer":
            return defer.succeed(True)
        if self.mode == "fail":
            return defer.fail(Unavailable("ping: connection lost"))
        d = defer.Deferred()
        self.unanswered.append(d)
        return d


def heartbeat(peer, clock, silent):
    return Heartbeat(peer.ping, clock=clock, interval=1.0, timeout=3.0,
                     on_silent=silent.append, name="peer").start()


def test_heartbeat_answered_pings_keep_the_peer_alive():
    clock, peer, silent = task.Clock(), Peer(), []
    beat = heartbeat(peer, clock, silent)
    clock.pump([0.5] * 40)
    assert silent == [] and peer.pings == 20 and beat.running
    beat.stop()


def test_heartbeat_silent_peer_is_declared_after_exactly_the_timeout():
    clock, peer, silent = task.Clock(), Peer(), []
    heartbeat(peer, clock, silent)
    clock.advance(1.0)                 # answered at t=1
    peer.mode = "never"
    clock.advance(1.0)                 # t=2: a ping goes out and stays unanswered
    clock.advance(1.0)                 # t=3: still in flight: no second ping
    assert peer.pings == 2 and len(peer.unanswered) == 1
    clock.advance(0.99)
    assert silent == []
    clock.advance(0.01)                # t=4: 3 s after the last answer
    assert silent == [3.0]
    clock.advance(10)
    assert silent == [3.0] and peer.pings == 2   # once, then stopped
    assert peer.unanswered[0].called             # the ping in flight was cancelled


def test_heartbeat_failing_pings_count_as_silence():
    clock, peer, silent = task.Clock(), Peer(), []
    peer.mode = "fail"
    heartbeat(peer, clock, silent)
    clock.pump([1.0] * 3)
    assert silent == [3.0]


def test_heartbeat_stop_cancels_everything():
    clock, peer, silent = task.Clock(), Peer(), []
    beat = heartbeat(peer, clock, silent)
    beat.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert silent == [] and peer.pings == 0


def test_heartbeat_refuses_nonsense():
    with pytest.raises(ValueError):
        Heartbeat(Peer().ping, clock=task.Clock(), interval=0, timeout=1, on_silent=print)


# -- protocol-level pings between two HeardBrokers -----------------------------------

def broker_pair():
    """Two HeardBrokers connected in memory -> (pinger, peer, pump, clock)."""
    clock = task.Clock()

    def broker(is_client):
        broker = HeardBroker(isClient=is_client)
        broker.factory = types.SimpleNamespace(clock=clock,
                                               clientConnectionMade=lambda broker: None)
        return broker

    peer, pinger, pump = connectedServerAndClient(lambda: broker(0), lambda: broker(1))
    return pinger, peer, pump, clock


def test_broker_heartbeat_is_answered_and_notes_the_peer_heard():
    pinger, peer, pump, clock = broker_pair()
    clock.advance(7)
    answered = pinger.heartbeat()
    both = pinger.heartbeat()                     # in flight together: one answer
    pump.flush()
    assert result_of(answered) is True and result_of(both) is True
    assert peer.last_heard == 7 and pinger.last_heard == 7


def test_broker_tells_its_peer_it_is_alive_without_an_answer():
    pinger, peer, pump, clock = broker_pair()
    pump.flush()
    heard_before = pinger.last_heard
    clock.advance(3)
    pinger.tell_alive()
    pump.flush()
    assert pinger.last_sent == 3 and peer.last_heard == 3
    assert pinger.last_heard == heard_before      # nothing came back


def test_broker_heartbeat_of_a_peer_that_stopped_answering_times_out():
    pinger, peer, pump, clock = broker_pair()
    peer.answers_heartbeats = False
    d = ping_peer(pinger, None, clock=clock, timeout=3)
    pump.flush()
    failures = []
    d.addErrback(failures.append)
    clock.advance(2.9)
    assert not failures
    clock.advance(0.2)
    assert failures and failures[0].check(defer.TimeoutError)
    assert pinger._heartbeats == []               # forgotten, no late callback
    peer.answers_heartbeats = True
    again = pinger.heartbeat()
    pump.flush()
    assert result_of(again) is True               # the next one is answered normally


def test_broker_heartbeat_fails_when_the_connection_is_lost():
    pinger, peer, pump, clock = broker_pair()
    peer.answers_heartbeats = False
    d = pinger.heartbeat()
    pump.flush()
    failures = []
    d.addErrback(failures.append)
    pinger.transport.loseConnection()
    pump.flush()
    assert failures and failures[0].check(pb.PBConnectionLost)
    later = []
    pinger.heartbeat().addErrback(later.append)
    assert later and later[0].check(pb.PBConnectionLost)


def test_ping_peer_falls_back_to_a_remote_call_on_a_plain_broker():
    calls = []
    d = ping_peer(pb.Broker(), lambda: calls.append(1) or defer.succeed("pong"),
                  clock=task.Clock(), timeout=1)
    assert result_of(d) == "pong" and calls == [1]


# -- the LNM: sessions, kept exports, hypervisor loss ------------------------------

class WatchedVMM(FakeVMM):
    """A FakeVMM that can lose its hypervisor connection."""

    def __init__(self):
        super().__init__()
        self.watchers = []
        self.up = True

    def watch_connection(self, callback):
        self.watchers.append(callback)

    def lose(self):
        self.up = False
        for callback in self.watchers:
            callback(False)

    def regain(self):
        self.up = True
        for callback in self.watchers:
            callback(True)

    def _call(self, method, action, *args):
        if not self.up:
            self.calls.append((method,) + args)
            return defer.fail(Unavailable(f"the hypervisor at {self.uri} is not connected"))
        return super()._call(method, action, *args)


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def vmm():
    return WatchedVMM()


@pytest.fixture
def node(vmm, clock):
    manager = NodeManager(vmm, name="lnm1", clock=clock, scan_interval=SCAN,
                          report_interval=REPORT)
    result_of(manager.startup())
    yield manager
    vmm.release()
    result_of(manager.shutdown())


@pytest.fixture
def reporter(node):
    reporter = RecordingReporter(echo_acks)
    node.set_reporter(reporter)
    return reporter


def running(node, name=VM):
    result_of(node.receive([record(name)]))
    return result_of(node.start(name))


def release_last(vmm):
    """Answer the latest held VMM call only."""
    d, action = vmm.held.pop()
    vmm._answer(d, action)


def reported_states(reporter, name):
    return [c["state"] for c in reporter.reported if c["name"] == name]


def test_a_start_that_outlives_its_connection_is_reported_to_the_next(node, vmm, clock,
                                                                      reporter):
    result_of(node.receive([record()]))
    vmm.hold = True
    started = pending(node.start(VM))
    node.begin_session()                       # the connection went; a new one came
    listed = pending(node.list_vms())          # the new controller's inventory
    release_last(vmm)                          # the listing answers first: busy VM
    vmm.release()                              # then the start finishes
    inventory = result_of(listed)
    assert [(d["name"], d["state"], d.get("busy")) for d in inventory] == [(VM, None, True)]
    assert result_of(started)["state"] == states.RUN
    clock.advance(REPORT)
    assert reported_states(reporter, VM) == [states.RUN]


def test_a_start_answered_in_its_session_is_not_reported(node, vmm, clock, reporter):
    running(node)
    clock.advance(REPORT)
    assert reporter.reported == []


def test_an_export_that_outlives_its_connection_is_put_back(node, vmm, clock):
    running(node)
    vmm.hold = True
    exported = pending(node.export_image(VM))
    node.begin_session()
    vmm.hold = False
    vmm.release()
    with pytest.raises(Unavailable, match="put back"):
        result_of(exported)
    assert vmm.domains[VM]["state"] == states.RUN
    assert node.retained_exports() == []


def test_an_import_that_outlives_its_connection_is_undone(node, vmm, clock, reporter):
    payload = {"xml": "<domain/>", "image": b"IMAGE:" + VM.encode(), "state": states.RUN}
    result_of(node.receive([record(state=states.MIGRATING)]))
    vmm.hold = True
    imported = pending(node.import_image(VM, payload))
    node.begin_session()
    listed = pending(node.list_vms())
    release_last(vmm)
    assert result_of(listed)[-1]["busy"] is True
    vmm.hold = False
    vmm.release()
    assert result_of(imported) is None
    assert VM not in vmm.domains            # its source keeps the VM
    clock.advance(REPORT)
    assert reported_states(reporter, VM) == [None]


def test_an_export_is_kept_and_listed_until_released_or_restored(node, vmm):
    running(node)
    payload = result_of(node.export_image(VM))
    assert VM not in vmm.domains and node.retained_exports() == [VM]
    listed = result_of(node.list_vms())
    assert [(d["name"], d["state"], d.get("retained")) for d in listed] == [
        (VM, states.MIGRATING, True)]
    # A replayed export answers the kept one: nothing is exported twice.
    assert result_of(node.export_image(VM)) is payload
    assert result_of(node.restore_export(VM))["state"] == states.RUN
    assert vmm.domains[VM]["state"] == states.RUN and node.retained_exports() == []
    # Restoring again is answered with the VM as it is (idempotent).
    assert result_of(node.restore_export(VM))["state"] == states.RUN
    result_of(node.export_image(VM))
    assert result_of(node.release_export(VM)) is True
    assert result_of(node.release_export(VM)) is False
    assert node.retained_exports() == [] and VM not in vmm.domains
    with pytest.raises(NoSuchVM):
        result_of(node.restore_export(VM))


def test_replayed_operations_answer_with_the_vm_as_it_is(node, vmm):
    running(node)
    assert result_of(node.op_on("pause", VM))["state"] == states.PAUSED
    assert result_of(node.op_on("pause", VM))["state"] == states.PAUSED
    assert result_of(node.start(VM))["state"] == states.PAUSED      # no second VM
    assert len(vmm.domains) == 1


def test_hypervisor_loss_makes_vms_unknown_not_stopped_then_rescans(node, vmm, clock,
                                                                    reporter):
    running(node)
    running(node, "2.web.alice.usher.local")
    info = result_of(node.get_node_info())
    clock.advance(REPORT)
    vmm.lose()
    clock.advance(REPORT)
    assert sorted((c["name"], c["state"]) for c in reporter.reported) == [
        ("1.web.alice.usher.local", states.UNKNOWN), ("2.web.alice.usher.local",
                                                      states.UNKNOWN)]
    calls = len(vmm.calls)
    clock.advance(SCAN)                         # no scan while it is away
    assert len(vmm.calls) == calls
    assert {d["state"] for d in result_of(node.list_vms())} == {states.UNKNOWN}
    assert result_of(node.get_node_info()) == dict(info, hypervisor_connected=False)
    with pytest.raises(Unavailable):
        result_of(node.op_on("pause", VM))
    del vmm.domains["2.web.alice.usher.local"]  # gone while away
    vmm.regain()
    clock.advance(REPORT)
    assert sorted((c["name"], c["state"]) for c in reporter.batches[-1]) == [
        (VM, states.RUN), ("2.web.alice.usher.local", None)]


def test_records_of_an_earlier_session_are_dropped_unless_on_the_host(node, vmm):
    running(node)
    result_of(node.receive([record("2.web.alice.usher.local")]))   # never started
    node.begin_session()
    result_of(node.receive([record("3.web.alice.usher.local")]))   # this session's
    result_of(node.list_vms())
    assert node.cached_names() == ["1.web.alice.usher.local", "3.web.alice.usher.local"]


# -- the link: early redial and its own heartbeat ----------------------------------

@pytest.fixture
def harness():
    h = Harness()
    h.link.factory.ping_interval = 1.0
    h.link.factory.ping_timeout = 3.0
    h.link.startService()
    yield h
    if h.link.running:
        d = h.link.stopService()
        if h.pump is not None:
            h.pump.flush()
        result_of(d)
    result_of(h.manager.shutdown())


def test_retry_now_brings_the_next_attempt_forward(harness):
    harness.connect()
    assert harness.link.retry_now() == "attached"
    harness.pump.server.transport.loseConnection()
    harness.pump.flush()
    assert not harness.link.attached
    assert harness.completer.succeedOnce() is None     # waiting RETRY seconds
    assert harness.link.retry_now() == "reconnecting"
    harness.reactor.advance(0)
    harness.connect()                                  # at once, not RETRY later
    assert harness.link.attached
    assert len(harness.controller.attaches) == 2


def test_retry_now_leaves_an_attempt_in_progress_alone(harness):
    assert harness.link.retry_now() == "connecting"


def test_the_lnm_drops_a_controller_that_stops_answering_pings(harness):
    harness.connect()
    for _ in range(10):
        harness.advance(0.5)
    assert harness.link.attached                       # answered
    harness.pump.server.answers_heartbeats = False
    for _ in range(8):
        harness.advance(0.5)
    assert not harness.link.attached                   # dropped, will redial
    assert harness.manager.session >= 2
    harness.reactor.advance(RETRY)
    harness.connect()
    assert harness.link.attached


# -- recovery announcements over real TLS ------------------------------------------

class FakeLink:
    def __init__(self, answer="reconnecting"):
        self.answer = answer
        self.calls = 0

    def retry_now(self):
        self.calls += 1
        return self.answer


@pytest.fixture
def site(tmp_path):
    """A CA, the controller's certificate, LNMs', and impostors: another LNM
    (role lnm), a controller certificate of the same CA that does not name
    the controller, one of another CA."""
    pki.init_ca(tmp_path / "ca")
    pki.issue_cert(tmp_path / "ca", "usherctrl", tmp_path / "certs", role="controller",
                   hostnames=["ctrl.test"])
    pki.issue_cert(tmp_path / "ca", "otherctrl", tmp_path / "certs", role="controller",
                   hostnames=["ctrl.elsewhere.test"])
    pki.issue_cert(tmp_path / "ca", "lnm1", tmp_path / "certs", role="lnm")
    pki.issue_cert(tmp_path / "ca", "lnm2", tmp_path / "certs", role="lnm")
    pki.init_ca(tmp_path / "other")
    pki.issue_cert(tmp_path / "other", "usherctrl", tmp_path / "rogue", role="controller",
                   hostnames=["ctrl.test"])
    return tmp_path


def cert(site, name, where="certs"):
    return str(site / where / f"{name}_cert.pem"), str(site / where / f"{name}_key.pem")


@pytest_twisted.async_yield_fixture
async def listener(site):
    from twisted.internet import reactor
    link = FakeLink()
    cert_file, key_file = cert(site, "lnm1")
    service = RecoveryListener(reactor, link, lnm_name="lnm1", interface="127.0.0.1", port=0,
                               cert_file=cert_file, key_file=key_file,
                               ca_file=str(site / "ca" / "ca_cert.pem"),
                               controller_identity="ctrl.test")
    service.startService()
    assert service.listening
    service.link = link
    yield service
    await defer.maybeDeferred(service.stopService)


def announce_as(site, listener, who="usherctrl", where="certs", lnm="lnm1"):
    from twisted.internet import reactor
    cert_file, key_file = cert(site, who, where)
    options = pki.client_tls_options(lnm, str(site / "ca" / "ca_cert.pem"), cert_file,
                                     key_file, peer_role="lnm")
    d = announce(reactor, "127.0.0.1", listener.advertised_port(), options, timeout=5)
    d.addTimeout(10, reactor)
    return d


@pytest_twisted.ensureDeferred
async def test_the_controller_announcement_makes_the_lnm_redial(site, listener):
    assert await announce_as(site, listener) == "OK reconnecting"
    assert listener.link.calls == 1
    listener.link.answer = "attached"
    assert await announce_as(site, listener) == "OK attached"


@pytest_twisted.ensureDeferred
async def test_an_announcement_from_another_lnm_is_refused(site, listener):
    # Refused in the handshake: an LNM's certificate is not the controller's.
    with pytest.raises(Exception):
        await announce_as(site, listener, who="lnm2")
    assert listener.link.calls == 0


@pytest_twisted.ensureDeferred
async def test_an_announcement_from_a_controller_not_ours_is_refused(site, listener):
    answer = await announce_as(site, listener, who="otherctrl")
    assert answer.startswith("ERR") and "does not name the controller" in answer
    assert listener.link.calls == 0


@pytest_twisted.ensureDeferred
async def test_an_announcement_signed_by_another_ca_never_gets_through(site, listener):
    with pytest.raises(Exception):
        await announce_as(site, listener, where="rogue")
    assert listener.link.calls == 0


@pytest_twisted.ensureDeferred
async def test_the_controller_checks_it_speaks_to_the_lnm_it_knew(site, listener):
    with pytest.raises(Exception):
        await announce_as(site, listener, lnm="lnm7")   # lnm1's certificate answers
    assert listener.link.calls == 0


@pytest_twisted.ensureDeferred
async def test_a_malformed_announcement_is_refused(site, listener):
    from twisted.internet import reactor
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
    from twisted.protocols.basic import LineOnlyReceiver
    answers = defer.Deferred()

    class Sender(LineOnlyReceiver):
        def connectionMade(self):
            self.sendLine(b"PLEASE CONNECT TO evil.example 1")

        def lineReceived(self, line):
            answers.callback(line.decode())

    cert_file, key_file = cert(site, "usherctrl")
    options = pki.client_tls_options("lnm1", str(site / "ca" / "ca_cert.pem"), cert_file,
                                     key_file, peer_role="lnm")
    from twisted.internet.endpoints import connectProtocol
    await connectProtocol(wrapClientTLS(options, HostnameEndpoint(
        reactor, "127.0.0.1", listener.advertised_port())), Sender())
    assert (await answers.addTimeout(10, reactor)).startswith("ERR expected")
    assert listener.link.calls == 0


# -- the recovery tracker and announcer --------------------------------------------

def test_recovery_is_done_when_every_known_lnm_is_back(clock):
    done = []
    recovery = Recovery(["lnm1", "lnm2"], clock=clock, window=30, on_done=lambda: done.append(1))
    waited = recovery.wait()
    assert not recovery.done and "lnm1, lnm2" in recovery.describe()
    recovery.lnm_attached("lnm2", object())
    assert not waited.called and recovery.describe().startswith("waiting for LNM lnm1")
    recovery.lnm_attached("lnm1", object())
    assert recovery.done and waited.called and done == [1]
    assert clock.getDelayedCalls() == []


def test_recovery_ends_with_its_window(clock):
    recovery = Recovery(["lnm1", "lnm2"], clock=clock, window=30)
    recovery.lnm_attached("lnm1", object())
    clock.advance(25)
    assert not recovery.done and recovery.describe() == (
        "waiting for LNM lnm2 to reconnect (at most 5 s more)")
    clock.advance(5)
    assert recovery.done and recovery.waiting == {"lnm2"}


def test_a_controller_that_knew_no_lnm_is_not_recovering(clock):
    assert Recovery([], clock=clock, window=30).done


class KnownLNMsStub:
    def __init__(self, entries):
        self.entries = entries


def test_the_announcer_retries_with_backoff_until_the_lnm_is_back(clock):
    calls = []
    answers = {}

    def fake_announce(reactor, host, port, options):
        calls.append((clock.seconds(), host, port, options))
        answers[len(calls)] = d = defer.Deferred()
        return d

    known = KnownLNMsStub({"lnm1": {"recovery_host": "10.0.0.1", "recovery_port": 7392},
                           "lnm2": {"recovery_host": "10.0.0.2", "recovery_port": None}})
    recovery = Recovery(["lnm1", "lnm2"], clock=clock, window=60)
    announcer = RecoveryAnnouncer(known, recovery, reactor=None, clock=clock,
                                  tls_options_for=lambda name: f"tls-for-{name}",
                                  initial_delay=1, max_delay=4, announce=fake_announce)
    announcer.startService()
    assert calls == [(0, "10.0.0.1", 7392, "tls-for-lnm1")]   # lnm2 left no address
    answers[1].errback(ConnectionRefusedError("refused"))
    clock.advance(1)
    answers[2].errback(ConnectionRefusedError("refused"))
    clock.advance(2)
    answers[3].callback("OK reconnecting")
    assert [c[0] for c in calls] == [0, 1, 3]
    recovery.lnm_attached("lnm1", object())
    clock.advance(60)
    assert len(calls) == 3                     # back: no more announcements
    announcer.stopService()


# -- the hypervisor connection (a real libvirtd, killed and restarted) --------------

@pytest.mark.skipif(not libvirtd.available(),
                    reason="needs root and libvirtd (Debian: libvirt-daemon)")
@pytest_twisted.ensureDeferred
async def test_libvirt_vmm_reconnects_with_backoff_after_libvirtd_restarts(tmp_path):
    from twisted.internet import reactor, threads
    from twisted.python.threadpool import ThreadPool

    from tests.e2e import wait_for
    from tests.libvirtd import PrivateLibvirtd
    from usher.lnm.libvirt_vmm import LibvirtVMM

    host = PrivateLibvirtd(tmp_path / "libvirtd")
    await threads.deferToThread(host.start)
    pool = ThreadPool(minthreads=1, maxthreads=2, name="reconnect-test")
    pool.start()
    vmm = LibvirtVMM(host.uri, reactor=reactor, pool=pool, state_dir=str(tmp_path / "state"),
                     reconnect_initial_delay=0.05, reconnect_max_delay=0.2)
    seen = []
    vmm.watch_connection(seen.append)
    try:
        await vmm.connect()
        await threads.deferToThread(host.kill)
        await wait_for(lambda: seen == [False], timeout=5)
        assert not vmm.connected
        with pytest.raises(Unavailable):
            await vmm.list_domains()
        await wait_for(lambda: vmm.hypervisor.reconnect_attempt >= 2, timeout=5)   # backing off
        await threads.deferToThread(host.start)
        await wait_for(lambda: seen == [False, True], timeout=5)
        assert await vmm.list_domains() == []
        await threads.deferToThread(host.kill)
        await wait_for(lambda: seen == [False, True, False], timeout=5)
        await vmm.close()                          # closing stops the reconnecting
        await threads.deferToThread(host.start)
        await task.deferLater(reactor, 0.5, lambda: None)
        assert seen == [False, True, False] and not vmm.connected
    finally:
        await vmm.close()
        pool.stop()
        await threads.deferToThread(host.stop)


# -- the one thing the controller persists ------------------------------------------

def test_the_lnm_list_survives_kill_9_at_any_moment(tmp_path):
    """A process rewrites lnms.json as fast as it can and is killed at
    several moments: the file is always a whole list, old or new."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from usher.controller.known_lnms import KnownLNMs

    path = tmp_path / "state" / "lnms.json"
    writer = (
        "import sys\n"
        "from usher.controller.known_lnms import KnownLNMs\n"
        f"known = KnownLNMs({str(path)!r})\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    known.remember(f'lnm{i % 50}', recovery_host='10.0.0.1', recovery_port=i,\n"
        "                   hostname='h' * (i % 300))\n"
    )
    for delay in (0.0, 0.05, 0.1, 0.15, 0.2):
        proc = subprocess.Popen([sys.executable, "-c", writer], cwd=os.getcwd())
        # Killed at several moments once it writes (its start-up may take a
        # while on a loaded machine: wait for its first file, bounded).
        deadline = time.monotonic() + 60
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never wrote"
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with open(path, encoding="utf-8") as f:
            data = json.load(f)                  # never torn
        assert data and all(isinstance(v, dict) and "recovery_port" in v
                            for v in data.values())
        assert KnownLNMs(str(path)).entries == data
    # Loading removes the temporary files of interrupted writes.
    assert os.listdir(path.parent) == ["lnms.json"]


def test_the_controller_is_recognised_by_name_or_address(tmp_path):
    from twisted.internet.ssl import Certificate

    from usher.lnm.recovery import certificate_names

    pki.init_ca(tmp_path / "ca")
    pki.issue_cert(tmp_path / "ca", "usherctrl", tmp_path, role="controller",
                   hostnames=["ctrl.example.org"], ips=["10.1.2.3"])
    # What a TLS transport's getPeerCertificate gives: pyOpenSSL's X509.
    certificate = Certificate.loadPEM((tmp_path / "usherctrl_cert.pem").read_bytes()).original

    class Transport:
        def getPeerCertificate(self):
            return certificate

    for identity, expected in [("ctrl.example.org", True), ("usherctrl", True),
                               ("10.1.2.3", True), ("10.1.2.4", False),
                               ("lnm1.example.org", False)]:
        assert certificate_names(Transport(), identity) is expected, identity
    assert certificate_names(object(), "usherctrl") is False     # not TLS
