"""usherweb's sessions: one per logged-in browser (a cookie) or script (a
bearer token), each acting through an ``UsherClient`` logged in with the
user's own credentials, so that the controller and its plugins decide what
the user may do. No HTTP here (``usher.clients.web.api`` is in front).

A session ends at logout, after ``session_idle_timeout`` seconds without a
request, or ``session_max_age`` seconds after login whatever it does; every
timer runs on the clock given in (a ``task.Clock`` in the tests). A token
made from a session (``make_token``) is a session of its own sharing the
same controller connection, which is closed when the last of them ends.
"""

import dataclasses
import hmac
import secrets

from twisted.internet import defer
from twisted.logger import Logger

from usher.client import gateway_login
from usher.errors import AuthenticationFailed, InvalidRequest, Unavailable
from usher.protocol import MAX_FIELD

log = Logger()

COOKIE = "cookie"
TOKEN = "token"
# 32 random bytes, URL-safe (43 characters): unguessable session ids, CSRF tokens
# and bearer tokens.
ID_BYTES = 32

# Bearer tokens one login may hold at once.
MAX_TOKENS_PER_LOGIN = 16


def new_secret():
    return secrets.token_urlsafe(ID_BYTES)


class _SharedClient:
    """One controller connection and the sessions that use it."""

    def __init__(self, client):
        self.client = client
        self.users = 0

    def release(self):
        self.users -= 1
        if self.users <= 0:
            return defer.maybeDeferred(self.client.disconnect)
        return defer.succeed(None)


@dataclasses.dataclass(eq=False)
class WebSession:
    # The id and the CSRF token are credentials: never in a repr (a logged
    # session must not hand them to whoever reads the log).
    id: str = dataclasses.field(repr=False)
    kind: str                   # COOKIE or TOKEN
    user: str
    admin: bool
    domain: str
    csrf: str = dataclasses.field(repr=False)
    created: float
    last_used: float
    shared: _SharedClient = dataclasses.field(repr=False)
    closed: bool = False
    why_closed: str | None = None
    timer: object = dataclasses.field(default=None, repr=False)
    # callables run once, with the reason, when the session ends (streams)
    on_close: list = dataclasses.field(default_factory=list, repr=False)
    streams: set = dataclasses.field(default_factory=set, repr=False)

    @property
    def client(self):
        return self.shared.client

    def describe(self):
        """What login and GET /session answer."""
        return {"user": self.user, "admin": self.admin, "domain": self.domain,
                "csrf": self.csrf}

    def check_csrf(self, token):
        return isinstance(token, str) and hmac.compare_digest(token.encode("utf-8", "replace"),
                                                              self.csrf.encode())


