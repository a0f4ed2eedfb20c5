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

    controller -> LNM   USHER-RECOVERY <protocol version>
    LNM -> controller   OK attached | OK reconnecting | OK connecting
                        ERR <reason>

then the LNM closes the connection.
"""

from service_identity import VerificationError
from twisted.application import service
from twisted.internet import protocol
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin

from usher import pki
from usher.protocol import PROTOCOL_VERSION

log = Logger()

ANNOUNCEMENT = "USHER-RECOVERY"
# An announcement is one short line; a peer that sends nothing useful within
# this many seconds is dropped.
IDLE_TIMEOUT = 10.0
MAX_CONNECTIONS = 8


def certificate_names(transport, identity):
    """Does the TLS peer's certificate (already verified against the site CA
    by the handshake) name ``identity``, a DNS name or an IP address?"""
    get_peer_certificate = getattr(transport, "getPeerCertificate", None)
    certificate = get_peer_certificate() if get_peer_certificate else None
    if certificate is None:
        return False
    try:
        pki.verify_certificate_names(certificate.to_cryptography(), identity)
    except VerificationError:
        return False
    return True


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
        self.sendLine(text.encode("ascii"))
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
        words = line.decode("ascii", "replace").split()
        if len(words) != 2 or words[0] != ANNOUNCEMENT:
            self._answer("ERR expected: USHER-RECOVERY <version>")
            return
        if words[1] != str(PROTOCOL_VERSION):
            self._answer(f"ERR protocol {words[1][:16]} not supported "
                         f"(this LNM speaks {PROTOCOL_VERSION})")
            return
        outcome = self.factory.announced()
        log.info("LNM {lnm}: recovery announcement from the controller at {peer}: "
                 "{outcome}", lnm=self.factory.lnm_name, peer=where, outcome=outcome)
        self._answer(f"OK {outcome}")


class RecoveryFactory(protocol.Factory):
    """Builds RecoveryProtocols; ``link`` is the LNM's ControllerLink."""

    protocol = RecoveryProtocol
    noisy = False

    def __init__(self, link, *, lnm_name, controller_identity):
        self.link = link
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

    def announced(self):
        """-> "attached" (nothing to do), "reconnecting" (a retry was due
        later: it happens now) or "connecting" (an attempt is under way)."""
        return self.link.retry_now()


class RecoveryListener(service.Service):
    """Listens for the controller's recovery announcements on
    ``recovery_interface:recovery_port`` (mutual TLS; only a certificate of
    role controller)."""

    def __init__(self, reactor, link, *, lnm_name, interface, port, cert_file, key_file,
                 ca_file, controller_identity):
        options = pki.server_tls_options(cert_file, key_file, ca_file,
                                         require_client_cert=True, role=pki.ROLE_LNM,
                                         client_roles=(pki.ROLE_CONTROLLER,),
                                         link=f"LNM {lnm_name}'s recovery listener")
        self.endpoint = SSL4ServerEndpoint(reactor, port, options, interface=interface)
        self.factory = RecoveryFactory(link, lnm_name=lnm_name,
                                       controller_identity=controller_identity)
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
           "certificate_names"]
