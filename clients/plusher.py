"""plusher: the XML-RPC gateway between the Plush execution manager and Usher
(paper, "Applications").

Plush drives resource providers over XML-RPC: *down-calls* it makes to the
provider, each answered at once, and *up-calls* the provider makes back to
Plush's own XML-RPC server when something it asked for is done. plusher is an
Usher client: every session holds one ``UsherClient`` connection, logged in
with the credentials Plush relays for its user (plusher checks no password
itself: the controller's authentication chain does), closed when idle.

Down-calls (``session`` is a session id from ``login``, or a struct
``{"user": ..., "password": ...}`` sent with each call instead)::

    login(user, password) -> session id
    logout(session) -> True
    request_vms(session, cluster, count, options, callback_url) -> request id
        Starts ``count`` VMs in the virtual cluster; returns at once. ``options``
        (a struct) become the start request's arguments (memory_mib, vcpus, os
        ..., as ``ush start --arg``); "lnms" (an array) suggests hosts.
    release(session, request id | [VM names]) -> {"released", "failed", "notes"}
    status(session, request id) -> struct (see ``Gateway.status``)
    list_vms(session[, cluster]) -> [{"name", "state", "vmm", "cluster",
                                      "memory_mib", "vcpus", "address"}]
    operate(session, operation, request id | [VM names])
        -> {"operation", "done": [{"name", "state"}], "failed": [{"name", "error"}],
            "notes"}

Up-calls, to the request's ``callback_url`` only (and only to hosts the site
allows: ``callback_hosts``; an empty ``callback_url`` asks for none), once
every VM of the request runs, or as soon as the request cannot be met::

    resources_ready(request id, [hosts])
    resources_failed(request id, message, [hosts that did start])

A host is the VM's address when an IP-management plugin put one in its
arguments (``address_args``), else its DNS name ``<name>.<owner>.<domain>``.
VMs that did start stay until Plush releases them (``release(request id)``).
An up-call that cannot be delivered is tried again with a doubling delay
(``upcall_attempts`` in all), then logged and given up; one Plush answers
with a fault is not repeated.

Errors are XML-RPC faults whose codes never change (``FAULT_*`` below);
input that is refused changes nothing. Methods are listed with
``system.listMethods`` and described by ``system.methodHelp``.

Layout: ``Gateway`` holds sessions and requests and does the work (no HTTP);
``UpcallSender`` delivers up-calls; ``PlusherResource`` is the thin XML-RPC
boundary; ``make_service`` and ``main`` the daemon.
"""

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import ipaddress
import secrets
import sys
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

from twisted.application import internet, service
from twisted.internet import defer, task
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server, xmlrpc

from usher import naming, pki, states
from usher.errors import (AuthenticationFailed, ConfigError, InvalidRequest, NoSuchLNM,
                          NoSuchVM, PermissionDenied, Rejected, Unavailable, UsherError)
from usher.protocol import MAX_FIELD, MAX_REQUEST_NAMES

log = Logger()

# Fault codes: part of plusher's interface, never renumbered.
FAULT_AUTHENTICATION = 1    # wrong user name or password; unknown or expired session
FAULT_INVALID_REQUEST = 2   # a malformed or missing argument
FAULT_NO_SUCH_VM = 3        # a named VM does not exist (or is not the user's to see)
FAULT_PERMISSION = 4        # the user may not do this (another user's VM or request)
FAULT_UNAVAILABLE = 5       # the controller cannot be reached, or plusher is full
FAULT_REJECTED = 6          # a controller plugin refused the request
FAULT_FAILED = 7            # the controller or a host could not carry it out
FAULT_NO_SUCH_REQUEST = 8   # unknown (or forgotten) request id
FAULT_INTERNAL = 9          # a bug in plusher; its log has the details

# Request states as status() reports them.
STARTING = "starting"   # the start request is at the controller
WAITING = "waiting"     # started; waiting for every VM to run
READY = "ready"         # resources_ready sent (or being sent)
FAILED = "failed"       # resources_failed sent (or being sent)
RELEASED = "released"   # Plush released it; no up-call follows

