"""The site CA: creating it (``usher ca init``) and issuing certificates
signed by it for a role (``usher cert issue``). See ``usher.pki``."""

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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from usher.errors import ConfigError, InvalidRequest
from usher.pki.certificates import ROLE_LNM, ROLE_OID, ROLE_USAGES, ROLES, _load_pair

DEFAULT_CA_DIR = "/etc/usher"
CA_CERT_FILE = "ca_cert.pem"
CA_KEY_FILE = "ca_key.pem"
KEY_TYPES = ("ec", "rsa")

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
