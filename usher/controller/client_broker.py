"""The client port's connections: the checks a peer passes before PB acts.

Until a connection has logged in, the peer is anyone who can reach the
port (README "Security"). ``ClientBroker`` holds it to a byte budget and a
login deadline and turns protocol errors into one bounded log line and a
closed connection; ``dispatch_call`` checks every call (method name, jelly,
signature, nesting) before PB decodes or logs its arguments.
"""

import inspect

from twisted.logger import Logger
from twisted.spread import pb

from usher.errors import InvalidRequest
from usher.liveness import enable_tcp_keepalive

log = Logger()

LOGIN_TIMEOUT = 30.0
PRELOGIN_BYTES = 64 * 1024
CONCURRENT_LOGINS = 16
# TCP keepalive on client connections: first probe after this many idle
# seconds, dropped after that many without an answer.
KEEPALIVE_INTERVAL = 30.0
KEEPALIVE_TIMEOUT = 90.0
# Longest method name a call may give; peer data is logged at most this long.
MAX_METHOD_NAME = 64
MAX_LOGGED = 200
# Deepest nesting of lists and dictionaries in a call's arguments (a
# selection is 3 deep).
MAX_NESTING = 32


def shown(value, limit=MAX_LOGGED):
    """Peer-controlled data as it may appear in the log: bounded, and its
    repr unless it is printable text (no forged lines)."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text)} characters)"
    return text


def shown_error(error):
    return shown(f"{type(error).__name__}: {error}")


def dispatch_call(target, broker, prefix, message, net_args, net_kw, perspective):
    """PB's ``remoteMessageReceived`` for objects a client can reach, without
    its failure modes: PB logs every argument of a call whose arguments do not
    fit (a password, megabytes of junk) and logs and answers a traceback for
    an unknown method or arguments it cannot decode. Here each of those is an
    InvalidRequest for the caller and nothing in the log but a bounded line."""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    if not isinstance(message, str) or not message.isidentifier() or \
            len(message) > MAX_METHOD_NAME:
        raise InvalidRequest(f"no such method: {shown(message, MAX_METHOD_NAME)}")
    method = getattr(target, prefix + message, None)
    if method is None:
        raise InvalidRequest(f"no such method: {message}")
    try:
        args = broker.unserialize(net_args, perspective)
        kw = broker.unserialize(net_kw, perspective)
    except Exception as e:
        log.info("refused a call of {method} from {peer}: its arguments cannot be decoded: "
                 "{error}", method=message, peer=peer_host(broker), error=shown_error(e))
        raise InvalidRequest(f"{message}: arguments that cannot be decoded "
                             f"({type(e).__name__})") from None
    if not isinstance(args, (list, tuple)) or not isinstance(kw, dict):
        raise InvalidRequest(f"{message}: malformed call")
    kw = {k.decode("utf-8", "replace") if isinstance(k, bytes) else k: v
          for k, v in kw.items()}
    problem = shape_problem((args, kw))
    if problem:
        raise InvalidRequest(f"{message}: {problem}")
    try:
        inspect.signature(method).bind(*args, **kw)
    except TypeError:
        params = ", ".join(p.name if p.default is p.empty else f"[{p.name}]"
                           for p in inspect.signature(method).parameters.values())
        raise InvalidRequest(f"{message}: wrong arguments; it takes ({params})") from None
    state = method(*args, **kw)
    return broker.serialize(state, perspective, method, args, kw)


def shape_problem(value):
    """What no Usher call carries, anywhere in its arguments: dictionaries
    whose keys are not strings, nesting deeper than MAX_NESTING. -> a
    description, or None."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, set, frozenset)):
            children = item
        elif isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                return "dictionary keys must be strings"
            children = item.values()
        else:
            continue
        if depth >= MAX_NESTING:
            return f"arguments nested deeper than {MAX_NESTING} levels"
        stack.extend((child, depth + 1) for child in children)
    return None


def peer_host(broker):
    try:
        peer = broker.transport.getPeer()
    except Exception:
        return "unknown"
    return getattr(peer, "host", None) or str(peer)


class ClientBroker(pb.Broker):
    """The broker of one client connection: the pre-login byte budget and
    deadline, TCP keepalive, and PB protocol errors turned into a bounded log
    line and a closed connection instead of an unhandled error that repeats
    what the peer sent."""

    logged_in = False
    received_before_login = 0
    _dropped = False
    _deadline = None
    _close_after_answer = False

    def connectionMade(self):
        super().connectionMade()
        factory = self.factory
        self._deadline = factory.clock.callLater(factory.login_timeout,
                                                 self._login_timed_out)
        enable_tcp_keepalive(self.transport, interval=KEEPALIVE_INTERVAL,
                             timeout=KEEPALIVE_TIMEOUT)

    @property
    def peer_host(self):
        return peer_host(self)

    def login_succeeded(self):
        self.logged_in = True
        self._cancel_deadline()

    def close_after_answer(self):
        """Close the connection once the next answer or error is sent."""
        self._close_after_answer = True

    def drop(self):
        if self._dropped:
            return
        self._dropped = True
        self._cancel_deadline()
        abort = getattr(self.transport, "abortConnection", None)
        (abort or self.transport.loseConnection)()

    def _cancel_deadline(self):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _login_timed_out(self):
        self._deadline = None
        if not self.logged_in:
            log.info("closing the connection from {peer}: no login within {timeout:g} s",
                     peer=self.peer_host, timeout=self.factory.login_timeout)
            self.drop()

    def dataReceived(self, data):
        if self._dropped:
            return
        if not self.logged_in:
            self.received_before_login += len(data)
            if self.received_before_login > self.factory.prelogin_bytes:
                log.warn("dropping the connection from {peer}: {count} bytes before logging "
                         "in (at most {limit})", peer=self.peer_host,
                         count=self.received_before_login, limit=self.factory.prelogin_bytes)
                self.drop()
                return
        try:
            super().dataReceived(data)
        except Exception as e:
            log.warn("dropping the connection from {peer}: protocol error: {error}",
                     peer=self.peer_host, error=shown_error(e))
            self.drop()

    def connectionLost(self, reason):
        self._cancel_deadline()
        super().connectionLost(reason)

    def sendCall(self, *exp):
        super().sendCall(*exp)
        if self._close_after_answer and exp and exp[0] in (b"answer", b"error"):
            self._close_after_answer = False
            self.transport.loseConnection()

    def proto_message(self, requestID, objectID, message, answerRequired, netArgs, netKw):
        _check_header(requestID, objectID, message, answerRequired)
        super().proto_message(requestID, objectID, message, answerRequired, netArgs, netKw)

    def proto_cachemessage(self, *args):
        raise pb.ProtocolError("no cached objects on this connection")

    def proto_didNotUnderstand(self, command):
        log.info("the client at {peer} did not understand {command}", peer=self.peer_host,
                 command=shown(command, MAX_METHOD_NAME))


def _check_header(request_id, object_id, message, answer_required):
    """Raise ProtocolError unless a message's header has the types PB sends."""
    if isinstance(message, bytes):
        try:
            message.decode("utf-8")
        except UnicodeDecodeError:
            raise pb.ProtocolError("a method name that is not UTF-8") from None
    if not (isinstance(request_id, int) and isinstance(answer_required, int)
            and isinstance(message, (str, bytes))
            and (isinstance(object_id, int)
                 or isinstance(object_id, (str, bytes)) and len(object_id) <= 16)):
        raise pb.ProtocolError("a malformed message header")
