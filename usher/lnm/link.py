"""The LNM's outgoing link to the controller.

The LNM dials the controller (mutual TLS; its certificate's CN is its name
there) and, on every new connection, calls ``attach(node_api, hello)`` on the
controller's root object, getting back the controller's reporter. The
NodeManager reports through it until the connection drops; then it queues its
changes until the next attach.

Attaching happens in the factory's ``clientConnectionMade`` (the buildbot
pattern), not in ClientService's ``prepareConnection``, which can wedge the
service when the link drops during PB's handshake. ClientService only keeps
the connection up, with exponential backoff between attempts; a recovery
announcement from a restarted controller (``usher.lnm.recovery``) brings the
next attempt forward (``retry_now``).

With several controllers configured (high availability, ``controller_host``
a list; ``usher.controllers.Rotation``) the link dials them in turn: a
failed connection or a refused attach (a standby answers ``Standby``) moves
to the next one at once, a lost link too, and the backoff applies only
after a full round without success. The term gate (``usher.lnm.terms``)
decides which controller is obeyed; a connection it found stale counts as
a refusal. With one controller nothing of this applies: the endpoint and
the retry policy are today's.

Once attached, the LNM pings the controller every ``ping_interval`` seconds and
drops a connection that has not answered for ``ping_timeout`` seconds (a cut
link sends no FIN), and TCP keepalive watches beneath; the controller does
the same from its side (``usher.controller.liveness``).
"""

import random

from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.spread import pb

from usher import records
from usher.controllers import Rotation
from usher.errors import Standby, UsherError
from usher.liveness import (HEARTBEAT_TICK, HeardBroker, Heartbeat, enable_tcp_keepalive,
                            ping_peer)
from usher.pbutil import call
from usher.protocol import PROTOCOL_VERSION

RECONNECT_FACTOR = 2.0
# Retries at about initial_delay (plus jitter) after a link is lost, before
# the backoff grows: a controller restarting (a crash, an upgrade, a
# failover) is back within seconds, and a refused connection costs its host
# nothing. With 2,000 LNMs, doubling from the first retry left most of them
# waiting 4-8 s more for a controller that had been back for seconds.
QUICK_RETRIES = 5


def reconnect_policy(initial_delay, max_delay, factor=RECONNECT_FACTOR,
                     quick=QUICK_RETRIES, jitter=random.random):
    """The seconds before reconnection attempt ``attempt`` (1, 2, ...):
    ``initial_delay`` for the first ``quick`` attempts, then doubling up to
    ``max_delay``; plus up to a second of jitter, so that LNMs do not all
    dial at once."""
    def policy(attempt):
        # (With several controllers an attempt is a whole round of them.)
        if attempt <= quick:
            delay = min(initial_delay, max_delay)
        else:
            delay = min(initial_delay * factor ** min(attempt - quick, 64), max_delay)
        return delay + jitter()
    return policy


class RemoteReporter:
    """The controller's reporter reference as a NodeManager reporter."""

    def __init__(self, remote, *, clock, timeout):
        self.remote = remote
        self.clock = clock
        self.timeout = timeout

    async def report(self, changes):
        reply = await call(self.remote, "report", records.encode_chunks(changes),
                           timeout=self.timeout, clock=self.clock)
        return records.decode_records(reply)

    async def report_status(self, node, vms, kept=None):
        """The monitor's figures: the node's as one JSON object, the VMs' as
        JSON chunks, and the names of the VMs kept as JSON chunks (a delta;
        None: a full report, as to an older controller). -> the controller's
        answer (usher.protocol, report_status)."""
        args = [records.encode_object(node), records.encode_chunks(vms)]
        if kept is not None:
            args.append(records.encode_chunks(kept))
        return await call(self.remote, "report_status", *args, timeout=self.timeout,
                          clock=self.clock)


