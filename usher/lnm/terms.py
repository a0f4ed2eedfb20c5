"""The LNM's term gate (high availability, usher.protocol): it obeys only
the controller with the highest term of leadership it has seen.

Each connection from a controller has a term: the one it sent with
``controller_term`` (0 for a controller that never sends one: one without
high availability, or an old one). The LNM remembers the highest term
seen, from ``controller_term`` and from recovery announcements, in
``<state_dir>/controller_term.json`` (written atomically before the term is
accepted), so that a restarted LNM still refuses a deposed controller.
Every command on a connection whose term is lower than the highest is
refused with StaleTerm (nothing done) and the connection dropped.
"""

import os
import weakref

from twisted.internet import defer, threads
from twisted.logger import Logger

from usher.errors import ConfigError, InvalidRequest, OperationFailed, StaleTerm
from usher.persist import read_json, remove_leftovers, write_json_atomic

log = Logger()

TERM_FILE = "controller_term.json"
# Terms are PostgreSQL bigints.
MAX_TERM = 2 ** 63 - 1
MAX_CONTROLLER_NAME = 255


def check_term(term):
    """A term from the wire: a non-negative int below 2**63."""
    if isinstance(term, bool) or not isinstance(term, int) or not 0 <= term <= MAX_TERM:
        raise InvalidRequest("term must be an integer from 0 to 2**63 - 1")
    return term


def check_controller_name(name):
    # Empty: a single controller (it has no ha_name).
    if (not isinstance(name, str) or len(name) > MAX_CONTROLLER_NAME
            or not name.isprintable()):
        raise InvalidRequest(f"controller must be a printable name of at most "
                             f"{MAX_CONTROLLER_NAME} characters")
    return name


class TermGate:
    """The highest term seen and the term of each connection (broker).

    ``state_dir`` None keeps the term in memory only (tests); ``pool``
    (with ``reactor``) is the thread pool the file is written in."""

    def __init__(self, state_dir=None, *, lnm_name="LNM", reactor=None, pool=None):
        self.lnm_name = lnm_name
        self.path = os.path.join(state_dir, TERM_FILE) if state_dir else None
        self.reactor = reactor
        self.pool = pool
        self._terms = weakref.WeakKeyDictionary()
        self._lock = defer.DeferredLock()
        self.highest = self._load()

    def _load(self):
        if self.path is None:
            return 0
        remove_leftovers(self.path)
        try:
            data = read_json(self.path, default={"highest": 0})
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.path}: cannot read the highest controller term: {e}; "
                              "restore it or remove it (the LNM then obeys any controller "
                              "until one tells it its term)") from None
        term = data.get("highest") if isinstance(data, dict) else None
        try:
            return check_term(term)
        except InvalidRequest:
            raise ConfigError(f"{self.path}: 'highest' is not a term (an integer from 0 to "
                              "2**63 - 1)") from None

    def term_of(self, broker):
        """The term of a connection: 0 until it sent controller_term."""
        return self._terms.get(broker, 0)

    def is_stale(self, broker):
        return self.term_of(broker) < self.highest

    async def offer(self, broker, term, controller):
        """``controller_term`` on ``broker`` -> {"accepted", "highest"}."""
        check_term(term)
        check_controller_name(controller)
        if term < self.highest:
            log.warn("LNM {lnm}: refused controller {controller} with term {term}: it has "
                     "seen term {highest}", lnm=self.lnm_name, controller=controller,
                     term=term, highest=self.highest)
            return {"accepted": False, "highest": self.highest}
        await self.raise_to(term, f"controller {controller}")
        if term < self.highest:    # a higher one came meanwhile
            return {"accepted": False, "highest": self.highest}
        self._terms[broker] = term
        if term:
            log.info("LNM {lnm}: controller {controller} has term {term}",
                     lnm=self.lnm_name, controller=controller, term=term)
        return {"accepted": True, "highest": self.highest}

    async def raise_to(self, term, source):
        """Remember ``term`` if it is the highest yet (persisted first)."""
        check_term(term)
        await self._lock.acquire()
        try:
            if term <= self.highest:
                return
            previous = self.highest
            if self.path is not None:
                try:
                    await self._write({"highest": term})
                except OSError as e:
                    raise OperationFailed(f"LNM {self.lnm_name} cannot record term {term} "
                                          f"({e}); refusing it") from None
            self.highest = term
            log.info("LNM {lnm}: highest controller term {previous} -> {term} ({source})",
                     lnm=self.lnm_name, previous=previous, term=term, source=source)
        finally:
            self._lock.release()

    def _write(self, data):
        if self.pool is None or self.reactor is None:
            return defer.maybeDeferred(write_json_atomic, self.path, data)
        return threads.deferToThreadPool(self.reactor, self.pool, write_json_atomic,
                                         self.path, data)

    def refuse(self, broker, method, clock):
        """A command on a stale connection: drop it -> the StaleTerm to raise."""
        term = self.term_of(broker)
        log.warn("LNM {lnm}: refused {method} from a controller with term {term} (highest "
                 "seen {highest}); dropping that connection", lnm=self.lnm_name,
                 method=method, term=term, highest=self.highest)
        drop(broker, clock)
        return StaleTerm(f"LNM {self.lnm_name} has seen controller term {self.highest}; "
                         f"this connection's term is {term}: not obeyed")


def drop(broker, clock):
    """Close a stale connection once the answer is on its way."""
    broker.usher_stale = True
    transport = broker.transport
    if transport is not None:
        clock.callLater(0, transport.loseConnection)


__all__ = ["MAX_TERM", "TERM_FILE", "TermGate", "check_term", "drop"]
