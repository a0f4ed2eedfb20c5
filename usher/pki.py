"""The site's small PKI and the TLS settings of Usher's connections.

- ``init_ca`` / ``issue_cert`` create a site CA and certificates signed by it
  (``usher ca init`` / ``usher cert issue --controller|--lnm|--gateway``).
- Certificate roles. Every certificate Usher issues carries its role, one of
  ``ROLES``, in two places: the subject attribute ``ROLE_OID`` (Usher's own
  object identifier, value ``controller``, ``lnm`` or ``gateway``; e.g.
  ``openssl x509 -subject`` shows ``2.25.1485...=lnm``) and the extended key
  usages the role needs (``ROLE_USAGES``). Its common name is its identity
  (the controller's host, the LNM's name, the gateway's host). Roles:

  ``controller``  serves the client and LNM ports; TLS client of the LNMs'
                  recovery listeners. Names: the hosts it is dialled as.
  ``lnm``         TLS client of the controller's LNM port; serves its recovery
                  listener, which the controller verifies by LNM name. Names:
                  the LNM's name only.
  ``gateway``     plusher and other web daemons: serves HTTPS, and may present
                  its certificate on the controller's client port, where it is
                  recognised as a trusted gateway (``peer_role``).

- ``server_tls_options`` / ``client_tls_options``: TLS 1.2+ against the site
  CA, checking the role of the peer's certificate (and, for the LNM port, its
  name against an allow-list, ``NameAllowList``) in the handshake: a peer
  with the wrong role, no role (a certificate issued before roles) or a name
  not allowed fails the handshake, and the refusing side logs one line naming
  the certificate's CN and role. Each also checks that the process's own
  certificate has the role it serves in (a ``ConfigError`` naming the remedy).
- ``peer_identity`` / ``peer_role``: the (CN, role) of a peer accepted by
  those checks, for the code behind a listener (the controller's login code
  trusts a client-reported source address only from a ``gateway``).

Everything here reads or writes files and is meant for start-up and the admin
command, not for the reactor thread while serving. Problems with existing
files raise ``usher.errors.ConfigError`` naming the file; bad arguments raise
``usher.errors.InvalidRequest`` and write nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import os
import re
import tempfile
import weakref
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
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
from usher.vmset import compile_regex, expand_ranges

log = Logger()

DEFAULT_CA_DIR = "/etc/usher"
CA_CERT_FILE = "ca_cert.pem"
CA_KEY_FILE = "ca_key.pem"
KEY_TYPES = ("ec", "rsa")

MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2

# Certificates start being valid a little in the past so that a host whose
# clock lags the CA's does not reject a certificate issued a moment ago.
_BACKDATE = datetime.timedelta(minutes=5)

_DNS_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME_PATTERN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")


@dataclasses.dataclass(frozen=True)
class KeyPairFiles:
    """Where a certificate and its private key were written."""

    cert_path: Path
    key_path: Path


# -- loading ------------------------------------------------------------------

def _read(path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a {what} file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} file: {exc.strerror}") from None


def load_certificate(path) -> x509.Certificate:
    """Load the (first) PEM certificate in ``path``."""
    data = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{path}: not a PEM certificate") from None


def load_private_key(path):
    """Load the unencrypted PEM private key in ``path``."""
    data = _read(path, "private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{path}: the private key is encrypted; Usher needs an unencrypted key "
            f"(protect it with file permissions)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not a PEM private key") from None


def _public_bytes(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_pair(cert_file, key_file):
    certificate = load_certificate(cert_file)
    private_key = load_private_key(key_file)
    if _public_bytes(certificate.public_key()) != _public_bytes(private_key.public_key()):
        raise ConfigError(f"{key_file}: private key does not match certificate {cert_file}")
    return certificate, private_key


def _twisted_certificate(certificate) -> Certificate:
    return Certificate.loadPEM(certificate.public_bytes(serialization.Encoding.PEM))


# -- certificate roles -------------------------------------------------------------

ROLE_CONTROLLER = "controller"
ROLE_LNM = "lnm"
ROLE_GATEWAY = "gateway"
ROLES = (ROLE_CONTROLLER, ROLE_LNM, ROLE_GATEWAY)

# The subject attribute that carries a certificate's role (a UTF8String, one
# of ROLES): an object identifier of Usher's own in the UUID arc 2.25 (ITU-T
# X.667: anyone may derive one from a fresh UUID, no registration), here
# UUID 0b2d83fa-99a3-4744-9077-27a0f65c2c3a. cryptography encodes and parses
# it. A site issuing Usher certificates with another tool adds it to the
# subject, e.g. openssl req -subj "/CN=lnm7/2.25.1485...4554=lnm".
ROLE_OID = x509.ObjectIdentifier("2.25.14857838162515446744207378937204714554")

_SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
_CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH

# The extended key usages each role's certificate carries: what the role does
# on its links (see the module docstring).
ROLE_USAGES = {
    # serves the client and LNM ports; dials the LNMs' recovery listeners
    ROLE_CONTROLLER: (_SERVER_AUTH, _CLIENT_AUTH),
    # dials the controller; serves its recovery listener
    ROLE_LNM: (_CLIENT_AUTH, _SERVER_AUTH),
    # serves HTTPS; may present itself on the controller's client port
    ROLE_GATEWAY: (_SERVER_AUTH, _CLIENT_AUTH),
}

# What a peer of each role is called in messages.
_ROLE_DESCRIPTIONS = {ROLE_CONTROLLER: "the controller", ROLE_LNM: "an LNM",
                      ROLE_GATEWAY: "a gateway"}


class CertificateRefused(PermissionDenied):
    """The TLS peer's certificate has the wrong role (or none), or a name the
    link does not allow: the reason a refused connection was lost."""


@dataclasses.dataclass(frozen=True)
class PeerIdentity:
    """What a certificate says about its holder: its common name and its
    role (None for a certificate without one)."""

    name: str | None
    role: str | None


def certificate_identity(certificate: x509.Certificate) -> PeerIdentity:
    """The common name and role of ``certificate``. The role is the value of
    the ``ROLE_OID`` subject attribute as written (several are joined by ",",
    which is no valid role), None without one."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    roles = certificate.subject.get_attributes_for_oid(ROLE_OID)
    return PeerIdentity(name=str(names[0].value) if names else None,
                        role=",".join(str(role.value) for role in roles) if roles else None)


