"""A test's side of usherweb: an HTTPS JSON client with a cookie jar and
the CSRF header (as the browser interface sends them), a reader of the
Server-Sent Events stream whose waits fire on the events themselves (no
sleeps), and a usherweb served in the test reactor for a sandbox."""

import dataclasses
import json
import os
from http.cookies import SimpleCookie
from io import BytesIO

from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.ssl import Certificate
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from usher import pki
from usher.clients.web import WebSettings, build_api, make_site


@dataclasses.dataclass
class Response:
    code: int
    headers: Headers
    raw: bytes

    @property
    def json(self):
        return json.loads(self.raw) if self.raw else None

    def header(self, name):
        values = self.headers.getRawHeaders(name)
        return values[0].decode() if values else None

    @property
    def error_code(self):
        return (self.json or {}).get("error", {}).get("code")


class WebClient:
    """Cookies and CSRF as a browser session of the UI keeps them."""

    def __init__(self, base, ca_file=None):
        self.base = base.rstrip("/")
        policy = BrowserLikePolicyForHTTPS(
            trustRoot=Certificate.loadPEM(open(ca_file, "rb").read())) if ca_file else None
        self.agent = Agent(reactor, contextFactory=policy) if policy else Agent(reactor)
        self.cookies = {}
        self.csrf = None
        self.token = None

    async def request(self, method, path, body=None, *, raw=None, content_type=None,
                      headers=None, csrf=True, cookies=True):
        h = Headers()
        if cookies and self.cookies:
            h.addRawHeader(b"cookie", "; ".join(f"{k}={v}" for k, v in
                                                self.cookies.items()).encode())
        if csrf and self.csrf and method not in ("GET", "HEAD"):
            h.addRawHeader(b"x-csrf-token", self.csrf.encode())
        if self.token:
            h.addRawHeader(b"authorization", f"Bearer {self.token}".encode())
        producer = None
        if body is not None or raw is not None:
            data = raw if raw is not None else json.dumps(body).encode()
            h.addRawHeader(b"content-type",
                           (content_type or "application/json").encode())
            producer = FileBodyProducer(BytesIO(data))
        for name, value in (headers or {}).items():
            h.setRawHeaders(name.encode(), [value.encode()])
        url = path if path.startswith("http") else self.base + path
        response = await self.agent.request(method.encode(), url.encode(), h, producer)
        for line in response.headers.getRawHeaders(b"set-cookie", []):
            parsed = SimpleCookie(line.decode())
            for key, morsel in parsed.items():
                if morsel["max-age"] == "0":
                    self.cookies.pop(key, None)
                else:
                    self.cookies[key] = morsel.value
        data = await readBody(response)
        return Response(response.code, response.headers, data)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, {} if body is None and "raw" not in kw else body,
                            **kw)

    async def login(self, user, password):
        response = await self.post("/api/v1/login", {"username": user, "password": password})
        if response.code == 200:
            self.csrf = response.json["csrf"]
        return response

    async def stream(self):
        """-> an EventReader on GET /api/v1/stream (its response started)."""
        h = Headers()
        if self.cookies:
            h.addRawHeader(b"cookie", "; ".join(f"{k}={v}" for k, v in
                                                self.cookies.items()).encode())
        if self.token:
            h.addRawHeader(b"authorization", f"Bearer {self.token}".encode())
        response = await self.agent.request(b"GET", (self.base + "/api/v1/stream").encode(),
                                            h, None)
        reader = EventReader(response)
        response.deliverBody(reader)
        return reader


