"""The controller's Prometheus endpoint (usher.controller.metrics), scraped
over real HTTP on 127.0.0.1 and parsed with prometheus_client's own parser."""

import prometheus_client
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, task
from twisted.spread import pb
from twisted.web.client import Agent, readBody

from usher import states
from usher.config import load_config
from usher.controller.client_link import UsherRealm
from usher.controller.core import Controller
from usher.controller.metrics import ControllerMetrics
from usher.controller.service import metrics_listener
from usher.controller.state import LNMInfo
from usher.errors import NoSuchVM, Rejected
from usher.protocol import FIGURES
from usher.settings import CTRL

DOMAIN = "usher.test"

# readBody warns about the HTTP/1.1 client transport it is given; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")



def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


class Rejecter:
    name = "rejecter"
    order = 10

    def entry_point(self, event):
        event.request.reject("no starts today")


def make_controller():
    clock = task.Clock()
    clock.advance(5000)
    controller = Controller(domain=DOMAIN, clock=clock)
    state = controller.state
    for lnm in ("lnm1", "lnm2"):
        state.lnms[lnm] = LNMInfo(lnm, {"cpus": 8}, handle=object())
    state.lnms["lnm3"] = LNMInfo("lnm3", {"cpus": 8})       # known, not connected
    for short, vm_state in (("1.web", states.RUN), ("2.web", states.RUN),
                            ("3.web", states.LOST), ("4.web", states.MISSING)):
        state.add(state.new_record(full(short), state=vm_state, lnm="lnm1",
                                   memory_mib=256, vcpus=1))
    state.set_unmanaged("stray", "lnm2", states.RUN)
    node = dict.fromkeys(FIGURES)
    node.update(cpu=[42.5, 30.0, 20.0], memory_used=[1024.0, 1024.0, 1024.0], vms=2,
                cpus=8, memory_mib=16384, free_memory_mib=4096, sampled_at=1.0,
                source="simulated:wave", simulated_load="wave")
    vm = dict.fromkeys(FIGURES)
    vm.update(name=full("1.web"), cpu=[150.0, 100.0, 50.0], net_rx=[2048.0, 1024.0, 512.0],
              source="libvirt")
    controller.lnm_status_report("lnm1", node, [vm])
    clock.advance(7)
    return controller


async def scrape(port):
    response = await Agent(reactor).request(
        b"GET", f"http://127.0.0.1:{port}/metrics".encode())
    assert response.code == 200
    body = (await readBody(response)).decode()
    return response, body


def samples(body):
    found = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found, name, **labels):
    return found[(name, tuple(sorted(labels.items())))]


