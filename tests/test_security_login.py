"""Security of the client port before and at login (issue 10, holes 6 and 8).

Attacks through the real interface: PB over TLS against a real controller —
the sandbox's usherctrl process (its log file is read back), or the
in-process ClientGrid whose login clock is a task.Clock where time is the
point (deadlines, lockouts, delays). Each test checks that the attack is
refused or contained, that another user is served meanwhile, and that
nothing changed.
"""

import os
import re
import stat

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.spread import banana, pb

from usher import daemon
from usher.auth.throttle import LoginThrottle, SourceLockedOut, ThrottlePolicy
from usher.controller.client_broker import PRELOGIN_BYTES
from usher.controller.client_login import ClientPBFactory, ClientRoot, client_factory
from usher.errors import ConfigError

from tests.clientgrid import PASSWORDS
from tests.e2e import RunningSandbox, wait_for
from tests.hostile import (LogCapture, banana_list_header, banana_string, connect_pb,
                           connect_tls, remote_type)

SECRET = "Sw0rdf1sh-never-logged"


# --- The sandbox: a real usherctrl process ---------------------------------------------------

@pytest_twisted.async_yield_fixture(scope="module")
async def system(tmp_path_factory):
    # A short login deadline, to see it close an idle connection for real;
    # back-off thresholds out of the way (the ClientGrid tests below drive
    # the throttle on a task.Clock; here every test comes from 127.0.0.1).
    box = RunningSandbox(tmp_path_factory.mktemp("sec-login"), lnms=1, settings={"ctrl": {
        "login_timeout": 20, "login_source_failures": 1000, "login_user_failures": 1000,
        "login_user_delay_max": 1}})
    await box.start()
    box.add_user("bob", "bob-secret")
    box.add_user("carol", SECRET)
    yield box
    await box.stop()


def port_and_ca(box):
    return box.description["client_port"], box.description["ca_file"]


def ctrl_log(box):
    with open(os.path.join(box.dir, "logs", "usherctrl.log"), encoding="utf-8",
              errors="replace") as f:
        return f.read()


@pytest_twisted.ensureDeferred
async def test_megabytes_before_login_are_cut_off_at_the_budget(system):
    alice = await system.connected_client()
    await alice.start(["budget"])
    port, ca = port_and_ca(system)
    attacker = await connect_tls(port, ca)
    # A list of fourteen 600 KB strings, 8.4 MB that banana would hold until
    # the list ends: what took 11.5 s of CPU and 124 MiB before login.
    attacker.transport.write(banana_list_header(14) + banana_string(600_000) * 14)
    served = await alice.list()         # the controller answers alice meanwhile
    await wait_for(lambda: attacker.lost.called, timeout=30)    # and drops the attacker
    assert [r["name"] for r in served] == [f"budget.alice.{alice.domain}"]
    await wait_for(lambda: "bytes before logging in" in ctrl_log(system))
    [count] = [int(n) for n in re.findall(r"(\d+) bytes before logging in", ctrl_log(system))]
    # cut off after the budget and at most one read more, far from 8 MB
    assert PRELOGIN_BYTES < count <= PRELOGIN_BYTES + 256 * 1024
    bob = await system.connected_client("bob", "bob-secret")
    assert bob.connected and await bob.list() == []


@pytest_twisted.ensureDeferred
async def test_pipelined_logins_on_one_connection_run_the_chain_once(system):
    port, ca = port_and_ca(system)
    before = ctrl_log(system).count("Login refused for bob: no module accepted")
    raw = await connect_pb(port, ca)
    calls = [raw.root.callRemote("login", "bob", f"guess{i}", None) for i in range(40)]
    outcomes = await defer.DeferredList(calls, consumeErrors=True)
    await raw.lost      # closed after 5 refused logins
    refused = [f for ok, f in outcomes if not ok and "in progress" in str(f.value)]
    assert 1 <= len(refused) <= 5
    assert all(not ok for ok, _ in outcomes)
    await wait_for(lambda: ctrl_log(system).count(
        "Login refused for bob: no module accepted") == before + 1)
    # a login after the attack: any other pipelined login would have run by now
    bob = await system.connected_client("bob", "bob-secret")
    assert bob.connected
    assert ctrl_log(system).count("Login refused for bob: no module accepted") == before + 1


