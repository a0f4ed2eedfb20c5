"""What Usher does to stay cheap with hundreds of LNMs and thousands of VMs
(issue "Benchmarks at scale"): quiet-aware heartbeats on ticks, batched
starts, changes reported at once, indexed selections, paced recovery
announcements, and the fleet of LNMs in one process.
"""

import types

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from usher import states
from usher.controller.recovery import Recovery, RecoveryAnnouncer
from usher.controller.state import GlobalState
from usher.errors import ConfigError, NoSuchVM, OperationFailed, Unavailable, from_name
from usher.liveness import HeardBroker, Heartbeat, on_tick
from usher.lnm.fleet import Fleet, member_names
from usher.lnm.node import NodeManager

from tests.fakes import FakeVMM, HeldReporter, record
from tests.test_lnm_node import REPORT, SCAN, result_of

DOMAIN = "usher.test"


# -- heartbeats that listen before they ask ------------------------------------------

class Peer:
    def __init__(self):
        self.pings = 0
        self.answer = True

    def ping(self):
        self.pings += 1
        return defer.succeed(True) if self.answer else defer.Deferred()


def test_a_peer_that_keeps_talking_is_never_pinged_nor_silent():
    clock, peer, silent, heard = task.Clock(), Peer(), [], [0.0]
    beat = Heartbeat(peer.ping, clock=clock, interval=1.0, timeout=3.0,
                     on_silent=silent.append, last_heard=lambda: heard[0]).start()
    for _ in range(40):
        clock.advance(0.5)
        heard[0] = clock.seconds()          # it sent something (a report, its own ping)
    assert peer.pings == 0 and silent == [] and beat.running
    beat.stop()


def test_a_quiet_peer_is_pinged_after_patience_and_silent_after_timeout():
    clock, peer, silent = task.Clock(), Peer(), []
    peer.answer = False
    Heartbeat(peer.ping, clock=clock, interval=1.0, timeout=3.0, patience=2.0,
              on_silent=silent.append, last_heard=lambda: 0.0).start()
    clock.advance(1.0)
    assert peer.pings == 0                  # quiet for 1 s: patience is 2
    clock.advance(1.0)
    assert peer.pings == 1                  # quiet for 2 s: asked
    clock.advance(0.99)
    assert silent == []
    clock.advance(0.01)
    assert silent == [3.0]                  # 3 s since it was last heard


def test_traffic_after_the_last_answer_postpones_silence():
    clock, peer, silent, heard = task.Clock(), Peer(), [], [0.0]
    peer.answer = False
    Heartbeat(peer.ping, clock=clock, interval=1.0, timeout=3.0, on_silent=silent.append,
              last_heard=lambda: heard[0]).start()
    clock.advance(2.5)
    heard[0] = 2.5                          # a report came, no answer to the pings
    clock.advance(2.9)
    assert silent == []
    clock.advance(0.1)
    assert silent == [3.0]


class Teller:
    """This side's link: what it last sent, and its signs of life."""

    def __init__(self, clock):
        self.clock = clock
        self.sent = 0.0
        self.tells = []

    def tell(self):
        self.tells.append(self.clock.seconds())
        self.sent = self.clock.seconds()

    def send(self):
        self.sent = self.clock.seconds()


def test_a_side_that_hears_its_peer_tells_it_is_alive_instead_of_asking():
    clock, peer, silent, heard = task.Clock(), Peer(), [], [0.0]
    side = Teller(clock)
    beat = Heartbeat(peer.ping, clock=clock, interval=1.0, timeout=6.0, patience=4.0,
                     on_silent=silent.append, last_heard=lambda: heard[0],
                     tell=side.tell, last_sent=lambda: side.sent).start()
    for step in range(1, 21):
        clock.advance(0.5)
        if step % 6 == 0:
            heard[0] = clock.seconds()      # its answer to a report, every 3 s
        if step == 9:
            side.send()                     # a report of ours at 4.5 s
    assert peer.pings == 0 and silent == [] and beat.running
    # Once per second of saying nothing, the report putting the next off.
    assert side.tells == [1.0, 2.0, 3.0, 4.0, 5.5, 6.5, 7.5, 8.5, 9.5]
    beat.stop()