def _usages(certificate) -> tuple:
    try:
        return tuple(certificate.extensions.get_extension_for_class(
            x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return ()


def _usage_name(usage) -> str:
    return "client" if usage == _CLIENT_AUTH else "server"


def _shown(text) -> str:
    """A name from a certificate, as a log line may show it: quoted, escaped
    and at most 64 characters (a CN has no more)."""
    if text is None:
        return "none"
    return repr(text if len(text) <= 64 else text[:64] + "...")


def _remedy(role: str, name: str | None) -> str:
    names = "" if role == ROLE_LNM else " [--hostname H]... [--ip IP]..."
    return f"usher cert issue --{role} {name or 'NAME'}{names}"


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


# -- creating the CA and certificates -------------------------------------------

def _generate_key(key_type: str):
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise InvalidRequest(f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")


def _check_days(days) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise InvalidRequest(f"invalid validity {days!r}: a positive number of days is needed")
    return days


def _check_dns_name(name, what: str) -> str:
    if (not isinstance(name, str) or len(name) > 253
            or not _DNS_NAME_PATTERN.fullmatch(name)):
        raise InvalidRequest(
            f"invalid {what} {name!r}: use a DNS name (letters, digits, '-' and '.')")
    return name


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    fd, temp_path = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as stream:
            os.fchmod(stream.fileno(), mode)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_path)
        raise


def _write_pair(files: KeyPairFiles, certificate, private_key) -> None:
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    try:
        files.cert_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        # The key first: a certificate without its key is useless, the
        # reverse is merely incomplete.
        _write_atomically(files.key_path, key_pem, 0o600)
        _write_atomically(files.cert_path, cert_pem, 0o644)
    except OSError as exc:
        raise ConfigError(
            f"{files.cert_path.parent}: cannot write {files.cert_path.name} and "
            f"{files.key_path.name}: {exc.strerror}") from None


def _refuse_to_overwrite(files: KeyPairFiles, what: str) -> None:
    existing = [str(path) for path in (files.cert_path, files.key_path) if path.exists()]
    if existing:
        raise InvalidRequest(
            f"refusing to overwrite the {what} ({', '.join(existing)}) without --force")


def _ca_files(directory) -> KeyPairFiles:
    directory = Path(directory)
    return KeyPairFiles(directory / CA_CERT_FILE, directory / CA_KEY_FILE)


def init_ca(directory, common_name: str = "Usher CA", days: int = 3650, *,
            force: bool = False, key_type: str = "ec") -> KeyPairFiles:
    """Create a self-signed site CA as ``ca_cert.pem`` and ``ca_key.pem`` (0600) in ``directory``.

    Refuses to replace an existing CA unless ``force``: every certificate it
    signed stops being trusted when it is replaced.
    """
    if not isinstance(common_name, str) or not common_name.strip():
        raise InvalidRequest("the CA common name must not be empty")
    _check_days(days)
    if key_type not in KEY_TYPES:
        raise InvalidRequest(f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")
    files = _ca_files(directory)
    if not force:
        _refuse_to_overwrite(files, "existing CA")
    private_key = _generate_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    public_key = private_key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(private_key, hashes.SHA256())
    )
    _write_pair(files, certificate, private_key)
    return files


def issue_cert(ca_dir, name: str, out_dir, *, role: str, hostnames=None, ips=None,
               days: int = 825, force: bool = False, key_type: str = "ec") -> KeyPairFiles:
    """Write ``<name>_cert.pem`` and ``<name>_key.pem`` (0600) into ``out_dir``,
    signed by the CA in ``ca_dir``, for ``role`` (one of ``ROLES``).

    The certificate has CN=name, the role (subject attribute ``ROLE_OID``),
    the extended key usages of the role (``ROLE_USAGES``) and subjectAltName
    DNS:name plus, for the controller and gateways, each of ``hostnames``
    (DNS) and ``ips`` (IPv4/IPv6): the names they are dialled as. An LNM's
    certificate names only the LNM (the controller verifies its recovery
    listener by LNM name). Its validity is cut short to the CA's own. Refuses
    to overwrite existing files unless ``force``.
    """
    if role not in ROLES:
        raise InvalidRequest(f"unknown certificate role {role!r}; use one of {', '.join(ROLES)}")
    _check_dns_name(name, "certificate name")
    _check_days(days)
    if key_type not in KEY_TYPES:
        raise InvalidRequest(f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")
    if role == ROLE_LNM and (hostnames or ips):
        raise InvalidRequest(
            "an LNM certificate names only the LNM (the controller checks its recovery "
            "listener by LNM name): no --hostname or --ip")
    dns_names = [name]
    for hostname in hostnames or ():
        _check_dns_name(hostname, "host name")
        if hostname.lower() not in (known.lower() for known in dns_names):
            dns_names.append(hostname)
    addresses = []
    for ip in ips or ():
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            raise InvalidRequest(f"invalid IP address {ip!r}") from None
        if address not in addresses:
            addresses.append(address)

    out_dir = Path(out_dir)
    files = KeyPairFiles(out_dir / f"{name}_cert.pem", out_dir / f"{name}_key.pem")
    if not force:
        _refuse_to_overwrite(files, f"certificate of {name!r}")
    ca = _ca_files(ca_dir)
    ca_certificate, ca_key = _load_pair(ca.cert_path, ca.key_path)

    private_key = _generate_key(key_type)
    public_key = private_key.public_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    not_after = min(now + datetime.timedelta(days=days), ca_certificate.not_valid_after_utc)
    if not_after <= now:
        raise ConfigError(f"{ca.cert_path}: the CA certificate has expired")
    alternative_names = [x509.DNSName(dns_name) for dns_name in dns_names]
    alternative_names += [x509.IPAddress(address) for address in addresses]
    ca_key_identifier = x509.AuthorityKeyIdentifier.from_issuer_public_key(
        ca_certificate.public_key())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(ROLE_OID, role)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False,
            key_encipherment=(key_type == "rsa"), data_encipherment=False,
            key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(ROLE_USAGES[role])), critical=False)
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(ca_key_identifier, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_pair(files, certificate, private_key)
    return files


__all__ = [
    "CA_CERT_FILE", "CA_KEY_FILE", "CertificateRefused", "DEFAULT_CA_DIR", "KEY_TYPES",
    "KeyPairFiles", "MINIMUM_TLS_VERSION", "NameAllowList", "PeerIdentity", "ROLES",
    "ROLE_CONTROLLER", "ROLE_GATEWAY", "ROLE_LNM", "ROLE_OID", "ROLE_USAGES",
    "certificate_identity", "client_tls_options", "client_tls_options_for", "init_ca",
    "issue_cert", "load_certificate", "load_private_key", "peer_common_name",
    "peer_identity", "peer_role", "server_tls_options", "verify_certificate_names",
]
