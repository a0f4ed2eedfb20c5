"""The TLS settings of Usher's connections: TLS 1.2+ against the site CA,
the role (and name) checks on the peer's certificate in the handshake, the
check of the process's own certificate, and the identity of a peer that was
accepted. See ``usher.pki``."""

from __future__ import annotations

import ipaddress
import weakref

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.cryptography import (verify_certificate_hostname,
                                           verify_certificate_ip_address)
from twisted.internet.interfaces import (IOpenSSLClientConnectionCreator,
                                         IOpenSSLServerConnectionCreator)
from twisted.internet.ssl import Certificate, CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from usher.errors import ConfigError, InvalidRequest, PermissionDenied
from usher.pki.certificates import (_CLIENT_AUTH, _ROLE_DESCRIPTIONS, _SERVER_AUTH,
                                    ROLE_CONTROLLER, ROLE_USAGES, ROLES, PeerIdentity,
                                    _load_pair, _remedy, _shown, _usage_name, _usages,
                                    certificate_identity, load_certificate)
from usher.vmset import compile_regex, expand_ranges

log = Logger()

MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2


def _twisted_certificate(certificate) -> Certificate:
    return Certificate.loadPEM(certificate.public_bytes(serialization.Encoding.PEM))


class CertificateRefused(PermissionDenied):
    """The TLS peer's certificate has the wrong role (or none), or a name the
    link does not allow: the reason a refused connection was lost."""


def _check_own_certificate(certificate, cert_file, role: str) -> None:
    """Refuse to serve in ``role`` with a certificate issued for another (or
    before roles): ``ConfigError`` naming the file and the remedy."""
    identity = certificate_identity(certificate)
    remedy = _remedy(role, identity.name)
    if identity.role is None:
        raise ConfigError(
            f"{cert_file}: the certificate (CN {_shown(identity.name)}) has no Usher role: "
            f"it was issued before certificate roles. Reissue it with '{remedy}' "
            f"(and the LNM, controller and gateway certificates with it, see the README, "
            f"Security)")
    if identity.role != role:
        raise ConfigError(
            f"{cert_file}: the certificate (CN {_shown(identity.name)}) has role "
            f"{_shown(identity.role)}, this daemon needs role {role!r}: issue one with "
            f"'{remedy}'")
    missing = [usage for usage in ROLE_USAGES[role] if usage not in _usages(certificate)]
    if missing:
        raise ConfigError(
            f"{cert_file}: the certificate (CN {_shown(identity.name)}) lacks the "
            f"extended key usage TLS {_usage_name(missing[0])} authentication its role "
            f"needs: reissue it with '{remedy}'")


class NameAllowList:
    """The names a set of patterns allows, written as LNM patterns elsewhere
    in Usher (``usher.vmset``): a name (``lnm7``), a range (``lnm[1-64]``,
    ``rack[1-4]-node[01-16]``) or a regular expression (``/re/`` or ``~re``),
    which must match the whole name. No patterns allow no name.

    ``option`` names the setting in messages (``[ctrl] lnm_names``). Bad
    patterns raise ``ConfigError`` naming it.
    """

    def __init__(self, patterns, *, option="the allow-list"):
        self.option = option
        self.patterns = tuple(patterns)
        self._names = set()
        self._regexes = []
        for pattern in self.patterns:
            try:
                if not isinstance(pattern, str) or not pattern.strip():
                    raise InvalidRequest("an empty pattern")
                if pattern.startswith("~") or (len(pattern) > 1 and pattern[0] == pattern[-1] == "/"):
                    self._regexes.append(compile_regex(
                        pattern[1:-1] if pattern.startswith("/") else pattern[1:]))
                else:
                    self._names.update(expand_ranges(pattern))
            except InvalidRequest as e:
                raise ConfigError(f"{option}: {e} (a range here takes no commas: "
                                  f"write lnm[1-3], lnm7)") from None

    def __bool__(self):
        return bool(self._names or self._regexes)

    def __contains__(self, name):
        return isinstance(name, str) and (
            name in self._names or any(regex.fullmatch(name) for regex in self._regexes))


