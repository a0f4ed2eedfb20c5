"""The LNM's recovery listener (paper, "Failures": "the LNMs will start a
listening server for a recovery announcement sent by the controller").

A restarted controller connects here and says so; the LNM then dials the
controller *it is configured with* at once instead of waiting out its
reconnect backoff. The announcement carries no address and no instruction:
whoever sends it can at most make the LNM try its own controller early. Even
so it is authenticated: mutual TLS against the site CA, the peer's
certificate must have role controller (``usher.pki``; any other is refused
in the handshake) and name the controller (``controller_tls_name``, else
``controller_host``), the identity the LNM checks when it dials out.

Wire protocol (lines over TLS)::

    controller -> LNM   USHER-RECOVERY <protocol version> [<term>]
    LNM -> controller   OK attached | OK reconnecting | OK connecting
                        ERR <reason>

then the LNM closes the connection. With several controllers configured
the certificate must name one of them. The term (high availability,
usher.protocol): lower than the highest the LNM has seen -> ``ERR stale
term`` and nothing done; else it becomes the highest seen, and a current
link of a lower term is dropped and the configured list dialed around at
once (the LNM still dials only its own controllers).
"""

from service_identity import VerificationError
from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin

from usher import pki
from usher.errors import UsherError
from usher.lnm.terms import MAX_TERM
from usher.protocol import PROTOCOL_VERSION

log = Logger()

ANNOUNCEMENT = "USHER-RECOVERY"
# An announcement is one short line; a peer that sends nothing useful within
# this many seconds is dropped.
IDLE_TIMEOUT = 10.0
MAX_CONNECTIONS = 8


def certificate_names(transport, identity):
    """Does the TLS peer's certificate (already verified against the site CA
    by the handshake) name ``identity``, a DNS name or an IP address (or
    one of a list of them: the configured controllers)?"""
    get_peer_certificate = getattr(transport, "getPeerCertificate", None)
    certificate = get_peer_certificate() if get_peer_certificate else None
    if certificate is None:
        return False
    identities = [identity] if isinstance(identity, str) else list(identity)
    for name in identities:
        try:
            pki.verify_certificate_names(certificate.to_cryptography(), name)
        except VerificationError:
            continue
        return True
    return False


def parse_announcement(line):
    """One announcement line (bytes) -> (protocol version text, term or
    None); raises ValueError with the answer's reason."""
    words = line.decode("ascii", "replace").split()
    if len(words) not in (2, 3) or words[0] != ANNOUNCEMENT:
        raise ValueError("expected: USHER-RECOVERY <version> [<term>]")
    if words[1] != str(PROTOCOL_VERSION):
        raise ValueError(f"protocol {words[1][:16]} not supported "
                         f"(this LNM speaks {PROTOCOL_VERSION})")
    if len(words) == 2:
        return words[1], None
    text = words[2]
    # Digits only (no sign, no spaces, no underscores: int() takes those),
    # and short enough to be a bigint before converting.
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_TERM:
        raise ValueError("the term must be an integer from 0 to 2**63 - 1")
    return words[1], int(text)


class RecoveryProtocol(LineOnlyReceiver, TimeoutMixin):
    MAX_LENGTH = 256

    def connectionMade(self):
        self.answered = False
        if not self.factory.admit(self):
            self.transport.abortConnection()
            return
        self.setTimeout(IDLE_TIMEOUT)

    def connectionLost(self, reason):
        self.setTimeout(None)
        self.factory.release(self)

    def timeoutConnection(self):
        self.transport.abortConnection()

    def lineLengthExceeded(self, line):
        self.transport.abortConnection()

    def _answer(self, text):
        self.answered = True
        if self.transport is None or self.transport.disconnected:
            return
        self.sendLine(text.encode("ascii", "replace"))
        self.transport.loseConnection()

    def lineReceived(self, line):
        if self.answered:
            return
        peer = self.transport.getPeer()
        where = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        if not certificate_names(self.transport, self.factory.controller_identity):
            log.warn("LNM {lnm}: refused a recovery announcement from {peer}: its "
                     "certificate does not name the controller {controller}",
                     lnm=self.factory.lnm_name, peer=where,
                     controller=self.factory.controller_identity)
            self._answer("ERR your certificate does not name the controller")
            return
        try:
            _version, term = parse_announcement(line)
        except ValueError as e:
            self._answer(f"ERR {e}")
            return
        self.answered = True    # one announcement per connection
        d = defer.Deferred.fromCoroutine(self.factory.announced(term))

        def done(outcome):
            log.info("LNM {lnm}: recovery announcement from the controller at {peer}"
                     "{of_term}: {outcome}", lnm=self.factory.lnm_name, peer=where,
                     of_term="" if term is None else f" (term {term})", outcome=outcome)
            self._answer(outcome)

        def failed(failure):
            if not failure.check(UsherError):
                log.failure("LNM {lnm}: recovery announcement", failure,
                            lnm=self.factory.lnm_name)
            self._answer(f"ERR {failure.getErrorMessage()[:160]}")
        d.addCallbacks(done, failed)


