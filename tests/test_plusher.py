"""plusher, the XML-RPC gateway for Plush.

End to end: an Usher sandbox (a controller and two LNMs as processes over
real TLS), plusher serving XML-RPC in the test reactor (and once as its own
process, over HTTPS), and a small "Plush" XML-RPC server receiving the
up-calls. A few tests drive the Gateway with a scripted client and a
task.Clock where time is the point (idle sessions, ready timeouts, up-call
retries).
"""

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import xmlrpc.client as xmlrpclib
from io import BytesIO

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectError
from twisted.internet.ssl import Certificate
from twisted.web import resource, server, xmlrpc
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from usher import pki, settings as usher_settings, states
from usher.clients import plusher
from usher.clients.plusher import (FAULT_AUTHENTICATION, FAULT_INVALID_REQUEST,
                                   FAULT_NO_SUCH_REQUEST, FAULT_NO_SUCH_VM, FAULT_PERMISSION,
                                   Gateway, PlusherSettings, UpcallSender)
from usher.config import load_config, parse_spec
from usher.errors import AuthenticationFailed, Unavailable

from tests.e2e import sleep, wait_for

DOMAIN = "usher.test"
SANDBOX_LNMS = 2
# Twisted's readBody cannot abort the transports Agent hands it: harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")
ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


# --- An XML-RPC caller (Plush's side of the down-calls) -------------------------------

async def call(url, method, *args, ca_file=None):
    """One XML-RPC call -> its result; a fault raises xmlrpc.client.Fault."""
    policy = BrowserLikePolicyForHTTPS(
        trustRoot=Certificate.loadPEM(open(ca_file, "rb").read())) if ca_file else None
    agent = Agent(reactor, contextFactory=policy) if policy else Agent(reactor)
    body = xmlrpclib.dumps(args, methodname=method).encode("utf-8")
    response = await agent.request(b"POST", url.encode("ascii"),
                                   Headers({b"Content-Type": [b"text/xml"]}),
                                   FileBodyProducer(BytesIO(body)))
    data = await readBody(response)
    assert response.code == 200, data
    return xmlrpclib.loads(data)[0][0]


async def fault_of(url, method, *args):
    with pytest.raises(xmlrpclib.Fault) as caught:
        await call(url, method, *args)
    return caught.value


# --- Plush's up-call server -------------------------------------------------------------