@pytest_twisted.ensureDeferred
async def test_endpoint_exports_figures_and_controller_health(pool):
    controller = make_controller()
    metrics = ControllerMetrics(controller, reactor=reactor, pool=pool)
    metrics.install()
    from twisted.web.server import Site
    port = reactor.listenTCP(0, Site(metrics.resource()), interface="127.0.0.1")
    try:
        # Requests of several kinds and outcomes through the client boundary.
        realm = UsherRealm(controller, clock=controller.clock, call_timeout=30)
        _iface, alice, logout = await realm.requestAvatar("alice", None, pb.IPerspective)
        await realm.requestAvatar("bob", None, pb.IPerspective)
        await alice.perspective_list_lnm([], True)
        await alice.perspective_list(None, True)
        with pytest.raises(NoSuchVM):
            await alice.perspective_op_on("pause", {"names": ["nosuch"]})
        controller.chains.add(Rejecter(), "start_request")
        with pytest.raises(Rejected):
            await alice.perspective_start(["x"], [], {})
        logout()
        logout()            # PB may end a session twice; it counts once

        response, body = await scrape(port.getHost().port)
    finally:
        await port.stopListening()
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    found = samples(body)

    # Per-LNM and per-VM averages; unavailable figures have no sample.
    assert value(found, "usher_lnm_cpu_percent", lnm="lnm1", window="1m") == 42.5
    assert value(found, "usher_lnm_cpu_percent", lnm="lnm1", window="15m") == 20.0
    assert value(found, "usher_lnm_memory_used_bytes", lnm="lnm1", window="5m") == 1024 * 2**20
    assert not any(name == "usher_lnm_network_receive_bytes_per_second"
                   for name, _ in found)
    assert value(found, "usher_vm_cpu_percent", vm=full("1.web"), lnm="lnm1",
                 window="1m") == 150.0
    assert value(found, "usher_vm_network_receive_bytes_per_second", vm=full("1.web"),
                 lnm="lnm1", window="15m") == 512.0
    assert value(found, "usher_lnm_vms", lnm="lnm1") == 2
    assert value(found, "usher_lnm_free_memory_bytes", lnm="lnm1") == 4096 * 2**20
    assert value(found, "usher_lnm_report_age_seconds", lnm="lnm1") == 7.0
    assert value(found, "usher_lnm_figures_info", lnm="lnm1", source="simulated:wave") == 1

    # Controller health.
    assert value(found, "usher_lnms_connected") == 2
    assert value(found, "usher_lnms_known") == 3
    assert value(found, "usher_lnm_connected", lnm="lnm3") == 0
    assert value(found, "usher_clients_connected") == 1          # bob is still here
    assert value(found, "usher_vms_lost") == 1 and value(found, "usher_vms_missing") == 1
    assert value(found, "usher_vms", state="run") == 2
    assert value(found, "usher_vms_unmanaged") == 1
    assert value(found, "usher_status_reports_total") == 1
    assert value(found, "usher_requests_total", kind="list_lnm", outcome="ok") == 1
    assert value(found, "usher_requests_total", kind="pause", outcome="invalid") == 1
    assert value(found, "usher_requests_total", kind="start", outcome="rejected") == 1
    assert value(found, "usher_request_duration_seconds_count", kind="list") == 1
    assert value(found, "usher_plugin_chain_duration_seconds_count", event="start_request",
                 outcome="rejected") == 1
    assert value(found, "usher_plugin_chain_duration_seconds_count", event="list_request",
                 outcome="ok") == 1
    assert any(name.startswith("usherctrl_process_") for name, _ in found)


@pytest_twisted.ensureDeferred
async def test_without_per_vm_series_and_one_registry_per_controller(pool):
    first = ControllerMetrics(make_controller(), reactor=reactor, pool=pool, per_vm=False)
    second = ControllerMetrics(make_controller(), reactor=reactor, pool=pool)
    body = prometheus_client.generate_latest(first.registry).decode()   # on the reactor
    found = samples(body)
    assert not any(name.startswith("usher_vm_cpu") for name, _ in found)
    assert any(name == "usher_lnm_cpu_percent" for name, _ in found)
    assert "usher_vm_cpu_percent" in prometheus_client.generate_latest(
        second.registry).decode()
    assert "usher_lnms_connected" not in prometheus_client.generate_latest().decode()


@pytest_twisted.ensureDeferred
async def test_the_endpoint_is_off_unless_configured_and_binds_the_configured_address(
        tmp_path, pool):
    config = load_config(CTRL, isolated=True)
    assert config["ctrl"]["metrics_port"] is None
    assert config["ctrl"]["metrics_interface"] == "127.0.0.1"
    path = tmp_path / "ctrl.config"
    path.write_text("[ctrl]\nmetrics_port = 0\n")
    from usher.errors import ConfigError
    with pytest.raises(ConfigError, match="metrics_port"):
        load_config(CTRL, extra_files=[str(path)], isolated=True)

    controller = make_controller()
    ctrl = dict(config["ctrl"], metrics_port=free_port(), metrics_interface="127.0.0.1")
    listener = metrics_listener(controller, ctrl, reactor, pool)
    listener.startService()
    try:
        _, body = await scrape(ctrl["metrics_port"])
        assert "usher_lnm_cpu_percent" in body
        assert controller.instruments is listener.metrics
    finally:
        await listener.stopService()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
