"""usherweb's site: the browser interface's static files at /, the REST
API at /api/v1/; every response with the security headers (CSP and the
others, HSTS over HTTPS); request bodies of bounded size."""

import json

from twisted.logger import Logger
from twisted.web import resource, server, static

from usher.clients.plusher.resource import BoundedRequest
from usher.clients.web import errors
from usher.clients.web.api import ApiResource

log = Logger()

CSP = (b"default-src 'self'; script-src 'self'; object-src 'none'; "
       b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
SECURITY_HEADERS = {
    b"content-security-policy": CSP,
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
    b"cross-origin-opener-policy": b"same-origin",
    b"cross-origin-resource-policy": b"same-origin",
    b"permissions-policy": b"camera=(), microphone=(), geolocation=()",
}
HSTS = b"max-age=31536000"

# ES modules need a JavaScript type; the rest as browsers expect.
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8",
                 ".mjs": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8",
                 ".html": "text/html; charset=utf-8",
                 ".json": "application/json",
                 ".svg": "image/svg+xml",
                 ".map": "application/json",
                 ".ico": "image/x-icon",
                 ".png": "image/png",
                 ".woff2": "font/woff2"}


class StaticFiles(static.File):
    """The UI's files: no directory listings, no hidden files."""

    contentTypes = dict(static.File.contentTypes, **CONTENT_TYPES)

    def directoryListing(self):
        return resource.NoResource()

    def getChild(self, path, request):
        if path.startswith(b"."):
            return resource.NoResource()
        return super().getChild(path, request)

    def createSimilarFile(self, path):
        f = super().createSimilarFile(path)
        f.contentTypes = self.contentTypes
        return f


class WebRoot(resource.Resource):
    def __init__(self, api_resource, static_dir):
        super().__init__()
        self.api = api_resource
        self.files = StaticFiles(static_dir)
        self.files.indexNames = ["index.html"]

    def getChild(self, path, request):
        if path == b"api":
            return self.api
        return self.files.getChildWithDefault(path, request)


class WebRequest(BoundedRequest):
    """A request with the security headers on whatever answers it, and a
    JSON 413 for a body larger than max_request_bytes."""

    https = True

    def process(self):
        for name, value in SECURITY_HEADERS.items():
            self.setHeader(name, value)
        if self.https:
            self.setHeader(b"strict-transport-security", HSTS)
        if not self.uri.startswith(b"/api/"):
            self.setHeader(b"cache-control", b"no-cache")
        super().process()

    def _too_large(self, size):
        self._refused = True
        self.content = None
        self.requestHeaders.removeHeader(b"expect")
        log.warn("usherweb refused a request of {size} bytes or more from {peer} (at most "
                 "{limit}: max_request_bytes)", size=size,
                 peer=getattr(self.getClientAddress(), "host", None), limit=self.max_body)
        payload = json.dumps(errors.body(errors.TOO_LARGE,
                                         f"the request body is larger than {self.max_body} "
                                         "bytes (max_request_bytes)")).encode()
        headers = b"".join(name + b": " + value + b"\r\n"
                           for name, value in SECURITY_HEADERS.items())
        transport = self.channel.transport
        transport.write(b"HTTP/1.1 413 Request Entity Too Large\r\n"
                        b"Content-Type: application/json; charset=utf-8\r\n"
                        b"Cache-Control: no-store\r\n" + headers
                        + b"Content-Length: " + str(len(payload)).encode() + b"\r\n"
                        b"Connection: close\r\n\r\n" + payload)
        transport.loseConnection()


def make_site(api, settings):
    root = WebRoot(ApiResource(api), settings.static_root)
    site = server.Site(root)
    site.requestFactory = type("UsherWebRequest", (WebRequest,),
                               {"max_body": settings.max_request_bytes,
                                "https": settings.https})
    site.noisy = False
    # No access log: URLs may hold VM names users consider private, and the
    # default log format has nothing usherweb needs.
    site.log = lambda request: None
    return site