# A started VM that reaches one of these has failed to come up.
_BROKEN_STATES = {states.SHUTOFF, states.MISSING}
# Up-call outcomes as status() reports them.
UPCALL_NONE, UPCALL_PENDING, UPCALL_DELIVERED = "none", "pending", "delivered"
UPCALL_REFUSED, UPCALL_GAVE_UP, UPCALL_CANCELLED = "refused", "gave_up", "cancelled"
# How many VM problems a failure message names before summing up the rest.
_MESSAGE_ITEMS = 10
MAX_OPTION_NAME = 64


def _fault_code(error):
    for cls, code in ((AuthenticationFailed, FAULT_AUTHENTICATION),
                      (NoSuchVM, FAULT_NO_SUCH_VM), (PermissionDenied, FAULT_PERMISSION),
                      (Unavailable, FAULT_UNAVAILABLE), (Rejected, FAULT_REJECTED),
                      (NoSuchRequest, FAULT_NO_SUCH_REQUEST),
                      (InvalidRequest, FAULT_INVALID_REQUEST),
                      (NoSuchLNM, FAULT_INVALID_REQUEST), (ConfigError, FAULT_UNAVAILABLE)):
        if isinstance(error, cls):
            return code
    return FAULT_FAILED


class NoSuchRequest(UsherError):
    """The request id is unknown, or finished longer than request_retention ago."""


def _strip_none(value):
    """XML-RPC has no nil: drop None fields, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_strip_none(v) for v in value if v is not None]
    return value


def _deferred(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        return defer.Deferred.fromCoroutine(method(*args, **kwargs))
    return wrapper


# --- Settings ---------------------------------------------------------------------

@dataclasses.dataclass
class PlusherSettings:
    """The [plusher] options (see usher.settings.PLUSHER_SPEC)."""
    interface: str = "127.0.0.1"
    port: int = 7393
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None
    controller_host: str = "localhost"
    controller_port: int = 7390
    controller_tls_name: str | None = None
    ssl_ca_file: str | None = "/etc/usher/ca_cert.pem"
    gateway_cert_file: str | None = None
    gateway_key_file: str | None = None
    call_timeout: float = 60.0
    session_idle_timeout: float = 600.0
    max_sessions: int = 1000
    ready_timeout: float = 600.0
    request_retention: float = 3600.0
    callback_hosts: list = dataclasses.field(default_factory=list)
    max_request_bytes: int = 1024 * 1024
    allow_plain_http: bool = False
    upcall_attempts: int = 5
    upcall_initial_delay: float = 1.0
    upcall_max_delay: float = 60.0
    upcall_timeout: float = 30.0
    address_args: list = dataclasses.field(
        default_factory=lambda: ["ip", "ip_address", "address"])
    log_file: str | None = None
    log_level: str = "info"
    pid_file: str | None = None

    @classmethod
    def from_config(cls, config):
        """From the dict load_config returns (or its "plusher" section)."""
        if isinstance(config, Mapping) and isinstance(config.get("plusher"), Mapping):
            config = config["plusher"]
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names})


# --- Input checks -------------------------------------------------------------------

def _check_string(value, what):
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{what} must be a non-empty string")
    if len(value) > MAX_FIELD:
        raise InvalidRequest(f"{what} is too long (at most {MAX_FIELD} characters)")
    return value


def check_options(options):
    """request_vms' options struct -> (start arguments, suggested LNMs)."""
    if not isinstance(options, Mapping):
        raise InvalidRequest("options must be a struct (give an empty struct for none)")
    args, lnms = {}, []
    for key, value in options.items():
        if key == "lnms":
            if not isinstance(value, list) or not all(isinstance(n, str) and n
                                                      for n in value):
                raise InvalidRequest("option 'lnms' must be an array of LNM names")
            lnms = list(value)
            continue
        if key in ("cluster", "count"):
            raise InvalidRequest(f"{key!r} is an argument of request_vms, not an option")
        if not isinstance(key, str) or not key.isidentifier() or len(key) > MAX_OPTION_NAME:
            raise InvalidRequest(f"invalid option name {key!r}: use letters, digits and "
                                 f"underscores (at most {MAX_OPTION_NAME})")
        if not (isinstance(value, (bool, int, float))
                or isinstance(value, str) and len(value) <= MAX_FIELD):
            raise InvalidRequest(f"option {key!r} must be a string (at most {MAX_FIELD} "
                                 "characters), a number or a boolean")
        args[key] = value
    for key in ("memory_mib", "vcpus"):
        value = args.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InvalidRequest(f"option {key!r} must be a positive integer")
    return args, lnms


