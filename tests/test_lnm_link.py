"""The LNM's PB boundary: NodeAPI (usher.lnm.api) and the controller link
(usher.lnm.link) against a tiny fake controller.

In memory (MemoryReactorClock + iosim pumps) for attach, reporting, hostile
input and re-attach; one test over real mutual TLS on loopback with
certificates made by usher.pki, and the LNM service on the embedded test
driver.
"""

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.spread import pb
from twisted.test.iosim import ConnectionCompleter

from test_lnm_node import result_of
from usher import pki, records, states
from usher.controller.service import lnm_port_tls
from usher.errors import InvalidRequest, NoSuchVM, OperationFailed, from_failure
from usher.liveness import HeardBroker
from usher.lnm import api
from usher.lnm.api import NodeAPI
from usher.lnm.link import ControllerLink
from usher.lnm.node import NodeManager

from tests.fakes import FakeVMM, record

PORT = 7391
SCAN = 10.0
REPORT = 0.5
RETRY = 2.0
VM = "1.web.alice.usher.local"


class FakeReporter(pb.Referenceable):
    """Acknowledges every change as a managed record (MISSING when gone)."""

    def __init__(self):
        self.reports = []

    def remote_report(self, chunks):
        changes = records.decode_chunks(chunks)
        self.reports.append(changes)
        return records.encode_chunks([record(c["name"], c["state"] or states.MISSING,
                                             version=len(self.reports) + 10)
                                      for c in changes])


class FakeController(pb.Root):
    def __init__(self):
        self.attaches = []
        self.reporter = FakeReporter()
        self.refuse = None

    def remote_attach(self, node_api, hello):
        if self.refuse is not None:
            raise self.refuse
        self.attaches.append((node_api, hello))
        return self.reporter


class ControllerSideFactory(pb.PBServerFactory):
    """As the controller's: its brokers answer protocol-level heartbeats."""
    protocol = HeardBroker


class Harness:
    """An LNM (FakeVMM + NodeManager + ControllerLink) and a fake controller,
    connected through in-memory pumps on one MemoryReactorClock."""

    def __init__(self):
        self.reactor = MemoryReactorClock()
        self.controller = FakeController()
        self.reactor.listenTCP(PORT, ControllerSideFactory(self.controller))
        self.completer = ConnectionCompleter(self.reactor)
        self.vmm = FakeVMM()
        self.manager = NodeManager(self.vmm, name="lnm1", clock=self.reactor,
                                   scan_interval=SCAN, report_interval=REPORT)
        result_of(self.manager.startup())
        self.link = ControllerLink(TCP4ClientEndpoint(self.reactor, "ctrl.example", PORT),
                                   self.manager, NodeAPI(self.manager), clock=self.reactor,
                                   call_timeout=30, recovery_port=7392,
                                   retry_policy=lambda attempt: RETRY)
        self.pump = None

    def connect(self):
        self.pump = self.completer.succeedOnce()
        assert self.pump is not None, "no connection attempt pending"
        self.pump.flush()

    def call(self, method, *args):
        """Call the LNM's node API the way the controller does."""
        node_api = self.controller.attaches[-1][0]
        d = node_api.callRemote(method, *args)
        self.pump.flush()
        return result_of(d)

    def call_error(self, method, *args):
        node_api = self.controller.attaches[-1][0]
        errors = []
        node_api.callRemote(method, *args).addErrback(errors.append)
        self.pump.flush()
        assert errors, f"{method} did not fail"
        return from_failure(errors[0])

    def advance(self, seconds):
        self.reactor.advance(seconds)
        if self.pump is not None:
            self.pump.flush()


@pytest.fixture
def harness():
    h = Harness()
    h.link.startService()
    yield h
    if h.link.running:
        d = h.link.stopService()
        if h.pump is not None:
            h.pump.flush()
        result_of(d)
    result_of(h.manager.shutdown())