class PlushServer(xmlrpc.XMLRPC):
    """Records every up-call by request id."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def xmlrpc_resources_ready(self, request_id, hosts):
        self.calls.setdefault(request_id, []).append(("resources_ready", hosts))
        return True

    def xmlrpc_resources_failed(self, request_id, message, hosts):
        self.calls.setdefault(request_id, []).append(("resources_failed", message, hosts))
        return True

    async def upcall(self, request_id, timeout=15):
        await wait_for(lambda: request_id in self.calls, timeout=timeout)
        return self.calls[request_id][0]


class FlakyPlush(resource.Resource):
    """Answers the first ``failures`` POSTs with HTTP 500, then accepts."""
    isLeaf = True

    def __init__(self, failures, fault=False):
        super().__init__()
        self.failures = failures
        self.fault = fault
        self.posts = 0

    def render_POST(self, request):
        self.posts += 1
        if self.posts <= self.failures:
            request.setResponseCode(500)
            return b"broken"
        request.setHeader(b"content-type", b"text/xml")
        if self.fault:
            return xmlrpclib.dumps(xmlrpclib.Fault(42, "unknown request"),
                                   methodresponse=True).encode()
        return xmlrpclib.dumps((True,), methodresponse=True).encode()


def listen(site):
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}/"


# --- Fixtures -----------------------------------------------------------------------------

def plusher_settings(box, **changes):
    d = box.description
    fields = dict(controller_host="127.0.0.1", controller_port=d["client_port"],
                  controller_tls_name="localhost", ssl_ca_file=d["ca_file"], call_timeout=30,
                  ready_timeout=15, upcall_attempts=3, upcall_initial_delay=0.2,
                  upcall_timeout=5)
    fields.update(changes)
    return PlusherSettings(**fields)


@dataclasses.dataclass
class Running:
    url: str
    gateway: Gateway
    plush: PlushServer
    callback: str
    password: str


@pytest_twisted.async_yield_fixture(scope="module")
async def gw(system):
    plush = PlushServer()
    plush_port, plush_url = listen(server.Site(plush))
    gateway = Gateway(plusher_settings(
        system, callback_hosts=[f"127.0.0.1:{plush_port.getHost().port}"]), reactor)
    port, url = listen(plusher.make_site(gateway))
    yield Running(url=url, gateway=gateway, plush=plush, callback=plush_url + "RPC2",
                  password=system.description["password"])
    await gateway.stop()
    await port.stopListening()
    await plush_port.stopListening()


async def login(gw, user="alice", password=None):
    return await call(gw.url, "login", user, gw.password if password is None else password)


# --- Sessions --------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_login_failure_and_sessions(gw):
    open_sessions = len(gw.gateway.sessions)
    wrong = await fault_of(gw.url, "login", "alice", "not-her-password")
    assert wrong.faultCode == FAULT_AUTHENTICATION
    assert "wrong user name or password" in wrong.faultString
    nobody = await fault_of(gw.url, "login", "nobody", "x")
    assert nobody.faultCode == FAULT_AUTHENTICATION
    # credentials sent with a call are checked the same way
    by_credentials = await fault_of(gw.url, "list_vms", {"user": "alice", "password": "no"})
    assert by_credentials.faultCode == FAULT_AUTHENTICATION
    assert len(gw.gateway.sessions) == open_sessions

    session = await login(gw)
    assert isinstance(session, str) and len(session) > 20
    assert await call(gw.url, "list_vms", session) == []
    assert await call(gw.url, "logout", session) is True
    expired = await fault_of(gw.url, "list_vms", session)
    assert (expired.faultCode, expired.faultString) == (
        FAULT_AUTHENTICATION, "unknown or expired session; log in again")
    assert session not in gw.gateway.sessions


@pytest_twisted.ensureDeferred
async def test_introspection_lists_and_describes_the_down_calls(gw):
    methods = await call(gw.url, "system.listMethods")
    assert {"login", "logout", "request_vms", "release", "status", "list_vms",
            "operate"} <= set(methods)
    assert "resources_ready" in await call(gw.url, "system.methodHelp", "request_vms")
    assert await call(gw.url, "system.methodSignature", "login") == [
        ["string", "string", "string"]]


# --- Requests and up-calls --------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_request_runs_vms_and_calls_resources_ready(gw):
    session = await login(gw)
    request_id = await call(gw.url, "request_vms", session, "plushready", 3,
                            {"memory_mib": 128, "os": "debian"}, gw.callback)
    assert isinstance(request_id, str)
    method, hosts = await gw.plush.upcall(request_id)
    names = [full(f"{i}.plushready") for i in (1, 2, 3)]
    assert (method, sorted(hosts)) == ("resources_ready", names)
    assert len(gw.plush.calls[request_id]) == 1

    status = await call(gw.url, "status", session, request_id)
    assert status["state"] == "ready" and status["hosts"] == hosts
    assert (status["cluster"], status["count"], status["user"]) == ("plushready", 3, "alice")
    assert status["upcall"] in ("pending", "delivered")
    assert [vm["state"] for vm in status["vms"]] == ["run"] * 3

    listed = await call(gw.url, "list_vms", session, "plushready")
    assert [vm["name"] for vm in listed] == names
    for vm in listed:
        assert vm["state"] == "run" and vm["cluster"] == "plushready"
        assert vm["lnm"] in ("lnm1", "lnm2") and vm["memory_mib"] == 128
        assert vm["address"] == vm["name"]    # no IP plugin: the VM's DNS name
    assert {vm["lnm"] for vm in listed} == {"lnm1", "lnm2"}
    assert len(await call(gw.url, "list_vms", session)) >= 3

    operated = await call(gw.url, "operate", session, "pause", request_id)
    assert operated["done"] == [{"name": n, "state": "paused"} for n in names]
    operated = await call(gw.url, "operate", session, "resume", [names[0], "2.plushready"])
    assert [d["name"] for d in operated["done"]] == names[:2] and operated["failed"] == []

    released = await call(gw.url, "release", session, request_id)
    assert sorted(released["released"]) == names and released["failed"] == []
    client = gw.gateway.sessions[session].client
    await wait_for(lambda: not any(n in client.vms for n in names))
    assert await call(gw.url, "list_vms", session, "plushready") == []
    status = await call(gw.url, "status", session, request_id)
    assert status["state"] == "released"
    assert [vm["state"] for vm in status["vms"]] == ["removed"] * 3
    assert len(gw.plush.calls[request_id]) == 1     # no up-call for a release


@pytest_twisted.ensureDeferred
async def test_hosts_are_addresses_from_the_vm_arguments(gw):
    session = await login(gw)
    request_id = await call(gw.url, "request_vms", session, "pluship", 1,
                            {"ip": "10.20.30.40"}, gw.callback)
    assert await gw.plush.upcall(request_id) == ("resources_ready", ["10.20.30.40"])
    [vm] = await call(gw.url, "list_vms", session, "pluship")
    assert (vm["name"], vm["address"]) == (full("1.pluship"), "10.20.30.40")
    released = await call(gw.url, "release", session, ["1.pluship"])
    assert released["released"] == [full("1.pluship")]


@pytest_twisted.ensureDeferred
async def test_request_beyond_plugin_limits_calls_resources_failed(gw, system, tmp_path):
    limits = tmp_path / "limits.config"
    limits.write_text("max_vms_per_request = 2\n")
    admin = await system.connected_client()
    await admin.unregister_plugin("limits")          # the default registration
    await admin.register_plugin("limits", "start_request", str(limits))
    bob = {"user": "bob", "password": "bob-secret"}     # credentials with every call
    try:
        request_id = await call(gw.url, "request_vms", bob, "plushlim", 3, {}, gw.callback)
        method, message, hosts = await gw.plush.upcall(request_id)
    finally:
        await admin.unregister_plugin("limits")
        await admin.register_plugin("limits", "start_request")
    assert method == "resources_failed"
    assert sorted(hosts) == [full("1.plushlim", "bob"), full("2.plushlim", "bob")]
    assert message.startswith("1 of 3 VMs could not start: ")
    assert f"{full('3.plushlim', 'bob')}: over the limit: at most 2 VMs per request" in message
    status = await call(gw.url, "status", bob, request_id)
    assert status["state"] == "failed" and status["message"] == message
    assert status["failed"][0]["name"] == full("3.plushlim", "bob")
    # one session for bob's credentials, reused by every call
    assert len([s for s in gw.gateway.sessions.values() if s.user == "bob"]) == 1
    # the VMs that did start stay until Plush releases them
    released = await call(gw.url, "release", bob, request_id)
    assert sorted(released["released"]) == sorted(hosts)


@pytest_twisted.ensureDeferred
async def test_request_beyond_capacity_calls_resources_failed(gw):
    session = await login(gw)
    request_id = await call(gw.url, "request_vms", session, "plushbig", 2,
                            {"memory_mib": 1_000_000}, gw.callback)
    method, message, hosts = await gw.plush.upcall(request_id)
    assert (method, hosts) == ("resources_failed", [])
    assert message.startswith("2 of 2 VMs could not start: ")
    assert "no LNM can start it" in message and "memory" in message
    assert await call(gw.url, "list_vms", session, "plushbig") == []
    assert await call(gw.url, "release", session, request_id) == {
        "released": [], "failed": [], "notes": []}


# --- Bad input ----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_bad_input_is_a_fault_and_changes_nothing(gw):
    session = await login(gw)
    good = {"cluster": "plushbad", "count": 1, "options": {}, "callback": gw.callback}
    cases = [
        (dict(count=0), "count must be a positive integer"),
        (dict(count="3"), "count must be a positive integer"),
        (dict(count=True), "count must be a positive integer"),
        (dict(cluster="Bad_Name"), "invalid cluster name 'Bad_Name'"),
        (dict(options=[1]), "options must be a struct"),
        (dict(options={"count": 3}), "'count' is an argument of request_vms"),
        (dict(options={"bad key": 1}), "invalid option name 'bad key'"),
        (dict(options={"memory_mib": -1}), "option 'memory_mib' must be a positive integer"),
        (dict(options={"os": ["a"]}), "option 'os' must be a string"),
        (dict(options={"lnms": "lnm1"}), "option 'lnms' must be an array"),
        (dict(callback="ftp://127.0.0.1/x"), "callback_url must be an http or https URL"),
        (dict(callback="file:///etc/passwd"), "callback_url must be an http or https URL"),
        (dict(callback="http:///RPC2"), "names no host"),
        (dict(callback="http://host:99999/"), "callback_url 'http://host:99999/'"),
        (dict(callback="http://a b/"), "without spaces"),
    ]
    for change, expected in cases:
        args = dict(good, **change)
        fault = await fault_of(gw.url, "request_vms", session, args["cluster"],
                               args["count"], args["options"], args["callback"])
        assert fault.faultCode == FAULT_INVALID_REQUEST, (change, fault)
        assert expected in fault.faultString, (change, fault.faultString)
    arity = await fault_of(gw.url, "request_vms", session, "plushbad", 1)
    assert (arity.faultCode, arity.faultString) == (
        FAULT_INVALID_REQUEST,
        "request_vms(session, cluster, count, options, callback_url): got 3 arguments")
    assert (await fault_of(gw.url, "list_vms", 42)).faultCode == FAULT_INVALID_REQUEST
    assert (await fault_of(gw.url, "operate", session, "explode", ["x"])).faultString == (
        "unknown operation 'explode'; valid: " + ", ".join(states.OPERATIONS))
    assert (await fault_of(gw.url, "release", session, [])).faultCode == FAULT_INVALID_REQUEST
    assert (await fault_of(gw.url, "no_such_method")).faultCode == xmlrpc.XMLRPC.NOT_FOUND

    unknown = await fault_of(gw.url, "operate", session, "pause", ["1.nosuchvm"])
    assert unknown.faultCode == FAULT_NO_SUCH_VM and "1.nosuchvm" in unknown.faultString
    missing = await fault_of(gw.url, "status", session, "r-nosuchrequest")
    assert (missing.faultCode, missing.faultString) == (
        FAULT_NO_SUCH_REQUEST, "no such request: r-nosuchrequest")

    # bob may neither touch alice's VMs nor see her requests
    request_id = await call(gw.url, "request_vms", session, "plushown", 1, {}, gw.callback)
    await gw.plush.upcall(request_id)
    bob = await login(gw, "bob", "bob-secret")
    foreign = await fault_of(gw.url, "release", bob, [full("1.plushown")])
    assert foreign.faultCode == FAULT_PERMISSION
    assert (await fault_of(gw.url, "status", bob, request_id)).faultCode == FAULT_PERMISSION
    assert (await fault_of(gw.url, "release", bob, request_id)).faultCode == FAULT_PERMISSION

    # nothing was started, nothing was destroyed, no other up-call was made
    assert await call(gw.url, "list_vms", session, "plushbad") == []
    [vm] = await call(gw.url, "list_vms", session, "plushown")
    assert vm["state"] == "run"
    await call(gw.url, "release", session, request_id)


# --- Timers: up-call retries, idle sessions, ready timeouts (task.Clock) --------------------------

def sender(clock, attempts=3):
    return UpcallSender(clock, lambda url: xmlrpc.Proxy(url.encode(), reactor=reactor),
                        attempts=attempts, initial_delay=1.0, max_delay=1.5, timeout=10)


async def next_retry(clock, flaky, posts):
    """Wait for the flaky server's ``posts``-th POST and the retry it leads to
    -> that retry's delay."""
    await wait_for(lambda: flaky.posts == posts and any(
        c.getTime() - clock.seconds() < 5 for c in clock.getDelayedCalls()))
    [retry] = [c for c in clock.getDelayedCalls() if c.getTime() - clock.seconds() < 5]
    return retry.getTime() - clock.seconds()


