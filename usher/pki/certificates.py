"""What a certificate says: reading PEM certificates and keys, the roles
Usher's certificates carry (``ROLE_OID``, ``ROLE_USAGES``) and a
certificate's identity (common name and role). See ``usher.pki``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from usher.errors import ConfigError


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