@pytest_twisted.ensureDeferred
async def test_login_arguments_and_hostile_calls_never_reach_the_log(system):
    port, ca = port_and_ca(system)
    size_before = len(ctrl_log(system))
    # An extra login argument carrying a password, and an extra keyword …
    raw = await connect_pb(port, ca)
    with pytest.raises(pb.RemoteError) as extra:
        await raw.root.callRemote("login", "carol", SECRET, None, "gateway", SECRET + "-2")
    assert "wrong arguments" in str(extra.value)
    with pytest.raises(pb.RemoteError):
        await raw.root.callRemote("login", "carol", SECRET, password=SECRET + "-3")
    # … a wrong password, and a right one
    with pytest.raises(pb.RemoteError, match="wrong user name or password"):
        await raw.root.callRemote("login", "carol", SECRET + "-4", None)
    carol = await raw.root.callRemote("login", "carol", SECRET, None)
    # Logged in, megabytes of junk where PB logged every argument (2.5 MB
    # sent made 9.8 MB of log): a 600 KB method name, keyword name and
    # arguments of a call that does not fit.
    junk = "J" * 600_000
    for method, args, kw in (("x" * 600_000, (), {}), ("list", (), {junk: 1}),
                             ("whoami", (junk, junk), {})):
        with pytest.raises(pb.RemoteError) as refused:
            await carol.callRemote(method, *args, **kw)
        assert len(str(refused.value)) < 300
    assert (await carol.callRemote("whoami"))["user"] == "carol"
    await raw.close()
    await wait_for(lambda: "user carol logged in" in ctrl_log(system))
    text = ctrl_log(system)
    assert SECRET not in text
    assert len(text) - size_before < 16 * 1024
    assert "J" * 300 not in text
    # The log itself is no longer world-readable (the sandbox's, like usherctrl's own).
    mode = stat.S_IMODE(os.stat(os.path.join(system.dir, "logs", "usherctrl.log")).st_mode)
    assert mode & 0o007 == 0


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_is_closed_before_login(tmp_path):
    box = RunningSandbox(tmp_path / "idle", lnms=0, settings={"ctrl": {
        "login_timeout": 1.5, "login_user_delay_max": 1}})
    await box.start()
    try:
        port, ca = port_and_ca(box)
        idle = await connect_tls(port, ca)
        quiet = await connect_pb(port, ca)     # speaks PB, never logs in
        alice = await box.connected_client()
        await idle.lost
        await quiet.lost
        assert alice.connected and (await alice._remote("whoami"))["user"] == "alice"
        await wait_for(lambda: ctrl_log(box).count("no login within 1.5 s") == 2)
    finally:
        await box.stop()


# --- In-process: the deadline and the budget on a task.Clock ----------------------------------

def make_factory(clock, **kwargs):
    root = ClientRoot(None, clock=clock)
    return ClientPBFactory(root, clock=clock, **kwargs)


def test_the_budget_counts_every_byte_until_login():
    factory = make_factory(task.Clock(), prelogin_bytes=10_000)
    broker = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1))
    broker.makeConnection(transport)
    data = banana_string(50_000)
    with LogCapture() as logged:
        for offset in range(0, len(data), 1000):
            broker.dataReceived(data[offset:offset + 1000])
            if transport.disconnecting:
                break
    assert transport.disconnecting and broker.received_before_login == 11_000
    assert any("11000 bytes before logging in (at most 10000)" in t for t in logged.texts())


def test_the_login_deadline_closes_idle_and_trickling_connections():
    clock = task.Clock()
    factory = make_factory(clock, login_timeout=30)
    broker = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1))
    transport = StringTransport()
    broker.makeConnection(transport)
    for _ in range(29):
        clock.advance(1)
        broker.dataReceived(b"\x01")      # a trickle is no login
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting
    # a logged-in connection has no deadline
    logged = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 2))
    transport = StringTransport()
    logged.makeConnection(transport)
    logged.login_succeeded()
    clock.advance(3600)
    assert not transport.disconnecting and clock.getDelayedCalls() == []


