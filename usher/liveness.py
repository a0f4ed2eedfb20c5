"""Noticing a silent peer: application-level heartbeats and TCP keepalive.

A peer that crashes is noticed at once (its kernel closes the connection), but
a peer behind a cut link, a frozen host or a dead NAT entry sends nothing at
all, and TCP on its own keeps such a connection open for hours. So both ends
of the controller-LNM link watch each other (``Heartbeat``: the LNM tells the
controller it is alive, either side asks when the other has gone quiet) and
give up on the connection after ``timeout`` seconds without hearing from it;
TCP keepalive and ``TCP_USER_TIMEOUT`` (``enable_tcp_keepalive``) are the
backstop beneath it, for a peer whose kernel is gone while the application's
messages are not due.
"""

import math
import socket

from twisted.internet import defer
from twisted.logger import Logger
from twisted.spread import pb

log = Logger()

# Heartbeat timers (and status reports, usher.lnm.monitor) fall on multiples
# of this many seconds of the clock, so that a controller watching hundreds
# of LNMs wakes up a few times a second for all of them rather than once per
# LNM and timer: on a virtual machine each wake-up of an idle process costs
# more CPU than the message that caused it.
HEARTBEAT_TICK = 0.5


def on_tick(clock, delay, tick):
    """``delay`` lengthened so that it ends on a multiple of ``tick`` seconds
    of ``clock`` (unchanged when ``tick`` is None or 0)."""
    if not tick:
        return delay
    now = clock.seconds()
    due = math.ceil((now + delay) / tick - 1e-9) * tick
    return max(0.0, due - now)