def test_a_side_that_stops_hearing_its_peer_asks_after_patience():
    clock, peer, silent = task.Clock(), Peer(), []
    peer.answer = False
    side = Teller(clock)
    Heartbeat(peer.ping, clock=clock, interval=1.0, timeout=6.0, patience=4.0,
              on_silent=silent.append, last_heard=lambda: 0.0, tell=side.tell,
              last_sent=lambda: side.sent).start()
    clock.pump([1.0] * 4)
    assert side.tells == [1.0, 2.0, 3.0] and peer.pings == 1    # asked at 4 s
    clock.pump([1.0] * 2)
    assert silent == [6.0]


def test_telling_needs_to_know_what_was_sent_and_heard():
    for kwargs in ({"tell": print}, {"last_sent": lambda: 0.0},
                   {"tell": print, "last_sent": lambda: 0.0}):
        with pytest.raises(ValueError):
            Heartbeat(Peer().ping, clock=task.Clock(), interval=1, timeout=3,
                      on_silent=print, **kwargs)


class TurnClock(task.Clock):
    """A clock whose zero-delay calls wait for ``turn()``, as a reactor's
    wait for its next iteration, after it has read its sockets."""

    def __init__(self):
        super().__init__()
        self.next_turn = []

    def callLater(self, delay, f, *args, **kwargs):
        if delay == 0:
            self.next_turn.append((f, args, kwargs))
            return None
        return super().callLater(delay, f, *args, **kwargs)

    def turn(self):
        calls, self.next_turn = self.next_turn, []
        for f, args, kwargs in calls:
            f(*args, **kwargs)


def test_silence_is_judged_after_reading_what_waited_during_a_stall():
    clock, peer, silent, heard = TurnClock(), Peer(), [], [0.0]
    peer.answer = False
    Heartbeat(peer.ping, clock=clock, interval=1.0, timeout=3.0, patience=2.0,
              on_silent=silent.append, last_heard=lambda: heard[0]).start()
    clock.advance(3.0)                      # the watchdog is due; the process stalled
    assert silent == []
    heard[0] = 3.0                          # the next turn reads the peer's message
    clock.turn()
    clock.advance(2.9)
    assert silent == []                     # alive: judged again 3 s after it spoke
    clock.advance(0.1)
    clock.turn()
    assert silent == [3.0]


def test_heartbeat_timers_fall_on_ticks():
    clock = task.Clock()
    clock.advance(0.3)
    assert on_tick(clock, 1.0, 0.5) == pytest.approx(1.2)     # ends at 1.5
    assert on_tick(clock, 1.2, 0.5) == pytest.approx(1.2)     # 1.5: already on a tick
    assert on_tick(clock, 1.0, None) == 1.0
    peer, silent = Peer(), []
    peer.answer = False
    Heartbeat(peer.ping, clock=clock, interval=1.0, timeout=3.0, on_silent=silent.append,
              tick=0.5).start()
    assert sorted(call.getTime() for call in clock.getDelayedCalls()) == [1.5, 3.5]
    clock.advance(3.2)
    assert silent == [3.2]                  # due at 3.3, declared on the 3.5 tick


def test_a_heard_broker_notes_when_its_peer_last_sent_anything():
    clock = task.Clock()
    broker = HeardBroker()
    broker.factory = types.SimpleNamespace(clock=clock)
    broker.makeConnection(StringTransport())
    assert broker.last_heard is None
    clock.advance(7)
    broker.dataReceived(b"")
    assert broker.last_heard == 7


# -- batched starts ------------------------------------------------------------------

@pytest.fixture
def manager():
    clock, vmm = task.Clock(), FakeVMM()
    node = NodeManager(vmm, name="lnm1", clock=clock, scan_interval=SCAN,
                       report_interval=REPORT)
    result_of(node.startup())
    node.clock_ = clock
    yield node
    result_of(node.shutdown())


def test_start_many_answers_for_each_vm_in_order(manager):
    names = ["1.web.alice.usher.local", "2.web.alice.usher.local"]
    result_of(manager.receive([record(n) for n in names]))
    outcomes = result_of(manager.start_many(names + ["3.web.alice.usher.local"]))
    assert [name for name, _ in outcomes] == names + ["3.web.alice.usher.local"]
    assert [info["state"] for _, info in outcomes[:2]] == [states.RUN, states.RUN]
    assert isinstance(outcomes[2][1], NoSuchVM)         # never received: that VM only
    assert sorted(manager.vmm.domains) == names


