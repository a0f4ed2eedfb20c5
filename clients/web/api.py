"""The REST API under /api/v1 (WEB_SPEC, Endpoints): thin handlers that
check what the request says, call the session's ``UsherClient`` and encode
its answer. The controller decides what a user may see and do; nothing
here does, beyond asking for a session.

``ApiResource`` is the HTTP boundary: routing, the session (cookie or
bearer token), the CSRF header, JSON bodies, errors as JSON.
"""

import json

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from usher import naming, states
from usher.clients.ush.format import (by_name, format_migrate_result,
                                      format_operation_result, format_start_result)
from usher.clients.web import errors
from usher.clients.web.checks import (check_count, check_selection, check_start_args,
                                      check_string, check_strings, flag_param, int_param,
                                      one_param, parse_query)
from usher.clients.web.errors import ApiError
from usher.clients.web.sessions import COOKIE, TOKEN
from usher.clients.web.stream import EventStream
from usher.errors import InvalidRequest, NoSuchVM, PermissionDenied, UsherError
from usher.vmset import compile_regex

log = Logger()

COOKIE_NAME = b"usher_session"
CSRF_HEADER = b"x-csrf-token"
STATE_CHANGING = {b"POST", b"PUT", b"PATCH", b"DELETE"}
MAX_LIMIT = 5000
DEFAULT_LIMIT = 500


# --- the handlers ------------------------------------------------------------------------------

def summarise(result, text):
    """The controller's result and ush's text of it ("summary")."""
    result = dict(result)
    result["summary"] = text
    return result


class Call:
    """One request, as the handlers see it."""

    def __init__(self, request, session, params, query, body, source):
        self.request = request
        self.session = session
        self.params = params
        self.query = query
        self.body = body
        self.source = source

    @property
    def client(self):
        return self.session.client