class ControllerLinkFactory(pb.PBClientFactory):
    """Attaches to the controller on every new connection."""

    log = Logger()
    noisy = False  # ClientService logs each attempt already
    # Notes when the controller last sent anything (for the heartbeat).
    protocol = HeardBroker

    def __init__(self, manager, node_api, *, clock, call_timeout, recovery_port=None,
                 ping_interval=None, ping_timeout=None, rotation=None):
        super().__init__()
        # Several controllers: which one is dialed, what became of it.
        self.rotation = rotation
        self.on_redial = None
        self._redial_broker = None
        self.manager = manager
        self.node_api = node_api
        self.clock = clock
        self.call_timeout = call_timeout
        # An int, None, or a callable giving either (the listener may fail).
        self.recovery_port = recovery_port
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.attached_broker = None
        self.connected_broker = None
        self.attach_count = 0
        self._attach_waiters = []
        self._heartbeat = None

    @property
    def attached(self):
        return self.attached_broker is not None

    def when_attached(self):
        """A Deferred firing (with the attach count) once attached: now if
        attached, else at the next attach."""
        if self.attached:
            return defer.succeed(self.attach_count)
        d = defer.Deferred()
        self._attach_waiters.append(d)
        return d

    def clientConnectionMade(self, broker):
        super().clientConnectionMade(broker)
        self.connected_broker = broker
        broker.notifyOnDisconnect(lambda: self._connection_lost(broker))
        if self.ping_interval and self.ping_timeout:
            enable_tcp_keepalive(broker.transport, interval=self.ping_interval,
                                 timeout=self.ping_timeout)
        begin_session = getattr(self.manager, "begin_session", None)
        if begin_session is not None:
            # Whatever the LNM tells this controller starts from the
            # inventory it is about to ask for.
            begin_session()
        defer.Deferred.fromCoroutine(self._attach(broker))

    def _advertised_recovery_port(self):
        port = self.recovery_port() if callable(self.recovery_port) else self.recovery_port
        return port if isinstance(port, int) else None

    def hello(self):
        """What attach tells the controller of this LNM (usher.protocol)."""
        return {"protocol": PROTOCOL_VERSION,
                "recovery_port": self._advertised_recovery_port(),
                "destroy_keeps": True}

    async def _attach(self, broker):
        hello = self.hello()
        root = broker.remoteForName("root")
        try:
            reporter = await call(root, "attach", self.node_api, hello,
                                  timeout=self.call_timeout, clock=self.clock)
            if not isinstance(reporter, pb.RemoteReference):
                raise UsherError(f"attach returned {type(reporter).__name__}, "
                                 "not a reporter reference")
        except Exception as e:
            if broker.disconnected:
                return
            # Drop the connection: ClientService dials again after a delay
            # (with several controllers: the next one, at once).
            error = str(e) or e.__class__.__name__
            if isinstance(e, Standby) and self.rotation is not None:
                self.log.info("LNM {lnm}: the controller at {peer} is a standby ({error}); "
                              "trying the next one", lnm=self.manager.name,
                              peer=self._dialed(), error=error)
            else:
                self.log.error("LNM {lnm} could not attach to the controller{at}: {error}",
                               lnm=self.manager.name, error=error,
                               at="" if self.rotation is None else f" at {self._dialed()}")
            broker.usher_refused = error
            broker.transport.loseConnection()
            return
        if broker.disconnected:
            return
        if self.rotation is not None:
            self.rotation.succeeded()
        self.attached_broker = broker
        self.attach_count += 1
        self.manager.set_reporter(RemoteReporter(reporter, clock=self.clock,
                                                 timeout=self.call_timeout))
        self.log.info("LNM {lnm} attached to the controller at {peer}",
                      lnm=self.manager.name, peer=_peer(broker))
        self._start_heartbeat(broker, reporter)
        waiters, self._attach_waiters = self._attach_waiters, []
        for waiter in waiters:
            waiter.callback(self.attach_count)

    def _start_heartbeat(self, broker, reporter):
        self._stop_heartbeat()
        if not (self.ping_interval and self.ping_timeout):
            return

        def silent(silent_for):
            self.log.error("LNM {lnm}: the controller has not answered for {seconds:.1f} s "
                           "(timeout {timeout:g} s); dropping the connection",
                           lnm=self.manager.name, seconds=silent_for,
                           timeout=self.ping_timeout)
            # Not loseConnection: over a cut link the TLS goodbye would wait
            # forever for its bytes to leave.
            broker.transport.abortConnection()

        # Tell the controller every ping_interval of saying nothing (its
        # watch needs that); ask it only when its answers to our reports
        # stop coming, leaving two intervals for the answer.
        patience = max(self.ping_interval, self.ping_timeout - 2 * self.ping_interval)
        self._heartbeat = Heartbeat(
            lambda: ping_peer(broker, lambda: call(reporter, "ping", timeout=self.ping_timeout,
                                                   clock=self.clock),
                              clock=self.clock, timeout=self.ping_timeout),
            clock=self.clock, interval=self.ping_interval, timeout=self.ping_timeout,
            on_silent=silent, name="the controller", patience=patience,
            last_heard=lambda: broker.last_heard, tell=broker.tell_alive,
            last_sent=lambda: broker.last_sent, tick=HEARTBEAT_TICK).start()

    def _stop_heartbeat(self):
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.stop()

    def cancel_waiters(self):
        waiters, self._attach_waiters = self._attach_waiters, []
        for waiter in waiters:
            waiter.errback(defer.CancelledError("the controller link stopped"))

    def detach(self):
        """Stop reporting through the current connection (on purpose)."""
        self._stop_heartbeat()
        if self.attached_broker is not None:
            self.attached_broker = None
            self.manager.set_reporter(None)

    def _dialed(self):
        dialed = self.rotation.dialed if self.rotation is not None else None
        return dialed.label if dialed is not None else "?"

    def dial_around(self, broker):
        """Drop ``broker``'s connection and dial (around the list) at once."""
        self._redial_broker = broker
        if broker.transport is not None:
            broker.transport.abortConnection()

    def _rotate_after(self, broker):
        if self.rotation is None:
            return
        if getattr(broker, "usher_stale", False) or getattr(broker, "usher_refused", None):
            self.rotation.failed(getattr(broker, "usher_refused", None) or "stale term")
        elif broker is self.attached_broker or broker is self._redial_broker:
            self.rotation.lost()
        else:
            self.rotation.failed("the connection dropped before attaching")

    def _connection_lost(self, broker):
        self._rotate_after(broker)
        if broker is self._redial_broker:
            self._redial_broker = None
            if self.on_redial is not None:
                # Once ClientService has scheduled its next attempt.
                self.clock.callLater(0, self.on_redial)
        if self.connected_broker is broker:
            self.connected_broker = None
            begin_session = getattr(self.manager, "begin_session", None)
            if begin_session is not None:
                # What commands of this connection still finish answers no one.
                begin_session()
        if self.attached_broker is not broker:
            return
        self.detach()
        self.log.warn("LNM {lnm}: lost the controller; changes queue until it is back",
                      lnm=self.manager.name)


