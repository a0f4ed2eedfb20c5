"""High availability, the LNM's and the clients' side (usher.protocol, High
availability): the LNM dials its controllers in turn (usher.controllers.
Rotation), obeys only the highest term of leadership it has seen (the term
gate, usher.lnm.terms, persisted across restarts), follows a recovery
announcement's term (usher.lnm.recovery); clients follow the active
controller (usher.client).

In memory (MemoryReactorClock, iosim pumps) with controller doubles that
speak the real PB methods; the clients over real TLS on 127.0.0.1 against
the controller's real client boundary; one real usherlnm process restarted.
"""

import os
import socket
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.spread import pb
from twisted.spread.flavors import IPBRoot
from twisted.test.iosim import ConnectionCompleter
from zope.interface import implementer

from test_lnm_link import ControllerSideFactory, FakeController
from test_lnm_node import result_of
from usher import pki
from usher.controllers import Controller, Rotation, parse_controllers
from usher.errors import (ConfigError, InvalidRequest, Standby, StaleTerm, Unavailable,
                          from_failure)
from usher.lnm.api import NodeAPI
from usher.lnm.link import ControllerLink
from usher.lnm.node import NodeManager
from usher.lnm.recovery import RecoveryFactory, parse_announcement
from usher.lnm.terms import TERM_FILE, TermGate

from tests.fakes import FakeVMM

A, B = 7391, 7491
RETRY = 2.0
SCAN = 10.0


# -- configuration ----------------------------------------------------------------


def test_one_host_is_todays_single_controller():
    [controller] = parse_controllers("ctl.example.org", 7391)
    assert controller == Controller("ctl.example.org", 7391, "ctl.example.org")
    [controller] = parse_controllers(["127.0.0.1"], 7391, "localhost")
    assert (controller.host, controller.port, controller.tls_name) == (
        "127.0.0.1", 7391, "localhost")


def test_a_list_with_ports_and_names():
    controllers = parse_controllers(["ctl1", "ctl2:7500", "[::1]:7600", "::1"], 7391,
                                    None)
    assert [(c.host, c.port, c.tls_name) for c in controllers] == [
        ("ctl1", 7391, "ctl1"), ("ctl2", 7500, "ctl2"), ("::1", 7600, "::1"),
        ("::1", 7391, "::1")]
    assert [c.tls_name for c in parse_controllers("a, b", 1, ["x", "y"])] == ["x", "y"]
    assert [c.tls_name for c in parse_controllers("a, b", 1, "x")] == ["x", "x"]


@pytest.mark.parametrize("hosts, names, message", [
    (["a", "a"], None, "listed twice"),
    (["a:0"], None, "port must be"),
    (["a:70000"], None, "port must be"),
    (["a:x"], None, "port must be"),
    (["a:"], None, "empty port"),
    (["[::1"], None, "IPv6"),
    (["a b"], None, "not a host"),
    ([], None, "names no controller"),
    (["a"] * 17, None, "at most"),
    (["a", "b"], ["x", "y", "z"], "one per controller_host entry"),
])
def test_bad_controller_lists_are_configuration_errors(hosts, names, message):
    with pytest.raises(ConfigError, match=message):
        parse_controllers(hosts, 7391, names, where="[lnm]")


# -- the LNM dialing two controllers in memory -------------------------------------


