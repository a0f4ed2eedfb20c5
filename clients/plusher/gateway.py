"""plusher's gateway: the sessions (one UsherClient connection each),
the requests and their up-calls behind the down-calls Plush makes. No HTTP
here: ``usher.clients.plusher.resource`` is the XML-RPC boundary in front."""

import contextlib
import dataclasses
import hashlib
import secrets
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import xmlrpc

from usher import naming, states
from usher.clients.plusher.checks import (DEFAULT_PORTS, check_callback_url, check_names,
                                          check_options, check_string,
                                          parse_callback_hosts)
from usher.clients.plusher.upcalls import UpcallSender
from usher.clients.plusher.wire import (FAILED, READY, RELEASED, STARTING, UPCALL_CANCELLED,
                                        UPCALL_NONE, UPCALL_PENDING, WAITING, NoSuchRequest,
                                        strip_none)
from usher.client import gateway_login
from usher.errors import (AuthenticationFailed, InvalidRequest, NoSuchVM, PermissionDenied,
                          Unavailable, UsherError)
from usher.pbutil import as_deferred
from usher.protocol import MAX_FIELD, MAX_REQUEST_NAMES

log = Logger()

# A started VM that reaches one of these has failed to come up.
_BROKEN_STATES = {states.SHUTOFF, states.MISSING}
# How many VM problems a failure message names before summing up the rest.
_MESSAGE_ITEMS = 10


@dataclasses.dataclass(eq=False)
class Session:
    id: str
    user: str
    client: object
    # (user, password digest) of a session opened by credentials sent with calls
    implicit_key: tuple | None = None
    calls: int = 0                  # down-calls in progress
    pending: set = dataclasses.field(default_factory=set)   # unfinished request ids
    logged_out: bool = False
    closed: bool = False
    expiry: object = None

    @property
    def busy(self):
        return bool(self.calls or self.pending)


@dataclasses.dataclass(eq=False)
class PlushRequest:
    id: str
    user: str
    session: Session
    cluster: str
    count: int
    args: dict
    lnms: list
    callback_url: str
    created: float
    state: str = STARTING
    vms: list = dataclasses.field(default_factory=list)      # names the controller started
    failed: list = dataclasses.field(default_factory=list)   # [{"name", "error"}]
    notes: list = dataclasses.field(default_factory=list)
    message: str | None = None
    hosts: list | None = None
    upcall: str = UPCALL_NONE
    seen: set = dataclasses.field(default_factory=set)       # VMs the cache has shown
    unwatch: object = None
    deadline: object = None
    delivery: object = None
    forget: object = None
    start_waiters: list = dataclasses.field(default_factory=list)
    start_returned: bool = False


