"""A Perspective Broker connection inside one process, for the in-process grid
(``tests.grid``).

After Tahoe-LAFS's ``no_network.LocalWrapper``: a call crosses to its peer on
a later reactor turn and runs the peer's real ``remote_*`` method. Here two
real ``pb.Broker``s are joined by an in-memory transport, so all that PB does
over TCP happens: jelly with the brokers' security, banana with its dialect
and size limits (a value PB could not send fails here too), remote
references handed over in calls, errors as PB sends them (a ``pb.Error`` by
class name; anything else logged and sent as a ``CopiedFailure``), and, when
the connection drops, ``PBConnectionLost`` for the calls in flight,
``DeadReferenceError`` for new ones and the brokers' disconnect notifications.

Each direction has switches (``Faults``) that make its calls fail as a faulty
link makes them fail: never sent, sent and lost (outcome unknown), carried out
with the answer lost, held until a Deferred fires, answered with an error.
Deliveries wait in an ``EventualQueue`` that a test can flush.
"""

import functools
import itertools
from collections import Counter, deque

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import pb

log = Logger()

# Values of Faults.broken besides False: every call fails as over a dropped
# connection, before it leaves (pbutil: "not sent", nothing happened) or after
# (the connection dropped with it in flight: its outcome is unknown).
NOT_SENT = "not sent"
SENT = "sent"

_ports = itertools.count(40000)


class EventualQueue:
    """Calls run on later turns of ``clock``, in the order queued (foolscap's
    eventual send): what a turn queues runs on the next one."""

    def __init__(self, clock):
        self.clock = clock
        self._queue = deque()
        self._turn_call = None
        self._flush_waiters = []
        self.stopped = False

    def eventually(self, function, *args):
        if self.stopped:
            return
        self._queue.append((function, args))
        if self._turn_call is None:
            self._turn_call = self.clock.callLater(0, self._turn)

    def _turn(self):
        self._turn_call = None
        for _ in range(len(self._queue)):
            function, args = self._queue.popleft()
            try:
                function(*args)
            except Exception:
                log.failure("an eventual delivery failed")
        if self._queue:
            self._turn_call = self.clock.callLater(0, self._turn)
        else:
            waiters, self._flush_waiters = self._flush_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def __len__(self):
        return len(self._queue)

    def flush(self):
        """-> Deferred firing once a turn ends with nothing left queued
        (what is held by a switch is not queued)."""
        if not self._queue:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._flush_waiters.append(waiter)
        return waiter

    def stop(self):
        """Drop what is queued and queue nothing more."""
        self.stopped = True
        self._queue.clear()
        if self._turn_call is not None and self._turn_call.active():
            self._turn_call.cancel()
        self._turn_call = None


class Faults:
    """What the link does to the calls one end makes (method names as sent).

    - ``broken``: False; ``True`` or ``NOT_SENT``: every call fails at once
      as on a dropped connection (``DeadReferenceError``); ``SENT``: every
      call leaves but never arrives, and fails as the connection lost.
    - ``not_sent``, ``lose_request``: the same for these methods only.
    - ``lose_answer``: these methods run on the peer; their answer never
      arrives and the call fails as the connection lost (outcome unknown).
    - ``hung_until``: a Deferred every request waits for before it arrives
      (``hang``: {method: Deferred} for some methods); if it fails, the
      peer answers with its error.
    - ``refuse``: {method: error}: the peer answers with this error, as PB
      sends errors, without running the method.
    - ``calls``: how many requests of each method arrived.
    """

    def __init__(self):
        self.broken = False
        self.not_sent = set()
        self.lose_request = set()
        self.lose_answer = set()
        self.hung_until = None
        self.hang = {}
        self.refuse = {}
        self.calls = Counter()

    def never_sent(self, method):
        return self.broken in (True, NOT_SENT) or method in self.not_sent

    def lost_on_the_way(self, method):
        return self.broken == SENT or method in self.lose_request

    def held_by(self, method):
        until = self.hang.get(method, self.hung_until)
        return until if until is not None and not until.called else None


class _Transport:
    """One end's side of the in-memory connection."""

    def __init__(self, connection, end, *, port, peer_port, peer_certificate):
        self._connection = connection
        self._end = end
        self._port = port
        self._peer_port = peer_port
        self._peer_certificate = peer_certificate
        self.capturing = None
        self.disconnecting = False

    def write(self, data):
        if self.capturing is not None:
            self.capturing.append(data)
        else:
            self._connection._deliver_soon(self._end, data)

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseConnection(self):
        self.disconnecting = True
        self._connection.lose()

    def abortConnection(self):
        self.disconnecting = True
        self._connection.lose(abort=True)

    def getPeer(self):
        return IPv4Address("TCP", "127.0.0.1", self._peer_port)

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", self._port)

    def getPeerCertificate(self):
        return self._peer_certificate

    def registerProducer(self, producer, streaming):
        pass

    def unregisterProducer(self):
        pass