class TwoControllers:
    """An LNM (FakeVMM, NodeManager, ControllerLink over a Rotation) and two
    fake controllers, ports A and B, on one MemoryReactorClock."""

    def __init__(self, state_dir=None):
        self.reactor = MemoryReactorClock()
        self.controllers = {A: FakeController(), B: FakeController()}
        for port, controller in self.controllers.items():
            self.reactor.listenTCP(port, ControllerSideFactory(controller))
        self.completer = ConnectionCompleter(self.reactor)
        self.vmm = FakeVMM()
        self.manager = NodeManager(self.vmm, name="lnm1", clock=self.reactor,
                                   scan_interval=SCAN, report_interval=0.5)
        result_of(self.manager.startup())
        self.terms = TermGate(state_dir, lnm_name="lnm1")
        self.rotation = Rotation(
            [Controller("ctrl-a", A, "ctrl-a"), Controller("ctrl-b", B, "ctrl-b")],
            lambda c: TCP4ClientEndpoint(self.reactor, c.host, c.port), base_policy=None)
        self.link = ControllerLink(self.rotation, self.manager,
                                   NodeAPI(self.manager, self.terms), clock=self.reactor,
                                   call_timeout=30, recovery_port=7392,
                                   retry_policy=lambda attempt: RETRY * attempt)
        self.pumps = []

    def dialing(self):
        """The port of the pending connection attempt (None: none)."""
        return self.reactor.tcpClients[0][1] if self.reactor.tcpClients else None

    def connect(self, port):
        assert self.dialing() == port, f"dialing {self.dialing()}, not {port}"
        pump = self.completer.succeedOnce()
        self.pumps.append(pump)
        self.flush()

    def fail(self, port):
        assert self.dialing() == port, f"dialing {self.dialing()}, not {port}"
        self.completer.failOnce()
        self.flush()

    def flush(self):
        for _ in range(3):
            for pump in self.pumps:
                pump.flush()
            self.reactor.advance(0)

    def advance(self, seconds):
        self.reactor.advance(seconds)
        self.flush()

    def node_api(self, port):
        return self.controllers[port].attaches[-1][0]

    def call(self, port, method, *args):
        results = []
        self.node_api(port).callRemote(method, *args).addBoth(results.append)
        self.flush()
        assert results, f"{method}: no answer"
        return results[0]

    def error(self, port, method, *args):
        outcome = self.call(port, method, *args)
        assert isinstance(outcome, Failure), f"{method} did not fail: {outcome!r}"
        return from_failure(outcome)


@pytest.fixture
def two(tmp_path):
    h = TwoControllers(str(tmp_path / "state"))
    h.link.startService()
    yield h
    if h.link.running:
        d = h.link.stopService()
        h.flush()
        result_of(d)
    result_of(h.manager.shutdown())


def test_a_standby_refusing_attach_moves_to_the_next_at_once(two):
    two.controllers[A].refuse = Standby("standby controller ctrl-a; the active one is ctrl-b")
    two.connect(A)
    assert not two.link.attached
    assert two.dialing() == B          # no delay: the round goes on
    two.connect(B)
    assert two.link.attached
    assert len(two.controllers[B].attaches) == 1 and not two.controllers[A].attaches
    assert two.call(B, "ping") is True


def test_failures_back_off_only_after_a_full_round(two):
    two.fail(A)
    assert two.dialing() == B
    two.fail(B)
    assert two.dialing() is None       # a round failed: the backoff
    two.advance(RETRY - 0.1)
    assert two.dialing() is None
    two.advance(0.1)
    two.fail(A)
    two.fail(B)
    two.advance(2 * RETRY - 0.1)       # the second round waits longer
    assert two.dialing() is None
    two.advance(0.1)
    two.controllers[A].refuse = Standby("standby controller ctrl-a")
    two.connect(A)
    two.connect(B)
    assert two.link.attached


def test_a_lost_link_dials_the_next_controller_at_once(two):
    two.connect(A)
    assert two.link.attached
    two.pumps[-1].serverIO.loseConnection()
    two.flush()
    assert not two.link.attached
    assert two.dialing() == B
    two.connect(B)
    assert two.link.attached


# -- the term gate ------------------------------------------------------------------


def test_a_higher_term_is_accepted_and_recorded(two, tmp_path):
    two.connect(A)
    answer = two.call(A, "controller_term", {"term": 5, "controller": "ctrl-a"})
    assert answer == {"accepted": True, "highest": 5}
    assert two.terms.highest == 5
    assert two.call(A, "ping") is True
    assert TermGate(str(tmp_path / "state")).highest == 5     # persisted
    # The same term again (a controller repeating itself) is fine.
    assert two.call(A, "controller_term", {"term": 5, "controller": "ctrl-a"})["accepted"]


