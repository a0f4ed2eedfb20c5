"""Security, hole 5: certificate roles, attacked through the real interfaces.

A real sandbox (controller and two LNMs as processes, TLS on 127.0.0.1) and
certificates of its own site CA that an attacker may hold: plusher's
(role gateway), the controller's own, an LNM's with a name the controller
does not allow, an LNM's key posing as the controller. Each is refused in
the TLS handshake with a log line naming the CN and role, nothing changes,
and the controller keeps serving another user. The client port's optional
gateway certificate is checked on the in-process controller boundary
(``tests.clientgrid``), where the server side of a connection can be seen.
"""

import json
import os
import subprocess
import sys

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.endpoints import (TCP4ClientEndpoint, SSL4ServerEndpoint,
                                        wrapClientTLS)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.spread import pb

from usher import pki, settings
from usher.client import UsherClient
from usher.clients.plusher import Gateway, PlusherSettings
from usher.config import load_config
from usher.controller.recovery import announce
from usher.errors import ConfigError, UsherError
from usher.protocol import PROTOCOL_VERSION

from tests.clientgrid import PASSWORDS, issue_without_role
from tests.e2e import RunningSandbox, wait_for

HANG_GUARD = 20     # seconds; a safety net, no test relies on timing


@pytest_twisted.async_yield_fixture(scope="module")
async def system(tmp_path_factory):
    box = RunningSandbox(tmp_path_factory.mktemp("sandbox"), lnms=2)
    await box.start()
    box.add_user("bob", "bob-secret")
    pki_dir = os.path.join(box.dir, "pki")
    # What an attacker may hold: certificates of the site CA for other roles.
    pki.issue_cert(pki_dir, "lnm2", os.path.join(box.dir, "gateway-named-lnm2"),
                   role="gateway", hostnames=["localhost"])
    pki.issue_cert(pki_dir, "plusher", pki_dir, role="gateway", hostnames=["localhost"])
    pki.issue_cert(pki_dir, "lnm9", pki_dir, role="lnm")
    # An LNM whose name is what clients dial: only its role betrays it.
    pki.issue_cert(pki_dir, "localhost", pki_dir, role="lnm")
    box.bob = await box.connected_client("bob", "bob-secret")
    yield box
    await box.stop()


def pair(system, name, where="pki"):
    directory = os.path.join(system.dir, where)
    return os.path.join(directory, f"{name}_cert.pem"), os.path.join(directory, f"{name}_key.pem")


def log_of(system, name):
    with open(os.path.join(system.dir, "logs", f"{name}.log"), encoding="utf-8",
              errors="replace") as f:
        return f.read()


async def lnm_names(system):
    return [lnm["name"] for lnm in await system.bob.list_lnm()]


def known_lnms(system):
    with open(os.path.join(system.dir, "ctrl-state", "lnms.json"), encoding="utf-8") as f:
        return json.load(f)


class FakeNode(pb.Referenceable):
    """What a fake LNM hands the controller in attach."""

    def remote_inventory(self):
        return []


class _Broker(pb.Broker):
    def connectionLost(self, reason):
        # An endpoint's connection lost before PB's handshake: fail the
        # waiting getRootObject with the reason (PBClientFactory would not).
        self.factory._failAll(reason)
        super().connectionLost(reason)


async def hand_made_client(cert_file, key_file, ca_file, port, method, *args):
    """A PB client over TLS presenting ``cert_file`` (made by hand: no checks
    of its own certificate) calls ``method`` on the root -> its result."""
    options = pki.client_tls_options("localhost", ca_file, cert_file, key_file)
    factory = pb.PBClientFactory()
    factory.protocol = _Broker
    broker = await wrapClientTLS(options, TCP4ClientEndpoint(
        reactor, "127.0.0.1", port, timeout=10)).connect(factory)
    try:
        root = await factory.getRootObject().addTimeout(HANG_GUARD, reactor)
        return await root.callRemote(method, *args).addTimeout(HANG_GUARD, reactor)
    finally:
        broker.transport.loseConnection()


