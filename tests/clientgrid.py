"""An in-process grid (``tests.grid``) behind the controller's real client
boundary: a TLS listener on 127.0.0.1, the authentication chain (the local
password file, optionally PAM), the realm and perspectives of
``usher.controller.client_link``; tests drive it with real ``UsherClient``s,
as a user would through the client API, in well under a second."""

import os

from twisted.cred.portal import Portal
from twisted.internet.endpoints import SSL4ServerEndpoint

from usher import passwdfile, pki
from usher.auth.chain import build_auth_chain
from usher.client import UsherClient
from usher.auth.throttle import LoginThrottle
from usher.controller.client_link import UsherRealm
from usher.controller.client_login import ClientPBFactory, ClientRoot, LoginSlots
from usher.controller.service import _role_lookup, client_port_tls

from tests.grid import Grid

PASSWORDS = {"root": "root-secret", "alice": "alice-secret", "bob": "bob-secret"}


def make_pki(directory):
    """A CA and the controller's certificate for localhost -> (dir, ca file)."""
    directory = str(directory)
    pki.init_ca(directory, common_name="Usher test CA", force=True)
    pki.issue_cert(directory, "usherctrl", directory, role=pki.ROLE_CONTROLLER,
                   hostnames=["localhost"], ips=["127.0.0.1"], force=True)
    return directory, os.path.join(directory, "ca_cert.pem")


def issue_without_role(ca_dir, name, out_dir):
    """``name``_cert.pem/_key.pem in ``out_dir`` as ``usher cert issue`` made
    them before certificate roles (both usages, no role), signed by the CA in
    ``ca_dir``: what an existing deployment still has."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = pki.load_certificate(os.path.join(ca_dir, "ca_cert.pem"))
    ca_key = pki.load_private_key(os.path.join(ca_dir, "ca_key.pem"))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256()))
    with open(os.path.join(out_dir, f"{name}_cert.pem"), "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(out_dir, f"{name}_key.pem"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


class ClientGrid:
    def __init__(self, reactor, tmpdir, pki_dir, *, auth_modules=("local",), ctrl_extra=None,
                 login_clock=None, throttle_policy=None, concurrent_logins=16,
                 is_gateway=None, login_timeout=30.0, prelogin_bytes=64 * 1024,
                 **grid_kwargs):
        self.reactor = reactor
        self.tmpdir = str(tmpdir)
        self.pki_dir = str(pki_dir)
        self.ca_file = os.path.join(self.pki_dir, "ca_cert.pem")
        self.grid = Grid(reactor, tmpdir, **grid_kwargs)
        self.controller = self.grid.controller
        os.makedirs(self.tmpdir, exist_ok=True)
        self.passwd = os.path.join(self.tmpdir, "passwd")
        for user, password in PASSWORDS.items():
            passwdfile.add_user(self.passwd, user, password, rounds=4)
        self.auth_modules = list(auth_modules)
        self.ctrl_extra = dict(ctrl_extra or {})
        self.port = None
        self.clients = []
        # The client port's login limits (usher.controller.client_login);
        # login_clock runs the throttle and the login deadline.
        self.login_clock = login_clock or reactor
        self.throttle = LoginThrottle(self.login_clock, throttle_policy)
        self.logins = LoginSlots(concurrent_logins)
        self.is_gateway = is_gateway
        self.login_timeout = login_timeout
        self.prelogin_bytes = prelogin_bytes
        self.chain = None

    @property
    def registry(self):
        return self.controller.plugins

    async def start(self):
        await self.grid.start()
        ctrl = {"passwd_file": self.passwd, **self.ctrl_extra}
        chain = self.chain = build_auth_chain(self.auth_modules, ctrl, self.grid.pool,
                                              self.reactor)
        realm = UsherRealm(self.controller, clock=self.reactor, call_timeout=10,
                           role_of=_role_lookup(chain))
        # The controller's own client-port TLS (an optional gateway certificate).
        tls = client_port_tls({"ssl_cert_file": os.path.join(self.pki_dir, "usherctrl_cert.pem"),
                               "ssl_key_file": os.path.join(self.pki_dir, "usherctrl_key.pem"),
                               "ssl_ca_file": self.ca_file})
        endpoint = SSL4ServerEndpoint(self.reactor, 0, tls, interface="127.0.0.1")
        root = ClientRoot(Portal(realm, [chain]), clock=self.login_clock,
                          throttle=self.throttle, logins=self.logins,
                          is_gateway=self.is_gateway)
        self.port = await endpoint.listen(ClientPBFactory(
            root, clock=self.login_clock, login_timeout=self.login_timeout,
            prelogin_bytes=self.prelogin_bytes))
        return self

    def client(self, user, password=None):
        client = UsherClient(self.reactor, "127.0.0.1", self.port.getHost().port,
                             ca_file=self.ca_file, tls_name="localhost", username=user,
                             password=PASSWORDS.get(user) if password is None else password,
                             timeout=20)
        self.clients.append(client)
        return client

    async def connected(self, user, password=None):
        client = self.client(user, password)
        await client.connect()
        return client

    async def stop(self):
        for client in self.clients:
            await client.disconnect()
        if self.port is not None:
            await self.port.stopListening()
        await self.grid.stop()


def plugin_instance(grid, name):
    """The instance of plugin ``name`` on any chain of ``grid`` (a Grid or ClientGrid)."""
    for registration in grid.controller.chains.registrations():
        if registration.plugin.name == name:
            return registration.plugin
    raise LookupError(name)
