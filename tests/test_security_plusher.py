"""Security of plusher (issue 10, holes 9 and 10), over HTTP against a real
controller (a sandbox): up-calls only to the hosts a site allows, no
credentials in the log, request bodies bounded before they are read, plain
HTTP only on loopback, and the HTTP peer's address passed on as the source
of a login."""

import os
import xmlrpc.client as xmlrpclib

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.testing import StringTransport
from twisted.web import server

from usher.clients import plusher
from usher.clients.plusher import (FAULT_INVALID_REQUEST, Gateway, check_callback_url,
                                   parse_callback_hosts)
from usher.errors import ConfigError, InvalidRequest

from tests.e2e import RunningSandbox, wait_for
from tests.hostile import LogCapture
from tests.test_plusher import PlushServer, call, fault_of, listen, plusher_settings

CALLBACK_PASSWORD = "Cb-pass-w0rd"


@pytest_twisted.async_yield_fixture(scope="module")
async def system(tmp_path_factory):
    box = RunningSandbox(tmp_path_factory.mktemp("sec-plusher"), lnms=1)
    await box.start()
    yield box
    await box.stop()


@pytest_twisted.async_yield_fixture
async def plush():
    """Plush's up-call server, and an "internal service" on another port."""
    server_ = PlushServer()
    port, url = listen(server.Site(server_))
    internal = PlushServer()
    internal_port, internal_url = listen(server.Site(internal))
    yield server_, port.getHost().port, internal, internal_url
    await port.stopListening()
    await internal_port.stopListening()


async def serve(system, **changes):
    gateway = Gateway(plusher_settings(system, **changes), reactor)
    port, url = listen(plusher.make_site(gateway))

    async def stop():
        await gateway.stop()
        await port.stopListening()
    return gateway, url, stop


# --- Hole 9: up-calls ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_no_upcalls_until_the_site_allows_hosts(system, plush):
    _plush, _port, internal, internal_url = plush
    gateway, url, stop = await serve(system)        # callback_hosts: the default, empty
    try:
        session = await call(url, "login", "alice", system.description["password"])
        fault = await fault_of(url, "request_vms", session, "nocb", 1, {},
                               internal_url + "internal/reset")
        assert fault.faultCode == FAULT_INVALID_REQUEST
        assert "makes no up-calls" in fault.faultString
        assert await call(url, "list_vms", session) == [] and gateway.requests == {}
        # An empty callback_url: the VMs start, Plush polls status.
        request_id = await call(url, "request_vms", session, "nocb", 1, {}, "")
        await wait_for(lambda: gateway.requests[request_id].state == plusher.READY)
        status = await call(url, "status", session, request_id)
        assert (status["state"], status["upcall"]) == ("ready", "none")
        await call(url, "release", session, request_id)
        assert internal.calls == {}
    finally:
        await stop()


@pytest_twisted.ensureDeferred
async def test_allowed_hosts_match_exactly_and_credentials_stay_out_of_the_log(system, plush):
    plush_server, plush_port, internal, internal_url = plush
    gateway, url, stop = await serve(system, callback_hosts=[f"127.0.0.1:{plush_port}"])
    try:
        session = await call(url, "login", "alice", system.description["password"])
        for refused in (internal_url + "RPC2",                      # another port
                        f"http://localhost:{plush_port}/RPC2",       # another name for it
                        f"http://127.0.0.1.nip.io:{plush_port}/",    # a suffix
                        "https://127.0.0.1/RPC2",                     # its default port
                        f"http://u:{CALLBACK_PASSWORD}@127.0.0.2:{plush_port}/"):
            fault = await fault_of(url, "request_vms", session, "cb", 1, {}, refused)
            assert fault.faultCode == FAULT_INVALID_REQUEST, refused
            assert "may not call back" in fault.faultString
            assert CALLBACK_PASSWORD not in fault.faultString
        assert gateway.requests == {} and internal.calls == {}
        with LogCapture() as logged:
            request_id = await call(
                url, "request_vms", session, "cb", 1, {},
                f"http://plush:{CALLBACK_PASSWORD}@127.0.0.1:{plush_port}/RPC2")
            method, _hosts = await plush_server.upcall(request_id)
        assert method == "resources_ready"
        texts = "\n".join(logged.texts())
        assert f"delivered to http://127.0.0.1:{plush_port}/RPC2" in texts
        assert CALLBACK_PASSWORD not in texts
        await call(url, "release", session, request_id)
    finally:
        await stop()


