"""A hostile client of the controller's client port, for the security and
fuzz tests: raw PB over real TLS (no UsherClient in the way: any method, any
arguments, hand-made jelly, pipelined calls), raw bytes over TLS, and a log
capture."""

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.logger import formatEvent, globalLogPublisher
from twisted.spread import banana, pb

from usher import pki


def _endpoint(port, ca_file):
    return wrapClientTLS(pki.client_tls_options("localhost", ca_file),
                         TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10))


class RawPB:
    """A PB connection: ``root`` (the LoginGateway), ``broker``, ``lost``
    (fires when the connection ends)."""

    def __init__(self, factory, broker, root):
        self.factory = factory
        self.broker = broker
        self.root = root
        self.lost = defer.Deferred()
        broker.notifyOnDisconnect(lambda: self.lost.called or self.lost.callback(None))

    @property
    def connected(self):
        return not self.broker.disconnected

    @property
    def local_port(self):
        return self.broker.transport.getHost().port

    def send(self, luid, method, net_args, net_kw=None):
        """A message with hand-made jelly (s-expressions, their strings as
        str) as the arguments to the object ``luid`` -> Deferred of its answer."""
        request_id = self.broker.newRequestID()
        answer = defer.Deferred()
        self.broker.waitingForAnswers[request_id] = answer
        self.broker.sendCall(b"message", request_id, _as_bytes(luid), _as_bytes(method), 1,
                             _as_bytes(net_args),
                             _as_bytes(net_kw if net_kw is not None else ["dictionary"]))
        return answer

    def close(self):
        if self.connected:
            self.broker.transport.loseConnection()
        return self.lost


def _as_bytes(sexp):
    if isinstance(sexp, str):
        return sexp.encode("utf-8")
    if isinstance(sexp, (list, tuple)):
        return [_as_bytes(item) for item in sexp]
    return sexp


class _HostileBroker(pb.Broker):
    """A client broker that shrugs off the controller's decref of a
    reference it never gave (hand-made jelly makes the controller hold
    ``["remote", 99999]``): the test is about the controller."""

    def proto_decref(self, objectID):
        if objectID in self.localObjects:
            super().proto_decref(objectID)


class _HostileFactory(pb.PBClientFactory):
    protocol = _HostileBroker


async def connect_pb(port, ca_file):
    factory = _HostileFactory()
    broker = await _endpoint(port, ca_file).connect(factory)
    root = await factory.getRootObject()
    return RawPB(factory, broker, root)


async def logged_in(port, ca_file, user, password):
    """-> (RawPB, the user's perspective RemoteReference)."""
    raw = await connect_pb(port, ca_file)
    perspective = await raw.root.callRemote("login", user, password, None)
    return raw, perspective


class RawTLS(protocol.Protocol):
    """Bytes over TLS: ``lost`` fires when the server closes."""

    def __init__(self):
        self.lost = defer.Deferred()
        self.received = b""

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost.callback(None)


async def connect_tls(port, ca_file):
    return await connectProtocol(_endpoint(port, ca_file), RawTLS())


def _b128(number):
    digits = []
    banana.int2b128(number, digits.append)
    return b"".join(digits)


def banana_string(size):
    """The banana encoding of a string of ``size`` bytes (its header and body)."""
    return _b128(size) + banana.STRING + b"x" * size


def banana_list_header(length):
    """The start of a banana list of ``length`` items (they follow)."""
    return _b128(length) + banana.LIST


def remote_type(error):
    """The class name of the error a PB call failed with ("usher.errors.X"
    for an Usher error from the controller): of a Failure, or of the
    pb.RemoteError an awaited call raised."""
    kind = error.remoteType if isinstance(error, pb.RemoteError) else error.type
    if isinstance(kind, bytes):
        kind = kind.decode("utf-8", "replace")
    return kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"


class LogCapture:
    """Every log event while active: ``events``; ``texts()`` formatted."""

    def __init__(self):
        self.events = []

    def __enter__(self):
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self.events.append)

    def texts(self):
        out = []
        for event in self.events:
            text = formatEvent(event) or ""
            failure = event.get("log_failure")
            if failure is not None:
                text += "\n" + failure.getTraceback()
            out.append(text)
        return out

    def problems(self):
        """Events that are errors: failures, tracebacks, error levels."""
        from twisted.logger import LogLevel
        return [text for event, text in zip(self.events, self.texts())
                if "log_failure" in event or event.get("isError")
                or event.get("log_level") in (LogLevel.error, LogLevel.critical)
                or "Peer will receive" in text or "Unhandled" in text]