def test_a_protocol_error_is_one_bounded_line_and_a_closed_connection():
    factory = make_factory(task.Clock())
    broker = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1))
    transport = StringTransport()
    broker.makeConnection(transport)
    # an answer to a request never made, whose id is a 60 KB string
    with LogCapture() as logged:
        broker.dataReceived(banana.encode(b"pb") + banana.encode([b"answer", b"k" * 60_000, 1]))
    assert transport.disconnecting
    [line] = [t for t in logged.texts() if "protocol error" in t]
    assert len(line) < 400 and not logged.problems()


# --- In-process: one login at a time, a bounded login queue ----------------------------------

class Gate:
    """Holds every check of the local module until ``open()`` (then lets
    them through); counts them."""

    def __init__(self, module):
        self.module = module
        self.real = module.authenticate
        self.asked = []
        self.waiting = []
        module.authenticate = self.authenticate

    def authenticate(self, user, password):
        self.asked.append(user)
        if self.opened:
            return self.real(user, password)
        d = defer.Deferred()
        self.waiting.append(d)
        d.addCallback(lambda _: self.real(user, password))
        return d

    opened = False

    def open(self):
        self.opened = True
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)


@pytest_twisted.ensureDeferred
async def test_only_one_login_per_connection_and_a_bounded_queue(client_grids):
    grid = await client_grids(concurrent_logins=2)
    bob = await grid.connected("bob")
    gate = Gate(grid.chain.modules[0])
    port, ca = grid.port.getHost().port, grid.ca_file
    first, second, third = [await connect_pb(port, ca) for _ in range(3)]
    pipelined = [first.root.callRemote("login", "alice", PASSWORDS["alice"], None)
                 for _ in range(3)]
    await wait_for(lambda: gate.asked == ["alice"])
    waiting = second.root.callRemote("login", "root", PASSWORDS["root"], None)
    await wait_for(lambda: gate.asked == ["alice", "root"])
    # a third login while two are checked: refused at once, as busy
    with pytest.raises(pb.RemoteError) as busy:
        await third.root.callRemote("login", "bob", PASSWORDS["bob"], None)
    assert "busy" in str(busy.value) and remote_type(busy.value) == "usher.errors.Unavailable"
    assert gate.asked == ["alice", "root"]
    # bob's session is served meanwhile
    assert (await bob._remote("whoami"))["user"] == "bob"
    gate.open()
    alice, *refused = await defer.DeferredList(pipelined, consumeErrors=True)
    assert alice[0] and all(not ok and "in progress" in str(f.value) for ok, f in refused)
    assert (await alice[1].callRemote("whoami"))["user"] == "alice"
    assert (await waiting).__class__ is pb.RemoteReference
    # with a slot free again, a login goes through
    assert await third.root.callRemote("login", "bob", PASSWORDS["bob"], None)
    assert gate.asked == ["alice", "root", "bob"]
    for raw in (first, second, third):
        await raw.close()


# --- Brute force: per-source lockout, per-user delay (ClientGrid on a task.Clock) ----------

class Gateways:
    """is_gateway for the grid: connections from the local ports a test names."""

    def __init__(self):
        self.ports = set()

    def __call__(self, broker):
        return broker.transport.getPeer().port in self.ports


async def attempt(grid, user, password, source=None, gateways=None):
    """One login on a fresh connection (from a gateway, claiming ``source``,
    when ``gateways`` is given) -> the RawPB and the Deferred of the login."""
    raw = await connect_pb(grid.port.getHost().port, grid.ca_file)
    if gateways is not None:
        gateways.ports.add(raw.local_port)
    kwargs = {"source": source} if source is not None else {}
    return raw, raw.root.callRemote("login", user, password, None, **kwargs)


async def outcome(d):
    try:
        await d
    except pb.RemoteError as e:
        return str(e)
    return "ok"


