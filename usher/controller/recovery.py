"""Controller recovery after a crash or restart (paper, "Failures").

The controller persists one thing, the LNMs it has known
(``usher.controller.known_lnms``). When it starts with a non-empty list it is
*recovering*:

- ``RecoveryAnnouncer`` tells every LNM on the list that the controller is
  back: over mutual TLS it connects to the LNM's recovery listener
  (``usher.lnm.recovery``), checks that the certificate has role lnm and
  names that LNM, and says ``USHER-RECOVERY <version>``. The LNM then dials its configured
  controller at once instead of waiting out its reconnect backoff. Unreachable
  LNMs are announced to again, with backoff, until they are back or the
  recovery window ends.
- ``Recovery`` tracks which of them are back. Each reattaching LNM hands over
  its node information and its VMs, from which the global state is rebuilt.
  Until all are back (or ``window`` seconds have passed) the state is
  incomplete: listings and client subscriptions wait for it, and starts are
  refused, because a VM started now might already run on an LNM not back yet.
"""

import collections
import functools

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin

from usher.protocol import PROTOCOL_VERSION

log = Logger()

ANNOUNCEMENT = "USHER-RECOVERY"
ANSWER_TIMEOUT = 10.0
# Announcements under way at once (see RecoveryAnnouncer).
ANNOUNCE_CONCURRENCY = 16


