"""A TCP proxy a test or the benchmark controls, to cut the link between two
live processes (tests/test_failures_e2e.py; figure 5 of bench/run.py).

``CuttableProxy`` listens on 127.0.0.1 and forwards every connection to a
target. ``cut()`` models a network partition as TCP sees it: nothing gets
through and nothing is closed — bytes, closes and new connections are held
(as a real network loses packets that TCP then retransmits); ``heal()``
delivers everything held, in order. Peers that gave up meanwhile (their
heartbeat timed out and they aborted) find their connection gone, as they
would over a real network.
"""

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint


class _Side(protocol.Protocol):
    """One end of a proxied pair: ``outer`` (the client's) or ``inner`` (the
    target's)."""

    def __init__(self, pair, which):
        self.pair = pair
        self.which = which

    def connectionMade(self):
        self.pair.side_up(self)

    def dataReceived(self, data):
        self.pair.forward(self, ("data", data))

    def connectionLost(self, reason):
        self.pair.forward(self, ("close", None))


class _Pair:
    def __init__(self, proxy):
        self.proxy = proxy
        self.outer = None
        self.inner = None
        self.held = []          # (destination "outer"/"inner", event) while cut or connecting
        self.closed = False

    def side_up(self, side):
        setattr(self, side.which, side)
        self.flush()

    def other(self, which):
        return "inner" if which == "outer" else "outer"

    def forward(self, side, event):
        self.held.append((self.other(side.which), event))
        self.flush()

    def flush(self):
        if self.proxy.is_cut:
            return
        while self.held:
            destination, (kind, data) = self.held[0]
            side = getattr(self, destination)
            if side is None:
                return          # still connecting to the target
            self.held.pop(0)
            if kind == "data":
                side.transport.write(data)
            else:
                side.transport.loseConnection()


class _OuterFactory(protocol.Factory):
    def __init__(self, proxy):
        self.proxy = proxy

    def buildProtocol(self, addr):
        pair = _Pair(self.proxy)
        self.proxy.pairs.append(pair)
        self.proxy.connections += 1
        side = _Side(pair, "outer")
        self.proxy.connect_inner(pair)
        return side


class CuttableProxy:
    def __init__(self, reactor, target_host, target_port):
        self.reactor = reactor
        self.target_host = target_host
        self.target_port = target_port
        self.is_cut = False
        self.pairs = []
        self.connections = 0
        self._port = None
        self._pending_connects = []

    @property
    def port(self):
        return self._port.getHost().port

    async def start(self, port=0):
        self._port = await TCP4ServerEndpoint(self.reactor, port,
                                              interface="127.0.0.1").listen(
            _OuterFactory(self))
        return self.port

    def connect_inner(self, pair):
        if self.is_cut:
            self._pending_connects.append(pair)
            return
        factory = protocol.Factory.forProtocol(lambda: _Side(pair, "inner"))
        d = TCP4ClientEndpoint(self.reactor, self.target_host, self.target_port).connect(
            factory)

        def refused(failure):
            if pair.outer is not None:
                pair.outer.transport.loseConnection()
        d.addErrback(refused)

    def cut(self):
        """Hold everything: no byte, close or new connection gets through."""
        self.is_cut = True

    def heal(self):
        """Deliver everything held, in order."""
        self.is_cut = False
        pending, self._pending_connects = self._pending_connects, []
        for pair in pending:
            self.connect_inner(pair)
        for pair in list(self.pairs):
            pair.flush()

    async def stop(self):
        self.heal()
        for pair in self.pairs:
            for side in (pair.outer, pair.inner):
                if side is not None and side.transport is not None:
                    side.transport.abortConnection()
        if self._port is not None:
            await defer.maybeDeferred(self._port.stopListening)