@pytest_twisted.ensureDeferred
async def test_upcalls_are_retried_with_backoff_then_given_up():
    clock = task.Clock()
    flaky = FlakyPlush(failures=2)
    port, url = listen(server.Site(flaky))
    try:
        delivery = defer.Deferred.fromCoroutine(
            sender(clock).deliver(url, "resources_ready", "r-1", ["h"]))
        assert await next_retry(clock, flaky, 1) == 1.0
        clock.advance(1.0)
        assert await next_retry(clock, flaky, 2) == 1.5      # doubled, capped
        clock.advance(1.5)
        assert await delivery == "delivered" and flaky.posts == 3

        broken = FlakyPlush(failures=10)
        port2, url2 = listen(server.Site(broken))
        delivery = defer.Deferred.fromCoroutine(
            sender(clock, attempts=2).deliver(url2, "resources_failed", "r-2", "why", []))
        clock.advance(await next_retry(clock, broken, 1))
        assert await delivery == "gave_up" and broken.posts == 2
        await port2.stopListening()

        refusing = FlakyPlush(failures=0, fault=True)
        port3, url3 = listen(server.Site(refusing))
        outcome = await sender(clock).deliver(url3, "resources_ready", "r-3", [])
        assert outcome == "refused" and refusing.posts == 1    # a fault is not repeated
        await port3.stopListening()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_idle_session_closes_unless_a_request_is_waiting(system):
    clock = task.Clock()
    gateway = Gateway(plusher_settings(system, session_idle_timeout=100), reactor,
                      clock=clock)
    try:
        session = await gateway.login("alice", system.description["password"])
        client = gateway.sessions[session].client
        clock.advance(90)
        await gateway.list_vms(session)         # a call: idle again from now
        clock.advance(90)
        assert session in gateway.sessions and client.connected
        clock.advance(10)
        assert session not in gateway.sessions
        await wait_for(lambda: not client.connected)
        with pytest.raises(AuthenticationFailed):
            await gateway.list_vms(session)
    finally:
        await gateway.stop()