class WebSessions:
    """The open sessions. ``client_factory(user, password, source)`` makes
    an UsherClient-like object (``connect()`` -> {"user", "admin",
    "domain"}, ``disconnect()``); ``clock`` runs the expiry timers."""

    def __init__(self, settings, clock, client_factory):
        self.settings = settings
        self.clock = clock
        self._client_factory = client_factory
        self._sessions = {}         # id -> WebSession
        self._logins = 0            # logins at the controller in progress
        self._stopped = False

    def __len__(self):
        return len(self._sessions)

    def __iter__(self):
        return iter(list(self._sessions.values()))

    # -- opening --------------------------------------------------------------

    def _check_room(self):
        if self._stopped:
            raise Unavailable("usherweb is shutting down")
        if len(self._sessions) + self._logins >= self.settings.max_sessions:
            raise Unavailable(f"too many open sessions ({self.settings.max_sessions}); "
                              "try again later")

    async def login(self, username, password, source=None, replacing=None):
        """-> a new cookie session, once the controller accepted the
        credentials (``source``: the browser's address, for the controller's
        login back-off). The session ``replacing`` (the one the browser
        sent, if any) ends: every login gets a new id, so an id planted in
        a browser before login is never the one that gets logged in."""
        if not isinstance(username, str) or not username or len(username) > MAX_FIELD:
            raise InvalidRequest("username must be a non-empty string")
        if not isinstance(password, str) or len(password) > MAX_FIELD:
            raise InvalidRequest("password must be a string")
        if replacing is not None:
            self.close(replacing, "replaced by a new login")
        self._check_room()
        client = self._client_factory(username, password, source)
        self._logins += 1
        try:
            who = await gateway_login(client, stopped=lambda: self._stopped, daemon="usherweb")
        finally:
            self._logins -= 1
        session = self._add(COOKIE, _SharedClient(client), who.get("user", username),
                            bool(who.get("admin")), who.get("domain", ""))
        log.info("session for {user} opened from {source}", user=session.user, source=source)
        return session

    def make_token(self, session):
        """A bearer-token session for scripts, of ``session``'s user and
        controller connection; its id is the token."""
        if session.closed:
            raise AuthenticationFailed("the session has ended; log in again")
        if session.shared.users > MAX_TOKENS_PER_LOGIN:
            # One user must not take the daemon's max_sessions (and their
            # streams' buffers) from everybody else.
            raise Unavailable(f"this login already has {MAX_TOKENS_PER_LOGIN} tokens; "
                              "end one (DELETE /api/v1/tokens/current) first")
        self._check_room()
        token = self._add(TOKEN, session.shared, session.user, session.admin, session.domain)
        log.info("token session for {user} made", user=token.user)
        return token

    def _add(self, kind, shared, user, admin, domain):
        now = self.clock.seconds()
        session_id = new_secret()
        while session_id in self._sessions:      # (never, with 256 random bits)
            session_id = new_secret()
        shared.users += 1
        session = WebSession(id=session_id, kind=kind, user=user, admin=admin, domain=domain,
                             csrf=new_secret(), created=now, last_used=now, shared=shared)
        self._sessions[session_id] = session
        self._arm(session)
        return session

    # -- finding and expiry ---------------------------------------------------

    def expires_at(self, session):
        """When ``session`` ends unless used again (clock seconds)."""
        return min(session.last_used + self.settings.session_idle_timeout,
                   session.created + self.settings.session_max_age)

    def find(self, session_id, kind):
        """The open session of that id and kind, or None. A lookup is no use:
        ``touch`` is (a request that passed its checks)."""
        if not isinstance(session_id, str) or not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None or session.kind != kind:
            return None
        if self.clock.seconds() >= self.expires_at(session):
            self._expire(session)
            return None
        return session

    def touch(self, session):
        session.last_used = self.clock.seconds()

    def _arm(self, session):
        delay = max(0.0, self.expires_at(session) - self.clock.seconds())
        session.timer = self.clock.callLater(delay, self._check, session)

    def _check(self, session):
        session.timer = None
        if session.closed:
            return
        if self.clock.seconds() >= self.expires_at(session):
            self._expire(session)
        else:
            self._arm(session)       # used meanwhile: sleep until the new expiry

    def _expire(self, session):
        now = self.clock.seconds()
        age = now - session.created
        self.close(session, "expired (session_max_age)"
                   if age >= self.settings.session_max_age else "expired (idle)")

    # -- closing --------------------------------------------------------------

    def close(self, session, why="logged out"):
        """End a session: its streams close, and its controller connection
        once no other session (a token made from it) uses it."""
        if session.closed:
            return defer.succeed(None)
        session.closed = True
        session.why_closed = why
        if session.timer is not None and session.timer.active():
            session.timer.cancel()
        session.timer = None
        self._sessions.pop(session.id, None)
        for callback in list(session.on_close):
            try:
                callback(why)
            except Exception:
                log.failure("usherweb: closing a stream of {user}'s session failed",
                            user=session.user)
        session.on_close.clear()
        log.info("{kind} session for {user} closed ({why})", kind=session.kind,
                 user=session.user, why=why)
        return session.shared.release()

    async def stop(self):
        self._stopped = True
        await defer.DeferredList([self.close(s, "usherweb stopping") for s in self])