def verify_certificate_names(certificate: x509.Certificate, identity: str) -> None:
    """Raise ``service_identity.VerificationError`` unless ``certificate``
    names ``identity``, a DNS name or an IP address (its subjectAltName)."""
    try:
        address = ipaddress.ip_address(identity)
    except ValueError:
        verify_certificate_hostname(certificate, identity)
    else:
        verify_certificate_ip_address(certificate, str(address))


# Identities the checks below accepted, by TLS connection (the
# TLSMemoryBIOProtocol, which is the transport of the protocol it wraps).
_ACCEPTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def peer_identity(transport) -> PeerIdentity | None:
    """The ``PeerIdentity`` (CN, role) of the certificate the TLS peer on
    ``transport`` presented, as the role check of this module's TLS options
    accepted it during the handshake; None when the peer presented no
    certificate (a plain client on the controller's client port), the
    transport is not TLS set up here, or the handshake is not done.

    ``transport`` is a protocol's transport, e.g. a PB ``broker.transport``
    (also through protocol wrappers such as a timeout wrapper).
    """
    for _ in range(4):
        if transport is None:
            return None
        try:
            identity = _ACCEPTED.get(transport)
        except TypeError:
            return None
        if identity is not None:
            return identity
        transport = getattr(transport, "transport", None)
    return None


def peer_role(transport) -> str | None:
    """The role of the TLS peer on ``transport`` (``peer_identity``), or None.

    On the controller's client port a connection whose ``peer_role`` is
    ``ROLE_GATEWAY`` comes from a gateway (plusher) with a site certificate of
    that role; every other connection (None) is a plain client."""
    identity = peer_identity(transport)
    return identity.role if identity is not None else None


class _PeerCheck:
    """What one end of a link accepts from the other: the peer's
    certificate must have one of ``roles`` and the extended key usage
    ``usage``; its CN must be in ``allowed_names`` (a ``NameAllowList``)
    when given; and it must name ``identity`` (the host a client dials) when
    given. ``link`` names this end in log lines ("the controller's LNM port").
    """

    def __init__(self, *, link, roles, usage, allowed_names=None, identity=None):
        self.link = link
        self.roles = tuple(roles)
        self.usage = usage
        self.allowed_names = allowed_names
        self.identity = identity

    def problem(self, certificate) -> str | None:
        """Why ``certificate`` (verified against the site CA) is refused, or None."""
        identity = certificate_identity(certificate)
        wanted = " or ".join(f"{_ROLE_DESCRIPTIONS[role]} (role {role})" for role in self.roles)
        if identity.role is None:
            return (f"the certificate has no Usher role (issued before certificate roles); "
                    f"only {wanted} is accepted: reissue it with "
                    f"'{_remedy(self.roles[0], identity.name)}'")
        if identity.role not in self.roles:
            return f"only {wanted} is accepted"
        if self.usage not in _usages(certificate):
            return (f"the certificate's extended key usage does not allow TLS "
                    f"{_usage_name(self.usage)} authentication")
        if self.allowed_names is not None and identity.name not in self.allowed_names:
            return f"the name is not in {self.allowed_names.option}"
        return None

    def verify_callback(self, tls_protocol, *, fail_connection: bool):
        """A pyOpenSSL verify callback for one connection. ``fail_connection``
        (the client end) also gives the connection a ``CertificateRefused``
        (or ``VerificationError``) as the reason it was lost."""
        protocol_ref = weakref.ref(tls_protocol)

        def verify(connection, x509_certificate, error_number, depth, ok):
            # Chain errors are OpenSSL's to report; only the leaf is ours.
            if depth != 0 or not ok:
                return bool(ok)
            tls = protocol_ref()
            try:
                certificate = x509_certificate.to_cryptography()
                if self.identity is not None:
                    verify_certificate_names(certificate, self.identity)
                problem = self.problem(certificate)
                identity = certificate_identity(certificate)
            except VerificationError:
                if fail_connection and tls is not None:
                    tls.failVerification(Failure())
                return False
            except Exception:
                # Nothing may escape an OpenSSL callback.
                log.failure("{link}: checking a peer certificate failed", link=self.link)
                return False
            if problem is None:
                if tls is not None:
                    _ACCEPTED[tls] = identity
                return True
            peer = getattr(getattr(tls, "transport", None), "getPeer", lambda: None)()
            where = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
            log.warn("{link}: refused {peer}, certificate CN {cn}, role {role}: {problem}",
                     link=self.link, peer=where, cn=_shown(identity.name),
                     role=_shown(identity.role), problem=problem)
            if fail_connection and tls is not None:
                tls.failVerification(Failure(CertificateRefused(
                    f"{self.link}: refused {where}, certificate CN {_shown(identity.name)}, "
                    f"role {_shown(identity.role)}: {problem}")))
            return False

        return verify