def test_callback_host_rules():
    rules = parse_callback_hosts(["Plush.Example.org", "10.0.0.5:5555", "calls.example.org:*"])
    allowed = ["http://plush.example.org/RPC2", "https://PLUSH.example.org:443/",
               "http://10.0.0.5:5555/", "http://calls.example.org:1/",
               "https://calls.example.org:65535/x", "http://u:p@10.0.0.5:5555/"]
    refused = ["http://plush.example.org:8080/", "http://www.plush.example.org/",
               "http://plush.example.org.evil.net/", "http://10.0.0.5/",
               "http://10.0.0.5:5556/", "http://127.0.0.1/", "http://0x0a000005:5555/"]
    for url in allowed:
        assert check_callback_url(url, rules) == url
    for url in refused:
        with pytest.raises(InvalidRequest, match="may not call back"):
            check_callback_url(url, rules)
    # Twisted's XML-RPC client splits at the first "@": this one would call
    # 127.0.0.1:22 though it names an allowed host last.
    for ambiguous in ("http://127.0.0.1:22@x@plush.example.org/", "http://[::1]:5555/"):
        with pytest.raises(InvalidRequest, match="at most one user name"):
            check_callback_url(ambiguous, rules)
    for bad in ("", "host:0", "host:http", "[::1]:80", "::1", "a/b", "u@host"):
        with pytest.raises(ConfigError, match="callback_hosts"):
            parse_callback_hosts([bad])
    assert plusher.safe_url("https://u:p@h:1/x?q") == "https://h:1/x?q"


# --- Hole 10: request bodies --------------------------------------------------------------

class RawHTTP(protocol.Protocol):
    def __init__(self):
        self.received = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_a_huge_body_is_refused_before_it_is_read(system):
    gateway, url, stop = await serve(system)
    try:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        raw = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawHTTP())
        # 23 MB announced (2.3 s of plusher's reactor and +59 MiB before):
        # the answer comes after the headers, the body is never read.
        raw.transport.write(b"POST / HTTP/1.1\r\nHost: plusher\r\nContent-Type: text/xml\r\n"
                            b"Content-Length: 23000000\r\nExpect: 100-continue\r\n\r\n")
        # meanwhile plusher serves a user
        session = await call(url, "login", "alice", system.description["password"])
        await wait_for(lambda: raw.lost.called)
        assert raw.received.startswith(b"HTTP/1.1 413 ")
        assert b"100 Continue" not in raw.received
        assert isinstance(await call(url, "list_vms", session), list)
        assert list(gateway.sessions) == [session]
    finally:
        await stop()


def feed(site, data, step=4096):
    """``data`` into a new HTTP channel of ``site`` -> (transport, channel)."""
    channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.9", 4444))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 4444))
    channel.makeConnection(transport)
    for offset in range(0, len(data), step):
        if transport.disconnecting:
            break
        channel.dataReceived(data[offset:offset + step])
    return transport, channel


def xmlrpc_body(size):
    body = xmlrpclib.dumps(("x" * 10,), methodname="list_vms").encode()
    return body.replace(b"<params>", b"<params>" + b" " * (size - len(body)), 1)


def test_a_chunked_body_is_cut_off_at_the_limit():
    rendered = []
    gateway = Gateway(plusher.PlusherSettings(max_request_bytes=8192), reactor,
                      client_factory=lambda *a, **k: rendered.append(a))
    site = plusher.make_site(gateway)
    chunks = b"".join(b"%x\r\n%s\r\n" % (1000, b"<" * 1000) for _ in range(1000)) + b"0\r\n\r\n"
    with LogCapture() as logged:
        transport, channel = feed(site, b"POST / HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: "
                                  b"chunked\r\nContent-Type: text/xml\r\n\r\n" + chunks)
    assert transport.value().startswith(b"HTTP/1.1 413 ") and transport.disconnecting
    assert rendered == [] and gateway.sessions == {}
    assert any("refused a request of 9000 bytes or more from 192.0.2.9" in t
               for t in logged.texts())
    channel.connectionLost(None)