class Heartbeat:
    """Pings a peer every ``interval`` seconds; when no ping has been answered
    for ``timeout`` seconds, calls ``on_silent()`` once and stops.

    ``ping()`` returns a Deferred or an awaitable; any result counts as an
    answer, any failure as none. At most one ping is in flight: a peer that
    is slow to answer is not flooded. ``last_answer`` is the clock time of the
    latest answer (or of ``start``).

    ``last_heard()``, if given, is the clock time at which the peer last sent
    anything at all (a ``HeardBroker``'s ``last_heard``), or None: any traffic
    is a sign of life, so the peer is pinged only once it has been quiet for
    ``patience`` seconds (default ``interval``), and is silent once it has
    been quiet for ``timeout``. Of two peers watching each other this way, the
    one with less patience does the asking and keeps the other quiet: one
    ping per ``interval`` on the link instead of two. (The controller, which
    would otherwise ping hundreds of LNMs, waits longer; the LNMs tell.)

    ``tell()``, if given, sends a sign of life that needs no answer, and
    ``last_sent()`` is the clock time at which this side last sent anything
    (a ``HeardBroker``'s ``last_sent``): then, while the peer is heard from
    within ``patience``, this side tells it it is alive whenever it has sent
    nothing for ``interval`` seconds, and asks only once the peer has been
    quiet for ``patience``. One message per ``interval`` keeps the peer's
    watch satisfied where a ping costs two. (The LNMs tell; they ask the
    controller only when its answers to their reports stop coming.)

    ``tick``: every timer ends on a multiple of this many seconds (see
    ``HEARTBEAT_TICK``); pings and silence are then up to ``tick`` late.
    """

    def __init__(self, ping, *, clock, interval, timeout, on_silent, name="peer",
                 last_heard=None, patience=None, tick=None, tell=None, last_sent=None):
        if interval <= 0 or timeout <= 0:
            raise ValueError("heartbeat interval and timeout must be positive")
        if (tell is None) != (last_sent is None) or (tell is not None and last_heard is None):
            raise ValueError("tell needs last_sent and last_heard")
        self._ping = ping
        self._tell = tell
        self._last_sent = last_sent
        self._last_heard = last_heard
        self.patience = interval if patience is None else patience
        self.tick = tick
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self._on_silent = on_silent
        self.name = name
        self.last_answer = None
        self.running = False
        self._next = None
        self._watchdog = None
        self._in_flight = None

    def start(self):
        if self.running:
            return self
        self.running = True
        self.last_answer = self.clock.seconds()
        self._watchdog = self._later(self.timeout, self._expired)
        self._next = self._later(self.interval, self._beat)
        return self

    def _later(self, delay, function):
        return self.clock.callLater(on_tick(self.clock, delay, self.tick), function)

    def stop(self):
        self.running = False
        for call in (self._next, self._watchdog):
            if call is not None and call.active():
                call.cancel()
        self._next = self._watchdog = None
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.cancel()

    def heard(self):
        """Clock time of the latest sign of life: an answer, any traffic
        (``last_heard``) or ``start``."""
        heard = self._last_heard() if self._last_heard is not None else None
        if heard is None or (self.last_answer is not None and self.last_answer > heard):
            return self.last_answer
        return heard

    def _beat(self):
        self._next = None
        if not self.running:
            return
        now = self.clock.seconds()
        quiet_for = now - self.heard()
        if self._last_heard is not None and quiet_for < self.patience - 1e-6:
            # It spoke lately: ask only once it has been quiet for a while.
            wait = self.patience - quiet_for
            if self._tell is not None:
                said = self._last_sent()
                said_for = now - (said if said is not None else self.last_answer)
                if said_for >= self.interval - 1e-6:
                    self._tell()
                    said_for = 0.0
                wait = min(wait, self.interval - said_for)
            self._next = self._later(wait, self._beat)
            return
        self._next = self._later(self.interval, self._beat)
        if self._in_flight is not None:
            return
        try:
            d = defer.ensureDeferred(self._ping())
        except Exception as e:
            d = defer.fail(e)
        self._in_flight = d
        d.addCallbacks(self._answered, self._unanswered, callbackArgs=(d,),
                       errbackArgs=(d,))

    def _answered(self, _result, d):
        if self._in_flight is d:
            self._in_flight = None
        if not self.running:
            return
        self.last_answer = self.clock.seconds()
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.reset(on_tick(self.clock, self.timeout, self.tick))

    def _unanswered(self, failure, d):
        if self._in_flight is d:
            self._in_flight = None
        if self.running and not failure.check(defer.CancelledError):
            log.debug("ping of {peer} failed: {error}", peer=self.name,
                      error=failure.getErrorMessage())

    def _expired(self, last_look=False):
        self._watchdog = None
        if not self.running:
            return
        silent_for = self.clock.seconds() - self.heard()
        if silent_for < self.timeout - 1e-6:
            # Heard from it since (traffic, not an answer): not silent yet.
            self._watchdog = self._later(self.timeout - silent_for, self._expired)
            return
        if not last_look:
            # A reactor runs its due timers before it reads its sockets: after
            # this process stalled (a long plugin, a big request), the peer's
            # message may be waiting unread. Judge after one more turn.
            self._watchdog = self.clock.callLater(0, self._expired, True)
            return
        self.stop()
        self._on_silent(silent_for)


# The broker-level ping and its answer: PB messages of their own (a broker
# dispatches ``[command, ...]`` to ``proto_<command>``), two banana items
# each, where a remote call and its answer take fifteen plus a Deferred, a
# jelly pass and an object lookup. At 100 pings a second from 500 LNMs that
# is most of an idle controller's work.
HEARTBEAT = b"usher_heartbeat"
HEARTBEAT_ANSWER = b"usher_heartbeat_answer"
ALIVE = b"usher_alive"          # the same, wanting no answer