class ScriptedClient:
    """UsherClient's surface as plusher uses it; the test decides what the
    controller answers and which changes it pushes."""

    def __init__(self, user):
        self.user = user
        self.vms = {}
        self.connected = False
        self.starts = []
        self.callbacks = []
        self.ops = []

    async def connect(self):
        self.connected = True
        return {"user": self.user, "admin": False, "domain": DOMAIN}

    def disconnect(self):
        self.connected = False
        return defer.succeed(None)

    def start(self, **kwargs):
        d = defer.Deferred()
        self.starts.append((kwargs, d))
        return d

    def on_change(self, callback):
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def push(self, *records, removed=()):
        for record in records:
            self.vms[record["name"]] = record
        for name in removed:
            self.vms.pop(name, None)
        for callback in list(self.callbacks):
            callback(list(records), list(removed))

    async def op_on(self, operation, names, args=None):
        self.ops.append((operation, list(names)) + ((args,) if args else ()))
        return {"operation": operation, "failed": [],
                "done": [{"name": n, "state": None} for n in names]}


def record(short, state, **extra):
    return dict(name=full(short), state=state, cluster=short.split(".", 1)[1], **extra)


class Upcalls:
    def __init__(self):
        self.made = []

    def __call__(self, url):
        made = self.made

        class Proxy:
            def callRemote(self, method, *args):
                made.append((url, method) + args)
                return defer.succeed(True)
        return Proxy()