def test_a_lower_term_is_refused_and_its_connection_dropped(two):
    two.connect(A)
    assert two.call(A, "controller_term", {"term": 5, "controller": "ctrl-a"})["accepted"]
    two.pumps[-1].serverIO.loseConnection()    # ctrl-a dies
    two.flush()
    two.connect(B)                                      # a deposed one answers
    assert two.link.attached
    answer = two.call(B, "controller_term", {"term": 4, "controller": "ctrl-b"})
    assert answer == {"accepted": False, "highest": 5}
    assert not two.link.attached                        # dropped by the LNM
    assert two.dialing() == A                           # and on to the next


def test_commands_on_a_stale_connection_are_refused_and_do_nothing(two):
    two.connect(A)
    assert two.call(A, "controller_term", {"term": 3, "controller": "ctrl-a"})["accepted"]
    two.pumps[-1].serverIO.loseConnection()
    two.flush()
    two.connect(B)
    # ctrl-b never sends a term (an old controller, term 0): refused now.
    calls = len(two.vmm.calls)
    error = two.error(B, "start", "1.web.alice.usher.local")
    assert isinstance(error, StaleTerm) and error.code == "stale_term"
    assert "term 3" in str(error)
    assert len(two.vmm.calls) == calls
    assert not two.link.attached
    assert two.dialing() == A


def test_a_connection_without_a_term_is_obeyed_while_no_term_was_seen(two):
    two.connect(A)
    assert two.call(A, "ping") is True
    # A single controller says term 0 and has no name.
    assert two.call(A, "controller_term", {"term": 0, "controller": ""}) == {
        "accepted": True, "highest": 0}
    assert two.call(A, "get_node_info")["name"] == "lnm1"
    assert two.terms.highest == 0


@pytest.mark.parametrize("claim", [
    {"term": -1, "controller": "c"},
    {"term": 2 ** 63, "controller": "c"},
    {"term": "5", "controller": "c"},
    {"term": 5.0, "controller": "c"},
    {"term": True, "controller": "c"},
    {"term": 5, "controller": "x" * 300},
    {"term": 5, "controller": "bad\nname"},
    {"term": 5, "controller": 7},
    {"term": 5},
    {"term": 5, "controller": "c", "extra": 1},
    "term 5",
    [5, "c"],
])
def test_hostile_controller_term_is_refused(two, claim):
    two.connect(A)
    error = two.error(A, "controller_term", claim)
    assert isinstance(error, InvalidRequest)
    assert two.terms.highest == 0
    assert not os.path.exists(two.terms.path)


def test_the_highest_term_survives_a_restart_and_a_corrupt_file_is_an_error(tmp_path):
    gate = TermGate(str(tmp_path))
    result_of(gate.raise_to(9, "test"))
    result_of(gate.raise_to(4, "test"))        # terms only grow
    assert TermGate(str(tmp_path)).highest == 9
    (tmp_path / TERM_FILE).write_text('{"highest": "nine"}')
    with pytest.raises(ConfigError, match="not a term"):
        TermGate(str(tmp_path))
    (tmp_path / TERM_FILE).write_text("{")
    with pytest.raises(ConfigError, match="cannot read"):
        TermGate(str(tmp_path))


# -- the recovery announcement with a term --------------------------------------------


@pytest.mark.parametrize("line, expected", [
    (b"USHER-RECOVERY 1", ("1", None)),
    (b"USHER-RECOVERY 1 0", ("1", 0)),
    (b"USHER-RECOVERY 1 42", ("1", 42)),
    (b"USHER-RECOVERY 1 9223372036854775807", ("1", 2 ** 63 - 1)),
])
def test_announcement_lines(line, expected):
    assert parse_announcement(line) == expected