class HeardBroker(pb.Broker):
    """A PB broker that notes when its peer last sent anything:
    ``last_heard``, and when it last sent anything itself: ``last_sent``,
    on its factory's ``clock`` (None until then, or without a clock). For
    ``Heartbeat(last_heard=..., last_sent=...)``.

    It also pings at the protocol level (``heartbeat()``) and answers such
    pings while ``answers_heartbeats``, and tells its peer it is alive
    without asking for an answer (``tell_alive()``). Both ends must be
    HeardBrokers: a plain broker cannot even say it did not understand (its
    answer, a str, is more than banana can send). The controller and its
    LNMs speak the same protocol version (``usher.protocol``), so they are."""

    last_heard = None
    last_sent = None
    answers_heartbeats = True

    def connectionMade(self):
        super().connectionMade()
        self._heartbeats = []

    def dataReceived(self, data):
        clock = getattr(self.factory, "clock", None)
        if clock is not None:
            self.last_heard = clock.seconds()
        super().dataReceived(data)

    def sendEncoded(self, obj):
        clock = getattr(self.factory, "clock", None)
        if clock is not None:
            self.last_sent = clock.seconds()
        super().sendEncoded(obj)

    def tell_alive(self):
        """A sign of life that needs no answer (ignored if disconnected)."""
        if not self.disconnected:
            self.sendCall(ALIVE)

    def proto_usher_alive(self):
        pass    # hearing it was the point (dataReceived noted the time)

    def heartbeat(self):
        """Ask the peer for a sign of life -> Deferred, fired when it answers
        (failed if the connection is lost first). Pings in flight share the
        next answer."""
        if self.disconnected:
            return defer.fail(pb.PBConnectionLost("heartbeat: not connected"))
        answer = defer.Deferred(self._forget_heartbeat)
        self._heartbeats.append(answer)
        self.sendCall(HEARTBEAT)
        return answer

    def _forget_heartbeat(self, answer):
        if answer in self._heartbeats:
            self._heartbeats.remove(answer)

    def proto_usher_heartbeat(self):
        if self.answers_heartbeats:
            self.sendCall(HEARTBEAT_ANSWER)

    def proto_usher_heartbeat_answer(self):
        answers, self._heartbeats = self._heartbeats, []
        for answer in answers:
            answer.callback(True)

    def connectionLost(self, reason):
        answers, self._heartbeats = getattr(self, "_heartbeats", []), []
        super().connectionLost(reason)
        for answer in answers:
            answer.errback(pb.PBConnectionLost("heartbeat: connection lost"))


def ping_peer(broker, fallback, *, clock, timeout):
    """One ping of the peer at the other end of ``broker``: a protocol-level
    heartbeat when ``broker`` can (a ``HeardBroker``), else ``fallback()`` (a
    remote call) -> Deferred, failed after ``timeout`` seconds unanswered."""
    if not isinstance(broker, HeardBroker):
        return defer.ensureDeferred(fallback())
    return broker.heartbeat().addTimeout(timeout, clock)


def _tcp_transport(transport):
    """The TCP transport under a TLS one (or the transport itself)."""
    seen = 0
    while transport is not None and seen < 4:
        if hasattr(transport, "setTcpKeepAlive") and hasattr(transport, "getHandle"):
            handle = transport.getHandle()
            if isinstance(handle, socket.socket):
                return transport
        transport = getattr(transport, "transport", None)
        seen += 1
    return None


def enable_tcp_keepalive(transport, *, interval, timeout):
    """Turn on TCP keepalive (first probe after ``interval`` idle seconds, then
    every ``interval`` seconds, dead after ``timeout``) and bound how long sent
    data may stay unacknowledged (``TCP_USER_TIMEOUT``) on the TCP connection
    under ``transport``. -> True if the options were set. Options a platform
    lacks are skipped: keepalive is the backstop, the heartbeat the detector.
    """
    tcp = _tcp_transport(transport)
    if tcp is None:
        return False
    try:
        tcp.setTcpKeepAlive(True)
        sock = tcp.getHandle()
        idle = max(1, int(math.ceil(interval)))
        probes = max(1, int(math.ceil(timeout / idle)))
        for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", idle),
                              ("TCP_KEEPCNT", probes),
                              ("TCP_USER_TIMEOUT", int(timeout * 1000))):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except OSError as e:
        log.warn("could not enable TCP keepalive: {error}", error=e)
        return False
    return True
