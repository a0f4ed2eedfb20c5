"""The controller's PB boundary towards clients (TLS).

PB's own login is an MD5 challenge that needs plaintext passwords on the
server; LDAP and PAM need the password itself. So the client sends its user
name and password over the TLS channel to ``login``, which runs them through
the cred portal (the authentication chain) and returns the user's
perspective: the capability for the Table 4 API.
"""

import inspect
import ipaddress
import math
import os

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.spread import pb
from twisted.spread.flavors import IPBRoot
from zope.interface import implementer

from usher.auth.throttle import LoginThrottle, SourceLockedOut, ThrottlePolicy
from usher.controller.events import Event
from usher.errors import (AuthenticationFailed, ConfigError, InvalidRequest, NoSuchVM,
                          PermissionDenied, Rejected, Unavailable, UsherError)
from usher.liveness import enable_tcp_keepalive
from usher.pbutil import call
from usher.records import encode_chunks
from usher.states import OPERATIONS
from usher.vmset import Selection

log = Logger()

MAX_CREDENTIAL = 1024
MAX_FAILED_LOGINS = 5


def _boundary(method):
    """Run an ``async def`` perspective method as a Deferred, and never let
    an unexpected exception's details reach the client."""
    import functools

    kind = method.__name__.removeprefix("perspective_")

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        async def run():
            try:
                return await method(self, *args, **kwargs)
            except UsherError:
                raise
            except Exception:
                log.failure("internal error in {method} for {user}",
                            method=method.__name__, user=self.user)
                raise UsherError("internal error in the controller; see its log")

        async def timed():
            # Requests by kind and outcome, and their latency (metrics).
            started = self.clock.seconds()
            request_kind = kind
            if kind == "op_on" and args and args[0] in OPERATIONS:
                request_kind = args[0]
            outcome = "error"
            try:
                result = await run()
                outcome = "partial" if isinstance(result, dict) and result.get("failed") \
                    else "ok"
                return result
            except Exception as e:
                outcome = request_outcome(e)
                raise
            finally:
                self.controller.instruments.request(request_kind, outcome,
                                                    self.clock.seconds() - started)
        return defer.Deferred.fromCoroutine(timed())

    return wrapper


def request_outcome(error):
    """The outcome label of a request that failed with ``error``."""
    if isinstance(error, Rejected):
        return "rejected"
    if isinstance(error, (PermissionDenied, AuthenticationFailed)):
        return "denied"
    if isinstance(error, (InvalidRequest, NoSuchVM)):
        return "invalid"
    return "error"