@implementer(IOpenSSLServerConnectionCreator)
class _CheckingServer:
    """Server connections of ``options`` whose peers ``check`` vets;
    ``required``: a peer without a certificate fails the handshake."""

    def __init__(self, options, check, *, required):
        self._options = options
        self._check = check
        self._flags = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if required else 0)

    def serverConnectionForTLS(self, tls_protocol):
        connection = self._options.serverConnectionForTLS(tls_protocol)
        connection.set_verify(self._flags,
                              self._check.verify_callback(tls_protocol, fail_connection=False))
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class _CheckingClient:
    """Client connections of ``options`` to ``check.identity`` (sent as SNI
    when a DNS name) whose server ``check`` vets."""

    def __init__(self, options, check):
        self._options = options
        self._check = check
        try:
            ipaddress.ip_address(check.identity)
            self._server_name = None
        except ValueError:
            try:
                self._server_name = check.identity.encode("idna")
            except UnicodeError:
                raise ConfigError(f"{check.identity!r}: not a valid host name") from None

    def clientConnectionForTLS(self, tls_protocol):
        connection = self._options.clientConnectionForTLS(tls_protocol)
        if self._server_name:
            connection.set_tlsext_host_name(self._server_name)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                              self._check.verify_callback(tls_protocol, fail_connection=True))
        return connection


def _check_roles(roles) -> tuple:
    roles = (roles,) if isinstance(roles, str) else tuple(roles)
    unknown = [role for role in roles if role not in ROLES]
    if not roles or unknown:
        raise ValueError(f"roles must be some of {ROLES}, not {roles!r}")
    return roles


def _own_pair(cert_file, key_file, role):
    certificate, private_key = _load_pair(cert_file, key_file)
    if role is not None:
        _check_own_certificate(certificate, cert_file, _check_roles(role)[0])
    return certificate, private_key


# -- TLS options ----------------------------------------------------------------