def test_start_many_reports_an_unexpected_failure_as_that_vms_own(manager):
    names = ["1.web.alice.usher.local", "2.web.alice.usher.local"]
    result_of(manager.receive([record(n) for n in names]))
    original = manager.vmm.create

    def create(spec):
        if spec["name"] == names[0]:
            raise KeyError("a bug")
        return original(spec)

    manager.vmm.create = create
    outcomes = dict(result_of(manager.start_many(names)))
    assert isinstance(outcomes[names[0]], OperationFailed)
    assert "internal error" in str(outcomes[names[0]])
    assert outcomes[names[1]]["state"] == states.RUN


def test_errors_sent_as_data_keep_their_kind():
    assert isinstance(from_name("NoSuchVM", "gone"), NoSuchVM)
    assert str(from_name("Unavailable", "down")) == "down"
    assert type(from_name("SomethingElse", "x")).__name__ == "UsherError"


@pytest_twisted.ensureDeferred
async def test_creates_asked_in_one_turn_go_to_the_pool_in_a_few_jobs(tmp_path):
    from twisted.internet import reactor
    from twisted.python.threadpool import ThreadPool

    from usher.lnm.libvirt_vmm import LibvirtVMM
    from usher.lnm.testhost import write_test_host

    pool = ThreadPool(minthreads=0, maxthreads=2)
    jobs = []
    submit = pool.callInThreadWithCallback

    def counting(*args, **kwargs):
        jobs.append(args)
        return submit(*args, **kwargs)

    pool.callInThreadWithCallback = counting
    pool.start()
    uri = write_test_host(str(tmp_path / "host.xml"), hostname="h", cpus=8,
                          memory_mib=8192, model="m")
    vmm = LibvirtVMM(uri, reactor=reactor, pool=pool, state_dir=str(tmp_path / "state"),
                     events=False)
    try:
        await vmm.connect()
        jobs.clear()
        specs = [{"name": f"{i}.web.alice.{DOMAIN}", "memory_mib": 64, "vcpus": 1,
                  "owner": "alice", "cluster": "web"} for i in range(1, 8)]
        specs.append({"name": "bad/name", "memory_mib": 64, "vcpus": 1})
        results = await defer.DeferredList([vmm.create(spec) for spec in specs[:-1]] + [
            defer.maybeDeferred(vmm.create, specs[-1])], consumeErrors=True)
        assert len(jobs) == 2                          # one per pool thread, not per VM
        infos = [info for ok, info in results[:-1]]
        assert all(ok for ok, _ in results[:-1]) and not results[-1][0]
        assert [i["name"] for i in infos] == [s["name"] for s in specs[:-1]]
        assert {i["state"] for i in infos} == {states.RUN}
        assert infos[0]["metadata"] == {"owner": "alice", "cluster": "web"}
        listed = {d["name"]: d for d in await vmm.list_domains()}
        assert {n: listed[n]["uuid"] for n in listed} == {i["name"]: i["uuid"] for i in infos}
    finally:
        await vmm.close()
        pool.stop()


# -- changes reported at once, batched while a report is on its way -------------------

def test_a_change_is_reported_on_the_next_turn_and_later_ones_wait_for_the_answer(manager):
    clock, vmm = manager.clock_, manager.vmm
    names = [f"{i}.web.alice.usher.local" for i in (1, 2, 3)]
    result_of(manager.receive([record(n) for n in names]))
    for name in names:
        result_of(manager.start(name))
    reporter = HeldReporter()
    manager.set_reporter(reporter)
    vmm.set_state(names[0], states.PAUSED)
    assert reporter.batches == []
    clock.advance(0)                                    # the next reactor turn
    assert [[c["name"] for c in b] for b in reporter.batches] == [[names[0]]]
    vmm.set_state(names[1], states.PAUSED)
    vmm.set_state(names[2], states.PAUSED)
    clock.advance(0)
    assert len(reporter.batches) == 1                   # one report at a time
    reporter.answers[0].callback(None)
    clock.advance(0)
    assert sorted(c["name"] for c in reporter.batches[1]) == names[1:]
    reporter.answers[1].callback(None)
    assert manager.pending_changes == {}