class UserPerspective(pb.Avatar):
    """One logged-in user's view of the controller (paper, Table 4)."""

    def perspectiveMessageReceived(self, broker, message, args, kw):
        return _dispatch(self, broker, "perspective_", message, args, kw, self)

    def __init__(self, controller, user, admin, observer, *, clock, call_timeout):
        self.controller = controller
        self.user = user
        self.admin = admin
        self.observer = observer
        self.clock = clock
        self.call_timeout = call_timeout
        self.subscription = None

    def logout(self):
        if self.subscription is not None:
            self.subscription.close()
            self.subscription = None

    def _push(self, seq, chunks, removed):
        if not isinstance(self.observer, pb.RemoteReference):
            return None
        return call(self.observer, "vm_changes", seq, chunks, removed,
                    timeout=self.call_timeout, clock=self.clock)

    @_boundary
    async def perspective_whoami(self):
        return {"user": self.user, "admin": self.admin, "domain": self.controller.domain}

    @_boundary
    async def perspective_subscribe(self, clusters=None):
        if clusters is not None:
            # As a selection of clusters would be: a list of short strings,
            # within the controller's limits.
            clusters = Selection.from_wire({"clusters": clusters},
                                           budget=self.controller.budget()).clusters
        # After a restart, the snapshot waits for the LNMs to hand over their
        # VMs (at most the recovery window): a client reconnecting then gets
        # the rebuilt state, not an empty one.
        await self.controller.settled()
        if self.subscription is not None:
            self.subscription.close()
        self.subscription = self.controller.hub.add(self.user, self.admin, clusters or None,
                                                    self._push)
        return self.subscription.snapshot(self.controller.state)

    @_boundary
    async def perspective_list(self, selection=None, status=False):
        # The controller parses the selection, within its limits.
        records = await self.controller.list(self.user, self.admin, selection, bool(status))
        return encode_chunks(records)

    @_boundary
    async def perspective_list_lnm(self, patterns=(), status=False):
        if not isinstance(patterns, (list, tuple)):
            raise InvalidRequest("LNM patterns must be a list")
        return self.controller.list_lnm(self.user, self.admin, patterns, bool(status))

    @_boundary
    async def perspective_top(self, patterns=(), count=10):
        if not isinstance(patterns, (list, tuple)):
            raise InvalidRequest("LNM patterns must be a list")
        result = await self.controller.top(self.user, self.admin, patterns, count)
        return {"lnms": result["lnms"], "vms": encode_chunks(result["vms"])}

    @_boundary
    async def perspective_start(self, vms=(), lnms=(), args=None):
        return await self.controller.start(self.user, self.admin, vms, lnms, args)

    @_boundary
    async def perspective_op_on(self, operation, selection, args=None):
        if not isinstance(operation, str):
            raise InvalidRequest("operation must be a string")
        return await self.controller.op_on(self.user, self.admin, operation, selection, args)

    @_boundary
    async def perspective_migrate(self, selection, lnms=(), args=None):
        return await self.controller.migrate(self.user, self.admin, selection, lnms, args)

    # -- plugin administration -------------------------------------------------

    def _require_admin(self):
        if not self.admin:
            raise PermissionDenied("only administrators may manage plugins")

    @_boundary
    async def perspective_plugins(self):
        self._require_admin()
        return self.controller.plugins.describe()

    @_boundary
    async def perspective_register_plugin(self, name, event, config_file=None, order=None):
        self._require_admin()
        if not all(isinstance(v, str) for v in (name, event)) or (
                config_file is not None and not isinstance(config_file, str)):
            raise InvalidRequest("plugin name, event and config file must be strings")
        if order is not None and not isinstance(order, int):
            raise InvalidRequest("order must be an integer")
        if config_file is not None and not os.path.isabs(config_file):
            # Relative to what? The controller's working directory is no
            # place a client can know.
            raise InvalidRequest(f"the plugin configuration file must be an absolute path "
                                 f"on the controller's host, not {config_file!r}")
        self.controller.plugins.register(name, event, config_file, order)
        return self.controller.plugins.describe()

    @_boundary
    async def perspective_unregister_plugin(self, name, event=None):
        self._require_admin()
        if not isinstance(name, str) or (event is not None and not isinstance(event, str)):
            raise InvalidRequest("plugin name and event must be strings")
        self.controller.plugins.unregister(name, event)
        return self.controller.plugins.describe()

    @_boundary
    async def perspective_forget_lnm(self, name):
        if not self.admin:
            raise PermissionDenied("only administrators may forget LNMs")
        if not isinstance(name, str):
            raise InvalidRequest("LNM name must be a string")
        return {"lnm": name, "forgotten": self.controller.forget_lnm(name)}


async def _no_role(user):
    return None


@implementer(IRealm)
class UsherRealm:
    def __init__(self, controller, *, clock, call_timeout, role_of=None):
        self.controller = controller
        self.clock = clock
        self.call_timeout = call_timeout
        self.role_of = role_of or _no_role

    def requestAvatar(self, avatar_id, mind, *interfaces):
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("only PB perspectives")
        return defer.Deferred.fromCoroutine(self._avatar(avatar_id, mind))

    async def _avatar(self, avatar_id, mind):
        user = avatar_id.decode() if isinstance(avatar_id, bytes) else avatar_id
        admin = self.controller.is_admin(user, await self.role_of(user))
        avatar = UserPerspective(self.controller, user, admin, mind, clock=self.clock,
                                 call_timeout=self.call_timeout)
        self.controller.chains.notify(Event("user_authenticated", self.controller.api,
                                            user=user, admin=admin))
        self.controller.client_sessions += 1
        ended = []

        def logout():
            if not ended:   # count each session once, however often it is ended
                ended.append(True)
                self.controller.client_sessions -= 1
            avatar.logout()
        return pb.IPerspective, avatar, logout


# -- before login ---------------------------------------------------------------
#
# Until a connection has logged in, the peer is anyone who can reach the
# port: it may send at most ``prelogin_bytes`` bytes and must log in within
# ``login_timeout`` seconds of connecting (idle or not), one login at a time;
# at most ``concurrent_logins`` logins are checked at once controller-wide
# (bcrypt runs in the thread pool), further ones are refused as busy; failed
# logins back off per source and per user (usher.auth.throttle). After login
# a connection may stay idle for as long as it likes (clients wait for change
# pushes); TCP keepalive closes one whose peer has vanished.

