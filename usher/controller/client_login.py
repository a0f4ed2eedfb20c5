"""The client port's login: one at a time per connection, a bounded number
controller-wide, back-off per source and per user (usher.auth.throttle),
and a source address believed only from a gateway.

PB's own login is an MD5 challenge that needs plaintext passwords on the
server; LDAP and PAM need the password itself. So the client sends its user
name and password over the TLS channel to ``login``, which runs them through
the cred portal (the authentication chain) and returns the user's
perspective: the capability for the Table 4 API.
"""

import ipaddress
import math

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.spread import pb
from twisted.spread.flavors import IPBRoot
from zope.interface import implementer

from usher.auth.throttle import LoginThrottle, SourceLockedOut, ThrottlePolicy
from usher.controller.client_broker import (CONCURRENT_LOGINS, LOGIN_TIMEOUT, MAX_METHOD_NAME,
                                            PRELOGIN_BYTES, ClientBroker, dispatch_call,
                                            peer_host, shown)
from usher.errors import AuthenticationFailed, ConfigError, InvalidRequest, Unavailable

log = Logger()

MAX_CREDENTIAL = 1024
MAX_FAILED_LOGINS = 5

# Until a connection has logged in, the peer is anyone who can reach the
# port: it may send at most ``prelogin_bytes`` bytes and must log in within
# ``login_timeout`` seconds of connecting (idle or not), one login at a time;
# at most ``concurrent_logins`` logins are checked at once controller-wide
# (bcrypt runs in the thread pool), further ones are refused as busy; failed
# logins back off per source and per user (usher.auth.throttle). After login
# a connection may stay idle for as long as it likes (clients wait for change
# pushes); TCP keepalive closes one whose peer has vanished.

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
        return dispatch_call(self, broker, "remote_", message, args, kw, None)

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
        peer = peer_host(self.broker)
        if claimed is None:
            return peer
        try:
            gateway = bool(self.is_gateway(self.broker))
        except Exception:
            log.failure("is_gateway failed for the connection from {peer}", peer=peer)
            gateway = False
        if not gateway:
            log.info("a login from {peer} claims to come from {claimed}: ignored (not a "
                     "gateway)", peer=peer, claimed=shown(claimed, MAX_METHOD_NAME))
            return peer
        address = _address(claimed)
        if address is None:
            log.warn("the gateway at {peer} sent {claimed} as a login's source, not an "
                     "address: counting the login as the gateway's", peer=peer,
                     claimed=shown(claimed, MAX_METHOD_NAME))
            return peer
        return address

    async def _login(self, username, password, observer, claimed):
        # One of a standby pair that is not active serves no one (README,
        # "A standby controller"): nothing else is checked.
        standby = getattr(self.portal, "standby_error", None)
        if standby is not None and standby() is not None:
            raise standby()
        source = self._source(claimed)
        user = shown(username, MAX_METHOD_NAME)
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
                     peer=peer_host(self.broker), audit="login_failed")
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
