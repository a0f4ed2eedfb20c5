"""usher.pki: the site CA, certificates, and real TLS handshakes over 127.0.0.1."""

import ipaddress
import os
import stat

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import SSL4ClientEndpoint, SSL4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol, ServerFactory
from zope.interface import implementer

from usher import pki
from usher.errors import ConfigError, InvalidRequest

# A safety net against a hung handshake; no test relies on timing.
_HANG_GUARD_SECONDS = 10


# -- fixtures -------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site CA with the controller's and an LNM's certificates, and a foreign CA."""
    base = tmp_path_factory.mktemp("site")
    ca_dir, other_ca_dir, certs = base / "ca", base / "other-ca", base / "certs"
    pki.init_ca(ca_dir)
    pki.init_ca(other_ca_dir, "Somebody else's CA")
    pki.issue_cert(ca_dir, "usherctrl", certs, hostnames=["localhost"], ips=["127.0.0.1"])
    pki.issue_cert(ca_dir, "lnm-01", certs)
    pki.issue_cert(other_ca_dir, "intruder", certs)
    return {
        "ca": str(ca_dir / "ca_cert.pem"),
        "other_ca": str(other_ca_dir / "ca_cert.pem"),
        "certs": certs,
    }


def _pair(site, name):
    return str(site["certs"] / f"{name}_cert.pem"), str(site["certs"] / f"{name}_key.pem")


def _load(path):
    return x509.load_pem_x509_certificate(open(path, "rb").read())


# -- init_ca / issue_cert -------------------------------------------------------------

def test_init_ca_writes_a_self_signed_ca_with_a_private_key(tmp_path):
    files = pki.init_ca(tmp_path / "ca", common_name="Test Site CA", days=10)

    assert files.cert_path == tmp_path / "ca" / "ca_cert.pem"
    assert files.key_path == tmp_path / "ca" / "ca_key.pem"
    assert stat.S_IMODE(os.stat(files.key_path).st_mode) == 0o600
    certificate = _load(files.cert_path)
    assert certificate.subject.rfc4514_string() == "CN=Test Site CA"
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    certificate.verify_directly_issued_by(certificate)
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert 10 <= lifetime.days <= 11
    key = serialization.load_pem_private_key(files.key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)


def test_init_ca_refuses_to_overwrite_unless_forced(tmp_path):
    first = pki.init_ca(tmp_path).cert_path.read_bytes()

    with pytest.raises(InvalidRequest, match="ca_cert.pem"):
        pki.init_ca(tmp_path)
    assert (tmp_path / "ca_cert.pem").read_bytes() == first

    pki.init_ca(tmp_path, force=True)
    assert (tmp_path / "ca_cert.pem").read_bytes() != first


def test_init_ca_refuses_when_only_the_key_is_left(tmp_path):
    (tmp_path / "ca_key.pem").write_text("leftover")
    with pytest.raises(InvalidRequest, match="ca_key.pem"):
        pki.init_ca(tmp_path)
    assert not (tmp_path / "ca_cert.pem").exists()