LOGIN_TIMEOUT = 30.0
PRELOGIN_BYTES = 64 * 1024
CONCURRENT_LOGINS = 16
# TCP keepalive on client connections: first probe after this many idle
# seconds, dropped after that many without an answer.
KEEPALIVE_INTERVAL = 30.0
KEEPALIVE_TIMEOUT = 90.0
# Longest method name a call may give; peer data is logged at most this long.
MAX_METHOD_NAME = 64
MAX_LOGGED = 200
# Deepest nesting of lists and dictionaries in a call's arguments (a
# selection is 3 deep).
MAX_NESTING = 32


def _shown(value, limit=MAX_LOGGED):
    """Peer-controlled data as it may appear in the log: bounded, and its
    repr unless it is printable text (no forged lines)."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text)} characters)"
    return text


def _shown_error(error):
    return _shown(f"{type(error).__name__}: {error}")


def _dispatch(target, broker, prefix, message, net_args, net_kw, perspective):
    """PB's ``remoteMessageReceived`` for objects a client can reach, without
    its failure modes: PB logs every argument of a call whose arguments do not
    fit (a password, megabytes of junk) and logs and answers a traceback for
    an unknown method or arguments it cannot decode. Here each of those is an
    InvalidRequest for the caller and nothing in the log but a bounded line."""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    if not isinstance(message, str) or not message.isidentifier() or \
            len(message) > MAX_METHOD_NAME:
        raise InvalidRequest(f"no such method: {_shown(message, MAX_METHOD_NAME)}")
    method = getattr(target, prefix + message, None)
    if method is None:
        raise InvalidRequest(f"no such method: {message}")
    try:
        args = broker.unserialize(net_args, perspective)
        kw = broker.unserialize(net_kw, perspective)
    except Exception as e:
        log.info("refused a call of {method} from {peer}: its arguments cannot be decoded: "
                 "{error}", method=message, peer=_peer_host(broker), error=_shown_error(e))
        raise InvalidRequest(f"{message}: arguments that cannot be decoded "
                             f"({type(e).__name__})") from None
    if not isinstance(args, (list, tuple)) or not isinstance(kw, dict):
        raise InvalidRequest(f"{message}: malformed call")
    kw = {k.decode("utf-8", "replace") if isinstance(k, bytes) else k: v
          for k, v in kw.items()}
    problem = _shape_problem((args, kw))
    if problem:
        raise InvalidRequest(f"{message}: {problem}")
    try:
        inspect.signature(method).bind(*args, **kw)
    except TypeError:
        params = ", ".join(p.name if p.default is p.empty else f"[{p.name}]"
                           for p in inspect.signature(method).parameters.values())
        raise InvalidRequest(f"{message}: wrong arguments; it takes ({params})") from None
    state = method(*args, **kw)
    return broker.serialize(state, perspective, method, args, kw)


def _shape_problem(value):
    """What no Usher call carries, anywhere in its arguments: dictionaries
    whose keys are not strings, nesting deeper than MAX_NESTING. -> a
    description, or None."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, set, frozenset)):
            children = item
        elif isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                return "dictionary keys must be strings"
            children = item.values()
        else:
            continue
        if depth >= MAX_NESTING:
            return f"arguments nested deeper than {MAX_NESTING} levels"
        stack.extend((child, depth + 1) for child in children)
    return None


def _peer_host(broker):
    try:
        peer = broker.transport.getPeer()
    except Exception:
        return "unknown"
    return getattr(peer, "host", None) or str(peer)