_DEFAULT_PORTS = {"http": 80, "https": 443}
ANY_PORT = "*"


def _normal_host(host):
    """A host name lowercased, an IP address in its canonical form."""
    host = host.lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def parse_callback_hosts(entries):
    """``callback_hosts`` -> {(host, port)}: ``host`` (the scheme's default
    port only), ``host:port``, or ``host:*`` (any port); a host is a name or
    an IPv4 address (Twisted's XML-RPC client cannot call IPv6 literals).
    Host names are matched exactly, never resolved, never as suffixes."""
    rules = set()
    for entry in entries:
        text = str(entry).strip()
        host, port = text, None
        if text.startswith("[") or text.count(":") > 1:
            raise ConfigError(f"[plusher] callback_hosts: {text!r}: IPv6 addresses are not "
                              "supported (use a host name)")
        if ":" in text:
            host, port = text.split(":")
        if port is not None and port != ANY_PORT:
            if not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ConfigError(f"[plusher] callback_hosts: {text!r}: port must be 1-65535 "
                                  "or *")
            port = int(port)
        if not host or any(c.isspace() or c in "/@?#" for c in host):
            raise ConfigError(f"[plusher] callback_hosts: {text!r} is not host, host:port "
                              "or host:*")
        rules.add((_normal_host(host), port))
    return frozenset(rules)


def safe_url(url):
    """``url`` without its user name and password, for logs and messages."""
    try:
        parts = urlsplit(url)
        if "@" not in parts.netloc:
            return url
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    except ValueError:
        return "(an unparsable URL)"