class RecoveryFactory(protocol.Factory):
    """Builds RecoveryProtocols; ``link`` is the LNM's ControllerLink."""

    protocol = RecoveryProtocol
    noisy = False

    def __init__(self, link, *, lnm_name, controller_identity, terms=None):
        self.link = link
        self.terms = terms
        self.lnm_name = lnm_name
        self.controller_identity = controller_identity
        self.connections = set()

    def admit(self, proto):
        if len(self.connections) >= MAX_CONNECTIONS:
            return False
        self.connections.add(proto)
        return True

    def release(self, proto):
        self.connections.discard(proto)

    async def announced(self, term=None):
        """-> the answer: "OK attached" (nothing to do), "OK reconnecting" (a
        retry was due later: it happens now; or a link of a lower term was
        dropped to dial again) or "OK connecting" (an attempt is under way);
        "ERR stale term" for a term below the highest seen."""
        if term is None or self.terms is None:
            return f"OK {self.link.retry_now()}"
        if term < self.terms.highest:
            log.warn("LNM {lnm}: refused a recovery announcement of term {term}: it has "
                     "seen term {highest}", lnm=self.lnm_name, term=term,
                     highest=self.terms.highest)
            return "ERR stale term"
        await self.terms.raise_to(term, "a recovery announcement")
        return f"OK {self.link.follow_term(term)}"


class RecoveryListener(service.Service):
    """Listens for the controller's recovery announcements on
    ``recovery_interface:recovery_port`` (mutual TLS; only a certificate of
    role controller)."""

    def __init__(self, reactor, link, *, lnm_name, interface, port, cert_file, key_file,
                 ca_file, controller_identity, terms=None):
        options = pki.server_tls_options(cert_file, key_file, ca_file,
                                         require_client_cert=True, role=pki.ROLE_LNM,
                                         client_roles=(pki.ROLE_CONTROLLER,),
                                         link=f"LNM {lnm_name}'s recovery listener")
        self.endpoint = SSL4ServerEndpoint(reactor, port, options, interface=interface)
        self.factory = RecoveryFactory(link, lnm_name=lnm_name,
                                       controller_identity=controller_identity, terms=terms)
        self.port = port
        self._listening_port = None

    @property
    def listening(self):
        return self._listening_port is not None

    def startService(self):
        super().startService()
        self.endpoint.listen(self.factory).addCallbacks(self._listening, self._not_listening)

    def _listening(self, listening_port):
        if not self.running:
            return listening_port.stopListening()
        self._listening_port = listening_port
        log.info("LNM {lnm}: listening for recovery announcements on port {port}",
                 lnm=self.factory.lnm_name, port=listening_port.getHost().port)

    def _not_listening(self, failure):
        # Recovery only hastens a reconnection the link makes anyway: run
        # without it rather than not at all, and advertise no port.
        log.error("LNM {lnm}: cannot listen for recovery announcements on port {port}: "
                  "{error}; a restarted controller will be noticed only at the next "
                  "reconnection attempt", lnm=self.factory.lnm_name, port=self.port,
                  error=failure.getErrorMessage())

    def advertised_port(self):
        """The port to give the controller in ``attach``, or None."""
        return self._listening_port.getHost().port if self.listening else None

    def stopService(self):
        super().stopService()
        listening_port, self._listening_port = self._listening_port, None
        if listening_port is not None:
            return listening_port.stopListening()
        return None


__all__ = ["ANNOUNCEMENT", "RecoveryFactory", "RecoveryListener", "RecoveryProtocol",
           "certificate_names", "parse_announcement"]
