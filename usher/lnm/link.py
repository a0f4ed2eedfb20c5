"""The LNM's outgoing link to the controller.

The LNM dials the controller (mutual TLS; its certificate's CN is its name
there) and, on every new connection, calls ``attach(node_api, hello)`` on the
controller's root object, getting back the controller's reporter. The
NodeManager reports through it until the connection drops; then it queues its
changes until the next attach.

Attaching happens in the factory's ``clientConnectionMade`` (the buildbot
pattern), not in ClientService's ``prepareConnection``, which can wedge the
service when the link drops during PB's handshake. ClientService only keeps
the connection up, with exponential backoff between attempts.
"""

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.logger import Logger
from twisted.spread import pb

from usher import records
from usher.errors import UsherError
from usher.pbutil import call
from usher.protocol import PROTOCOL_VERSION

RECONNECT_FACTOR = 2.0


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


class ControllerLinkFactory(pb.PBClientFactory):
    """Attaches to the controller on every new connection."""

    log = Logger()
    noisy = False  # ClientService logs each attempt already

    def __init__(self, manager, node_api, *, clock, call_timeout, recovery_port=None):
        super().__init__()
        self.manager = manager
        self.node_api = node_api
        self.clock = clock
        self.call_timeout = call_timeout
        self.recovery_port = recovery_port
        self.attached_broker = None
        self.attach_count = 0
        self._attach_waiters = []

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
        broker.notifyOnDisconnect(lambda: self._connection_lost(broker))
        defer.Deferred.fromCoroutine(self._attach(broker))

    async def _attach(self, broker):
        hello = {"protocol": PROTOCOL_VERSION, "recovery_port": self.recovery_port}
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
            # Drop the connection: ClientService dials again after a delay.
            self.log.error("LNM {lnm} could not attach to the controller: {error}",
                           lnm=self.manager.name, error=str(e) or e.__class__.__name__)
            broker.transport.loseConnection()
            return
        if broker.disconnected:
            return
        self.attached_broker = broker
        self.attach_count += 1
        self.manager.set_reporter(RemoteReporter(reporter, clock=self.clock,
                                                 timeout=self.call_timeout))
        self.log.info("LNM {lnm} attached to the controller at {peer}",
                      lnm=self.manager.name, peer=_peer(broker))
        waiters, self._attach_waiters = self._attach_waiters, []
        for waiter in waiters:
            waiter.callback(self.attach_count)

    def cancel_waiters(self):
        waiters, self._attach_waiters = self._attach_waiters, []
        for waiter in waiters:
            waiter.errback(defer.CancelledError("the controller link stopped"))

    def detach(self):
        """Stop reporting through the current connection (on purpose)."""
        if self.attached_broker is not None:
            self.attached_broker = None
            self.manager.set_reporter(None)

    def _connection_lost(self, broker):
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


class ControllerLink(ClientService):
    """Keeps the LNM connected and attached to the controller.

    ``endpoint`` is a client endpoint (in production TLS with the LNM's
    certificate, see ``usher.lnm.service``); ``retry_policy`` defaults to
    exponential backoff from ``initial_delay`` to ``max_delay`` seconds.
    """

    def __init__(self, endpoint, manager, node_api, *, clock, call_timeout,
                 recovery_port=None, initial_delay=1.0, max_delay=30.0, retry_policy=None):
        self.factory = ControllerLinkFactory(manager, node_api, clock=clock,
                                             call_timeout=call_timeout,
                                             recovery_port=recovery_port)
        if retry_policy is None:
            retry_policy = backoffPolicy(initial_delay, max_delay, RECONNECT_FACTOR)
        super().__init__(endpoint, self.factory, retryPolicy=retry_policy, clock=clock)

    @property
    def attached(self):
        return self.factory.attached

    def when_attached(self):
        return self.factory.when_attached()

    def stopService(self):
        d = super().stopService()
        # Detach now, not when the connection's last bytes have gone.
        self.factory.detach()
        self.factory.cancel_waiters()
        return d