def test_a_failed_report_is_retried_after_report_interval(manager):
    clock, vmm = manager.clock_, manager.vmm
    result_of(manager.receive([record()]))
    result_of(manager.start(record()["name"]))
    reporter = HeldReporter()
    reporter.failing = Unavailable("report: connection lost")
    manager.set_reporter(reporter)
    vmm.set_state(record()["name"], states.PAUSED)
    clock.advance(0)
    reporter.answers[0].callback(None)
    clock.advance(REPORT * 0.9)
    assert len(reporter.batches) == 1
    reporter.failing = None
    clock.advance(REPORT * 0.1)
    assert len(reporter.batches) == 2
    reporter.answers[1].callback(None)
    assert manager.pending_changes == {}


def test_a_late_event_saying_what_is_known_reads_nothing(manager):
    vmm = manager.vmm
    name = record()["name"]
    result_of(manager.receive([record()]))
    result_of(manager.start(name))
    vmm.calls.clear()
    vmm.emit(name, states.RUN)                          # the start's own event, late
    assert vmm.calls == []
    vmm.domains[name]["state"] = states.PAUSED
    vmm.emit(name, states.PAUSED)                       # news: read afresh
    assert vmm.calls == [("domain_info", name)]


# -- the global state: indexes instead of scans ------------------------------------------

def test_owned_views_and_cluster_members_follow_every_change():
    state = GlobalState(DOMAIN)
    for name in (f"1.web.alice.{DOMAIN}", f"2.web.alice.{DOMAIN}", f"1.db.bob.{DOMAIN}"):
        state.add(state.new_record(name, state=states.RUN, lnm="lnm1"))
    view = state.owned_view("alice")
    assert sorted(view) == [f"1.web.alice.{DOMAIN}", f"2.web.alice.{DOMAIN}"]
    assert f"1.db.bob.{DOMAIN}" not in view and view.get(f"1.db.bob.{DOMAIN}") is None
    assert state.owned_by("alice") == dict(view)
    assert state.cluster_members(["web"]) == {f"1.web.alice.{DOMAIN}",
                                              f"2.web.alice.{DOMAIN}"}
    assert state.cluster_members(["db", "web"], owner="bob") == {f"1.db.bob.{DOMAIN}"}
    state.update(f"2.web.alice.{DOMAIN}", cluster="db")
    assert state.cluster_members(["db"], owner="alice") == {f"2.web.alice.{DOMAIN}"}
    state.remove(f"1.web.alice.{DOMAIN}")
    assert sorted(state.owned_view("alice")) == [f"2.web.alice.{DOMAIN}"]
    assert state.cluster_members(["web"]) == set() and ("alice", "web") not in state.clusters
    assert len(state.owned_view("nobody")) == 0


@pytest_twisted.ensureDeferred
async def test_selections_by_cluster_pick_exactly_what_a_full_scan_would(tmp_path):
    from twisted.internet import reactor

    from tests.grid import Grid

    grid = await Grid(reactor, str(tmp_path), lnms=2).start()
    try:
        c = grid.controller
        await c.start("alice", False, [], [], {"cluster": "web", "count": 3})
        await c.start("alice", False, [], [], {"cluster": "db", "count": 2})
        await c.start("bob", False, [], [], {"cluster": "web", "count": 2})
        from usher.vmset import Selection

        mine = await c.visibility.select("alice", False, Selection(clusters=["web"], names=["1.db"]))
        assert sorted(r["name"] for r in mine) == sorted(
            [f"{i}.web.alice.{DOMAIN}" for i in (1, 2, 3)] + [f"1.db.alice.{DOMAIN}"])
        everyone = await c.visibility.select("root", True, Selection(clusters=["web"]))
        assert len(everyone) == 5
        listed = await c.list("alice", False, Selection(clusters=["db"]))
        assert sorted(r["name"] for r in listed) == [f"{i}.db.alice.{DOMAIN}" for i in (1, 2)]
        with pytest.raises(NoSuchVM):
            await c.visibility.select("alice", False, Selection(names=["9.web"]))
    finally:
        await grid.stop()


# -- recovery announcements, paced ---------------------------------------------------------