@pytest.mark.parametrize("line, message", [
    (b"USHER-RECOVERY 1 9223372036854775808", "term must be"),
    (b"USHER-RECOVERY 1 " + b"9" * 200, "term must be"),
    (b"USHER-RECOVERY 1 -3", "term must be"),
    (b"USHER-RECOVERY 1 +3", "term must be"),
    (b"USHER-RECOVERY 1 3_000", "term must be"),
    (b"USHER-RECOVERY 1 0x10", "term must be"),
    (b"USHER-RECOVERY 1 1e3", "term must be"),
    (b"USHER-RECOVERY 1 \xd9\xa3", "term must be"),         # an Arabic-Indic digit
    (b"USHER-RECOVERY 1 nan", "term must be"),
    (b"USHER-RECOVERY 1 2 3", "expected"),
    (b"USHER-RECOVERY", "expected"),
    (b"HELLO 1 2", "expected"),
    (b"", "expected"),
    (b"USHER-RECOVERY 99 2", "not supported"),
])
def test_hostile_announcements_are_refused(line, message):
    with pytest.raises(ValueError, match=message):
        parse_announcement(line)


def recovery_of(two):
    return RecoveryFactory(two.link, lnm_name="lnm1", controller_identity=["ctrl-a", "ctrl-b"],
                           terms=two.terms)


def test_an_announced_higher_term_drops_the_link_and_dials_around(two):
    two.connect(A)
    assert two.call(A, "controller_term", {"term": 2, "controller": "ctrl-a"})["accepted"]
    factory = recovery_of(two)
    assert result_of(factory.announced(2)) == "OK attached"
    assert result_of(factory.announced(None)) == "OK attached"
    assert result_of(factory.announced(3)) == "OK reconnecting"
    assert two.terms.highest == 3
    two.flush()
    assert not two.link.attached
    assert two.dialing() == B                  # at once, no backoff
    two.connect(B)
    assert two.call(B, "controller_term", {"term": 3, "controller": "ctrl-b"})["accepted"]
    assert two.link.attached


def test_an_announced_lower_term_is_refused_and_changes_nothing(two):
    two.connect(A)
    assert two.call(A, "controller_term", {"term": 7, "controller": "ctrl-a"})["accepted"]
    factory = recovery_of(two)
    assert result_of(factory.announced(6)) == "ERR stale term"
    two.flush()
    assert two.link.attached and two.terms.highest == 7


def test_an_announcement_while_waiting_dials_at_once(two):
    two.fail(A)
    two.fail(B)
    assert two.dialing() is None
    assert result_of(recovery_of(two).announced(1)) == "OK reconnecting"
    two.flush()
    assert two.dialing() == A


# -- clients following the active controller (real TLS, the real client port) ----------


class StandbyLogin(pb.Referenceable):
    def __init__(self, name):
        self.name = name

    def remote_login(self, *args, **kwargs):
        raise Standby(f"standby controller {self.name}; the active one is elsewhere")


@implementer(IPBRoot)
class SwitchRoot:
    """A controller's client port that is a standby or the real one."""

    def __init__(self, inner, name, standby):
        self.inner = inner
        self.name = name
        self.standby = standby

    def rootObject(self, broker):
        return StandbyLogin(self.name) if self.standby else self.inner.rootObject(broker)


async def two_client_ports(cg, reactor, pki_dir):
    from usher.controller.client_login import ClientPBFactory
    from usher.controller.service import client_port_tls
    tls = client_port_tls({"ssl_cert_file": os.path.join(pki_dir, "usherctrl_cert.pem"),
                           "ssl_key_file": os.path.join(pki_dir, "usherctrl_key.pem"),
                           "ssl_ca_file": cg.ca_file})
    inner = cg.port.factory.wrappedFactory.root
    roots, ports = [], []
    for name, standby in (("ctrl-a", True), ("ctrl-b", False)):
        root = SwitchRoot(inner, name, standby)
        port = await SSL4ServerEndpoint(reactor, 0, tls, interface="127.0.0.1").listen(
            ClientPBFactory(root, clock=reactor, login_timeout=30))
        roots.append(root)
        ports.append(port)
    return roots, ports