def test_issue_cert_is_signed_by_the_ca_for_server_and_client_use(tmp_path):
    ca = pki.init_ca(tmp_path / "ca")
    files = pki.issue_cert(tmp_path / "ca", "lnm-07", tmp_path / "out",
                           hostnames=["lnm-07.cluster.example", "localhost"],
                           ips=["127.0.0.1", "::1"])

    assert files.cert_path == tmp_path / "out" / "lnm-07_cert.pem"
    assert files.key_path == tmp_path / "out" / "lnm-07_key.pem"
    assert stat.S_IMODE(os.stat(files.key_path).st_mode) == 0o600
    certificate = _load(files.cert_path)
    certificate.verify_directly_issued_by(_load(ca.cert_path))
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "lnm-07"
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [
        "lnm-07", "lnm-07.cluster.example", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(files.key_path.read_bytes(), None)
    assert key.public_key().public_numbers() == certificate.public_key().public_numbers()


def test_issue_cert_can_make_rsa_keys(tmp_path):
    pki.init_ca(tmp_path)
    files = pki.issue_cert(tmp_path, "ctrl", tmp_path, key_type="rsa")
    key = serialization.load_pem_private_key(files.key_path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048


def test_issue_cert_never_outlives_its_ca(tmp_path):
    ca = pki.init_ca(tmp_path, days=30)
    certificate = _load(pki.issue_cert(tmp_path, "ctrl", tmp_path, days=825).cert_path)
    assert certificate.not_valid_after_utc <= _load(ca.cert_path).not_valid_after_utc


@pytest.mark.parametrize("kwargs, complaint", [
    ({"name": "../evil"}, "certificate name"),
    ({"name": "-lnm"}, "certificate name"),
    ({"name": "lnm", "hostnames": ["bad host"]}, "host name"),
    ({"name": "lnm", "ips": ["10.0.0.300"]}, "IP address"),
    ({"name": "lnm", "days": 0}, "days"),
    ({"name": "lnm", "key_type": "dsa"}, "key type"),
])
def test_issue_cert_rejects_bad_input_and_writes_nothing(tmp_path, kwargs, complaint):
    pki.init_ca(tmp_path / "ca")
    out = tmp_path / "out"
    name = kwargs.pop("name")
    with pytest.raises(InvalidRequest, match=complaint):
        pki.issue_cert(tmp_path / "ca", name, out, **kwargs)
    assert not out.exists()


def test_issue_cert_refuses_to_overwrite_unless_forced(tmp_path):
    pki.init_ca(tmp_path)
    first = pki.issue_cert(tmp_path, "ctrl", tmp_path).cert_path.read_bytes()
    with pytest.raises(InvalidRequest, match="ctrl_cert.pem"):
        pki.issue_cert(tmp_path, "ctrl", tmp_path)
    assert (tmp_path / "ctrl_cert.pem").read_bytes() == first
    pki.issue_cert(tmp_path, "ctrl", tmp_path, force=True)
    assert (tmp_path / "ctrl_cert.pem").read_bytes() != first


def test_issue_cert_without_a_ca_names_the_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"ca_cert\.pem: certificate file not found"):
        pki.issue_cert(tmp_path, "ctrl", tmp_path)
    assert not (tmp_path / "ctrl_key.pem").exists()


# -- load errors -------------------------------------------------------------------

def test_missing_bad_and_mismatched_files_are_config_errors_naming_the_file(site, tmp_path):
    cert, key = _pair(site, "usherctrl")
    _, other_key = _pair(site, "lnm-01")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    missing = str(tmp_path / "missing.pem")

    with pytest.raises(ConfigError, match=f"{missing}: certificate file not found"):
        pki.server_tls_options(missing, key)
    with pytest.raises(ConfigError, match=f"{garbage}: not a PEM certificate"):
        pki.server_tls_options(str(garbage), key)
    with pytest.raises(ConfigError, match=f"{garbage}: not a PEM private key"):
        pki.server_tls_options(cert, str(garbage))
    with pytest.raises(ConfigError, match=f"{other_key}: private key does not match"):
        pki.server_tls_options(cert, other_key)
    with pytest.raises(ConfigError, match=f"{missing}: certificate file not found"):
        pki.server_tls_options(cert, key, missing, require_client_cert=True)
    with pytest.raises(ConfigError, match=f"{missing}: certificate file not found"):
        pki.client_tls_options("localhost", missing)
    with pytest.raises(ConfigError, match="needs a CA file"):
        pki.server_tls_options(cert, key, require_client_cert=True)
    with pytest.raises(ConfigError, match="both a certificate and a key"):
        pki.client_tls_options("localhost", site["ca"], cert_file=cert)


def test_encrypted_keys_are_refused_with_an_explanation(site, tmp_path):
    cert, key = _pair(site, "usherctrl")
    private_key = serialization.load_pem_private_key(open(key, "rb").read(), None)
    encrypted = tmp_path / "encrypted_key.pem"
    encrypted.write_bytes(private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match=f"{encrypted}: the private key is encrypted"):
        pki.server_tls_options(cert, str(encrypted))


def test_peer_common_name_without_tls_is_none():
    class PlainTransport:
        pass

    class NoCertificateYet:
        def getPeerCertificate(self):
            return None

    assert pki.peer_common_name(PlainTransport()) is None
    assert pki.peer_common_name(NoCertificateYet()) is None


# -- real handshakes over 127.0.0.1 ------------------------------------------------

@implementer(IHandshakeListener)
class _Greeter(Protocol):
    """Server side: once the handshake is done, say hello to the peer by its CN."""

    def connectionMade(self):
        self.lost = Deferred()
        self.factory.connections.append(self)

    def handshakeCompleted(self):
        peer = pki.peer_common_name(self.transport)
        self.factory.peer_names.append(peer)
        self.transport.write(f"hello {peer}\n".encode())

    def connectionLost(self, reason):
        self.lost.callback(None)


class _Visitor(Protocol):
    """Client side: wait for the greeting, then hang up."""

    def __init__(self):
        self.received = b""
        self.reason = None
        self.lost = Deferred()

    def dataReceived(self, data):
        self.received += data
        if self.received.endswith(b"\n"):
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


async def _visit(server_options, client_options):
    """Connect once; -> (bytes the client received, why it was disconnected, CNs the server saw)."""
    factory = ServerFactory.forProtocol(_Greeter)
    factory.connections, factory.peer_names = [], []
    port = await SSL4ServerEndpoint(
        reactor, 0, server_options, interface="127.0.0.1").listen(factory)
    try:
        visitor = _Visitor()
        await connectProtocol(
            SSL4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, client_options),
            visitor)
        await visitor.lost.addTimeout(_HANG_GUARD_SECONDS, reactor)
        await gatherResults([connection.lost for connection in factory.connections]
                            ).addTimeout(_HANG_GUARD_SECONDS, reactor)
    finally:
        await port.stopListening()
    return visitor.received, visitor.reason, factory.peer_names