def test_attach_on_connection_hands_over_the_node_api(harness):
    attached = harness.link.when_attached()
    assert not attached.called
    harness.connect()
    assert result_of(attached) == 1
    assert harness.link.attached
    [(node_api, hello)] = harness.controller.attaches
    assert isinstance(node_api, pb.RemoteReference)
    assert hello == {"protocol": 1, "recovery_port": 7392, "destroy_keeps": True}
    assert harness.call("ping") is True
    info = harness.call("get_node_info")
    assert info["name"] == "lnm1" and info["cpus"] == 4


def test_controller_drives_table_2_over_pb(harness):
    harness.connect()
    harness.vmm.add_domain("foreign", states.PAUSED)
    assert harness.call("receive", records.encode_chunks([record()])) == 1
    assert harness.call("start", VM)["state"] == states.RUN
    listed = records.decode_records(harness.call("list_vms"))
    assert sorted(d["name"] for d in listed) == sorted([VM, "foreign"])
    assert harness.call("op_on", "pause", VM)["state"] == states.PAUSED
    assert harness.call("get_details", VM)["owner"] == "alice"
    assert harness.call("get_node_status")["vms"] == 0
    assert harness.call("op_on", "destroy", VM)["state"] == states.SHUTOFF
    assert harness.call("op_on", "delete", VM) is None
    assert VM not in harness.vmm.domains


def test_export_and_import_travel_as_base64_chunks(harness):
    harness.connect()
    harness.call("receive", records.encode_chunks([record()]))
    harness.call("start", VM)
    payload = harness.call("export_image", VM)
    assert isinstance(payload["xml"], str) and payload["state"] == states.RUN
    assert all(isinstance(c, str) for c in payload["image"])
    assert VM not in harness.vmm.domains
    harness.call("receive", records.encode_chunks([record(state=states.MIGRATING)]))
    assert harness.call("import_image", VM, payload)["state"] == states.RUN
    assert harness.vmm.domains[VM]["memory_mib"] == 128


def test_image_chunks_stay_under_the_banana_limit():
    data = bytes(range(256)) * 4000    # about 1 MiB
    chunks = api.encode_image(data)
    assert len(chunks) > 1
    assert all(len(c) <= 256 * 1024 for c in chunks)
    assert api.decode_image(chunks) == data


@pytest.mark.parametrize("method, args, message", [
    ("start", (42,), "must be a string"),
    ("start", ("x" * 5000,), "invalid VM name"),
    ("start", ("bad\nname",), "invalid VM name"),
    ("op_on", ("explode", VM), "unknown operation"),
    ("op_on", (["pause"], VM), "unknown operation"),
    ("receive", ("not chunks",), "JSON chunks"),
    ("receive", (['[{"name": 1}]'],), "malformed VM record"),
    ("receive", (['[{"name": "a", "state": "flying"}]'],), "unknown state"),
    ("migrate", (VM, "qemu+tcp://elsewhere"), "must be a dict"),
    ("migrate", (VM, {"migration_uri": 7}), "migration_uri"),
    ("import_image", (VM, {"xml": "<domain/>", "image": ["***"]}), "base64"),
    ("import_image", (VM, {"image": []}), "domain definition"),
])
def test_hostile_input_is_refused_and_changes_nothing(harness, method, args, message):
    harness.connect()
    calls = len(harness.vmm.calls)
    error = harness.call_error(method, *args)
    assert isinstance(error, InvalidRequest)
    assert message in str(error)
    assert len(harness.vmm.calls) == calls
    assert harness.manager.cached_names() == []


def test_errors_reach_the_controller_by_type(harness):
    harness.connect()
    assert isinstance(harness.call_error("start", VM), NoSuchVM)
    harness.vmm.fail_next = RuntimeError("secret internals")
    error = harness.call_error("get_node_info")
    assert isinstance(error, OperationFailed)
    assert "secret" not in str(error) and "internal error" in str(error)