def attach_as(system, cert_file, key_file):
    """A fake LNM with ``cert_file`` attaches to the controller's LNM port."""
    return hand_made_client(cert_file, key_file, system.description["ca_file"],
                            system.description["lnm_port"], "attach", FakeNode(),
                            {"protocol": PROTOCOL_VERSION, "recovery_port": 1})


@pytest.mark.parametrize("name, where, role", [
    ("plusher", "pki", "gateway"),
    ("lnm2", "gateway-named-lnm2", "gateway"),     # an allowed LNM name, the wrong role
    ("usherctrl", "pki", "controller"),            # the controller's own certificate
])
@pytest_twisted.ensureDeferred
async def test_certificates_of_other_roles_cannot_attach_as_an_lnm(system, name, where, role):
    before, known = await lnm_names(system), known_lnms(system)

    with pytest.raises(SSL.Error, match="alert"):      # refused in the handshake
        await attach_as(system, *pair(system, name, where))

    line = ("the controller's LNM port: refused 127.0.0.1:", f"certificate CN '{name}', "
            f"role '{role}': only an LNM (role lnm) is accepted")
    await wait_for(lambda: any(all(part in entry for part in line)
                               for entry in log_of(system, "usherctrl").splitlines()))
    assert "PRIVATE KEY" not in log_of(system, "usherctrl")
    # Nothing changed, and the controller kept serving another user.
    assert await lnm_names(system) == before == ["lnm1", "lnm2"]
    assert known_lnms(system) == known
    assert all(lnm["connected"] for lnm in await system.bob.list_lnm())


@pytest_twisted.ensureDeferred
async def test_an_lnm_whose_name_is_not_allowed_cannot_attach(system):
    before = await lnm_names(system)

    with pytest.raises(SSL.Error, match="alert"):
        await attach_as(system, *pair(system, "lnm9"))

    await wait_for(lambda: "certificate CN 'lnm9', role 'lnm': the name is not in [ctrl] "
                           "lnm_names" in log_of(system, "usherctrl"))
    assert await lnm_names(system) == before == ["lnm1", "lnm2"]
    assert "lnm9" not in known_lnms(system)


class Recorder(Protocol):
    """A fake controller: keeps every application byte a client sends."""

    def connectionMade(self):
        self.factory.connections += 1

    def dataReceived(self, data):
        self.factory.received += data


@pytest_twisted.async_yield_fixture
async def fake_controller(system):
    """-> start(name): a TLS server on 127.0.0.1 with the certificate and key
    ``name`` of the sandbox's CA (an LNM's: stolen from a compromised host)."""
    ports = []

    async def start(name):
        factory = ServerFactory.forProtocol(Recorder)
        factory.received, factory.connections = b"", 0
        # The attacker's server checks nothing of its own certificate.
        options = pki.server_tls_options(*pair(system, name))
        ports.append(await SSL4ServerEndpoint(reactor, 0, options,
                                              interface="127.0.0.1").listen(factory))
        factory.port = ports[-1].getHost().port
        return factory
    yield start
    for port in ports:
        await port.stopListening()


@pytest.mark.parametrize("name", ["localhost", "lnm1"])
@pytest_twisted.ensureDeferred
async def test_a_fake_controller_with_an_lnms_key_never_gets_a_password(
        system, fake_controller, name):
    fake = await fake_controller(name)
    password = "alice-password-for-the-fake"

    client = UsherClient(reactor, "127.0.0.1", fake.port, ca_file=system.description["ca_file"],
                         tls_name="localhost", username="alice", password=password,
                         timeout=10)
    with pytest.raises(UsherError) as caught:
        await client.connect()
    await client.disconnect()

    if name == "localhost":     # names what the client dials: the role refuses it
        assert "only the controller (role controller) is accepted" in str(caught.value)
        assert "CN 'localhost', role 'lnm'" in str(caught.value)
    assert fake.connections >= 1
    assert password.encode() not in fake.received and b"alice" not in fake.received

    # ush, as a user runs it, with its configuration pointed at the fake.
    config = os.path.join(system.dir, f"ush-fake-{name}.config")
    with open(system.description["configs"]["ush"], encoding="utf-8") as f:
        text = f.read()
    with open(config, "w", encoding="utf-8") as f:
        f.write(text.replace(f"controller_port = {system.description['client_port']}",
                             f"controller_port = {fake.port}")
                .replace(system.description["password"], password))
    completed = await system.ush("list", config=config)
    assert completed.returncode != 0
    assert password.encode() not in fake.received
    assert (await system.bob.list_lnm())     # the real controller kept serving