def _lnm_port_options(site):
    cert, key = _pair(site, "usherctrl")
    return pki.server_tls_options(cert, key, site["ca"], require_client_cert=True)


@pytest_twisted.ensureDeferred
async def test_mutual_tls_accepts_a_site_certificate_and_reads_its_common_name(site):
    lnm_cert, lnm_key = _pair(site, "lnm-01")
    client = pki.client_tls_options("usherctrl", site["ca"], lnm_cert, lnm_key)

    received, _, peer_names = await _visit(_lnm_port_options(site), client)

    assert received == b"hello lnm-01\n"
    assert peer_names == ["lnm-01"]


@pytest_twisted.ensureDeferred
async def test_mutual_tls_refuses_a_client_without_a_certificate(site):
    client = pki.client_tls_options("usherctrl", site["ca"])

    received, reason, peer_names = await _visit(_lnm_port_options(site), client)

    assert received == b""
    assert peer_names == []
    assert reason.check(SSL.Error)
    assert "certificate required" in str(reason.value)


@pytest_twisted.ensureDeferred
async def test_mutual_tls_refuses_a_certificate_from_another_ca(site):
    intruder_cert, intruder_key = _pair(site, "intruder")
    client = pki.client_tls_options("usherctrl", site["ca"], intruder_cert, intruder_key)

    received, reason, peer_names = await _visit(_lnm_port_options(site), client)

    assert received == b""
    assert peer_names == []
    assert reason.check(SSL.Error)
    assert "unknown ca" in str(reason.value)


@pytest.mark.parametrize("hostname", ["usherctrl", "localhost", "127.0.0.1"])
@pytest_twisted.ensureDeferred
async def test_client_port_needs_no_client_certificate(site, hostname):
    cert, key = _pair(site, "usherctrl")
    server = pki.server_tls_options(cert, key, site["ca"])

    received, _, peer_names = await _visit(server, pki.client_tls_options(hostname, site["ca"]))

    assert received == b"hello None\n"
    assert peer_names == [None]


@pytest_twisted.ensureDeferred
async def test_client_refuses_a_server_certificate_for_another_name(site):
    cert, key = _pair(site, "usherctrl")
    server = pki.server_tls_options(cert, key)

    received, reason, _ = await _visit(
        server, pki.client_tls_options("controller.elsewhere.example", site["ca"]))

    assert received == b""
    assert reason.check(VerificationError)
    assert "controller.elsewhere.example" in str(reason.value)


@pytest_twisted.ensureDeferred
async def test_client_refuses_a_server_certificate_from_another_ca(site):
    cert, key = _pair(site, "usherctrl")
    server = pki.server_tls_options(cert, key)
    client = pki.client_tls_options("usherctrl", site["other_ca"])

    received, reason, _ = await _visit(server, client)

    assert received == b""
    assert reason.check(SSL.Error)
    assert "certificate verify failed" in str(reason.value)