@pytest_twisted.ensureDeferred
async def test_clients_follow_the_active_controller(tmp_path):
    from twisted.internet import reactor

    from tests.clientgrid import PASSWORDS, ClientGrid, make_pki
    from usher.client import UsherClient
    pki_dir, _ca = make_pki(tmp_path / "pki")
    cg = await ClientGrid(reactor, tmp_path / "grid", pki_dir).start()
    roots, ports = await two_client_ports(cg, reactor, pki_dir)
    entries = [f"127.0.0.1:{port.getHost().port}" for port in ports]
    client = UsherClient(reactor, entries, 7390, ca_file=cg.ca_file, tls_name="localhost",
                         username="alice", password=PASSWORDS["alice"], timeout=20,
                         initial_delay=0.1, max_delay=0.5)
    states = []
    client.on_connection(lambda state, detail: states.append((state, detail)))
    try:
        who = await client.connect()             # ctrl-a: Standby -> ctrl-b
        assert who["user"] == "alice"
        assert client.port == ports[1].getHost().port
        await client.start(cluster="web", count=2)
        await wait_until(reactor, lambda: len(client.vms) == 2)
        # ctrl-b steps down and ctrl-a takes over; ctrl-b's connection drops.
        roots[1].standby, roots[0].standby = True, False
        client._perspective.broker.transport.loseConnection()
        await wait_until(reactor, lambda: client.connected
                         and client.port == ports[0].getHost().port)
        listed = await client.list(remote=True)
        assert sorted(client.vms) == sorted(r["name"] for r in listed)    # re-synced
        assert ("connected", f"reconnected to 127.0.0.1:{ports[0].getHost().port}") in states
        await client.start(cluster="db", count=1)
        await wait_until(reactor, lambda: len(client.vms) == 3)
    finally:
        await client.disconnect()
        for port in ports:
            await port.stopListening()
        await cg.stop()


@pytest_twisted.ensureDeferred
async def test_a_client_fails_when_every_controller_is_a_standby(tmp_path):
    from twisted.internet import reactor

    from tests.clientgrid import PASSWORDS, ClientGrid, make_pki
    from usher.client import UsherClient
    pki_dir, _ca = make_pki(tmp_path / "pki")
    cg = await ClientGrid(reactor, tmp_path / "grid", pki_dir).start()
    roots, ports = await two_client_ports(cg, reactor, pki_dir)
    roots[1].standby = True
    # A closed port as a third entry: refused connections count too.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = closed.getsockname()[1]
    closed.close()
    entries = ", ".join([f"127.0.0.1:{dead}"]
                        + [f"127.0.0.1:{port.getHost().port}" for port in ports])
    client = UsherClient(reactor, entries, 7390, ca_file=cg.ca_file, tls_name="localhost",
                         username="alice", password=PASSWORDS["alice"], timeout=20)
    try:
        with pytest.raises(Unavailable, match="cannot reach an active controller"):
            await client.connect()
        roots[0].standby = False
        await client.connect()                  # a new connect goes round again
        assert client.connected and client.port == ports[0].getHost().port
    finally:
        await client.disconnect()
        for port in ports:
            await port.stopListening()
        await cg.stop()


async def wait_until(reactor, predicate, timeout=15.0):
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError("timed out waiting")
        await task.deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


# -- a real usherlnm process keeps the term across a restart ----------------------------