def _peer(broker):
    try:
        peer = broker.transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "?"


class _RetryClock:
    """The clock ClientService schedules its retries on. It remembers the
    pending retry so that ``ControllerLink.retry_now`` can bring it forward
    (ClientService itself has no way to)."""

    def __init__(self, clock):
        self._clock = clock
        self.pending_retry = None

    def callLater(self, delay, function, *args, **kwargs):
        call = self._clock.callLater(delay, function, *args, **kwargs)
        self.pending_retry = call
        return call

    def seconds(self):
        return self._clock.seconds()

    def getDelayedCalls(self):
        return self._clock.getDelayedCalls()


class ControllerLink(ClientService):
    """Keeps the LNM connected and attached to the controller.

    ``endpoint`` is a client endpoint (in production TLS with the LNM's
    certificate, see ``usher.lnm.service``); ``retry_policy`` defaults to
    ``reconnect_policy``: a few retries after ``initial_delay``, then
    exponential backoff up to ``max_delay`` seconds, with up to a second of
    random jitter so that LNMs do not all dial at once.
    ``ping_interval``/``ping_timeout`` (both or neither) turn on the heartbeat.
    ``endpoint`` may be a ``usher.controllers.Rotation`` (several
    controllers): the retry policy then applies after each full round.
    ``terms``: the LNM's TermGate (the term of the current connection).
    """

    def __init__(self, endpoint, manager, node_api, *, clock, call_timeout,
                 recovery_port=None, initial_delay=1.0, max_delay=30.0, retry_policy=None,
                 ping_interval=None, ping_timeout=None, terms=None):
        rotation = endpoint if isinstance(endpoint, Rotation) else None
        self.rotation = rotation
        self.terms = terms if terms is not None else getattr(node_api, "terms", None)
        self.factory = ControllerLinkFactory(manager, node_api, clock=clock,
                                             call_timeout=call_timeout,
                                             recovery_port=recovery_port,
                                             ping_interval=ping_interval,
                                             ping_timeout=ping_timeout, rotation=rotation)
        self.factory.on_redial = self.retry_now
        if retry_policy is None:
            retry_policy = reconnect_policy(initial_delay, max_delay)
        if rotation is not None:
            rotation.base_policy = retry_policy
            endpoint, retry_policy = rotation.endpoint, rotation.policy
        self._retry_clock = _RetryClock(clock)
        super().__init__(endpoint, self.factory, retryPolicy=retry_policy,
                         clock=self._retry_clock)

    @property
    def attached(self):
        return self.factory.attached

    def retry_now(self):
        """Dial the controller now if a reconnection attempt is only
        scheduled (a recovery announcement came). -> "attached", "connecting"
        (an attempt is already under way) or "reconnecting" (one starts now).
        """
        if self.factory.attached:
            return "attached"
        pending = self._retry_clock.pending_retry
        if (self.running and self.factory.connected_broker is None
                and pending is not None and pending.active()):
            pending.reset(0)
            return "reconnecting"
        return "connecting"

    def when_attached(self):
        return self.factory.when_attached()

    def current_term(self):
        """The term of the current connection (None when there is none)."""
        broker = self.factory.connected_broker
        if broker is None:
            return None
        return self.terms.term_of(broker) if self.terms is not None else 0

    def follow_term(self, term):
        """A recovery announcement of ``term`` (already recorded as the
        highest seen): a connection of a lower term is dropped and the list
        dialed around at once. -> "attached", "reconnecting" or "connecting"."""
        broker = self.factory.connected_broker
        if broker is not None and self.current_term() < term:
            self.factory.log.info("LNM {lnm}: a controller announced term {term}; dropping "
                                  "the link of term {old} and dialing again",
                                  lnm=self.factory.manager.name, term=term,
                                  old=self.current_term())
            self.factory.dial_around(broker)
            return "reconnecting"
        return self.retry_now()

    def stopService(self):
        d = super().stopService()
        # Detach now, not when the connection's last bytes have gone.
        self.factory.detach()
        self.factory.cancel_waiters()
        return d