class ClientBroker(pb.Broker):
    """The broker of one client connection: the pre-login byte budget and
    deadline, TCP keepalive, and PB protocol errors turned into a bounded log
    line and a closed connection instead of an unhandled error that repeats
    what the peer sent."""

    logged_in = False
    received_before_login = 0
    _dropped = False
    _deadline = None
    _close_after_answer = False

    def connectionMade(self):
        super().connectionMade()
        factory = self.factory
        self._deadline = factory.clock.callLater(factory.login_timeout,
                                                 self._login_timed_out)
        enable_tcp_keepalive(self.transport, interval=KEEPALIVE_INTERVAL,
                             timeout=KEEPALIVE_TIMEOUT)

    @property
    def peer_host(self):
        return _peer_host(self)

    def login_succeeded(self):
        self.logged_in = True
        self._cancel_deadline()

    def close_after_answer(self):
        """Close the connection once the next answer or error is sent."""
        self._close_after_answer = True

    def drop(self):
        if self._dropped:
            return
        self._dropped = True
        self._cancel_deadline()
        abort = getattr(self.transport, "abortConnection", None)
        (abort or self.transport.loseConnection)()

    def _cancel_deadline(self):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _login_timed_out(self):
        self._deadline = None
        if not self.logged_in:
            log.info("closing the connection from {peer}: no login within {timeout:g} s",
                     peer=self.peer_host, timeout=self.factory.login_timeout)
            self.drop()

    def dataReceived(self, data):
        if self._dropped:
            return
        if not self.logged_in:
            self.received_before_login += len(data)
            if self.received_before_login > self.factory.prelogin_bytes:
                log.warn("dropping the connection from {peer}: {count} bytes before logging "
                         "in (at most {limit})", peer=self.peer_host,
                         count=self.received_before_login, limit=self.factory.prelogin_bytes)
                self.drop()
                return
        try:
            super().dataReceived(data)
        except Exception as e:
            log.warn("dropping the connection from {peer}: protocol error: {error}",
                     peer=self.peer_host, error=_shown_error(e))
            self.drop()

    def connectionLost(self, reason):
        self._cancel_deadline()
        super().connectionLost(reason)

    def sendCall(self, *exp):
        super().sendCall(*exp)
        if self._close_after_answer and exp and exp[0] in (b"answer", b"error"):
            self._close_after_answer = False
            self.transport.loseConnection()

    def proto_message(self, requestID, objectID, message, answerRequired, netArgs, netKw):
        _check_header(requestID, objectID, message, answerRequired)
        super().proto_message(requestID, objectID, message, answerRequired, netArgs, netKw)

    def proto_cachemessage(self, *args):
        raise pb.ProtocolError("no cached objects on this connection")

    def proto_didNotUnderstand(self, command):
        log.info("the client at {peer} did not understand {command}", peer=self.peer_host,
                 command=_shown(command, MAX_METHOD_NAME))


def _check_header(request_id, object_id, message, answer_required):
    """Raise ProtocolError unless a message's header has the types PB sends."""
    if isinstance(message, bytes):
        try:
            message.decode("utf-8")
        except UnicodeDecodeError:
            raise pb.ProtocolError("a method name that is not UTF-8") from None
    if not (isinstance(request_id, int) and isinstance(answer_required, int)
            and isinstance(message, (str, bytes))
            and (isinstance(object_id, int)
                 or isinstance(object_id, (str, bytes)) and len(object_id) <= 16)):
        raise pb.ProtocolError("a malformed message header")


class LoginSlots:
    """At most ``limit`` logins being checked at once (controller-wide)."""

    def __init__(self, limit=CONCURRENT_LOGINS):
        self.limit = limit
        self.in_use = 0

    def acquire(self):
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def release(self):
        self.in_use -= 1


def _never_a_gateway(broker):
    return False


def _address(text):
    """A claimed source address, normalised, or None if it is not one."""
    if not isinstance(text, str) or len(text) > 64:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


