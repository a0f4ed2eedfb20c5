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
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

from usher import pki
from usher.controller.service import client_port_tls, lnm_port_tls
from usher.errors import ConfigError, InvalidRequest

from tests.clientgrid import issue_without_role

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
    pki.issue_cert(ca_dir, "usherctrl", certs, role="controller", hostnames=["localhost"],
                   ips=["127.0.0.1"])
    pki.issue_cert(ca_dir, "lnm-01", certs, role="lnm")
    pki.issue_cert(other_ca_dir, "intruder", certs, role="lnm")
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


@pytest.mark.parametrize("role", ["controller", "gateway"])
def test_issue_cert_is_signed_by_the_ca_with_its_role_and_names(tmp_path, role):
    ca = pki.init_ca(tmp_path / "ca")
    files = pki.issue_cert(tmp_path / "ca", "ctrl-07", tmp_path / "out", role=role,
                           hostnames=["ctrl-07.cluster.example", "localhost"],
                           ips=["127.0.0.1", "::1"])

    assert files.cert_path == tmp_path / "out" / "ctrl-07_cert.pem"
    assert files.key_path == tmp_path / "out" / "ctrl-07_key.pem"
    assert stat.S_IMODE(os.stat(files.key_path).st_mode) == 0o600
    certificate = _load(files.cert_path)
    certificate.verify_directly_issued_by(_load(ca.cert_path))
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ctrl-07"
    assert [a.value for a in certificate.subject.get_attributes_for_oid(pki.ROLE_OID)] == [role]
    assert pki.certificate_identity(certificate) == pki.PeerIdentity("ctrl-07", role)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [
        "ctrl-07", "ctrl-07.cluster.example", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(files.key_path.read_bytes(), None)
    assert key.public_key().public_numbers() == certificate.public_key().public_numbers()


def test_an_lnm_certificate_names_only_the_lnm(tmp_path):
    pki.init_ca(tmp_path)
    certificate = _load(pki.issue_cert(tmp_path, "lnm-07", tmp_path, role="lnm").cert_path)

    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(names) == [x509.DNSName("lnm-07")]
    assert pki.certificate_identity(certificate) == pki.PeerIdentity("lnm-07", "lnm")
    # Dialled by the controller (recovery) and dialling it: both usages.
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    for extra in ({"hostnames": ["localhost"]}, {"ips": ["127.0.0.1"]}):
        with pytest.raises(InvalidRequest, match="names only the LNM"):
            pki.issue_cert(tmp_path, "lnm-08", tmp_path, role="lnm", **extra)
    assert not (tmp_path / "lnm-08_cert.pem").exists()


def test_issue_cert_can_make_rsa_keys(tmp_path):
    pki.init_ca(tmp_path)
    files = pki.issue_cert(tmp_path, "ctrl", tmp_path, role="controller", key_type="rsa")
    key = serialization.load_pem_private_key(files.key_path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048


def test_issue_cert_never_outlives_its_ca(tmp_path):
    ca = pki.init_ca(tmp_path, days=30)
    certificate = _load(pki.issue_cert(tmp_path, "ctrl", tmp_path, role="controller",
                                       days=825).cert_path)
    assert certificate.not_valid_after_utc <= _load(ca.cert_path).not_valid_after_utc


@pytest.mark.parametrize("kwargs, complaint", [
    ({"name": "../evil"}, "certificate name"),
    ({"name": "-lnm"}, "certificate name"),
    ({"name": "lnm", "hostnames": ["bad host"]}, "host name"),
    ({"name": "lnm", "ips": ["10.0.0.300"]}, "IP address"),
    ({"name": "lnm", "days": 0}, "days"),
    ({"name": "lnm", "key_type": "dsa"}, "key type"),
    ({"name": "lnm", "role": "admin"}, "certificate role"),
    ({"name": "lnm", "role": None}, "certificate role"),
])
def test_issue_cert_rejects_bad_input_and_writes_nothing(tmp_path, kwargs, complaint):
    pki.init_ca(tmp_path / "ca")
    out = tmp_path / "out"
    name = kwargs.pop("name")
    kwargs.setdefault("role", "controller")
    with pytest.raises(InvalidRequest, match=complaint):
        pki.issue_cert(tmp_path / "ca", name, out, **kwargs)
    assert not out.exists()


def test_issue_cert_refuses_to_overwrite_unless_forced(tmp_path):
    pki.init_ca(tmp_path)
    first = pki.issue_cert(tmp_path, "ctrl", tmp_path, role="controller").cert_path.read_bytes()
    with pytest.raises(InvalidRequest, match="ctrl_cert.pem"):
        pki.issue_cert(tmp_path, "ctrl", tmp_path, role="controller")
    assert (tmp_path / "ctrl_cert.pem").read_bytes() == first
    pki.issue_cert(tmp_path, "ctrl", tmp_path, role="controller", force=True)
    assert (tmp_path / "ctrl_cert.pem").read_bytes() != first


def test_issue_cert_without_a_ca_names_the_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"ca_cert\.pem: certificate file not found"):
        pki.issue_cert(tmp_path, "ctrl", tmp_path, role="controller")
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
        pki.server_tls_options(cert, key, missing, require_client_cert=True,
                               client_roles=["lnm"])
    with pytest.raises(ConfigError, match=f"{missing}: certificate file not found"):
        pki.client_tls_options("localhost", missing)
    with pytest.raises(ConfigError, match="needs a CA file"):
        pki.server_tls_options(cert, key, require_client_cert=True, client_roles=["lnm"])
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


def _ctrl(site, **options):
    cert, key = _pair(site, "usherctrl")
    return {"ssl_cert_file": cert, "ssl_key_file": key, "ssl_ca_file": site["ca"], **options}


def _lnm_port_options(site, lnm_names=("lnm-[01-09]",)):
    """The controller's own LNM port TLS."""
    return lnm_port_tls(_ctrl(site, lnm_names=list(lnm_names)))


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
    received, _, peer_names = await _visit(client_port_tls(_ctrl(site)),
                                           pki.client_tls_options(hostname, site["ca"]))

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


# -- certificate roles -------------------------------------------------------------

@pytest.fixture(scope="module")
def roles_site(site):
    """More certificates of the site CA: plusher's (gateway), an LNM not on
    the allow-list, and one issued before roles."""
    ca_dir = site["certs"].parent / "ca"
    pki.issue_cert(ca_dir, "plusher", site["certs"], role="gateway", hostnames=["localhost"])
    pki.issue_cert(ca_dir, "lnm-99", site["certs"], role="lnm")
    pki.issue_cert(ca_dir, "lnm-02", site["certs"], role="lnm")
    issue_without_role(ca_dir, "lnm-03", site["certs"])
    return site


@pytest.fixture
def warnings():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
    globalLogPublisher.removeObserver(events.append)


def test_name_allow_list_takes_names_ranges_and_whole_name_regexes():
    allowed = pki.NameAllowList(["lnm7", "node[1-3]", "web[01-02]", "~^rack[0-9]+$",
                                 "/gpu-.*/"])
    for name in ("lnm7", "node1", "node3", "web01", "web02", "rack12", "gpu-a"):
        assert name in allowed, name
    for name in ("lnm70", "node4", "web1", "web3", "xrack1", "agpu-a", "", None, 7):
        assert name not in allowed, name
    assert not pki.NameAllowList([])
    assert "lnm1" not in pki.NameAllowList([])
    for bad in (["lnm[1-"], ["~(bad"], [""]):
        with pytest.raises(ConfigError, match=r"^\[ctrl\] lnm_names: "):
            pki.NameAllowList(bad, option="[ctrl] lnm_names")


@pytest.mark.parametrize("name, role, complaint", [
    ("lnm-01", "controller", r"has role 'lnm', this daemon needs role 'controller': issue "
                             r"one with 'usher cert issue --controller lnm-01"),
    ("plusher", "lnm", r"has role 'gateway'.*usher cert issue --lnm plusher'"),
    ("lnm-03", "lnm", r"lnm-03_cert.pem: the certificate \(CN 'lnm-03'\) has no Usher role: "
                      r"it was issued before certificate roles. Reissue it with "
                      r"'usher cert issue --lnm lnm-03'"),
])
def test_a_daemon_refuses_to_start_with_a_certificate_of_another_role(
        roles_site, name, role, complaint):
    cert, key = _pair(roles_site, name)
    with pytest.raises(ConfigError, match=complaint):
        pki.server_tls_options(cert, key, role=role)
    with pytest.raises(ConfigError, match=complaint):
        pki.client_tls_options("usherctrl", roles_site["ca"], cert, key, role=role)


@pytest.mark.parametrize("name, complaint", [
    ("plusher", "role 'gateway': only an LNM (role lnm) is accepted"),
    ("usherctrl", "role 'controller': only an LNM (role lnm) is accepted"),
    ("lnm-99", "CN 'lnm-99', role 'lnm': the name is not in [ctrl] lnm_names"),
    ("lnm-03", "role none: the certificate has no Usher role (issued before certificate "
               "roles); only an LNM (role lnm) is accepted: reissue it with "
               "'usher cert issue --lnm lnm-03'"),
])
@pytest_twisted.ensureDeferred
async def test_lnm_port_refuses_other_roles_and_names_not_allowed(
        roles_site, warnings, name, complaint):
    cert, key = _pair(roles_site, name)
    client = pki.client_tls_options("usherctrl", roles_site["ca"], cert, key)

    received, reason, peer_names = await _visit(_lnm_port_options(roles_site), client)

    assert received == b"" and peer_names == []
    assert reason.check(SSL.Error)
    assert [line for line in warnings() if "the controller's LNM port: refused 127.0.0.1:" in line
            and complaint in line], warnings()
    assert not any("BEGIN" in line or "PRIVATE" in line for line in warnings())


@pytest_twisted.ensureDeferred
async def test_an_empty_lnm_allow_list_admits_no_lnm(roles_site, warnings):
    cert, key = _pair(roles_site, "lnm-01")
    server = _lnm_port_options(roles_site, lnm_names=())
    assert any("lnm_names is empty: no LNM can attach" in line for line in warnings())

    received, reason, _ = await _visit(
        server, pki.client_tls_options("usherctrl", roles_site["ca"], cert, key))

    assert received == b"" and reason.check(SSL.Error)


@pytest_twisted.ensureDeferred
async def test_a_client_refuses_a_server_of_another_role_even_if_it_names_the_host(
        roles_site, warnings):
    # An LNM's key posing as the controller "lnm-01" (what its certificate names).
    cert, key = _pair(roles_site, "lnm-01")
    server = pki.server_tls_options(cert, key)

    received, reason, _ = await _visit(server, pki.client_tls_options("lnm-01", roles_site["ca"]))

    assert received == b""
    assert reason.check(pki.CertificateRefused)
    assert ("CN 'lnm-01', role 'lnm': only the controller (role controller) is accepted"
            in str(reason.value))
    assert any("refused 127.0.0.1:" in line and "CN 'lnm-01'" in line for line in warnings())


@pytest_twisted.ensureDeferred
async def test_client_port_accepts_a_gateway_certificate_and_says_so(roles_site):
    identities = []

    @implementer(IHandshakeListener)
    class Recorder(_Greeter):
        def handshakeCompleted(self):
            identities.append((pki.peer_identity(self.transport), pki.peer_role(self.transport)))
            super().handshakeCompleted()

    cert, key = _pair(roles_site, "plusher")
    factory = ServerFactory.forProtocol(Recorder)
    factory.connections, factory.peer_names = [], []
    port = await SSL4ServerEndpoint(reactor, 0, client_port_tls(_ctrl(roles_site)),
                                    interface="127.0.0.1").listen(factory)
    try:
        for client in (pki.client_tls_options("localhost", roles_site["ca"], cert, key,
                                              role="gateway"),
                       pki.client_tls_options("localhost", roles_site["ca"])):
            visitor = _Visitor()
            await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1",
                                                     port.getHost().port, client), visitor)
            await visitor.lost.addTimeout(_HANG_GUARD_SECONDS, reactor)
    finally:
        await port.stopListening()
    assert identities == [(pki.PeerIdentity("plusher", "gateway"), "gateway"), (None, None)]


@pytest.mark.parametrize("name", ["lnm-01", "usherctrl"])
@pytest_twisted.ensureDeferred
async def test_client_port_refuses_a_client_certificate_that_is_not_a_gateway(roles_site, name):
    cert, key = _pair(roles_site, name)
    client = pki.client_tls_options("localhost", roles_site["ca"], cert, key)

    received, reason, peer_names = await _visit(client_port_tls(_ctrl(roles_site)), client)

    assert received == b"" and peer_names == [] and reason.check(SSL.Error)


def test_peer_identity_without_a_checked_handshake_is_none():
    class Plain:
        transport = None

    assert pki.peer_identity(Plain()) is None and pki.peer_role(object()) is None