class Api:
    """The endpoints; each returns (status, body) or (status, None)."""

    def __init__(self, sessions, settings, clock, openapi_document):
        self.sessions = sessions
        self.settings = settings
        self.clock = clock
        self.openapi_document = openapi_document

    # session --------------------------------------------------------------------

    async def login(self, call):
        body = call.body
        replacing = call.session
        session = await self.sessions.login(check_string(body.get("username"), "username"),
                                            check_string(body.get("password", ""), "password",
                                                    empty=True),
                                            source=call.source, replacing=replacing)
        secure = "; Secure" if self.settings.https else ""
        call.request.setHeader(b"set-cookie", (
            f"{COOKIE_NAME.decode()}={session.id}; HttpOnly{secure}; SameSite=Strict; "
            "Path=/").encode("ascii"))
        return 200, session.describe()

    async def logout(self, call):
        await self.sessions.close(call.session, "logged out")
        if call.session.kind == COOKIE:
            secure = "; Secure" if self.settings.https else ""
            call.request.setHeader(b"set-cookie", (
                f"{COOKIE_NAME.decode()}=; HttpOnly{secure}; SameSite=Strict; Path=/; "
                "Max-Age=0").encode("ascii"))
        return 204, None

    async def session(self, call):
        return 200, call.session.describe()

    async def make_token(self, call):
        token = self.sessions.make_token(call.session)
        return 201, {"token": token.id,
                     "expires": token.created + self.settings.session_max_age,
                     "idle_timeout": self.settings.session_idle_timeout}

    async def drop_token(self, call):
        if call.session.kind != TOKEN:
            raise InvalidRequest("DELETE /tokens/current ends the bearer token the request "
                                 "carries; this request has none (log out instead)")
        await self.sessions.close(call.session, "token deleted")
        return 204, None

    # VMs ---------------------------------------------------------------------------

    async def list_vms(self, call):
        query = call.query
        records = self._filtered(call.session, query)
        offset = int_param(query, "offset", 0, 0, 10 ** 9)
        limit = int_param(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        return 200, {"vms": records[offset:offset + limit], "total": len(records)}

    def _filtered(self, session, query):
        client = session.client
        if client.user is None:
            from usher.errors import Unavailable
            raise Unavailable("not connected to the controller")
        records = [r for r in client.vms.values() if "state" in r]
        regex = one_param(query, "regex")
        if regex is not None:
            pattern = compile_regex(regex)
            records = [r for r in records if pattern.search(r["name"])]
        for field, key in (("cluster", "cluster"), ("lnm", "lnm"), ("state", "state")):
            # Repeated (state=run&state=paused): any of them.
            wanted = set(query.get(field, []))
            if field == "state":
                unknown = wanted - set(states.ALL_STATES)
                if unknown:
                    raise InvalidRequest(f"unknown state {sorted(unknown)[0][:40]!r}; valid: "
                                         + ", ".join(states.ALL_STATES))
            if not wanted:
                continue
            records = [r for r in records if r.get(key) in wanted]
        names = one_param(query, "names")
        if names is not None:
            wanted = set()
            for name in names.split(","):
                if name:
                    try:
                        wanted.add(naming.qualify(name, session.user, session.domain))
                    except (PermissionDenied, InvalidRequest):
                        continue        # another user's, or no VM's: matches nothing
            records = [r for r in records if r["name"] in wanted]
        return by_name(records)

    async def get_vm(self, call):
        name = call.params["name"]
        try:
            records = await call.client.list(selection=[name], status=True)
        except PermissionDenied:
            raise NoSuchVM(f"no such VM: {name}") from None
        if not records:
            raise NoSuchVM(f"no such VM: {name}")
        return 200, records[0]

    async def start(self, call):
        body = call.body
        names = check_strings(body["names"], "names") if "names" in body else []
        cluster = body.get("cluster")
        count = body.get("count")
        if names and (cluster is not None or count is not None):
            raise InvalidRequest("give names, or cluster and count, not both")
        if not names:
            if cluster is None or count is None:
                raise InvalidRequest("nothing to start: give names, or cluster and count")
            cluster = naming.check_label(check_string(cluster, "cluster"), "cluster name")
            count = check_count(count, "count")
        lnms = check_strings(body.get("lnms", []), "lnms")
        args = check_start_args(body.get("args", {}))
        for key in ("memory_mib", "vcpus"):
            if key in body:
                args[key] = check_count(body[key], key)
        result = await call.client.start(names=names, cluster=cluster, count=count,
                                         lnms=lnms, args=args or None)
        return 200, summarise(result, format_start_result(result))

    def operation(self, operation):
        async def operate(call):
            force = call.body.get("force", False)
            if not isinstance(force, bool):
                raise InvalidRequest("force must be true or false")
            result = await call.client.op_on(operation, check_selection(call.body),
                                             {"force": True} if force else None)
            return 200, summarise(result, format_operation_result(operation, result))
        return operate

    async def migrate(self, call):
        lnms = check_strings(call.body.get("lnms", []), "lnms")
        if not lnms:
            raise InvalidRequest("lnms: name at least one LNM to migrate to")
        result = await call.client.migrate(check_selection(call.body), lnms)
        return 200, summarise(result, format_migrate_result(result))

    # LNMs, top, problems ------------------------------------------------------------

    async def list_lnms(self, call):
        status = flag_param(call.query, "status")
        return 200, {"lnms": await call.client.list_lnm([], status=status)}

    async def get_lnm(self, call):
        name = call.params["name"]
        try:
            lnms = await call.client.list_lnm([name], status=True)
        except InvalidRequest:
            lnms = []
        lnms = [lnm for lnm in lnms if lnm.get("name") == name]
        if not lnms:
            raise ApiError(errors.NO_SUCH_LNM, f"no such LNM: {name}")
        return 200, lnms[0]

    async def top(self, call):
        count = int_param(call.query, "count", 10, 0, 1000)
        return 200, await call.client.top([], count)

    async def problems(self, call):
        records = await call.client.list(selection=None, remote=True)
        lost = [r for r in records if r.get("state") == states.LOST]
        missing = [r for r in records if r.get("state") == states.MISSING]
        unmanaged = [r for r in records if r.get("managed") is False]
        return 200, {"lost": by_name(lost), "missing": by_name(missing),
                     "unmanaged": by_name(unmanaged)}

    # plugins (the controller refuses them to non-administrators) --------------------

    async def plugins(self, call):
        return 200, await call.client.plugins()

    async def register_plugin(self, call):
        body = call.body
        config_file = body.get("config_file")
        order = body.get("order")
        if order is not None:
            check_count(order, "order", low=-(10 ** 9), high=10 ** 9)
        result = await call.client.register_plugin(
            check_string(body.get("name"), "name"), check_string(body.get("event"), "event"),
            None if config_file is None else check_string(config_file, "config_file"), order)
        return 200, result

    async def unregister_plugin(self, call):
        event = call.body.get("event")
        result = await call.client.unregister_plugin(
            check_string(call.body.get("name"), "name"),
            None if event is None else check_string(event, "event"))
        return 200, result

    # the stream and the document ------------------------------------------------------

    async def stream(self, call):
        if call.request.method == b"HEAD":
            # A HEAD response has no body: a stream opened for it would hold
            # its slot and never end.
            raise ApiError(errors.METHOD_NOT_ALLOWED, "the stream is read with GET")
        if len(call.session.streams) >= self.settings.max_streams_per_session:
            raise ApiError(errors.UNAVAILABLE, "too many open streams for this session "
                           f"({self.settings.max_streams_per_session}); close one")
        EventStream(call.request, call.session, self.settings, self.clock).open()
        return None, None        # the stream owns the response now

    async def openapi(self, call):
        return 200, self.openapi_document


class Route:
    def __init__(self, method, path, handler, *, public=False, body=None, required=(),
                 query=()):
        self.method = method
        self.parts = tuple(path.strip("/").split("/"))
        self.handler = handler
        self.public = public
        self.body = None if body is None else set(body)     # allowed fields
        self.required = set(required)
        self.query = set(query)

    def match(self, parts):
        if len(parts) != len(self.parts):
            return None
        params = {}
        for mine, theirs in zip(self.parts, parts):
            if mine.startswith("{"):
                if not theirs:
                    return None
                params[mine[1:-1]] = theirs
            elif mine != theirs:
                return None
        return params


SELECTION_FIELDS = ("names", "regex", "cluster", "lnm")
VM_FILTERS = ("regex", "cluster", "state", "lnm", "names", "offset", "limit")


def routes(api):
    table = [
        Route("POST", "login", api.login, public=True, body=("username", "password"),
              required=("username", "password")),
        Route("POST", "logout", api.logout, body=()),
        Route("GET", "session", api.session),
        Route("POST", "tokens", api.make_token, body=()),
        Route("DELETE", "tokens/current", api.drop_token),
        Route("GET", "vms", api.list_vms, query=VM_FILTERS),
        Route("POST", "vms/start", api.start,
              body=("names", "cluster", "count", "lnms", "args", "memory_mib", "vcpus")),
        Route("POST", "vms/migrate", api.migrate, body=SELECTION_FIELDS + ("lnms",),
              required=("lnms",)),
        Route("GET", "vms/{name}", api.get_vm),
        Route("GET", "lnms", api.list_lnms, query=("status",)),
        Route("GET", "lnms/{name}", api.get_lnm),
        Route("GET", "top", api.top, query=("count",)),
        Route("GET", "problems", api.problems),
        Route("GET", "plugins", api.plugins),
        Route("POST", "plugins/register", api.register_plugin,
              body=("name", "event", "config_file", "order"), required=("name", "event")),
        Route("POST", "plugins/unregister", api.unregister_plugin, body=("name", "event"),
              required=("name",)),
        Route("GET", "stream", api.stream),
        Route("GET", "openapi.json", api.openapi, public=True),
    ]
    for operation in states.OPERATIONS:
        table.insert(8, Route("POST", f"vms/{operation}", api.operation(operation),
                              body=SELECTION_FIELDS + (("force",) if operation == "delete"
                                                       else ())))
    return table


# --- the HTTP boundary --------------------------------------------------------------------

def encode_json(data):
    """JSON for a response; <, > and & escaped, so that nothing in it can be
    read as markup even by a client that sniffs."""
    text = json.dumps(data, separators=(",", ":"), default=str, ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode("utf-8")


def client_address(request):
    return getattr(request.getClientAddress(), "host", None)


class ApiResource(resource.Resource):
    """/api/v1/...: every request routed, authenticated, checked; every
    answer JSON (errors: {"error": {"code", "message"}})."""

    isLeaf = True

    def __init__(self, api):
        super().__init__()
        self.api = api
        self.sessions = api.sessions
        self.routes = routes(api)

    def render(self, request):
        d = defer.Deferred.fromCoroutine(self._handle(request))
        d.addErrback(self._unexpected, request)
        return server.NOT_DONE_YET

    def _unexpected(self, failure, request):
        log.failure("usherweb: {method} {path} failed", failure,
                    method=request.method.decode("ascii", "replace"),
                    path=request.path.decode("ascii", "replace")[:200])
        self._respond(request, 500, errors.body(errors.INTERNAL,
                                                "internal error in usherweb; see its log"))

    async def _handle(self, request):
        try:
            status, data = await self._dispatch(request)
        except ApiError as e:
            for name, value in e.headers.items():
                request.setHeader(name, value)
            status, data = e.status, errors.body(e.code, e.message)
        except UsherError as e:
            error = errors.from_usher_error(e)
            status, data = error.status, errors.body(error.code, error.message)
        if status is not None:
            self._respond(request, status, data)

    def _respond(self, request, status, data):
        if request.finished or request._disconnected:
            return
        request.setResponseCode(status)
        request.setHeader(b"cache-control", b"no-store")
        if data is None:
            request.setHeader(b"content-length", b"0")
            request.finish()
            return
        payload = encode_json(data)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"content-length", str(len(payload)).encode("ascii"))
        request.write(payload)
        request.finish()

    def _route(self, request):
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        if parts[:1] != ["v1"]:
            raise ApiError(errors.NOT_FOUND, "no such API (the API is at /api/v1/)")
        parts = parts[1:]
        method = request.method.decode("ascii", "replace")
        allowed = []
        for route in self.routes:
            params = route.match(parts)
            if params is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, params
            allowed.append(route.method)
        if allowed:
            raise ApiError(errors.METHOD_NOT_ALLOWED,
                           f"{method[:10]} is not allowed here; allowed: {', '.join(allowed)}",
                           headers={b"allow": ", ".join(allowed).encode("ascii")})
        raise ApiError(errors.NOT_FOUND, f"no such endpoint: /api/v1/{'/'.join(parts)[:200]}")

    def _session(self, request, route):
        """-> (session or None, how: "bearer" | "cookie" | None)."""
        authorization = request.getHeader(b"authorization")
        if authorization is not None:
            scheme, _, token = authorization.partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                raise ApiError(errors.NOT_LOGGED_IN, "Authorization: only a bearer token "
                               "(Authorization: Bearer TOKEN) is accepted")
            session = self.sessions.find(token.strip().decode("ascii", "replace"), TOKEN)
            if session is None:
                raise ApiError(errors.NOT_LOGGED_IN, "unknown or expired token; make a new "
                               "one (POST /api/v1/tokens)")
            return session, "bearer"
        cookie = request.getCookie(COOKIE_NAME)
        session = None
        if cookie is not None:
            session = self.sessions.find(cookie.decode("ascii", "replace"), COOKIE)
        return session, ("cookie" if session is not None else None)

    async def _dispatch(self, request):
        route, params = self._route(request)
        session, how = self._session(request, route)
        if not route.public:
            if session is None:
                raise ApiError(errors.NOT_LOGGED_IN, "not logged in (or the session "
                               "expired); log in again")
            if how == "cookie" and request.method in STATE_CHANGING and \
                    not session.check_csrf((request.getHeader(CSRF_HEADER) or b"")
                                           .decode("ascii", "replace")):
                raise ApiError(errors.CSRF_FAILED, "missing or wrong X-CSRF-Token header "
                               "(it is the csrf value login and GET /api/v1/session return)")
            self.sessions.touch(session)
        query = parse_query(request, route.query)
        body = self._body(request, route)
        call = Call(request, session, params, query, body, client_address(request))
        return await route.handler(call)

    def _body(self, request, route):
        content = request.content.read() if request.content is not None else b""
        if route.body is None:
            if content:
                raise InvalidRequest("this request takes no body")
            return {}
        if not content and not route.required:
            return {}
        kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if kind != b"application/json":
            raise ApiError(errors.UNSUPPORTED_MEDIA_TYPE,
                           "the body must be JSON (Content-Type: application/json)")
        try:
            body = json.loads(content.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise InvalidRequest(f"the body is not valid JSON: {str(e)[:100]}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        unknown = set(body) - route.body
        if unknown:
            raise InvalidRequest("unknown field" + ("s" if len(unknown) > 1 else "") + ": "
                                 + ", ".join(sorted(repr(k)[:40] for k in unknown)[:5])
                                 + "; known: " + (", ".join(sorted(route.body)) or "none"))
        missing = route.required - set(body)
        if missing:
            raise InvalidRequest("missing field" + ("s" if len(missing) > 1 else "") + ": "
                                 + ", ".join(sorted(missing)))
        return body