def some_names(names, limit=20):
    """The first ``limit`` of ``names`` sorted, and how many more: a log
    line about 2,000 LNMs stays a line."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class Recovery:
    """Which of the LNMs known before a restart are back.

    An LNM watcher (``Controller.watch_lnms``). ``done`` once every expected
    LNM has attached, or ``window`` seconds after the start; ``on_done()`` is
    called then (the controller settles what waited for it).
    """

    def __init__(self, expected, *, clock, window, on_done=None):
        self.clock = clock
        self.window = window
        self.expected = set(expected)
        self.waiting = set(expected)
        self.started_at = clock.seconds()
        self.finished_at = None
        self.done = False
        self._on_done = on_done
        self._waiters = []
        self._timer = None
        if self.waiting:
            log.info("recovering: waiting up to {window:g} s for the {count} LNMs known "
                     "before the restart: {lnms}", window=window, count=len(self.waiting),
                     lnms=some_names(self.waiting))
            self._timer = clock.callLater(window, self._window_over)
        else:
            self._finish()

    def describe(self):
        left = max(0.0, self.started_at + self.window - self.clock.seconds())
        return f"waiting for LNM{'s' if len(self.waiting) != 1 else ''} " \
               f"{some_names(self.waiting, 5)} to reconnect " \
               f"(at most {left:.0f} s more)"

    def wait(self):
        """A Deferred firing once recovery is done."""
        if self.done:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def lnm_attached(self, name, handle):
        if self.done or name not in self.waiting:
            return
        self.waiting.discard(name)
        if not self.waiting:
            log.info("recovered: every LNM known before the restart is back after "
                     "{seconds:.2f} s", seconds=self.clock.seconds() - self.started_at)
            self._finish()

    def lnm_detached(self, name, handle):
        pass

    def _window_over(self):
        self._timer = None
        if self.done:
            return
        log.error("recovery window of {window:g} s over; {count} LNMs still away: {lnms}. "
                  "Their VMs are unknown until they reconnect", window=self.window,
                  count=len(self.waiting), lnms=some_names(self.waiting))
        self._finish()

    def _finish(self):
        self.done = True
        self.finished_at = self.clock.seconds()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self._on_done is not None:
            self._on_done()

    def stop(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class _AnnounceProtocol(LineOnlyReceiver, TimeoutMixin):
    MAX_LENGTH = 256

    def __init__(self, answered, term=None):
        self.answered = answered
        self.term = term

    def connectionMade(self):
        self.setTimeout(ANSWER_TIMEOUT)
        # With a standby controller the announcement carries the term of
        # leadership (``USHER-RECOVERY <protocol> <term>``); one controller
        # sends today's two tokens.
        line = f"{ANNOUNCEMENT} {PROTOCOL_VERSION}"
        if self.term is not None:
            line += f" {int(self.term)}"
        self.sendLine(line.encode("ascii"))

    def lineReceived(self, line):
        self.setTimeout(None)
        if not self.answered.called:
            self.answered.callback(line.decode("ascii", "replace"))
        self.transport.loseConnection()

    def lineLengthExceeded(self, line):
        self.transport.abortConnection()

    def timeoutConnection(self):
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.setTimeout(None)
        if not self.answered.called:
            self.answered.errback(reason)


class _AnnounceFactory(protocol.Factory):
    noisy = False

    def __init__(self, answered, term=None):
        self.answered = answered
        self.term = term

    def buildProtocol(self, addr):
        proto = _AnnounceProtocol(self.answered, self.term)
        proto.factory = self
        return proto


def announce(reactor, host, port, tls_options, *, timeout=ANSWER_TIMEOUT, term=None):
    """Say ``USHER-RECOVERY`` to one LNM -> Deferred firing with its answer
    line (``OK attached``, ``OK reconnecting`` …)."""
    answered = defer.Deferred()
    endpoint = wrapClientTLS(tls_options, HostnameEndpoint(reactor, host, port,
                                                           timeout=timeout))
    connecting = endpoint.connect(_AnnounceFactory(answered, term))

    def not_connected(failure):
        if not answered.called:
            answered.errback(failure)
    connecting.addErrback(not_connected)
    return answered


class RecoveryAnnouncer(service.Service):
    """Announces the controller's return to every LNM it knew, with backoff
    for those that do not answer, until they reattach or ``recovery`` is done.

    ``tls_options_for(name)`` gives the client TLS options for LNM ``name``
    (the controller's certificate; the LNM's must have role lnm and name
    ``name``).
    ``announce`` is the function that talks to one LNM (tests replace it).

    At most ``concurrency`` announcements are under way at once; the others
    wait their turn, and an LNM that reattached meanwhile (LNMs redial on
    their own too) is not announced to. A few LNMs hear at once; of hundreds,
    the many that come back by themselves within a second or two cost no TLS
    handshake each, which the controller would pay while they reattach.
    """

    def __init__(self, known_lnms, recovery, *, reactor, tls_options_for, clock=None,
                 initial_delay=1.0, max_delay=15.0, announce=announce,
                 concurrency=ANNOUNCE_CONCURRENCY):
        self.known_lnms = known_lnms
        self.recovery = recovery
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.tls_options_for = tls_options_for
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self._announce = announce
        self._retries = {}
        self.concurrency = concurrency
        self._queue = collections.deque()   # (name, attempt) waiting their turn
        self._under_way = 0
        self.answers = {}     # LNM name -> last answer (or error), for tests and logs

    def startService(self):
        super().startService()
        self._queue.extend((name, 0) for name in sorted(self.recovery.waiting))
        self._next_turns()

    def _next_turns(self):
        while self._under_way < self.concurrency and self._queue:
            name, attempt = self._queue.popleft()
            if self._send(name, attempt):
                self._under_way += 1

    def _queued(self, name, attempt):
        self._retries.pop(name, None)
        self._queue.append((name, attempt))
        self._next_turns()

    def stopService(self):
        super().stopService()
        for call in self._retries.values():
            if call.active():
                call.cancel()
        self._retries.clear()
        self._queue.clear()

    def _wanted(self, name):
        return self.running and not self.recovery.done and name in self.recovery.waiting

    def _send(self, name, attempt):
        """Announce to ``name`` -> True if an announcement is under way."""
        if not self._wanted(name):
            return False
        entry = self.known_lnms.entries.get(name) or {}
        host, port = entry.get("recovery_host"), entry.get("recovery_port")
        if not host or not isinstance(port, int):
            log.warn("LNM {lnm} left no recovery address; it will reconnect on its own",
                     lnm=name)
            return False
        try:
            options = self.tls_options_for(name)
        except Exception as e:
            log.error("cannot announce recovery to LNM {lnm}: {error}", lnm=name, error=e)
            return False
        d = self._announce(self.reactor, host, port, options)

        def turn_over(result):
            self._under_way -= 1
            self._next_turns()
            return result

        def answered(line):
            self.answers[name] = line
            log.info("recovery announced to LNM {lnm} at {host}:{port}: {answer}",
                     lnm=name, host=host, port=port, answer=line)
            # Again later if it is still not back (e.g. it believed itself
            # attached over a connection that leads nowhere any more).
            self._again(name, attempt)

        def failed(failure):
            self.answers[name] = f"error: {failure.getErrorMessage()}"
            log.info("recovery announcement to LNM {lnm} at {host}:{port} failed: "
                     "{error}", lnm=name, host=host, port=port,
                     error=failure.getErrorMessage())
            self._again(name, attempt)

        d.addCallbacks(answered, failed)
        d.addBoth(turn_over)
        return True

    def _again(self, name, attempt):
        if not self._wanted(name):
            return
        delay = min(self.initial_delay * 2 ** attempt, self.max_delay)
        self._retries[name] = self.clock.callLater(delay, self._queued, name, attempt + 1)


class RecoveryService(service.Service):
    """At start: recovering if the controller knew LNMs before (``Recovery``,
    set as ``controller.recovery``), and announcing its return to them
    (``RecoveryAnnouncer``). Start it before the listeners."""

    def __init__(self, controller, *, reactor, window, tls_options_for, clock=None,
                 announce=announce, term=None):
        self.controller = controller
        # The term of leadership to announce (None: one controller).
        self.term = term
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.window = window
        self.tls_options_for = tls_options_for
        self._announce = announce
        self.recovery = None
        self.announcer = None

    def startService(self):
        super().startService()
        known = self.controller.known_lnms
        expected = sorted(known.entries) if known is not None else []
        self.recovery = Recovery(expected, clock=self.clock, window=self.window,
                                 on_done=self.controller.resolve_soon)
        self.controller.recovery = self.recovery
        self.controller.watch_lnms(self.recovery)
        if expected:
            send = self._announce
            if self.term is not None:
                send = functools.partial(send, term=self.term)
            self.announcer = RecoveryAnnouncer(known, self.recovery, reactor=self.reactor,
                                               clock=self.clock,
                                               tls_options_for=self.tls_options_for,
                                               announce=send)
            self.announcer.startService()

    def stopService(self):
        super().stopService()
        if self.announcer is not None and self.announcer.running:
            self.announcer.stopService()
        if self.recovery is not None:
            self.recovery.stop()