class EventReader(protocol.Protocol):
    """Parses text/event-stream; ``wait(predicate)`` fires on the first
    event (name, data) it holds — no timers, the events themselves."""

    def __init__(self, response):
        self.response = response
        self.events = []
        self.comments = []
        self._buffer = b""
        self._waiters = []
        self.ended = defer.Deferred()
        self.bytes = 0

    def dataReceived(self, data):
        self.bytes += len(data)
        self._buffer += data
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            name, lines = "message", []
            for line in block.decode("utf-8").split("\n"):
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    lines.append(line[6:])
            if lines:
                self.events.append((name, json.loads("\n".join(lines))))
        self._check()

    def connectionLost(self, reason):
        if not self.ended.called:
            self.ended.callback(None)
        for predicate, d in self._waiters:
            if not d.called:
                d.errback(AssertionError(f"stream ended before the event; had {self.names}"))
        self._waiters = []

    @property
    def names(self):
        return [name for name, _ in self.events]

    def _check(self):
        for entry in list(self._waiters):
            predicate, d = entry
            for event in self.events:
                if predicate(*event):
                    self._waiters.remove(entry)
                    d.callback(event)
                    break

    def wait(self, predicate, timeout=20):
        """-> Deferred firing with the first (name, data) for which
        ``predicate(name, data)`` holds (already received or to come)."""
        for event in self.events:
            if predicate(*event):
                return defer.succeed(event)
        d = defer.Deferred()
        self._waiters.append((predicate, d))
        return d.addTimeout(timeout, reactor)

    def snapshot(self):
        """-> Deferred firing with the records of the snapshot, once its end came."""
        def done(_event):
            records = []
            for name, data in self.events:
                if name in ("snapshot", "snapshot-part"):
                    records.extend(data["vms"])
                if name == "snapshot-end":
                    break
            return records
        return self.wait(lambda name, data: name == "snapshot-end").addCallback(done)

    def close(self):
        if self.transport is not None:
            self.transport.stopProducing()


def web_settings(box, static_dir, **changes):
    d = box.description
    pki_dir = os.path.join(box.dir, "pki")
    fields = dict(controller_host="127.0.0.1", controller_port=d["client_port"],
                  controller_tls_name="localhost", ssl_ca_file=d["ca_file"], call_timeout=30,
                  ssl_cert_file=os.path.join(pki_dir, "webtest_cert.pem"),
                  ssl_key_file=os.path.join(pki_dir, "webtest_key.pem"),
                  gateway_cert_file=os.path.join(pki_dir, "webtest_cert.pem"),
                  gateway_key_file=os.path.join(pki_dir, "webtest_key.pem"),
                  static_dir=str(static_dir))
    fields.update(changes)
    return WebSettings(**fields)


class ServedWeb:
    """usherweb's site in the test reactor over HTTPS (a certificate of the
    sandbox's CA, role gateway, which also authenticates it to the controller)."""

    def __init__(self, box, static_dir, **changes):
        pki_dir = os.path.join(box.dir, "pki")
        if not os.path.exists(os.path.join(pki_dir, "webtest_cert.pem")):
            pki.issue_cert(pki_dir, "webtest", pki_dir, role=pki.ROLE_GATEWAY,
                           hostnames=["localhost"], ips=["127.0.0.1"], force=True)
        os.makedirs(static_dir, exist_ok=True)
        self.settings = web_settings(box, static_dir, **changes)
        self.api = build_api(self.settings, reactor)
        self.sessions = self.api.sessions
        self.ca_file = box.description["ca_file"]
        if self.settings.https:
            context = pki.server_tls_options(self.settings.ssl_cert_file,
                                             self.settings.ssl_key_file)
            self.port = reactor.listenSSL(0, make_site(self.api, self.settings), context,
                                          interface="127.0.0.1")
            self.url = f"https://localhost:{self.port.getHost().port}"
        else:
            self.port = reactor.listenTCP(0, make_site(self.api, self.settings),
                                          interface="127.0.0.1")
            self.url = f"http://127.0.0.1:{self.port.getHost().port}"

    def client(self):
        return WebClient(self.url, self.ca_file if self.settings.https else None)

    async def stop(self):
        await self.sessions.stop()
        await self.port.stopListening()


__all__ = ["EventReader", "Response", "ServedWeb", "WebClient", "web_settings", "ssl"]