async def held(clock):
    """Once a login is held back (its connection's 30 s deadline and its
    delay are the clock's only calls) -> the seconds it waits."""
    await wait_for(lambda: len(clock.getDelayedCalls()) == 2)
    return min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds()


async def throttled_grid(client_grids, policy=None):
    """-> (ClientGrid whose login clock is a task.Clock, that clock, its
    Gateways, the names the local module checked)."""
    clock = task.Clock()
    gateways = Gateways()
    grid = await client_grids(login_clock=clock, is_gateway=gateways,
                              throttle_policy=policy)
    return grid, clock, gateways, counting(grid)


async def login_once(grid, user, password, source=None, gateways=None):
    """One login on a fresh connection, closed after -> its outcome."""
    raw, d = await attempt(grid, user, password, source, gateways)
    try:
        return await outcome(d)
    finally:
        await raw.close()


def counting(grid):
    checked = []
    module = grid.chain.modules[0]
    real = module.authenticate

    def authenticate(user, password):
        checked.append(user)
        return real(user, password)
    module.authenticate = authenticate
    return checked


@pytest_twisted.ensureDeferred
async def test_a_guessing_source_is_locked_out_and_others_are_not(client_grids):
    grid, clock, gateways, checked = await throttled_grid(
        client_grids, ThrottlePolicy(source_failures=10, source_lockout=60))
    with LogCapture() as logged:
        for i in range(10):   # ten names, one guess each: no user delay on the way
            assert await login_once(grid, f"user{i}", "guess") == "wrong user name or password"
    assert any(e.get("audit") == "source_locked_out" and e.get("source") == "127.0.0.1"
               for e in logged.events)
    # the source is locked out: refused at once, even with a right password,
    # and whatever it claims to be (it is no gateway)
    for claim in (None, "10.9.9.9"):
        assert re.fullmatch(r"too many failed logins from 127\.0\.0\.1; try again in 60 s",
                            await login_once(grid, "bob", PASSWORDS["bob"], source=claim))
    assert len(checked) == 10
    # a user behind a gateway, from another address, logs in meanwhile
    assert await login_once(grid, "bob", PASSWORDS["bob"], source="192.0.2.7",
                            gateways=gateways) == "ok"
    # after the lockout one guess is allowed; it fails: locked out twice as long
    clock.advance(60)
    assert await login_once(grid, "user99", "guess") == "wrong user name or password"
    assert "try again in 120 s" in await login_once(grid, "alice", PASSWORDS["alice"])
    clock.advance(120)
    assert await login_once(grid, "alice", PASSWORDS["alice"]) == "ok"
    assert len(checked) == 13


@pytest_twisted.ensureDeferred
async def test_a_guessed_user_is_delayed_never_locked_out(client_grids):
    grid, clock, gateways, checked = await throttled_grid(
        client_grids, ThrottlePolicy(user_free_failures=3, user_delay_max=16))
    bob = await grid.connected("bob")
    # guesses for alice from ever new addresses (a botnet behind plusher)
    for i in range(3):
        assert await login_once(grid, "alice", "guess", source=f"198.51.100.{i}",
                                gateways=gateways) == "wrong user name or password"
    # the fourth login for alice waits 1 s before it is checked
    raw, d = await attempt(grid, "alice", "guess", source="198.51.100.3", gateways=gateways)
    assert await held(clock) == 1
    assert not d.called and checked.count("alice") == 3
    assert (await bob._remote("whoami"))["user"] == "bob"     # others are served meanwhile
    clock.advance(1)
    assert await outcome(d) == "wrong user name or password"
    await raw.close()
    # delays double up to 16 s, however long the attack goes on …
    for i in range(4, 12):
        raw, d = await attempt(grid, "alice", "guess", source=f"198.51.100.{i}",
                               gateways=gateways)
        delay = await held(clock)
        assert delay == min(2 ** (i - 3), 16)
        clock.advance(delay)
        assert await outcome(d) == "wrong user name or password"
        await raw.close()
    # … and alice, with her password, gets in after at most that long
    raw, d = await attempt(grid, "alice", PASSWORDS["alice"], source="203.0.113.5",
                           gateways=gateways)
    assert await held(clock) == 16
    clock.advance(16)
    assert await outcome(d) == "ok"
    await raw.close()
    # which ends her delay
    assert await login_once(grid, "alice", PASSWORDS["alice"], source="203.0.113.5",
                            gateways=gateways) == "ok"