def scripted_gateway(**changes):
    clients = []

    def factory(user, password, source=None):
        if password != "pw":
            raise AssertionError("only the right password reaches the controller here")
        clients.append(ScriptedClient(user))
        return clients[-1]
    upcalls = Upcalls()
    clock = task.Clock()
    settings = PlusherSettings(**dict(dict(ready_timeout=60, session_idle_timeout=300,
                                           callback_hosts=["plush"]), **changes))
    gateway = Gateway(settings, reactor, clock=clock, client_factory=factory,
                      proxy_factory=upcalls)
    return gateway, clients, upcalls, clock


@pytest_twisted.ensureDeferred
async def test_vms_that_never_run_fail_the_request_after_ready_timeout():
    gateway, clients, upcalls, clock = scripted_gateway(ready_timeout=60,
                                                        session_idle_timeout=30)
    session = await gateway.login("alice", "pw")
    [client] = clients
    request_id = await gateway.request_vms(session, "slow", 2, {}, "http://plush/RPC2")
    [(kwargs, started)] = client.starts
    assert kwargs == {"cluster": "slow", "count": 2, "lnms": [], "args": {}}
    client.push(record("1.slow", states.STARTING), record("2.slow", states.STARTING))
    started.callback({"started": [{"name": full("1.slow")}, {"name": full("2.slow")}],
                      "failed": [], "notes": []})
    client.push(record("1.slow", states.RUN, args={"ip": "10.0.0.1"}))
    clock.advance(59)       # longer than the idle timeout: the request keeps it open
    assert session in gateway.sessions and upcalls.made == []
    clock.advance(1)
    assert upcalls.made == [("http://plush/RPC2", "resources_failed", request_id,
                             f"1 of 2 VMs were not running within 60 s: {full('2.slow')} "
                             "is starting", ["10.0.0.1"])]
    assert (await gateway.status(session, request_id))["state"] == "failed"
    clock.advance(29)
    assert session in gateway.sessions
    clock.advance(1)        # idle once the request ended (status was a call)
    assert session not in gateway.sessions and not client.connected