class LocalConnection:
    """Joins ``client`` and ``server``, two unconnected brokers (built by
    their factories' ``buildProtocol``), and connects them: banana's
    negotiation and each later expression cross on a later turn of
    ``eventual``. ``client_calls``/``server_calls`` are the ``Faults`` of
    the calls each end makes; ``*_certificate`` what each end's transport
    shows as its peer's certificate (a pyOpenSSL X509, as TLS does)."""

    def __init__(self, client, server, eventual, *, client_certificate=None,
                 server_certificate=None):
        self.client = client
        self.server = server
        self.eventual = eventual
        self.client_calls = Faults()
        self.server_calls = Faults()
        self.lost = False
        self._closing = False
        self._aborted = False     # what is on its way is dropped
        self._asked = {client: {}, server: {}}    # requestID -> method, unanswered
        self._lost_waiters = []
        client_port, server_port = next(_ports), next(_ports)
        for end in (client, server):
            # PB sends every expression through sendCall: the link decides
            # what becomes of it there.
            end.sendCall = functools.partial(self._send, end)
        server.makeConnection(_Transport(self, server, port=server_port, peer_port=client_port,
                                         peer_certificate=client_certificate))
        client.makeConnection(_Transport(self, client, port=client_port, peer_port=server_port,
                                         peer_certificate=server_certificate))

    def faults_of(self, end):
        return self.client_calls if end is self.client else self.server_calls

    def _other(self, end):
        return self.server if end is self.client else self.client

    # -- the connection dropping --------------------------------------------------

    def lose(self, abort=False):
        """The connection closes on a later turn (as ``loseConnection``): after
        what is already on its way, or, when ``abort``, dropping that."""
        if self.lost or self._closing:
            return
        self._closing = True
        self._aborted = abort
        self.eventually(self.cut, ConnectionAborted() if abort else ConnectionDone())

    def cut(self, reason=None):
        """The connection drops now; both ends notice at once."""
        if self.lost:
            return
        self.lost = True
        reason = Failure(reason or ConnectionLost("the test cut the link"))
        for end in (self.client, self.server):
            end.connectionLost(reason)
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_lost(self):
        if self.lost:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._lost_waiters.append(waiter)
        return waiter

    # -- what crosses ---------------------------------------------------------

    def eventually(self, function, *args):
        self.eventual.eventually(function, *args)

    def _encoded(self, end, expression):
        """``expression`` as ``end``'s own sendCall encodes it (banana, its
        dialect; a BananaError raised before anything is sent)."""
        transport = end.transport
        outer, transport.capturing = transport.capturing, []
        try:
            type(end).sendCall(end, *expression)
        finally:
            captured, transport.capturing = transport.capturing, outer
        return b"".join(captured)

    def _send(self, end, *expression):
        if self.lost or self._aborted:
            return
        command = expression[0]
        if command in (b"message", b"cachemessage"):
            self._send_request(end, expression)
        elif command in (b"answer", b"error"):
            self._send_answer(end, expression)
        else:
            self._deliver_soon(end, self._encoded(end, expression))

    def _send_request(self, end, expression):
        request_id, method, answer_required = expression[1], expression[3], expression[4]
        method = method.decode() if isinstance(method, bytes) else method
        faults = self.faults_of(end)
        if faults.never_sent(method):
            end.waitingForAnswers.pop(request_id, None)
            raise pb.DeadReferenceError(f"{method}: the link is broken (test switch)")
        data = self._encoded(end, expression)
        if answer_required:
            self._asked[end][request_id] = method
        other = self._other(end)

        def arrive():
            faults.calls[method] += 1

        if faults.lost_on_the_way(method):
            self.eventually(self._fail_as_lost, end, request_id, method)
        elif method in faults.refuse:
            error = faults.refuse[method]
            self.eventually(self._answer_error, other, request_id, Failure(error), arrive)
        elif faults.held_by(method) is not None:
            until = faults.held_by(method)

            def release(result):
                if isinstance(result, Failure):
                    self.eventually(self._answer_error, other, request_id, result, arrive)
                    return None
                self._deliver_soon(end, data, arrive)
                return result
            until.addBoth(release)
        else:
            self._deliver_soon(end, data, arrive)

    def _send_answer(self, end, expression):
        request_id = expression[1]
        other = self._other(end)
        method = self._asked[other].pop(request_id, None)
        data = self._encoded(end, expression)
        if method is not None and method in self.faults_of(other).lose_answer:
            self.eventually(self._fail_as_lost, other, request_id, method, False)
            return
        self._deliver_soon(end, data)

    def _deliver_soon(self, sender, data, on_arrival=None):
        self.eventually(self._deliver, self._other(sender), data, on_arrival)

    def _deliver(self, receiver, data, on_arrival):
        if self.lost or self._aborted:
            return
        if on_arrival is not None:
            on_arrival()
        receiver.dataReceived(data)

    def _answer_error(self, answerer, request_id, failure, on_arrival):
        """``answerer`` answers the request with ``failure``, as PB sends
        errors."""
        if self.lost or answerer.disconnected:
            return
        on_arrival()
        answerer._sendFailureOrError(failure, request_id)

    def _fail_as_lost(self, caller, request_id, method, forget=True):
        if forget:
            self._asked[caller].pop(request_id, None)
        waiting = caller.waitingForAnswers
        d = waiting.pop(request_id, None) if waiting is not None else None
        if d is not None:
            d.errback(Failure(pb.PBConnectionLost(
                f"{method}: the connection dropped (test switch)")))


def peer_certificate(common_name):
    """A self-signed certificate for ``common_name``, as a TLS transport's
    getPeerCertificate shows it (pyOpenSSL)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from OpenSSL import crypto

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .sign(key, hashes.SHA256()))
    return crypto.X509.from_cryptography(certificate)
