"""A TCP relay that can fall silent: between one fleet LNM and the controller,
to make that LNM's link go quiet without closing it (figure 5).

``freeze()`` holds every byte, close and new connection, as a network
partition does (TCP sees nothing at all); ``thaw()`` delivers what was held,
in order. A peer that gave up meanwhile has aborted its own end.
"""

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint


class _End(protocol.Protocol):
    def __init__(self, pair, which):
        self.pair = pair
        self.which = which

    def connectionMade(self):
        setattr(self.pair, self.which, self)
        self.pair.flush()

    def dataReceived(self, data):
        self.pair.relay(self.which, ("data", data))

    def connectionLost(self, reason):
        self.pair.relay(self.which, ("close", None))


class _Pair:
    def __init__(self, relay):
        self.relay_ = relay
        self.outer = self.inner = None
        self.held = []

    def relay(self, source, event):
        self.held.append(("inner" if source == "outer" else "outer", event))
        self.flush()

    def flush(self):
        if self.relay_.frozen:
            return
        while self.held:
            destination, (kind, data) = self.held[0]
            end = getattr(self, destination)
            if end is None:
                return          # still connecting to the target
            self.held.pop(0)
            if kind == "data":
                end.transport.write(data)
            else:
                end.transport.loseConnection()


class SilenceableRelay:
    def __init__(self, reactor, target_host, target_port):
        self.reactor = reactor
        self.target = (target_host, target_port)
        self.frozen = False
        self.pairs = []
        self._waiting = []
        self._port = None

    @property
    def port(self):
        return self._port.getHost().port

    async def start(self):
        relay = self

        class Outer(protocol.Factory):
            def buildProtocol(self, addr):
                pair = _Pair(relay)
                relay.pairs.append(pair)
                relay._connect(pair)
                return _End(pair, "outer")

        self._port = await TCP4ServerEndpoint(self.reactor, 0,
                                              interface="127.0.0.1").listen(Outer())
        return self.port

    def _connect(self, pair):
        if self.frozen:
            self._waiting.append(pair)
            return
        factory = protocol.Factory.forProtocol(lambda: _End(pair, "inner"))
        d = TCP4ClientEndpoint(self.reactor, *self.target).connect(factory)
        d.addErrback(lambda _f: pair.outer and pair.outer.transport.loseConnection())

    def freeze(self):
        self.frozen = True

    def thaw(self):
        self.frozen = False
        waiting, self._waiting = self._waiting, []
        for pair in waiting:
            self._connect(pair)
        for pair in list(self.pairs):
            pair.flush()

    async def stop(self):
        self.thaw()
        for pair in self.pairs:
            for end in (pair.outer, pair.inner):
                if end is not None and end.transport is not None:
                    end.transport.abortConnection()
        if self._port is not None:
            await defer.maybeDeferred(self._port.stopListening)