def test_a_body_at_the_limit_is_served():
    gateway = Gateway(plusher.PlusherSettings(max_request_bytes=8192), reactor)
    site = plusher.make_site(gateway)
    for size, status in ((8192, b"200"), (8193, b"413")):
        body = xmlrpc_body(size)
        assert len(body) == size
        transport, channel = feed(site, b"POST / HTTP/1.1\r\nHost: p\r\nContent-Type: "
                                  b"text/xml\r\nContent-Length: %d\r\n\r\n" % size + body)
        assert transport.value().startswith(b"HTTP/1.1 " + status), transport.value()[:200]
        channel.connectionLost(None)


def test_plain_http_is_for_loopback_only(system):
    ca = system.description["ca_file"]
    for interface, allowed in (("127.0.0.1", True), ("::1", True), ("0.0.0.0", False),
                               ("192.0.2.10", False)):
        config = {"plusher": {**vars(plusher.PlusherSettings(interface=interface,
                                                              ssl_ca_file=ca))}}
        if allowed:
            plusher.check_transport(plusher.PlusherSettings.from_config(config))
        else:
            with pytest.raises(ConfigError, match="not a loopback address: serve HTTPS"):
                plusher.make_service(config, reactor)
            config["plusher"]["allow_plain_http"] = True
            plusher.check_transport(plusher.PlusherSettings.from_config(config))


# --- The source of a login --------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_plusher_sends_the_http_peer_as_the_login_source(system):
    sources = []

    def factory(user, password, source=None):
        sources.append(source)
        return gateway._usher_client(user, password, source)
    gateway = Gateway(plusher_settings(system), reactor, client_factory=factory)
    port, url = listen(plusher.make_site(gateway))
    try:
        await call(url, "login", "alice", system.description["password"])
        fault = await fault_of(url, "list_vms", {"user": "alice", "password": "wrong"})
        assert fault.faultCode == plusher.FAULT_AUTHENTICATION
        assert sources == ["127.0.0.1", "127.0.0.1"]
        # The sandbox's controller has no gateway certificates: it logs the
        # claim and counts the login as plusher's own (usher.pki roles decide).
        log = os.path.join(system.dir, "logs", "usherctrl.log")
        await wait_for(lambda: "claims to come from 127.0.0.1" in open(log).read())
    finally:
        await gateway.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_gateway_certificate_makes_the_controller_trust_the_source(system):
    """With its gateway certificate, plusher's source claims count: failed
    logins are the HTTP peer's, not plusher's own address."""
    from usher import pki
    pki_dir = os.path.join(system.dir, "pki")
    pki.issue_cert(pki_dir, "plusher", pki_dir, role=pki.ROLE_GATEWAY, force=True)
    settings = plusher_settings(system,
                                gateway_cert_file=os.path.join(pki_dir, "plusher_cert.pem"),
                                gateway_key_file=os.path.join(pki_dir, "plusher_key.pem"))

    def factory(user, password, source=None):
        # The HTTP peer here is 127.0.0.1 too: claim a documentation address
        # (nothing is sent to it) so the log shows whose failure was counted.
        return gateway._usher_client(user, password, "192.0.2.7")
    gateway = Gateway(settings, reactor, client_factory=factory)
    port, url = listen(plusher.make_site(gateway))
    try:
        fault = await fault_of(url, "list_vms", {"user": "alice", "password": "wrong"})
        assert fault.faultCode == plusher.FAULT_AUTHENTICATION
        log = os.path.join(system.dir, "logs", "usherctrl.log")
        await wait_for(lambda: "failed login for alice from 192.0.2.7" in open(log).read())
        assert "claims to come from 192.0.2.7" not in open(log).read()
        assert await call(url, "login", "alice", system.description["password"])
    finally:
        await gateway.stop()
        await port.stopListening()
