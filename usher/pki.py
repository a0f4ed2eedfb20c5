"""The site's small PKI and the TLS settings of Usher's connections.

- ``init_ca`` / ``issue_cert`` create a site CA and certificates signed by it
  (``usher ca init`` / ``usher cert issue``).
- ``server_tls_options``: the controller's client port (server certificate
  only) and its LNM port (mutual TLS: every LNM presents a certificate from
  the site CA, and its common name is its identity, see ``peer_common_name``).
- ``client_tls_options``: clients and LNMs verify the controller's
  certificate against the site CA and its name against the host they dial.

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
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
)

from usher.errors import ConfigError, InvalidRequest

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


def _twisted_private_certificate(certificate, private_key) -> PrivateCertificate:
    pem = certificate.public_bytes(serialization.Encoding.PEM) + private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return PrivateCertificate.loadPEM(pem)


def _twisted_certificate(certificate) -> Certificate:
    return Certificate.loadPEM(certificate.public_bytes(serialization.Encoding.PEM))


# -- TLS options ----------------------------------------------------------------

def server_tls_options(cert_file, key_file, ca_file=None,
                       require_client_cert: bool = False) -> CertificateOptions:
    """TLS 1.2+ server options presenting ``cert_file``/``key_file``.

    With ``require_client_cert`` (the LNM port) the handshake fails unless
    the client presents a certificate signed by the CA in ``ca_file``.
    Without it (the client port) no client certificate is asked for and
    ``ca_file`` is not used.
    """
    # cryptography objects, not pyOpenSSL's (deprecated for this in pyOpenSSL).
    certificate, private_key = _load_pair(cert_file, key_file)
    if not require_client_cert:
        return CertificateOptions(
            privateKey=private_key,
            certificate=certificate,
            raiseMinimumTo=MINIMUM_TLS_VERSION,
        )
    if ca_file is None:
        raise ConfigError(
            f"{cert_file}: requiring client certificates needs a CA file to verify them")
    # A trustRoot makes Twisted verify the peer and refuse a handshake without
    # a certificate.
    return CertificateOptions(
        privateKey=private_key,
        certificate=certificate,
        trustRoot=_twisted_certificate(load_certificate(ca_file)),
        raiseMinimumTo=MINIMUM_TLS_VERSION,
    )


def client_tls_options(hostname: str, ca_file, cert_file=None, key_file=None):
    """TLS 1.2+ client options: trust only the site CA in ``ca_file`` and check
    that the server's certificate names ``hostname`` (DNS name or IP address).

    ``cert_file`` and ``key_file`` (both or neither) are the client's own
    certificate, which the controller's LNM port requires.
    """
    if (cert_file is None) != (key_file is None):
        raise ConfigError(
            f"{cert_file or key_file}: a client certificate needs both a certificate "
            f"and a key file")
    trust_root = _twisted_certificate(load_certificate(ca_file))
    client_certificate = None
    if cert_file is not None:
        client_certificate = _twisted_private_certificate(*_load_pair(cert_file, key_file))
    return optionsForClientTLS(
        hostname,
        trustRoot=trust_root,
        clientCertificate=client_certificate,
        extraCertificateOptions={"raiseMinimumTo": MINIMUM_TLS_VERSION},
    )


def client_tls_options_for(ca_file, cert_file, key_file):
    """-> ``options_for(hostname)``: ``client_tls_options(hostname, ca_file,
    cert_file, key_file)`` with the files read once, for a process that dials
    many peers under one certificate (the controller announcing its return to
    hundreds of LNMs)."""
    trust_root = _twisted_certificate(load_certificate(ca_file))
    client_certificate = _twisted_private_certificate(*_load_pair(cert_file, key_file))

    def options_for(hostname: str):
        return optionsForClientTLS(
            hostname, trustRoot=trust_root, clientCertificate=client_certificate,
            extraCertificateOptions={"raiseMinimumTo": MINIMUM_TLS_VERSION})

    return options_for


def peer_common_name(transport) -> str | None:
    """The subject common name of the certificate the TLS peer presented.

    None when the transport is not TLS, the handshake has not completed, or
    the peer sent no certificate (or one without a CN). On the LNM port the
    certificate has been verified against the site CA before any application
    data arrives, so the CN identifies the LNM.
    """
    get_peer_certificate = getattr(transport, "getPeerCertificate", None)
    if get_peer_certificate is None:
        return None
    peer_certificate = get_peer_certificate()
    if peer_certificate is None:
        return None
    names = peer_certificate.to_cryptography().subject.get_attributes_for_oid(
        NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


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


def issue_cert(ca_dir, name: str, out_dir, *, hostnames=None, ips=None, days: int = 825,
               force: bool = False, key_type: str = "ec") -> KeyPairFiles:
    """Write ``<name>_cert.pem`` and ``<name>_key.pem`` (0600) into ``out_dir``,
    signed by the CA in ``ca_dir``.

    The certificate has CN=name and subjectAltName DNS:name plus each of
    ``hostnames`` (DNS) and ``ips`` (IPv4/IPv6), and may be used as a server
    and as a client certificate (the controller's, an LNM's). Its validity is
    cut short to the CA's own. Refuses to overwrite existing files unless
    ``force``.
    """
    _check_dns_name(name, "certificate name")
    _check_days(days)
    if key_type not in KEY_TYPES:
        raise InvalidRequest(f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")
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
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
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
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(ca_key_identifier, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_pair(files, certificate, private_key)
    return files


__all__ = [
    "CA_CERT_FILE", "CA_KEY_FILE", "DEFAULT_CA_DIR", "KEY_TYPES", "KeyPairFiles",
    "MINIMUM_TLS_VERSION", "client_tls_options", "client_tls_options_for", "init_ca",
    "issue_cert",
    "load_certificate", "load_private_key", "peer_common_name", "server_tls_options",
]