def test_announcements_are_paced_and_skip_lnms_that_came_back_on_their_own():
    clock, calls, answers = task.Clock(), [], []

    def fake_announce(reactor, host, port, options):
        calls.append(host)
        d = defer.Deferred()
        answers.append(d)
        return d

    names = [f"lnm{i}" for i in range(1, 6)]
    known = types.SimpleNamespace(entries={n: {"recovery_host": n, "recovery_port": 7392}
                                           for n in names})
    recovery = Recovery(names, clock=clock, window=60)
    announcer = RecoveryAnnouncer(known, recovery, reactor=None, clock=clock,
                                  tls_options_for=lambda name: None, announce=fake_announce,
                                  concurrency=2)
    announcer.startService()
    assert calls == ["lnm1", "lnm2"]
    recovery.lnm_attached("lnm3", object())             # redialled by itself
    answers[0].callback("OK reconnecting")
    assert calls == ["lnm1", "lnm2", "lnm4"]            # lnm3 needs no announcement
    answers[1].errback(ConnectionRefusedError())
    answers[2].callback("OK reconnecting")
    assert calls == ["lnm1", "lnm2", "lnm4", "lnm5"]
    for name in ("lnm1", "lnm2", "lnm4", "lnm5"):
        recovery.lnm_attached(name, object())
    clock.advance(60)
    assert len(calls) == 4 and recovery.done
    announcer.stopService()


# -- the fleet ------------------------------------------------------------------------------

def fleet_config(tmp_path, **extra):
    lnm = {"name": None, "controller_host": "127.0.0.1", "controller_port": 7391,
           "controller_tls_name": None, "ssl_key_file": "/x/key.pem",
           "ssl_cert_file": "/x/cert.pem", "ssl_ca_file": "/x/ca.pem", "libvirt_uri": None,
           "state_dir": str(tmp_path / "fleet"), "threads": 4, "recovery_port": 7392}
    lnm.update(extra)
    return {"lnm": lnm}


def test_each_fleet_member_has_its_own_name_certificate_state_and_port(tmp_path):
    fleet = Fleet(fleet_config(tmp_path), reactor=None, cert_dir="/certs", prefix="node")
    config = fleet.member_config("node7", {"controller_port": 9999})["lnm"]
    assert (config["name"], config["ssl_cert_file"], config["ssl_key_file"]) == (
        "node7", "/certs/node7_cert.pem", "/certs/node7_key.pem")
    assert config["state_dir"] == str(tmp_path / "fleet" / "node7")
    assert config["recovery_port"] == 0 and config["controller_port"] == 9999
    assert fleet.config["lnm"]["recovery_port"] == 7392          # the fleet's own untouched
    assert member_names("lnm", range(3, 5)) == ["lnm3", "lnm4"]


@pytest_twisted.ensureDeferred
async def test_a_running_fleet_hands_the_interpreter_lock_over_sooner(tmp_path):
    import sys

    from twisted.internet import reactor

    from usher.lnm.fleet import FLEET_SWITCH_INTERVAL
    before = sys.getswitchinterval()
    fleet = Fleet(fleet_config(tmp_path), reactor=reactor, cert_dir="/certs")
    fleet.startService()
    try:
        assert sys.getswitchinterval() == min(before, FLEET_SWITCH_INTERVAL)
    finally:
        await fleet.stopService()
    assert sys.getswitchinterval() == before


def test_a_fleet_refuses_a_hypervisor_uri_and_a_bad_prefix(tmp_path):
    with pytest.raises(ConfigError, match="libvirt_uri"):
        Fleet(fleet_config(tmp_path, libvirt_uri="qemu:///system"), None, cert_dir="/c")
    with pytest.raises(ConfigError, match="prefix"):
        Fleet(fleet_config(tmp_path), None, cert_dir="/c", prefix="a b")