@pytest_twisted.ensureDeferred
async def test_a_restarted_usherlnm_still_refuses_a_deposed_controller(tmp_path):
    from twisted.internet import reactor

    from usher import sandbox
    from usher.controller.service import lnm_port_tls
    site = sandbox.prepare(str(tmp_path / "site"), lnms=1, domain="usher.test",
                           user="alice", rounds=4)
    pki_dir = os.path.dirname(site["ca_file"])
    tls = lnm_port_tls({"ssl_cert_file": os.path.join(pki_dir, "usherctrl_cert.pem"),
                        "ssl_key_file": os.path.join(pki_dir, "usherctrl_key.pem"),
                        "ssl_ca_file": site["ca_file"], "lnm_names": ["lnm1"]})
    controllers = {}
    for name in ("ctrl-a", "ctrl-b"):
        controller = FakeController()
        controllers[name] = (controller, await SSL4ServerEndpoint(
            reactor, 0, tls, interface="127.0.0.1").listen(ControllerSideFactory(controller)))
    controllers["ctrl-b"][0].refuse = Standby("standby controller ctrl-b")
    with open(site["configs"]["lnm1"], encoding="utf-8") as f:
        text = f.read()
    entries = ", ".join(f"127.0.0.1:{port.getHost().port}"
                        for _controller, port in controllers.values())
    text = text.replace("controller_host = 127.0.0.1\n", f"controller_host = {entries}\n")
    text = text.replace("reconnect_initial_delay = 0.5", "reconnect_initial_delay = 0.2")
    config = tmp_path / "lnm1.config"
    config.write_text(text)
    state_dir = os.path.join(site["dir"], "lnm1-state")

    def spawn():
        return subprocess.Popen([sys.executable, "-m", "usher.lnm.main", "--isolated",
                                 "--config", str(config)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    a = controllers["ctrl-a"][0]
    process = spawn()
    try:
        await wait_until(reactor, lambda: len(a.attaches) == 1, timeout=30)
        node_api = a.attaches[0][0]
        answer = await node_api.callRemote("controller_term",
                                           {"term": 6, "controller": "ctrl-a"})
        assert answer == {"accepted": True, "highest": 6}
        assert os.path.exists(os.path.join(state_dir, TERM_FILE))
        process.kill()                                  # kill -9 the LNM
        process.wait(timeout=30)
        process = spawn()
        await wait_until(reactor, lambda: len(a.attaches) == 2, timeout=30)
        node_api = a.attaches[1][0]
        # ctrl-a now speaks for a deposed term: refused, nothing done.
        answer = await node_api.callRemote("controller_term",
                                           {"term": 5, "controller": "ctrl-a"})
        assert answer == {"accepted": False, "highest": 6}
        await wait_until(reactor, lambda: len(a.attaches) >= 3, timeout=30)
        # A connection that never sent a term: term 0, refused.
        refused = await a.attaches[2][0].callRemote("list_vms").addErrback(from_failure)
        assert isinstance(refused, StaleTerm), refused
        assert "term 6" in str(refused)
        await wait_until(reactor, lambda: len(a.attaches) >= 4, timeout=30)
        node_api = a.attaches[3][0]
        answer = await node_api.callRemote("controller_term",
                                           {"term": 7, "controller": "ctrl-a"})
        assert answer == {"accepted": True, "highest": 7}
        assert await node_api.callRemote("ping") is True
    finally:
        process.kill()
        process.wait(timeout=30)
        for _controller, port in controllers.values():
            await port.stopListening()



def test_ush_connect_uses_the_configured_list_and_names():
    from clients.ush.cmd_session import parse_target
    from clients.ush.program import tls_name_for
    from clients.ush.settings import UshSettings
    settings = UshSettings(controller_host="ctl1, ctl2:7500", controller_port=7390,
                           controller_tls_name="name1, name2")
    user, host, port = parse_target(None, settings)
    assert (user, host, port) == (None, "ctl1, ctl2:7500", 7390)
    assert [(c.host, c.port, c.tls_name) for c in parse_controllers(
        host, port, tls_name_for(host, settings))] == [("ctl1", 7390, "name1"),
                                                       ("ctl2", 7500, "name2")]
    # connect HOST: that entry's name; a host not in the list: its own.
    assert tls_name_for("ctl2", settings) == "name2"
    assert tls_name_for("elsewhere", settings) is None
    single = UshSettings(controller_host="ctl1", controller_tls_name="localhost")
    assert tls_name_for("other", single) == "localhost"      # as before