def server_tls_options(cert_file, key_file, ca_file=None, require_client_cert: bool = False,
                       *, role=None, client_roles=(), allowed_names=None,
                       link="TLS server"):
    """TLS 1.2+ server options presenting ``cert_file``/``key_file``.

    ``role``: the role the certificate must have (``ConfigError`` naming the
    remedy otherwise); None checks none (plusher's HTTPS certificate may come
    from any CA).

    ``client_roles``: the roles of the client certificates accepted, which
    must be signed by the CA in ``ca_file``; a certificate with another role,
    without a role or (``allowed_names``, a ``NameAllowList``) with a CN not
    allowed fails the handshake, logged by ``link``. With
    ``require_client_cert`` (the LNM port, the recovery listener) a client
    without a certificate fails too; without it (the client port) it is
    accepted and ``peer_identity`` is None. No ``client_roles``: no client
    certificate is asked for and ``ca_file`` is not used.
    """
    # cryptography objects, not pyOpenSSL's (deprecated for this in pyOpenSSL).
    certificate, private_key = _own_pair(cert_file, key_file, role)
    if not client_roles:
        if require_client_cert:
            raise ValueError("require_client_cert needs the client_roles accepted")
        return CertificateOptions(
            privateKey=private_key,
            certificate=certificate,
            raiseMinimumTo=MINIMUM_TLS_VERSION,
        )
    if ca_file is None:
        raise ConfigError(
            f"{cert_file}: requiring client certificates needs a CA file to verify them")
    options = CertificateOptions(
        privateKey=private_key,
        certificate=certificate,
        trustRoot=_twisted_certificate(load_certificate(ca_file)),
        raiseMinimumTo=MINIMUM_TLS_VERSION,
    )
    check = _PeerCheck(link=link, roles=_check_roles(client_roles), usage=_CLIENT_AUTH,
                       allowed_names=allowed_names)
    return _CheckingServer(options, check, required=require_client_cert)


def client_tls_options(hostname: str, ca_file, cert_file=None, key_file=None, *,
                       peer_role=ROLE_CONTROLLER, role=None, link=None):
    """TLS 1.2+ client options: trust only the site CA in ``ca_file``, check
    that the server's certificate names ``hostname`` (DNS name or IP address)
    and has role ``peer_role`` (the controller unless told otherwise). A
    server refused for its role fails the connection with a
    ``CertificateRefused`` reason, logged by ``link``.

    ``cert_file`` and ``key_file`` (both or neither) are the client's own
    certificate, which must have ``role`` when given (the LNM port needs one).
    """
    return client_tls_options_for(ca_file, cert_file, key_file, peer_role=peer_role,
                                  role=role, link=link)(hostname)


def client_tls_options_for(ca_file, cert_file=None, key_file=None, *,
                           peer_role=ROLE_CONTROLLER, role=None, link=None):
    """-> ``options_for(hostname)``: ``client_tls_options(hostname, ...)``
    with the files read once, for a process that dials many peers under one
    certificate (the controller announcing its return to hundreds of LNMs)."""
    if (cert_file is None) != (key_file is None):
        raise ConfigError(
            f"{cert_file or key_file}: a client certificate needs both a certificate "
            f"and a key file")
    peer_roles = _check_roles(peer_role)
    own = {}
    if cert_file is not None:
        certificate, private_key = _own_pair(cert_file, key_file, role)
        own = {"privateKey": private_key, "certificate": certificate}
    options = CertificateOptions(trustRoot=_twisted_certificate(load_certificate(ca_file)),
                                 raiseMinimumTo=MINIMUM_TLS_VERSION, **own)

    def options_for(hostname: str):
        if not isinstance(hostname, str) or not hostname:
            raise ConfigError(f"{hostname!r}: a TLS peer name must be a host name or address")
        check = _PeerCheck(
            link=link or f"client of {_ROLE_DESCRIPTIONS[peer_roles[0]]} {hostname}",
            roles=peer_roles, usage=_SERVER_AUTH, identity=hostname)
        return _CheckingClient(options, check)

    return options_for


def peer_common_name(transport) -> str | None:
    """The subject common name of the certificate the TLS peer presented.

    None when the transport is not TLS, the handshake has not completed, or
    the peer sent no certificate (or one without a CN). On the LNM port the
    certificate has been verified against the site CA, and its role and name
    checked, before any application data arrives, so the CN identifies the
    LNM.
    """
    get_peer_certificate = getattr(transport, "getPeerCertificate", None)
    if get_peer_certificate is None:
        return None
    peer_certificate = get_peer_certificate()
    if peer_certificate is None:
        return None
    return certificate_identity(peer_certificate.to_cryptography()).name