def recovery_port_of(system, lnm):
    config = load_config(settings.LNM, [system.description["configs"][lnm]], isolated=True)
    return config["lnm"]["recovery_port"]


@pytest.mark.parametrize("name", ["lnm2", "localhost"])
@pytest_twisted.ensureDeferred
async def test_an_lnms_recovery_listener_refuses_an_lnm_posing_as_the_controller(system, name):
    # "localhost" is the controller identity lnm1 checks (controller_tls_name).
    options = pki.client_tls_options("lnm1", system.description["ca_file"],
                                     *pair(system, name), peer_role="lnm")

    with pytest.raises(Exception) as caught:
        await announce(reactor, "127.0.0.1", recovery_port_of(system, "lnm1"), options,
                       timeout=10).addTimeout(HANG_GUARD, reactor)

    assert not str(caught.value).startswith("OK")
    await wait_for(lambda: "LNM lnm1's recovery listener: refused 127.0.0.1:" in
                   log_of(system, "lnm1") and f"certificate CN '{name}', role 'lnm': only "
                   "the controller (role controller) is accepted" in log_of(system, "lnm1"))
    assert "recovery announcement from the controller" not in log_of(system, "lnm1")
    assert await lnm_names(system) == ["lnm1", "lnm2"]


def test_an_old_certificate_without_a_role_stops_the_controller_naming_the_remedy(
        system, tmp_path):
    issue_without_role(os.path.join(system.dir, "pki"), "usherctrl", tmp_path)
    config = tmp_path / "ctrl.config"
    with open(system.description["configs"]["ctrl"], encoding="utf-8") as f:
        text = f.read()
    pki_dir = os.path.join(system.dir, "pki")
    config.write_text(text.replace(f"{pki_dir}/usherctrl_", f"{tmp_path}/usherctrl_")
                      .replace(f"client_port = {system.description['client_port']}",
                               "client_port = 1").replace(
                                   f"lnm_port = {system.description['lnm_port']}",
                                   "lnm_port = 2"))

    completed = subprocess.run([sys.executable, "-m", "usher.controller.main", "--isolated",
                                "--config", str(config)], capture_output=True, text=True,
                               timeout=60, stdin=subprocess.DEVNULL)

    assert completed.returncode == 2
    assert (f"{tmp_path}/usherctrl_cert.pem: the certificate (CN 'usherctrl') has no Usher "
            "role: it was issued before certificate roles. Reissue it with 'usher cert issue "
            "--controller usherctrl") in completed.stderr
    assert "Traceback" not in completed.stderr


# -- the client port: an optional gateway certificate --------------------------------

class RecordingRoot:
    """The client port's root, noting every server-side broker."""

    def __init__(self, root):
        self.root = root
        self.brokers = []

    def rootObject(self, broker):
        self.brokers.append(broker)
        return self.root.rootObject(broker)


async def recording_grid(client_grids):
    grid = await client_grids()
    pb_factory = grid.port.factory.wrappedFactory
    pb_factory.root = RecordingRoot(pb_factory.root)
    return grid, pb_factory.root


def grid_client(grid, user, **tls):
    client = UsherClient(reactor, "127.0.0.1", grid.port.getHost().port, ca_file=grid.ca_file,
                         tls_name="localhost", username=user, password=PASSWORDS[user],
                         timeout=10, **tls)
    grid.clients.append(client)
    return client


