"""Notices to users' clients: short news the controller or a plugin has for
one user ("your VM's lease ends in 10 minutes"), pushed to every session
that user has open (ush prints it as a ``[notice]`` line, usherweb shows it
in the browser), through the observer each client gives at login
(``remote_notice(kind, message)``: ``usher.client``).

Bounded, because a user's client may read slowly or not at all: a kind is
at most ``MAX_KIND`` characters, a message at most ``MAX_MESSAGE`` (longer
ones are cut, marked with an ellipsis); each session has at most one call
in flight and at most ``max_queued`` notices waiting, dropping the oldest
(and counting them: the session's next notice says how many it missed). A
notice for a user with no session is dropped: notices are news, not mail.
"""

import collections
import re

from twisted.internet import defer
from twisted.logger import Logger

from usher.errors import InvalidRequest, UsherError
from usher.pbutil import call

log = Logger()

MAX_KIND = 32
MAX_MESSAGE = 1000
MAX_QUEUED = 32
KIND = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")


def check_notice(kind, message):
    """-> (kind, message) bounded as the module says; InvalidRequest for a
    kind that is not a short lower-case word or a message that is not text."""
    if not isinstance(kind, str) or KIND.fullmatch(kind) is None:
        raise InvalidRequest(f"a notice kind is 1 to {MAX_KIND} characters of a-z, 0-9, "
                             "'_', '.' and '-'")
    if not isinstance(message, str):
        raise InvalidRequest("a notice message must be text")
    # One line each: a client prints it as one.
    message = " ".join(message.split())
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 1] + "\u2026"
    return kind, message


class NoticeSession:
    """One logged-in session's queue of notices and its observer."""

    def __init__(self, hub, user, observer):
        self.hub = hub
        self.user = user
        self.observer = observer        # a pb.RemoteReference (or a test's double)
        self.queue = collections.deque()
        self.dropped = 0                # dropped since the last one delivered
        self.dropped_total = 0
        self.delivered = 0
        self.active = True
        self._sending = None

    def put(self, kind, message):
        if not self.active:
            return
        if len(self.queue) >= self.hub.max_queued:
            self.queue.popleft()
            self.dropped += 1
            self.dropped_total += 1
        self.queue.append((kind, message))
        self._send_next()

    def _send_next(self):
        if self._sending is not None or not self.queue or not self.active:
            return
        kind, message = self.queue.popleft()
        if self.dropped:
            message = (f"{message} ({self.dropped} earlier notice"
                       f"{'s' if self.dropped != 1 else ''} dropped: too many at once)")
            self.dropped = 0
        try:
            d = call(self.observer, "notice", kind, message, timeout=self.hub.call_timeout,
                     clock=self.hub.clock)
        except Exception as e:      # a double without callRemote, a broken reference
            d = defer.fail(e)
        self._sending = d
        d.addCallbacks(self._sent, self._not_sent)

    def _sent(self, _result):
        self._sending = None
        self.delivered += 1
        self._send_next()

    def _not_sent(self, failure):
        self._sending = None
        if failure.check(UsherError):
            log.info("a notice for {user} was not delivered: {error}", user=self.user,
                     error=failure.getErrorMessage())
        else:
            log.failure("a notice for {user} failed", failure, user=self.user)
        self._send_next()

    def close(self):
        self.active = False
        self.queue.clear()
        self.hub.remove(self)


class UserNotices:
    """The sessions of every user, for ``notify(user, kind, message)``."""

    def __init__(self, clock, *, call_timeout=30.0, max_queued=MAX_QUEUED):
        self.clock = clock
        self.call_timeout = call_timeout
        self.max_queued = max_queued
        self._by_user = {}              # user -> set of NoticeSession

    def add(self, user, observer):
        session = NoticeSession(self, user, observer)
        self._by_user.setdefault(user, set()).add(session)
        return session

    def remove(self, session):
        sessions = self._by_user.get(session.user)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._by_user[session.user]

    def sessions_of(self, user):
        return set(self._by_user.get(user, ()))

    def notify(self, user, kind, message):
        """Push one notice to every session of ``user`` -> how many sessions."""
        if not isinstance(user, str):
            raise InvalidRequest("a notice goes to a user (a name)")
        kind, message = check_notice(kind, message)
        sessions = self._by_user.get(user, ())
        for session in list(sessions):
            session.put(kind, message)
        return len(sessions)