def check_callback_url(url, allowed_hosts=()):
    """An up-call target: an http(s) URL whose host and port ``allowed_hosts``
    (``callback_hosts``: no up-call to anywhere while it is empty) allow, or
    the empty string for no up-call."""
    if url == "":
        return url
    _check_string(url, "callback_url")
    if not url.isascii() or any(c.isspace() or ord(c) < 32 for c in url):
        raise InvalidRequest("callback_url must be an ASCII URL without spaces")
    shown = safe_url(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise InvalidRequest(f"callback_url must be an http or https URL, not {shown!r}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise InvalidRequest(f"callback_url {shown!r}: {e}") from None
    if not host:
        raise InvalidRequest(f"callback_url {shown!r} names no host")
    if parts.netloc.count("@") > 1 or ":" in host:
        raise InvalidRequest(f"callback_url {shown!r}: give a host name or IPv4 address, "
                             "and at most one user name and password")
    rules = allowed_hosts if isinstance(allowed_hosts, frozenset) \
        else parse_callback_hosts(allowed_hosts)
    if not rules:
        raise InvalidRequest("this plusher makes no up-calls (the site allows no "
                             "callback_hosts): give an empty callback_url and poll status")
    host = _normal_host(host)
    default = _DEFAULT_PORTS[scheme]
    port = default if port is None else port
    if not any(h == host and (p == ANY_PORT or p == port or (p is None and port == default))
               for h, p in rules):
        raise InvalidRequest(f"callback_url {shown!r}: plusher may not call back "
                             f"{host} port {port} (callback_hosts)")
    return url


def check_names(names):
    if not isinstance(names, list) or not names:
        raise InvalidRequest("give a request id or a non-empty array of VM names")
    if len(names) > MAX_REQUEST_NAMES:
        raise InvalidRequest(f"at most {MAX_REQUEST_NAMES} VM names per call")
    for name in names:
        _check_string(name, "a VM name")
    return names


# --- Up-calls --------------------------------------------------------------------------

def _describe(error):
    if isinstance(error, ValueError) and len(error.args) == 2 and all(
            isinstance(a, bytes) for a in error.args):
        # twisted.web.xmlrpc reports an HTTP error status this way.
        return "HTTP " + " ".join(a.decode("latin-1") for a in error.args)
    if isinstance(error, defer.TimeoutError):
        return "no answer in time"
    return f"{type(error).__name__}: {error}"


class UpcallSender:
    """Delivers up-calls to Plush, trying again with a doubling delay.

    ``proxy_factory(url)`` gives an object with ``callRemote(method, *args)``
    (``twisted.web.xmlrpc.Proxy`` in production); every delay and timeout
    runs on ``clock``.
    """

    def __init__(self, clock, proxy_factory, *, attempts, initial_delay, max_delay, timeout):
        self.clock = clock
        self.proxy_factory = proxy_factory
        self.attempts = attempts
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.timeout = timeout

    async def deliver(self, url, method, *args):
        """-> "delivered", "refused" (Plush answered with a fault: not
        repeated), "gave_up" or "cancelled"."""
        delay = self.initial_delay
        request_id = args[0] if args else None
        for attempt in range(1, self.attempts + 1):
            try:
                call = self.proxy_factory(url).callRemote(method, *args)
                call.addTimeout(self.timeout, self.clock)
                await call
                log.info("up-call {method} for request {request_id} delivered to {url}",
                         method=method, request_id=request_id, url=safe_url(url))
                return UPCALL_DELIVERED
            except xmlrpc.Fault as fault:
                log.warn("Plush refused up-call {method} for request {request_id}: fault "
                         "{code}: {message}", method=method, request_id=request_id,
                         code=fault.faultCode, message=str(fault.faultString)[:MAX_FIELD])
                return UPCALL_REFUSED
            except defer.CancelledError:
                return UPCALL_CANCELLED
            except Exception as e:
                reason = _describe(e)
            if attempt == self.attempts:
                break
            log.warn("up-call {method} for request {request_id} to {url} failed (attempt "
                     "{attempt} of {attempts}): {reason}; trying again in {delay:g} s",
                     method=method, request_id=request_id, url=safe_url(url), attempt=attempt,
                     attempts=self.attempts, reason=reason, delay=delay)
            try:
                await task.deferLater(self.clock, delay, lambda: None)
            except defer.CancelledError:
                return UPCALL_CANCELLED
            delay = min(delay * 2, self.max_delay)
        log.error("giving up up-call {method} for request {request_id} to {url} after "
                  "{attempts} attempts: {reason}", method=method, request_id=request_id,
                  url=safe_url(url), attempts=self.attempts, reason=reason)
        return UPCALL_GAVE_UP


# --- Sessions and requests ----------------------------------------------------------------

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
        port = parts.port or _DEFAULT_PORTS[parts.scheme.lower()]
        target = urlunsplit((parts.scheme, f"{parts.hostname}:{port}", parts.path or "/",
                             parts.query, ""))
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return xmlrpc.Proxy(target.encode("ascii"), user=user and user.encode(),
                            password=password and password.encode(),
                            connectTimeout=self.settings.upcall_timeout, reactor=self.reactor)

    # -- sessions ----------------------------------------------------------------

    @_deferred
    async def login(self, user, password, source=None):
        """-> a new session id; the controller checks the credentials
        (``source``: the address of Plush's HTTP peer, for its back-off)."""
        session = await self._open(user, password, source=source)
        log.info("session for {user} opened", user=user)
        return session.id

    async def _open(self, user, password, implicit_key=None, source=None):
        _check_string(user, "user")
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
            who = await client.connect()
        except UsherError:
            raise
        except Exception as e:
            raise Unavailable(f"cannot connect to the controller: {e}") from None
        finally:
            self._logins -= 1
        if self._stopped:
            await client.disconnect()
            raise Unavailable("plusher is shutting down")
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
            _check_string(user, "user")
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

    @_deferred
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

    @_deferred
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
        return _strip_none({
            "name": record["name"], "state": record.get("state"), "vmm": record.get("vmm"),
            "cluster": record.get("cluster"), "memory_mib": record.get("memory_mib"),
            "vcpus": record.get("vcpus"), "address": self._address(record)})

    def _request_of(self, session, request_id):
        _check_string(request_id, "request id")
        request = self.requests.get(request_id)
        if request is None:
            raise NoSuchRequest(f"no such request: {request_id}")
        if request.user != session.user:
            raise PermissionDenied(f"request {request_id} is not yours")
        return request

    # -- down-calls on VMs -----------------------------------------------------------

    @_deferred
    async def status(self, ref, request_id, source=None):
        session = await self._session(ref, source)
        with self._using(session):
            request = self._request_of(session, request_id)
            vms = session.client.vms
            return _strip_none({
                "request_id": request.id, "state": request.state, "user": request.user,
                "cluster": request.cluster, "count": request.count,
                "created": float(request.created),
                "vms": [self._vm_struct(vms[n]) if n in vms
                        else {"name": n, "state": "removed"} for n in request.vms],
                "hosts": request.hosts, "failed": request.failed, "notes": request.notes,
                "message": request.message, "upcall": request.upcall})

    @_deferred
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

    @_deferred
    async def operate(self, ref, operation, target, source=None):
        if not isinstance(operation, str) or operation not in states.OPERATIONS:
            raise InvalidRequest(f"unknown operation {operation!r}; valid: "
                                 + ", ".join(states.OPERATIONS))
        if not isinstance(target, str):
            check_names(target)
        session = await self._session(ref, source)
        with self._using(session):
            if isinstance(target, str):
                request = self._request_of(session, target)
                await self._when_started(request)
                names = [n for n in request.vms if n in session.client.vms]
                if not names:
                    raise NoSuchVM(f"request {request.id} has no VMs left")
            else:
                names = target
            result = await session.client.op_on(operation, names)
            return _strip_none({"operation": operation, "done": result.get("done", []),
                                "failed": result.get("failed", []),
                                "notes": result.get("notes", [])})

    @_deferred
    async def release(self, ref, target, source=None):
        if not isinstance(target, str):
            check_names(target)
        session = await self._session(ref, source)
        with self._using(session):
            if isinstance(target, str):
                request = self._request_of(session, target)
                self._release_request(request)
                await self._when_started(request)
                names = [n for n in request.vms if n in session.client.vms]
                log.info("request {request_id} released by {user}", request_id=request.id,
                         user=session.user)
                if not names:
                    return {"released": [], "failed": [], "notes": []}
            else:
                names = target
            result = await session.client.op_on("destroy", names)
            return _strip_none({"released": [d["name"] for d in result.get("done", [])],
                                "failed": result.get("failed", []),
                                "notes": result.get("notes", [])})

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


# --- The XML-RPC boundary --------------------------------------------------------------

def _to_fault(failure, method):
    error = failure.value
    if isinstance(error, xmlrpc.Fault):
        return error
    if isinstance(error, UsherError):
        return xmlrpc.Fault(_fault_code(error), str(error))
    log.failure("plusher: {method} failed", failure, method=method)
    return xmlrpc.Fault(FAULT_INTERNAL, f"internal error in plusher ({method}); "
                        "see its log")


def _client_host(request):
    address = request.getClientAddress()
    return getattr(address, "host", None)


def _boundary(name, procedure):
    """Check the argument count, run, and turn every error into a Fault. A
    procedure with a keyword-only ``source`` is given the HTTP peer's address
    (for the controller's login back-off)."""
    signature = inspect.signature(procedure)
    positional = [p for p in signature.parameters.values() if p.kind is not p.KEYWORD_ONLY]
    params = ", ".join(p.name if p.default is p.empty else f"[{p.name}]"
                       for p in positional)
    takes_source = "source" in signature.parameters

    @functools.wraps(procedure)
    def call(request, *args):
        source = {"source": _client_host(request)} if takes_source else {}
        try:
            signature.bind(*args, **source)
        except TypeError:
            return xmlrpc.Fault(FAULT_INVALID_REQUEST,
                                f"{name}({params}): got {len(args)} argument"
                                f"{'' if len(args) == 1 else 's'}")
        d = defer.maybeDeferred(procedure, *args, **source)
        d.addCallback(_strip_none)
        d.addErrback(_to_fault, name)
        return d
    call.withRequest = True
    return call


class PlusherResource(xmlrpc.XMLRPC):
    """The XML-RPC methods Plush calls (the down-calls), over a Gateway."""

    def __init__(self, gateway):
        super().__init__(allowNone=False)
        self.gateway = gateway
        xmlrpc.addIntrospection(self)

    def lookupProcedure(self, procedurePath):
        procedure = super().lookupProcedure(procedurePath)
        if self.separator in procedurePath:
            return procedure          # system.* introspection
        return _boundary(procedurePath, procedure)

    def xmlrpc_login(self, user, password, *, source=None):
        """login(user, password) -> session id. The controller checks the
        credentials; the session holds one connection to it, closed after
        session_idle_timeout seconds without calls."""
        return self.gateway.login(user, password, source=source)
    xmlrpc_login.signature = [["string", "string", "string"]]

    def xmlrpc_logout(self, session):
        """logout(session) -> true. Requests of the session still waiting for
        their VMs keep its connection until they end."""
        return self.gateway.logout(session)
    xmlrpc_logout.signature = [["boolean", "string"]]

    def xmlrpc_request_vms(self, session, cluster, count, options, callback_url, *,
                           source=None):
        """request_vms(session, cluster, count, options, callback_url) -> request
        id, at once. Starts count VMs in the virtual cluster; options (a
        struct) become the start request's arguments (memory_mib, vcpus, os
        ...; "lnms": array of suggested hosts). When every VM runs plusher
        calls resources_ready(request id, [hosts]) at callback_url (http or
        https, on a host callback_hosts allows; an empty callback_url: no
        up-call, poll status); if some cannot start, resources_failed(request
        id, message, [hosts that did start])."""
        return self.gateway.request_vms(session, cluster, count, options, callback_url,
                                        source=source)
    xmlrpc_request_vms.signature = [["string", "string", "string", "int", "struct",
                                     "string"]]

    def xmlrpc_release(self, session, target, *, source=None):
        """release(session, request id | [VM names]) -> {released: [names],
        failed: [{name, error}], notes}. Destroys the VMs; no up-call follows
        the release of a request."""
        return self.gateway.release(session, target, source=source)
    xmlrpc_release.signature = [["struct", "string", "string"], ["struct", "string", "array"]]

    def xmlrpc_status(self, session, request_id, *, source=None):
        """status(session, request id) -> {request_id, state (starting, waiting,
        ready, failed, released), cluster, count, vms: [{name, state, ...}],
        hosts, failed: [{name, error}], notes, message, upcall (none, pending,
        delivered, refused, gave_up, cancelled)}."""
        return self.gateway.status(session, request_id, source=source)
    xmlrpc_status.signature = [["struct", "string", "string"]]

    def xmlrpc_list_vms(self, session, cluster=None, *, source=None):
        """list_vms(session[, cluster]) -> [{name, state, vmm, cluster,
        memory_mib, vcpus, address}]: the user's VMs (of one cluster)."""
        return self.gateway.list_vms(session, cluster, source=source)
    xmlrpc_list_vms.signature = [["array", "string"], ["array", "string", "string"]]

    def xmlrpc_operate(self, session, operation, target, *, source=None):
        """operate(session, operation, request id | [VM names]) -> {operation,
        done: [{name, state}], failed: [{name, error}], notes}. Operations:
        pause, resume, shutdown, reboot, hibernate, restore, destroy, cycle."""
        return self.gateway.operate(session, operation, target, source=source)
    xmlrpc_operate.signature = [["struct", "string", "string", "string"],
                                ["struct", "string", "string", "array"]]


class BoundedRequest(server.Request):
    """A request whose body may be at most ``max_body`` bytes: a larger
    Content-Length is answered 413 before any of the body is read, and a
    chunked body that grows past it is cut off there with a 413; nothing of
    either is parsed."""

    max_body = 1024 * 1024
    _body = 0
    _refused = False

    def gotLength(self, length):
        if length is not None and length > self.max_body:
            self._too_large(length)
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._body += len(data)
        if self._body > self.max_body:
            self._too_large(self._body)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if not self._refused:
            super().requestReceived(command, path, version)

    def _too_large(self, size):
        self._refused = True
        self.content = None
        self.requestHeaders.removeHeader(b"expect")     # no "100 Continue" after this
        log.warn("refused a request of {size} bytes or more from {peer} (at most {limit}: "
                 "max_request_bytes)", size=size, peer=_client_host(self),
                 limit=self.max_body)
        transport = self.channel.transport
        transport.write(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n")
        transport.loseConnection()


def make_site(gateway):
    site = server.Site(PlusherResource(gateway))
    site.requestFactory = type("PlusherRequest", (BoundedRequest,),
                               {"max_body": gateway.settings.max_request_bytes})
    site.noisy = False
    return site


def check_transport(settings):
    """Plain HTTP carries users' passwords in clear text: only on a loopback
    interface, unless the site says otherwise (allow_plain_http)."""
    if settings.ssl_cert_file is not None or settings.allow_plain_http:
        return
    try:
        loopback = ipaddress.ip_address(settings.interface).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"[plusher] interface {settings.interface} is not a loopback "
                          "address: serve HTTPS there (ssl_cert_file, ssl_key_file), or set "
                          "allow_plain_http = true (passwords then cross the network in "
                          "clear text)")


def server_endpoint(reactor, settings, port=None):
    """HTTPS when plusher has a certificate and key, else HTTP."""
    port = settings.port if port is None else port
    cert, key = settings.ssl_cert_file, settings.ssl_key_file
    if (cert is None) != (key is None):
        raise ConfigError("[plusher] ssl_cert_file and ssl_key_file: set both (HTTPS) or "
                          "neither (HTTP)")
    if cert is None:
        return TCP4ServerEndpoint(reactor, port, interface=settings.interface)
    return SSL4ServerEndpoint(reactor, port, pki.server_tls_options(cert, key),
                              interface=settings.interface)


class _GatewayService(service.Service):
    def __init__(self, gateway):
        self.gateway = gateway

    def stopService(self):
        super().stopService()
        return self.gateway.stop()


def make_service(config, reactor):
    """-> (root MultiService, Gateway) for a loaded plusher configuration."""
    settings = PlusherSettings.from_config(config)
    # Refuse a bad CA file, or a gateway certificate without role gateway, at
    # start (the controller accepts only a controller certificate, and a
    # client certificate only of role gateway).
    pki.client_tls_options(settings.controller_tls_name or settings.controller_host,
                           settings.ssl_ca_file, settings.gateway_cert_file,
                           settings.gateway_key_file, role=pki.ROLE_GATEWAY)
    check_transport(settings)
    root = service.MultiService()
    gateway = Gateway(settings, reactor)
    _GatewayService(gateway).setServiceParent(root)
    listener = internet.StreamServerEndpointService(server_endpoint(reactor, settings),
                                                    make_site(gateway))
    listener._raiseSynchronously = True
    listener.setServiceParent(root)
    return root, gateway


def main(argv=None):
    from usher import daemon, settings as usher_settings
    options = daemon.argument_parser(
        "plusher", "plusher: the XML-RPC gateway between Plush and Usher.",
        usher_settings.PLUSHER).parse_args(argv)

    from twisted.internet import reactor

    from usher.config import load_config
    try:
        config = load_config(usher_settings.PLUSHER, extra_files=options.config,
                             isolated=options.isolated)
        root, _gateway = make_service(config, reactor)
        section = config["plusher"]
        daemon.start_logging(section["log_file"], section["log_level"])
    except ConfigError as e:
        print(f"plusher: configuration error: {e}", file=sys.stderr)
        return 2
    scheme = "https" if section["ssl_cert_file"] else "http"

    def running():
        log.info("plusher serving XML-RPC on {url}",
                 url=f"{scheme}://{section['interface']}:{section['port']}/")
    return daemon.run(reactor, root, name="plusher", pid_file=section["pid_file"],
                      on_running=running)


if __name__ == "__main__":
    sys.exit(main())