@pytest_twisted.ensureDeferred
async def test_a_claimed_source_counts_only_from_a_gateway(client_grids):
    grid, _clock, gateways, _checked = await throttled_grid(client_grids)
    with LogCapture() as logged:
        await login_once(grid, "bob", "guess", source="10.1.1.1")
        await login_once(grid, "bob", "guess", source="10.1.1.1", gateways=gateways)
        await login_once(grid, "bob", "guess", source="not an address " * 100,
                         gateways=gateways)
    assert set(grid.throttle.sources._records) == {"127.0.0.1", "10.1.1.1"}
    assert grid.throttle.sources.get("127.0.0.1").failures == 2
    texts = logged.texts()
    assert any("claims to come from 10.1.1.1: ignored (not a gateway)" in t for t in texts)
    assert all(len(t) < 1000 for t in texts)


# --- The throttle itself ------------------------------------------------------------------

def test_unknown_and_known_users_back_off_alike():
    clock = task.Clock()
    throttle = LoginThrottle(clock)
    for _ in range(5):
        throttle.failed("alice", "192.0.2.1")          # a user that exists
        throttle.failed("no-such-user", "192.0.2.2")   # one that does not
    assert throttle.user_delay("alice") == throttle.user_delay("no-such-user") == 4


def test_the_tables_are_bounded_and_forget():
    clock = task.Clock()
    throttle = LoginThrottle(clock, ThrottlePolicy(max_entries=1000, forget_after=600,
                                                   source_failures=10**6))
    for i in range(5000):
        throttle.failed(f"u{i}" + "x" * (i % 200), f"10.0.{i // 250}.{i % 250}")
    assert len(throttle.users) == len(throttle.sources) == 1000
    assert max(map(len, throttle.users._records)) <= 65
    clock.advance(601)
    throttle.failed("one", "192.0.2.1")
    assert len(throttle.users) == len(throttle.sources) == 1


def test_lockouts_double_up_to_the_maximum_and_success_keeps_the_source():
    clock = task.Clock()
    throttle = LoginThrottle(clock, ThrottlePolicy(source_failures=3, source_lockout=10,
                                                   source_lockout_max=35))
    lockouts = []
    for _ in range(6):
        while True:
            try:
                throttle.admit("x", "192.0.2.9")
            except SourceLockedOut as e:
                lockouts.append(e.retry_after)
                clock.advance(e.retry_after)
                break
            throttle.failed("x", "192.0.2.9")
        throttle.succeeded("x", "192.0.2.9")
    assert lockouts == [10, 20, 35, 35, 35, 35]


def test_log_files_are_created_0640_and_events_bounded(tmp_path):
    path = tmp_path / "ctrl.log"
    stream = daemon.open_log_file(str(path))
    stream.close()
    assert stat.S_IMODE(os.stat(path).st_mode) & ~0o640 == 0
    os.chmod(path, 0o644)
    daemon.open_log_file(str(path)).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    event = {"log_format": "{junk}", "junk": "J" * 10**6, "log_time": 0,
             "log_namespace": "t", "log_level": None}
    assert len(daemon.bounded_event_text(event)) < daemon.MAX_LOG_EVENT + 100


def test_a_login_timeout_shorter_than_the_user_delay_is_a_config_error():
    ctrl = {"login_timeout": 10, "max_prelogin_bytes": 65536, "max_concurrent_logins": 4,
            "login_source_failures": 10, "login_source_lockout": 60,
            "login_source_lockout_max": 3600, "login_user_failures": 3,
            "login_user_delay_max": 16, "login_failure_memory": 3600}
    with pytest.raises(ConfigError, match="login_timeout"):
        client_factory(None, ctrl, task.Clock())
    assert isinstance(client_factory(None, dict(ctrl, login_timeout=30), task.Clock()),
                      ClientPBFactory)