class Gateway:
    """Sessions, requests and up-calls; the XML-RPC boundary calls it.

    ``client_factory(user, password)`` builds an UsherClient-like object;
    ``proxy_factory(url)`` an XML-RPC proxy for up-calls; ``clock`` runs every
    timer (idle sessions, ready timeouts, up-call retries).
    """

    def __init__(self, settings, reactor, *, clock=None, client_factory=None,
                 proxy_factory=None):
        self.settings = settings
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self._client_factory = client_factory or self._usher_client
        self.upcalls = UpcallSender(
            self.clock, proxy_factory or self._proxy, attempts=settings.upcall_attempts,
            initial_delay=settings.upcall_initial_delay, max_delay=settings.upcall_max_delay,
            timeout=settings.upcall_timeout)
        self.sessions = {}      # session id -> Session
        self._implicit = {}     # (user, password digest) -> Session
        self._opening = {}      # (user, password digest) -> [Deferred] waiting for it
        self._logins = 0        # logins at the controller in progress
        self.requests = {}      # request id -> PlushRequest
        self._stopped = False
        self.callback_rules = parse_callback_hosts(settings.callback_hosts)

    def _usher_client(self, user, password, source=None):
        from usher.client import UsherClient
        s = self.settings
        return UsherClient(self.reactor, s.controller_host, s.controller_port,
                           ca_file=s.ssl_ca_file, tls_name=s.controller_tls_name,
                           cert_file=s.gateway_cert_file, key_file=s.gateway_key_file,
                           username=user, password=password, timeout=s.call_timeout,
                           source=source)

    def _proxy(self, url):
        # From the parts check_callback_url checked, so that the proxy's own
        # URL parsing (naive about "@") can only see what was checked.
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORTS[parts.scheme.lower()]
        target = urlunsplit((parts.scheme, f"{parts.hostname}:{port}", parts.path or "/",
                             parts.query, ""))
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return xmlrpc.Proxy(target.encode("ascii"), user=user and user.encode(),
                            password=password and password.encode(),
                            connectTimeout=self.settings.upcall_timeout, reactor=self.reactor)

    # -- sessions ----------------------------------------------------------------

    @as_deferred
    async def login(self, user, password, source=None):
        """-> a new session id; the controller checks the credentials
        (``source``: the address of Plush's HTTP peer, for its back-off)."""
        session = await self._open(user, password, source=source)
        log.info("session for {user} opened", user=user)
        return session.id

    async def _open(self, user, password, implicit_key=None, source=None):
        check_string(user, "user")
        if not isinstance(password, str) or len(password) > MAX_FIELD:
            raise InvalidRequest("password must be a string")
        if self._stopped:
            raise Unavailable("plusher is shutting down")
        if len(self.sessions) + self._logins >= self.settings.max_sessions:
            raise Unavailable(f"too many open sessions ({self.settings.max_sessions}); "
                              "try again later")
        client = self._client_factory(user, password, source=source)
        self._logins += 1
        try:
            who = await gateway_login(client, stopped=lambda: self._stopped, daemon="plusher")
        finally:
            self._logins -= 1
        session = Session(id=secrets.token_urlsafe(24), user=who.get("user", user),
                          client=client, implicit_key=implicit_key)
        self.sessions[session.id] = session
        self._settle(session)
        return session

    async def _session(self, ref, source=None):
        """The session a call names: an id, or credentials (reusing the
        session they opened before; ``source`` opens a new one)."""
        if isinstance(ref, str):
            session = self.sessions.get(ref)
            if session is None or session.logged_out:
                raise AuthenticationFailed("unknown or expired session; log in again")
            return session
        if isinstance(ref, Mapping) and set(ref) == {"user", "password"}:
            user, password = ref["user"], ref["password"]
            check_string(user, "user")
            if not isinstance(password, str):
                raise InvalidRequest("password must be a string")
            key = (user, hashlib.sha256(password.encode("utf-8")).digest())
            session = self._implicit.get(key)
            if session is not None and not session.closed:
                return session
            if key in self._opening:
                # Another call with the same credentials is logging in: share it.
                waiter = defer.Deferred()
                self._opening[key].append(waiter)
                return await waiter
            waiters = self._opening[key] = []
            try:
                session = await self._open(user, password, implicit_key=key, source=source)
            except Exception:
                failed = Failure()
                for waiter in waiters:
                    waiter.errback(failed)
                raise
            finally:
                del self._opening[key]
            self._implicit[key] = session
            log.info("session for {user} opened by credentials sent with a call", user=user)
            for waiter in waiters:
                waiter.callback(session)
            return session
        raise InvalidRequest("session must be a session id (from login) or a struct "
                             "with 'user' and 'password'")

    @contextlib.contextmanager
    def _using(self, session):
        """A down-call in progress: the session is busy, not idle."""
        session.calls += 1
        try:
            yield session
        finally:
            session.calls -= 1
            self._settle(session)

    def _settle(self, session):
        """Close a session that is idle and logged out; otherwise (re)start
        its idle timer, stopped while it is busy."""
        if session.closed:
            return
        if session.expiry is not None and session.expiry.active():
            session.expiry.cancel()
        session.expiry = None
        if session.busy:
            return
        if session.logged_out:
            self._close(session, "logged out")
            return
        session.expiry = self.clock.callLater(self.settings.session_idle_timeout,
                                              self._expire, session)

    def _expire(self, session):
        session.expiry = None
        if not session.busy:
            self._close(session, "idle")

    def _close(self, session, why):
        if session.closed:
            return defer.succeed(None)
        session.closed = True
        if session.expiry is not None and session.expiry.active():
            session.expiry.cancel()
        self.sessions.pop(session.id, None)
        if session.implicit_key is not None and \
                self._implicit.get(session.implicit_key) is session:
            del self._implicit[session.implicit_key]
        log.info("session for {user} closed ({why})", user=session.user, why=why)
        d = defer.maybeDeferred(session.client.disconnect)
        d.addErrback(lambda f: log.failure("closing the session of {user}", f,
                                           user=session.user))
        return d

    @as_deferred
    async def logout(self, ref):
        """Ends a session; its requests still waiting for VMs keep it open
        until they end (their up-calls are still made)."""
        if not isinstance(ref, str):
            raise InvalidRequest("logout takes the session id that login returned")
        session = await self._session(ref)
        session.logged_out = True
        self.sessions.pop(session.id, None)
        self._settle(session)
        return True

    # -- requests ------------------------------------------------------------------

    @as_deferred
    async def request_vms(self, ref, cluster, count, options, callback_url, source=None):
        if not isinstance(cluster, str):
            raise InvalidRequest("cluster must be a string")
        naming.check_label(cluster, "cluster name")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidRequest("count must be a positive integer")
        if count > MAX_REQUEST_NAMES:
            raise InvalidRequest(f"at most {MAX_REQUEST_NAMES} VMs per request")
        args, lnms = check_options(options)
        check_callback_url(callback_url, self.callback_rules)
        session = await self._session(ref, source)
        with self._using(session):
            if self._stopped:
                raise Unavailable("plusher is shutting down")
            request = PlushRequest(
                id="r-" + secrets.token_urlsafe(12), user=session.user, session=session,
                cluster=cluster, count=count, args=args, lnms=lnms,
                callback_url=callback_url, created=self.clock.seconds())
            self.requests[request.id] = request
            session.pending.add(request.id)
            log.info("request {request_id} by {user}: {count} VMs in cluster {cluster}",
                     request_id=request.id, user=request.user, count=count, cluster=cluster)
            run = defer.Deferred.fromCoroutine(self._run(request))
            run.addErrback(lambda f: log.failure("request {request_id}", f,
                                                 request_id=request.id))
            return request.id

    async def _run(self, request):
        client = request.session.client
        try:
            result = await client.start(cluster=request.cluster, count=request.count,
                                        lnms=request.lnms, args=dict(request.args))
        except UsherError as e:
            self._started(request)
            if request.state == STARTING:
                self._fail(request, f"the start request failed: {e}", [])
            return
        except Exception as e:
            self._started(request)
            log.failure("request {request_id}: start failed", request_id=request.id)
            if request.state == STARTING:
                self._fail(request, f"the start request failed: {e}", [])
            return
        request.vms = [s["name"] for s in result.get("started", [])]
        request.failed = [dict(f) for f in result.get("failed", [])]
        request.notes = list(result.get("notes") or [])
        self._started(request)
        if request.state != STARTING:     # released meanwhile
            return
        if request.failed or len(request.vms) < request.count:
            self._fail(request, self._start_failure_message(request),
                       self._addresses(client, request.vms))
            return
        request.state = WAITING
        request.unwatch = client.on_change(
            lambda changed, removed: self._changed(request, changed, removed))
        request.deadline = self.clock.callLater(self.settings.ready_timeout,
                                                self._ready_timed_out, request)
        self._check_ready(request)

    def _started(self, request):
        request.start_returned = True
        waiters, request.start_waiters = request.start_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _when_started(self, request):
        if request.start_returned:
            return defer.succeed(None)
        waiter = defer.Deferred()
        request.start_waiters.append(waiter)
        return waiter

    def _start_failure_message(self, request):
        missing = request.count - len(request.vms)
        parts = [f"{entry.get('name')}: {entry.get('error')}"
                 for entry in request.failed[:_MESSAGE_ITEMS]]
        if len(request.failed) > _MESSAGE_ITEMS:
            parts.append(f"and {len(request.failed) - _MESSAGE_ITEMS} more")
        message = f"{missing} of {request.count} VMs could not start"
        if parts:
            message += ": " + "; ".join(parts)
        if request.notes:
            message += " (" + "; ".join(request.notes) + ")"
        return message

    def _changed(self, request, changed, removed):
        names = set(request.vms)
        if names.intersection(removed) or any(r.get("name") in names for r in changed):
            self._check_ready(request)

    def _check_ready(self, request):
        if request.state != WAITING:
            return
        vms = request.session.client.vms
        request.seen.update(n for n in request.vms if n in vms)
        problems = [f"{n} was removed" for n in request.vms
                    if n in request.seen and n not in vms]
        problems += [f"{n} is {vms[n]['state']}" for n in request.vms
                     if n in vms and vms[n]["state"] in _BROKEN_STATES]
        if problems:
            running = [n for n in request.vms if n in vms and vms[n]["state"] == states.RUN]
            self._fail(request, self._vm_failure_message(request, problems),
                       self._addresses(request.session.client, running))
        elif all(n in vms and vms[n]["state"] == states.RUN for n in request.vms):
            self._succeed(request)

    def _vm_failure_message(self, request, problems):
        text = "; ".join(problems[:_MESSAGE_ITEMS])
        if len(problems) > _MESSAGE_ITEMS:
            text += f"; and {len(problems) - _MESSAGE_ITEMS} more"
        return f"{len(problems)} of {request.count} VMs did not come up: {text}"

    def _ready_timed_out(self, request):
        request.deadline = None
        if request.state != WAITING:
            return
        vms = request.session.client.vms
        late = [f"{n} is {vms[n]['state'] if n in vms else 'not reported yet'}"
                for n in request.vms if n not in vms or vms[n]["state"] != states.RUN]
        running = [n for n in request.vms if n in vms and vms[n]["state"] == states.RUN]
        self._fail(request, f"{len(late)} of {request.count} VMs were not running within "
                   f"{self.settings.ready_timeout:g} s: " + "; ".join(late[:_MESSAGE_ITEMS]),
                   self._addresses(request.session.client, running))

    def _succeed(self, request):
        request.state = READY
        request.hosts = self._addresses(request.session.client, request.vms)
        self._finish(request)
        log.info("request {request_id}: {count} VMs ready", request_id=request.id,
                 count=len(request.hosts))
        self._upcall(request, "resources_ready", request.id, request.hosts)

    def _fail(self, request, message, hosts):
        request.state = FAILED
        request.message = message
        request.hosts = hosts
        self._finish(request)
        log.warn("request {request_id} failed: {message}", request_id=request.id,
                 message=message)
        self._upcall(request, "resources_failed", request.id, message, hosts)

    def _finish(self, request):
        if request.deadline is not None and request.deadline.active():
            request.deadline.cancel()
        request.deadline = None
        if request.unwatch is not None:
            request.unwatch()
            request.unwatch = None
        request.session.pending.discard(request.id)
        self._settle(request.session)
        request.forget = self.clock.callLater(self.settings.request_retention,
                                              self._forget, request)

    def _forget(self, request):
        request.forget = None
        if self.requests.get(request.id) is request:
            del self.requests[request.id]

    def _upcall(self, request, method, *args):
        if self._stopped or not request.callback_url:
            return      # no up-call asked for: Plush polls status
        request.upcall = UPCALL_PENDING
        delivery = defer.Deferred.fromCoroutine(
            self.upcalls.deliver(request.callback_url, method, *args))
        request.delivery = delivery

        def done(outcome):
            request.delivery = None
            request.upcall = outcome
        delivery.addCallback(done)
        delivery.addErrback(lambda f: done(UPCALL_CANCELLED) if f.check(
            defer.CancelledError) else log.failure("up-call {method}", f, method=method))

    def _address(self, record):
        extra = record.get("args") or {}
        for key in self.settings.address_args:
            value = extra.get(key)
            if isinstance(value, str) and value:
                return value
        return record["name"]

    def _addresses(self, client, names):
        return [self._address(client.vms.get(n) or {"name": n}) for n in names]

    def _vm_struct(self, record):
        return strip_none({
            "name": record["name"], "state": record.get("state"), "lnm": record.get("lnm"),
            "cluster": record.get("cluster"), "memory_mib": record.get("memory_mib"),
            "vcpus": record.get("vcpus"), "address": self._address(record)})

    def _request_of(self, session, request_id):
        check_string(request_id, "request id")
        request = self.requests.get(request_id)
        if request is None:
            raise NoSuchRequest(f"no such request: {request_id}")
        if request.user != session.user:
            raise PermissionDenied(f"request {request_id} is not yours")
        return request

    # -- down-calls on VMs -----------------------------------------------------------

    @as_deferred
    async def status(self, ref, request_id, source=None):
        session = await self._session(ref, source)
        with self._using(session):
            request = self._request_of(session, request_id)
            vms = session.client.vms
            return strip_none({
                "request_id": request.id, "state": request.state, "user": request.user,
                "cluster": request.cluster, "count": request.count,
                "created": float(request.created),
                "vms": [self._vm_struct(vms[n]) if n in vms
                        else {"name": n, "state": "removed"} for n in request.vms],
                "hosts": request.hosts, "failed": request.failed, "notes": request.notes,
                "message": request.message, "upcall": request.upcall})

    @as_deferred
    async def list_vms(self, ref, cluster=None, source=None):
        if cluster is not None:
            if not isinstance(cluster, str):
                raise InvalidRequest("cluster must be a string")
            naming.check_label(cluster, "cluster name")
        session = await self._session(ref, source)
        with self._using(session):
            client = session.client
            if not client.connected:
                raise Unavailable("not connected to the controller; reconnecting")
            records = sorted(client.vms.values(), key=lambda r: r["name"])
            return [self._vm_struct(r) for r in records
                    if cluster is None or r.get("cluster") == cluster]

    @as_deferred
    async def operate(self, ref, operation, target, source=None):
        if not isinstance(operation, str) or operation not in states.OPERATIONS:
            raise InvalidRequest(f"unknown operation {operation!r}; valid: "
                                 + ", ".join(states.OPERATIONS))
        session = await self._session_for(ref, target, source)
        with self._using(session):
            request, names = await self._target_vms(session, target)
            if request is not None and not names:
                raise NoSuchVM(f"request {request.id} has no VMs left")
            result = await session.client.op_on(operation, names)
            return strip_none({"operation": operation, "done": result.get("done", []),
                               "failed": result.get("failed", []),
                               "notes": result.get("notes", [])})

    @as_deferred
    async def release(self, ref, target, source=None):
        session = await self._session_for(ref, target, source)
        with self._using(session):
            request, names = await self._target_vms(session, target,
                                                    before=self._release_request)
            if request is not None:
                log.info("request {request_id} released by {user}", request_id=request.id,
                         user=session.user)
                if not names:
                    return {"released": [], "failed": [], "notes": []}
            # Released VMs are removed, running or not (a forced delete).
            result = await session.client.op_on("delete", names, {"force": True})
            return strip_none({"released": [d["name"] for d in result.get("done", [])],
                               "failed": result.get("failed", []),
                               "notes": result.get("notes", [])})

    async def _session_for(self, ref, target, source):
        """The session of a call on ``target`` (a request id or VM names),
        whose names are checked first."""
        if not isinstance(target, str):
            check_names(target)
        return await self._session(ref, source)

    async def _target_vms(self, session, target, before=None):
        """-> (request, the names of its VMs the user still has) for a request
        id, once its start has returned (``before(request)`` is called
        before waiting for that); (None, target) for a list of names."""
        if not isinstance(target, str):
            return None, target
        request = self._request_of(session, target)
        if before is not None:
            before(request)
        await self._when_started(request)
        return request, [n for n in request.vms if n in session.client.vms]

    def _release_request(self, request):
        """No up-call after a release: Plush has given the resources back."""
        previous, request.state = request.state, RELEASED
        if previous in (STARTING, WAITING):
            self._finish(request)
        if request.delivery is not None:
            request.delivery.cancel()

    # -- life cycle ------------------------------------------------------------------------

    def stop(self):
        """Cancel timers and up-calls, close every session -> Deferred."""
        self._stopped = True
        for request in list(self.requests.values()):
            for timer in (request.deadline, request.forget):
                if timer is not None and timer.active():
                    timer.cancel()
            if request.unwatch is not None:
                request.unwatch()
                request.unwatch = None
            if request.delivery is not None:
                request.delivery.cancel()
        sessions = set(self.sessions.values()) | {r.session for r in self.requests.values()}
        sessions |= set(self._implicit.values())
        return defer.DeferredList([self._close(s, "plusher stopping") for s in sessions],
                                  consumeErrors=True)