@pytest_twisted.ensureDeferred
async def test_a_vm_that_vanishes_fails_the_request_and_release_while_starting():
    gateway, clients, upcalls, clock = scripted_gateway()
    session = await gateway.login("alice", "pw")
    [client] = clients
    first = await gateway.request_vms(session, "gone", 2, {}, "http://plush/")
    client.push(record("1.gone", states.STARTING), record("2.gone", states.RUN))
    client.starts[0][1].callback({"started": [{"name": full("1.gone")},
                                              {"name": full("2.gone")}], "failed": []})
    client.push(removed=[full("1.gone")])
    assert upcalls.made == [("http://plush/", "resources_failed", first,
                             f"1 of 2 VMs did not come up: {full('1.gone')} was removed",
                             [full("2.gone")])]

    # released before the controller answered: destroyed once started, no up-call
    second = await gateway.request_vms(session, "late", 1, {}, "http://plush/")
    release = gateway.release(session, second)
    assert not release.called and (await gateway.status(session, second))["state"] == \
        "released"
    client.push(record("1.late", states.RUN))
    client.starts[1][1].callback({"started": [{"name": full("1.late")}], "failed": []})
    assert (await release)["released"] == [full("1.late")]
    # Released VMs are removed, running or not (issue 17: destroy keeps them).
    assert client.ops[-1] == ("delete", [full("1.late")], {"force": True})
    assert len(upcalls.made) == 1


@pytest_twisted.ensureDeferred
async def test_concurrent_calls_with_the_same_credentials_share_one_session():
    gateway, clients, upcalls, clock = scripted_gateway()
    credentials = {"user": "carol", "password": "pw"}
    first, second = await defer.gatherResults([gateway.list_vms(credentials),
                                               gateway.list_vms(credentials)])
    assert first == second == [] and len(clients) == 1 and len(gateway.sessions) == 1
    clock.advance(300)
    assert gateway.sessions == {}
    await gateway.list_vms(credentials)
    assert len(clients) == 2      # a new connection after the idle one closed