def test_report_round_trip_updates_the_cache(harness):
    harness.connect()
    harness.call("receive", records.encode_chunks([record()]))
    harness.call("start", VM)
    harness.vmm.set_state(VM, states.PAUSED)       # paused outside Usher
    harness.advance(REPORT)
    [[change]] = harness.controller.reporter.reports
    assert change["name"] == VM and change["state"] == states.PAUSED
    assert change["metadata"] == {"owner": "alice", "cluster": "web"}
    cached = harness.manager.cached_vm(VM).record
    assert cached["state"] == states.PAUSED and cached["version"] == 11
    assert harness.manager.pending_changes == {}


def test_reattach_after_the_connection_drops_and_report_queued_changes(harness):
    harness.connect()
    harness.call("receive", records.encode_chunks([record()]))
    harness.call("start", VM)
    # The controller goes away.
    harness.pump.server.transport.loseConnection()
    harness.pump.flush()
    assert not harness.link.attached
    assert harness.manager._reporter is None
    reattached = harness.link.when_attached()
    # Changes while detached wait, the latest one per VM.
    harness.vmm.set_state(VM, states.PAUSED)
    harness.vmm.set_state(VM, states.SHUTOFF)
    harness.advance(REPORT)
    assert harness.controller.reporter.reports == []
    assert harness.manager.pending_changes[VM]["state"] == states.SHUTOFF
    # ClientService dials again after the retry delay.
    harness.reactor.advance(RETRY)
    harness.connect()
    assert result_of(reattached) == 2
    assert len(harness.controller.attaches) == 2
    harness.advance(REPORT)
    assert [[(c["name"], c["state"]) for c in batch]
            for batch in harness.controller.reporter.reports] == [[(VM, states.SHUTOFF)]]


def test_refused_attach_drops_the_connection_and_retries(harness):
    harness.controller.refuse = InvalidRequest("protocol 1 not supported")
    harness.connect()
    assert not harness.link.attached
    assert harness.pump.clientIO.disconnected
    harness.controller.refuse = None
    harness.reactor.advance(RETRY)
    harness.connect()
    assert harness.link.attached


def test_stopping_the_link_detaches_and_cancels_waiters(harness):
    harness.connect()
    harness.pump.server.transport.loseConnection()
    harness.pump.flush()
    waiting = harness.link.when_attached()
    harness.reactor.advance(RETRY)
    harness.connect()
    d = harness.link.stopService()
    harness.pump.flush()
    result_of(d)
    assert not harness.link.attached and harness.manager._reporter is None
    assert result_of(waiting) == 2
    never = harness.link.when_attached()
    harness.link.startService()              # dialling again...
    d = harness.link.stopService()           # ...and given up before connecting
    result_of(d)
    with pytest.raises(defer.CancelledError):
        result_of(never)


# -- over real TLS, with the service as usherlnm builds it ---------------------------

class CertifyingController(FakeController):
    """Records the common name of the certificate behind each attach."""

    def rootObject(self, broker):
        controller = self

        class Gateway(pb.Referenceable):
            def remote_attach(self, node_api, hello):
                controller.names.append(pki.peer_common_name(broker.transport))
                return FakeController.remote_attach(controller, node_api, hello)

        return Gateway()


