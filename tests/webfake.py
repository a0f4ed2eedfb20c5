"""A small fake of usherweb's API (WEB_SPEC.md) serving the real static
files, for browser tests and the browser benchmark that need what a sandbox
cannot cheaply give: 10,000 VMs, and changes pushed at a chosen moment.

Its site is usherweb's own root (the security headers and CSP included);
only /api/v1 is fake: login with any user and the password "pw", a stream
with the snapshot in parts of 1,000 then ``push(changed, removed)``."""

import json
import os

from twisted.internet import reactor
from twisted.web import resource, server

from usher.clients.web.resource import WebRequest, WebRoot

STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "clients", "web", "static")
PASSWORD = "pw"
PART = 1000


def fleet(count, owner="carol", domain="usher.test", lnms=4):
    """count VM records as the API gives them, in clusters of 1,000."""
    return [{"name": f"{i % 1000 + 1}.c{i // 1000}.{owner}.{domain}", "owner": owner,
             "cluster": f"c{i // 1000}", "state": "run", "lnm": f"lnm{i % lnms + 1}",
             "memory_mib": 512, "vcpus": 1, "uuid": f"00000000-0000-0000-0000-{i:012d}",
             "args": {}} for i in range(count)]


def frame(event, data):
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class FakeApi(resource.Resource):
    isLeaf = True

    def __init__(self, records):
        super().__init__()
        self.vms = {r["name"]: r for r in records}
        self.streams = []
        self.logged_in = set()
        self.requests = []

    def _json(self, request, code, body):
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode()

    def _session(self, request):
        return request.getCookie(b"usher_session") in self.logged_in

    def render(self, request):
        path = request.path.decode()[len("/api/v1"):]
        self.requests.append((request.method.decode(), path))
        if path == "/login" and request.method == b"POST":
            body = json.loads(request.content.read() or b"{}")
            if body.get("password") != PASSWORD:
                return self._json(request, 401, {"error": {
                    "code": "authentication_failed", "message": "authentication failed"}})
            sid = os.urandom(16).hex().encode()
            self.logged_in.add(sid)
            request.addCookie(b"usher_session", sid, path=b"/", httpOnly=True,
                              sameSite="strict")
            return self._json(request, 200, {"user": body.get("username"), "admin": False,
                                             "domain": "usher.test", "csrf": "fake-csrf"})
        if not self._session(request):
            return self._json(request, 401, {"error": {"code": "not_logged_in",
                                                       "message": "not logged in"}})
        if path == "/session":
            return self._json(request, 200, {"user": "carol", "admin": False,
                                             "domain": "usher.test", "csrf": "fake-csrf"})
        if path == "/stream":
            return self._stream(request)
        if path.startswith("/vms/") and request.method == b"GET":
            record = self.vms.get(path[len("/vms/"):])
            if record is None:
                return self._json(request, 404, {"error": {"code": "no_such_vm",
                                                           "message": "no such VM"}})
            return self._json(request, 200, dict(record, status={}))
        if path == "/lnms":
            return self._json(request, 200, {"lnms": []})
        return self._json(request, 404, {"error": {"code": "not_found", "message": path}})

    def _stream(self, request):
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        records = sorted(self.vms.values(), key=lambda r: r["name"])
        parts = [records[i:i + PART] for i in range(0, len(records), PART)] or [[]]
        request.write(frame("snapshot", {"vms": parts[0], "seq": 1, "total": len(records),
                                         "parts": len(parts)}))
        for part in parts[1:]:
            request.write(frame("snapshot-part", {"vms": part}))
        request.write(frame("snapshot-end", {"seq": 1, "total": len(records)}))
        self.streams.append(request)
        request.notifyFinish().addBoth(lambda _: self.streams.remove(request))
        return server.NOT_DONE_YET

    def push(self, changed=(), removed=()):
        """Change the fake's VMs and tell every open stream."""
        for record in changed:
            self.vms[record["name"]] = record
        for name in removed:
            self.vms.pop(name, None)
        data = frame("changes", {"changed": list(changed), "removed": list(removed)})
        for request in list(self.streams):
            request.write(data)


class FakeWeb:
    """The fake served on 127.0.0.1 (plain HTTP; the fake's cookie is not
    Secure, so Chromium keeps it over http://127.0.0.1)."""

    def __init__(self, records):
        self.api = FakeApi(records)
        api_root = resource.Resource()
        api_root.putChild(b"v1", self.api)
        root = WebRoot(api_root, STATIC)
        site = server.Site(root)
        site.requestFactory = type("FakeWebRequest", (WebRequest,),
                                   {"max_body": 65536, "https": False})
        site.log = lambda request: None
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"

    def stop(self):
        for request in list(self.api.streams):
            request.finish()
        return self.port.stopListening()