@pytest.mark.parametrize("argv, message", [
    (["--fleet", "0"], "--fleet"),
    (["--fleet", "3", "--name", "lnm1"], "--name"),
])
def test_usherlnm_refuses_a_fleet_it_cannot_run(argv, message, capsys):
    from usher.lnm.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["--isolated"] + argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_metadata_is_read_once_per_definition_and_again_when_changed(tmp_path):
    import libvirt
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    from usher.lnm import domain_xml
    from usher.lnm.libvirt_vmm import LibvirtVMM
    from usher.lnm.testhost import write_test_host

    pool = ThreadPool(minthreads=0, maxthreads=2)
    pool.start()
    uri = write_test_host(str(tmp_path / "host.xml"), hostname="h", cpus=8, memory_mib=8192,
                          model="m")
    vmm = LibvirtVMM(uri, reactor=reactor, pool=pool, state_dir=str(tmp_path / "state"))
    running, stopped = f"1.web.alice.{DOMAIN}", f"2.web.alice.{DOMAIN}"

    async def owners():
        return {d["name"]: d["metadata"].get("owner") for d in await vmm.list_domains()}

    async def until_owners(expected):
        deadline = reactor.seconds() + 10
        while (seen := await owners()) != expected:
            assert reactor.seconds() < deadline, seen       # events never came
            await task.deferLater(reactor, 0.05, lambda: None)

    events = []
    try:
        await vmm.connect()
        vmm.subscribe(lambda name, state: events.append((name, state)))
        for name in (running, stopped):
            await vmm.create({"name": name, "memory_mib": 64, "vcpus": 1,
                              "owner": "alice", "cluster": "web"})
        await vmm.operate("shutdown", stopped, shutdown_timeout=0)
        # Events come in order: once the last is in, so are the definitions'.
        deadline = reactor.seconds() + 10
        while (stopped, states.SHUTOFF) not in events:
            assert reactor.seconds() < deadline, events
            await task.deferLater(reactor, 0.02, lambda: None)
        assert await owners() == {running: "alice", stopped: "alice"}
        reads = []
        original = vmm._metadata_of
        vmm._metadata_of = lambda dom: reads.append(dom.name()) or original(dom)
        await owners()
        assert reads == []                          # remembered since their definition

        def behind_usher():                         # as virsh would
            conn = vmm.libvirt_connection
            xml = conn.lookupByName(stopped).XMLDesc(0)
            conn.defineXML(xml.replace('owner="alice"', 'owner="bob"'))
            conn.lookupByName(running).setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, '<vm owner="carol" cluster="web"/>',
                "usher", domain_xml.USHER_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)

        await deferToThreadPool(reactor, pool, behind_usher)
        await until_owners({running: "carol", stopped: "bob"})
        assert sorted(set(reads)) == [running, stopped]     # read again, those two only
    finally:
        await vmm.close()
        pool.stop()


def test_settle_heap_freezes_what_start_up_built():
    import subprocess
    import sys

    code = ("import gc; from usher import daemon; assert gc.get_freeze_count() == 0; "
            "daemon.settle_heap(); assert gc.get_freeze_count() > 1000; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


@pytest_twisted.ensureDeferred
async def test_usherlnm_fleet_runs_many_lnms_against_a_real_controller(tmp_path):
    """``usherlnm --fleet 3``: three LNMs in one process, each attached under
    its own certificate, sharing the work of a start; SIGTERM stops them all."""
    import os
    import sys

    from twisted.internet import reactor

    from usher import sandbox

    description = sandbox.prepare(str(tmp_path / "box"), lnms=3, domain="usher.test",
                                  user="alice", rounds=4)
    box = sandbox.Sandbox(reactor, description, out=open(os.devnull, "w"))
    box.spawn("usherctrl", "usher.controller.main", description["configs"]["ctrl"])
    fleet = sandbox.LoggedProcess("fleet", str(tmp_path / "fleet.log"))
    argv = [sys.executable, "-m", "usher.lnm.main", "--isolated", "--config",
            description["configs"]["lnm1"], "--fleet", "3",
            "--fleet-certs", os.path.join(description["dir"], "pki")]
    process = reactor.spawnProcess(fleet, argv[0], argv, env=dict(os.environ))
    client = None
    try:
        client = sandbox_client(reactor, description)
        connected = []

        async def all_attached():
            nonlocal client
            try:
                if not client.connected:
                    await client.connect()
                connected[:] = [lnm["name"] for lnm in await client.list_lnm()
                                if lnm["connected"]]
            except Exception:
                await client.disconnect()
                client = sandbox_client(reactor, description)
            return connected == ["lnm1", "lnm2", "lnm3"]

        deadline = reactor.seconds() + 60
        while not await all_attached():
            assert reactor.seconds() < deadline, connected
            await task.deferLater(reactor, 0.2, lambda: None)
        result = await client.start(cluster="web", count=6)
        assert result["failed"] == []
        assert sorted({s["lnm"] for s in result["started"]}) == ["lnm1", "lnm2", "lnm3"]
        process.signalProcess("TERM")
        assert await fleet.ended == 0
    finally:
        if client is not None:
            await client.disconnect()
        if not fleet.ended.called:
            process.signalProcess("KILL")
            await fleet.ended
        await box.stop()


def sandbox_client(reactor, description):
    from usher.client import UsherClient

    return UsherClient(reactor, "127.0.0.1", description["client_port"],
                       ca_file=description["ca_file"], tls_name="localhost",
                       username=description["user"], password=description["password"],
                       timeout=10)