@pytest_twisted.ensureDeferred
async def test_sessions_beyond_max_sessions_are_refused():
    gateway, clients, upcalls, clock = scripted_gateway(max_sessions=1)
    session = await gateway.login("alice", "pw")
    with pytest.raises(Unavailable, match=r"too many open sessions \(1\)"):
        await gateway.login("bob", "pw")
    assert len(clients) == 1      # the controller was not even asked
    await gateway.logout(session)
    await gateway.login("bob", "pw")


# --- The daemon: configuration, HTTPS, a real process --------------------------------------------

def test_sample_config_states_and_documents_every_default(tmp_path):
    spec = usher_settings.PLUSHER
    sample = os.path.join(ETC, "plusher.config.orig")
    from_sample = load_config(dataclasses.replace(spec, host_file=sample), env={},
                              home=str(tmp_path))
    defaults = load_config(dataclasses.replace(spec, host_file=str(tmp_path / "none")),
                           env={}, home=str(tmp_path))
    assert from_sample == defaults
    assert PlusherSettings.from_config(defaults) == PlusherSettings()
    lines = open(sample, encoding="utf-8").read().splitlines()
    for option in parse_spec(spec.spec)["plusher"]:
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{option} ="))
        assert any(line.startswith("# ") for line in lines[max(0, index - 6):index]), option


def test_half_a_certificate_is_a_configuration_error(tmp_path, capsys):
    config = tmp_path / "plusher.config"
    config.write_text(textwrap.dedent(f"""
        [plusher]
        ssl_cert_file = {tmp_path}/cert.pem
        ssl_ca_file = {tmp_path}/ca.pem
        """))
    assert plusher.main(["--isolated", "--config", str(config)]) == 2
    assert "plusher: configuration error: " in capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_plusher_process_serves_https(system, tmp_path):
    d = system.description
    pki_dir = os.path.join(system.dir, "pki")
    pki.issue_cert(pki_dir, "plusher", str(tmp_path), role="gateway", hostnames=["localhost"],
                   ips=["127.0.0.1"], force=True)
    from usher.sandbox import free_port
    port = free_port()
    config = tmp_path / "plusher.config"
    config.write_text(textwrap.dedent(f"""
        [plusher]
        port = {port}
        ssl_cert_file = {tmp_path}/plusher_cert.pem
        ssl_key_file = {tmp_path}/plusher_key.pem
        controller_host = 127.0.0.1
        controller_port = {d['client_port']}
        controller_tls_name = localhost
        ssl_ca_file = {d['ca_file']}
        log_file = {tmp_path}/plusher.log
        """))
    process = subprocess.Popen([sys.executable, "-m", "usher.clients.plusher", "--isolated",
                                "--config", str(config)], stdin=subprocess.DEVNULL)
    url = f"https://localhost:{port}/"
    try:
        for _ in range(100):
            try:
                session = await call(url, "login", "alice", d["password"],
                                     ca_file=d["ca_file"])
                break
            except ConnectError:
                await sleep(0.05)
        else:
            raise AssertionError("plusher did not start: " + open(tmp_path / "plusher.log").read())
        assert isinstance(await call(url, "list_vms", session, ca_file=d["ca_file"]), list)
        with pytest.raises(Exception):      # plain HTTP is not served
            await call(f"http://127.0.0.1:{port}/", "login", "alice", d["password"])
    finally:
        process.send_signal(signal.SIGTERM)
        code = None
        for _ in range(100):
            code = process.poll()
            if code is not None:
                break
            await sleep(0.05)
        if code is None:
            process.kill()
    assert code == 0
    log_text = open(tmp_path / "plusher.log").read()
    assert f"plusher serving XML-RPC on https://127.0.0.1:{port}/" in log_text
    assert "session for alice opened" in log_text