@pytest_twisted.ensureDeferred
async def test_a_gateway_certificate_marks_the_connection_and_plain_clients_still_log_in(
        client_grids, pki_dir):
    pki.issue_cert(pki_dir, "plusher", pki_dir, role="gateway", force=True)
    gateway_cert, gateway_key = (os.path.join(pki_dir, f"plusher_{kind}.pem")
                                 for kind in ("cert", "key"))
    grid, root = await recording_grid(client_grids)

    gateway = grid_client(grid, "alice", cert_file=gateway_cert, key_file=gateway_key)
    assert (await gateway.connect())["user"] == "alice"
    plain = grid_client(grid, "bob")
    assert (await plain.connect())["user"] == "bob"

    assert [pki.peer_role(broker.transport) for broker in root.brokers] == ["gateway", None]
    assert pki.peer_identity(root.brokers[0].transport) == pki.PeerIdentity("plusher", "gateway")


@pytest_twisted.ensureDeferred
async def test_plusher_presents_its_gateway_certificate_to_the_controller(
        client_grids, pki_dir):
    pki.issue_cert(pki_dir, "plusher", pki_dir, role="gateway", force=True)
    grid, root = await recording_grid(client_grids)
    gateway = Gateway(PlusherSettings(
        controller_host="127.0.0.1", controller_port=grid.port.getHost().port,
        controller_tls_name="localhost", ssl_ca_file=grid.ca_file,
        gateway_cert_file=os.path.join(pki_dir, "plusher_cert.pem"),
        gateway_key_file=os.path.join(pki_dir, "plusher_key.pem"), call_timeout=10), reactor)
    try:
        assert await gateway.login("alice", PASSWORDS["alice"])
        assert [pki.peer_role(broker.transport) for broker in root.brokers] == ["gateway"]
    finally:
        await gateway.stop()


@pytest.mark.parametrize("name", ["lnm1", "usherctrl"])
@pytest_twisted.ensureDeferred
async def test_a_client_certificate_of_another_role_is_refused_on_the_client_port(
        client_grids, pki_dir, name):
    if name != "usherctrl":
        pki.issue_cert(pki_dir, name, pki_dir, role="lnm", force=True)
    grid, root = await recording_grid(client_grids)
    intruder = grid_client(grid, "alice", cert_file=os.path.join(pki_dir, f"{name}_cert.pem"),
                           key_file=os.path.join(pki_dir, f"{name}_key.pem"))
    # The client library itself refuses to present a non-gateway certificate.
    with pytest.raises(ConfigError, match="needs role 'gateway'"):
        await intruder.connect()
    # A hand-made client that does present it fails the handshake.
    with pytest.raises(SSL.Error, match="alert"):
        await hand_made_client(os.path.join(pki_dir, f"{name}_cert.pem"),
                               os.path.join(pki_dir, f"{name}_key.pem"), grid.ca_file,
                               grid.port.getHost().port, "login", "alice",
                               PASSWORDS["alice"], None)
    assert all(pki.peer_role(broker.transport) is None for broker in root.brokers)
    assert (await grid_client(grid, "bob").connect())["user"] == "bob"


def test_an_lnm_with_an_old_certificate_refuses_to_start_naming_the_remedy(system, tmp_path):
    from usher.lnm.service import controller_endpoint

    issue_without_role(os.path.join(system.dir, "pki"), "lnm1", tmp_path)
    config = load_config(settings.LNM, [system.description["configs"]["lnm1"]],
                         isolated=True)["lnm"]
    config.update(ssl_cert_file=str(tmp_path / "lnm1_cert.pem"),
                  ssl_key_file=str(tmp_path / "lnm1_key.pem"))

    with pytest.raises(ConfigError, match=r"has no Usher role: it was issued before "
                                          r"certificate roles. Reissue it with 'usher cert "
                                          r"issue --lnm lnm1'"):
        controller_endpoint(reactor, config)