@pytest_twisted.ensureDeferred
async def test_lnm_service_attaches_over_mutual_tls(tmp_path):
    from twisted.internet import reactor
    from twisted.internet.endpoints import SSL4ServerEndpoint

    from usher.lnm.service import make_service

    pki.init_ca(tmp_path / "ca")
    pki.issue_cert(tmp_path / "ca", "ctrl", tmp_path / "ctrl", role="controller",
                   hostnames=["localhost"], ips=["127.0.0.1"])
    pki.issue_cert(tmp_path / "ca", "lnm7", tmp_path / "lnm", role="lnm")
    controller = CertifyingController()
    controller.names = []
    server_options = lnm_port_tls({"ssl_cert_file": tmp_path / "ctrl" / "ctrl_cert.pem",
                                   "ssl_key_file": tmp_path / "ctrl" / "ctrl_key.pem",
                                   "ssl_ca_file": tmp_path / "ca" / "ca_cert.pem",
                                   "lnm_names": ["lnm[1-9]"]})
    port = await SSL4ServerEndpoint(reactor, 0, server_options,
                                    interface="127.0.0.1").listen(
        ControllerSideFactory(controller))
    config = {"lnm": {
        "name": None, "controller_host": "127.0.0.1",
        "controller_port": port.getHost().port, "controller_tls_name": None,
        "ssl_key_file": str(tmp_path / "lnm" / "lnm7_key.pem"),
        "ssl_cert_file": str(tmp_path / "lnm" / "lnm7_cert.pem"),
        "ssl_ca_file": str(tmp_path / "ca" / "ca_cert.pem"),
        "libvirt_uri": None, "test_host": True, "host_cpus": 3, "host_memory": 2048,
        "host_model": "tls-test", "state_dir": str(tmp_path / "state"),
        "domain_template": None, "migration_uri": None, "scan_interval": 10.0,
        "report_interval": 0.05, "threads": 2, "recovery_port": 7392,
        "recovery_interface": "127.0.0.1", "reconnect_initial_delay": 0.1,
        "reconnect_max_delay": 1.0, "call_timeout": 10.0, "log_file": None,
        "log_level": "info", "pid_file": None}}
    root = make_service(config, reactor)
    assert root.name == "lnm7"                 # from the certificate
    root.startService()
    try:
        await root.ready
        await defer.Deferred.fromCoroutine(_with_timeout(root.link.when_attached(), reactor))
        assert controller.names == ["lnm7"]
        node_api, hello = controller.attaches[0]
        info = await node_api.callRemote("get_node_info")
        assert (info["name"], info["cpus"], info["memory_mib"]) == ("lnm7", 3, 2048)
        await node_api.callRemote("receive", records.encode_chunks([record()]))
        started = await node_api.callRemote("start", VM)
        assert started["state"] == states.RUN
        assert await node_api.callRemote("op_on", "pause", VM)
        assert [d["name"] for d in records.decode_chunks(
            await node_api.callRemote("list_vms"))] == [VM]
    finally:
        await root.stopService()
        await port.stopListening()
    assert not root.link.attached


async def _with_timeout(d, reactor, seconds=10):
    d.addTimeout(seconds, reactor)
    return await d


# -- the usherlnm console script -----------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("[lnm]\nscan_interval = -3\n", "scan_interval"),
    ("[lnm]\nname = lnm1\nhost_cpus = many\n", "host_cpus"),
    ("[lnm]\ntest_host = yes\nssl_cert_file = /nonexistent/cert.pem\n", "/nonexistent/cert.pem"),
])
def test_usherlnm_refuses_an_invalid_configuration(tmp_path, capsys, text, message):
    from usher.lnm.main import main

    config = tmp_path / "lnm.config"
    config.write_text(text)
    assert main(["--isolated", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("usherlnm: configuration error:") and message in err


def test_reconnecting_retries_soon_a_few_times_then_backs_off():
    from usher.lnm.link import QUICK_RETRIES, reconnect_policy
    policy = reconnect_policy(1.0, 30.0, jitter=lambda: 0.0)
    delays = [policy(attempt) for attempt in range(1, 11)]
    assert delays[:QUICK_RETRIES] == [1.0] * QUICK_RETRIES
    assert delays[QUICK_RETRIES:] == [2.0, 4.0, 8.0, 16.0, 30.0]
    assert policy(10 ** 6) == 30.0
    jittered = reconnect_policy(1.0, 30.0)
    assert all(1.0 <= jittered(1) < 2.0 for _ in range(100))