class LoginGateway(pb.Referenceable):
    """The root object a client connection sees before logging in.

    ``login(username, password[, observer][, source])``: one at a time per
    connection; ``source`` (the address of the user behind a gateway such as
    plusher) counts only from a connection ``is_gateway(broker)`` vouches
    for; from any other it is logged as claimed and ignored.
    """

    def __init__(self, portal, broker, *, clock=None, throttle=None, logins=None,
                 is_gateway=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.portal = portal
        self.broker = broker
        self.clock = clock
        self.throttle = throttle if throttle is not None else LoginThrottle(clock)
        self.logins = logins if logins is not None else LoginSlots()
        self.is_gateway = is_gateway or _never_a_gateway
        self.failures = 0
        self.logged_in = False
        self.running = False

    def remoteMessageReceived(self, broker, message, args, kw):
        return _dispatch(self, broker, "remote_", message, args, kw, None)

    def remote_login(self, username, password, observer=None, source=None):
        if self.logged_in:
            return defer.fail(InvalidRequest("already logged in on this connection"))
        if self.running:
            self._refused()
            return defer.fail(InvalidRequest("a login is already in progress on this "
                                             "connection"))
        if not (isinstance(username, str) and isinstance(password, str)
                and 0 < len(username) <= MAX_CREDENTIAL and len(password) <= MAX_CREDENTIAL):
            self._refused()
            return defer.fail(InvalidRequest("user name and password must be short strings"))
        self.running = True
        d = defer.Deferred.fromCoroutine(self._login(username, password, observer, source))

        def done(result):
            self.running = False
            return result
        return d.addBoth(done)

    def _refused(self):
        """One more refused login on this connection; the last one allowed
        closes it (once its answer is sent)."""
        self.failures += 1
        if self.failures >= MAX_FAILED_LOGINS:
            if isinstance(self.broker, ClientBroker):
                self.broker.close_after_answer()
            else:
                self.broker.transport.loseConnection()

    def _source(self, claimed):
        peer = _peer_host(self.broker)
        if claimed is None:
            return peer
        try:
            gateway = bool(self.is_gateway(self.broker))
        except Exception:
            log.failure("is_gateway failed for the connection from {peer}", peer=peer)
            gateway = False
        if not gateway:
            log.info("a login from {peer} claims to come from {claimed}: ignored (not a "
                     "gateway)", peer=peer, claimed=_shown(claimed, MAX_METHOD_NAME))
            return peer
        address = _address(claimed)
        if address is None:
            log.warn("the gateway at {peer} sent {claimed} as a login's source, not an "
                     "address: counting the login as the gateway's", peer=peer,
                     claimed=_shown(claimed, MAX_METHOD_NAME))
            return peer
        return address

    async def _login(self, username, password, observer, claimed):
        source = self._source(claimed)
        user = _shown(username, MAX_METHOD_NAME)
        try:
            wait = self.throttle.admit(username, source)
        except SourceLockedOut as e:
            self._refused()
            log.info("login for {user} from {source} refused: too many failed logins from "
                     "there", user=user, source=source)
            raise AuthenticationFailed(f"too many failed logins from {source}; try again in "
                                       f"{math.ceil(e.retry_after)} s") from None
        if wait:
            await task.deferLater(self.clock, wait, lambda: None)
            if self.broker.disconnected:
                raise Unavailable("the connection closed")
        if not self.logins.acquire():
            self._refused()
            log.warn("login for {user} from {source} refused: {count} logins already being "
                     "checked", user=user, source=source, count=self.logins.in_use)
            raise Unavailable("the controller is busy with other logins; try again in a "
                              "moment")
        creds = UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))
        try:
            _iface, avatar, logout = await self.portal.login(creds, observer, pb.IPerspective)
        except UnauthorizedLogin:
            self.throttle.failed(username, source)
            self._refused()
            log.warn("failed login for {user} from {source}", user=user, source=source,
                     peer=_peer_host(self.broker), audit="login_failed")
            raise AuthenticationFailed("wrong user name or password") from None
        finally:
            self.logins.release()
        self.throttle.succeeded(username, source)
        if self.broker.disconnected:
            logout()
            raise Unavailable("the connection closed")
        self.logged_in = True
        if isinstance(self.broker, ClientBroker):
            self.broker.login_succeeded()
        self.broker.notifyOnDisconnect(logout)
        log.info("user {user} logged in from {source}", user=avatar.user, source=source)
        return pb.AsReferenceable(avatar, "perspective")


@implementer(IPBRoot)
class ClientRoot:
    """Gives each connection its LoginGateway; the throttle and the login
    slots are shared by every connection."""

    def __init__(self, portal, *, clock=None, throttle=None, logins=None, is_gateway=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.portal = portal
        self.clock = clock
        self.throttle = throttle if throttle is not None else LoginThrottle(clock)
        self.logins = logins if logins is not None else LoginSlots()
        self.is_gateway = is_gateway

    def rootObject(self, broker):
        return LoginGateway(self.portal, broker, clock=self.clock, throttle=self.throttle,
                            logins=self.logins, is_gateway=self.is_gateway)


class ClientPBFactory(pb.PBServerFactory):
    """The client port's factory: ClientBrokers over a ClientRoot."""

    protocol = ClientBroker

    def __init__(self, root, *, clock, login_timeout=LOGIN_TIMEOUT,
                 prelogin_bytes=PRELOGIN_BYTES):
        super().__init__(root)
        self.clock = clock
        self.login_timeout = login_timeout
        self.prelogin_bytes = prelogin_bytes


def client_factory(portal, ctrl, clock, *, is_gateway=None):
    """The client port's factory from the controller's [ctrl] settings.
    ``is_gateway(broker)``: whether that connection is a gateway whose
    ``source`` claims count (default: none is)."""
    throttle = LoginThrottle(clock, ThrottlePolicy.from_settings(ctrl))
    if ctrl["login_timeout"] <= throttle.policy.user_delay_max:
        raise ConfigError(f"[ctrl] login_timeout ({ctrl['login_timeout']:g} s) must be longer "
                          f"than login_user_delay_max ({throttle.policy.user_delay_max:g} s)")
    root = ClientRoot(portal, clock=clock, throttle=throttle,
                      logins=LoginSlots(ctrl["max_concurrent_logins"]), is_gateway=is_gateway)
    return ClientPBFactory(root, clock=clock, login_timeout=ctrl["login_timeout"],
                           prelogin_bytes=ctrl["max_prelogin_bytes"])
