"""Monitoring end to end: LNM processes sample (simulated load on the test
driver), report over mutual TLS, the controller consolidates, and clients
(the library, ush one-shot) and Prometheus see the figures."""

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.web.client import Agent, readBody

from tests.e2e import RunningSandbox, parse_json, sleep

# readBody warns about the HTTP/1.1 client transport it is given; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")



@pytest_twisted.async_yield_fixture(scope="module")
async def system(tmp_path_factory):
    box = RunningSandbox(tmp_path_factory.mktemp("monitored"), lnms=2, settings={
        "ctrl": {"metrics_per_vm": "true"},
        "lnm": {"sample_interval": "0.2", "status_report_interval": "0.5",
                "simulated_load": "idle"}})
    await box.start()
    yield box
    await box.stop()


@pytest_twisted.ensureDeferred
async def test_figures_flow_from_lnm_processes_to_clients_and_prometheus(system):
    client = await system.connected_client()
    result = await client.start(names=["hot"], lnms=["lnm2"],
                                args={"simulated_cpu": "80", "vcpus": 2})
    assert result["failed"] == []
    hot = "hot.alice.usher.test"
    deadline = reactor.seconds() + 20
    while True:           # real processes: wait for the first reports
        view = await client.top(count=1)
        if view["vms"] and view["vms"][0]["status"].get("cpu"):
            break
        assert reactor.seconds() < deadline, view
        await sleep(0.2)
    assert view["vms"][0]["name"] == hot and view["vms"][0]["lnm"] == "lnm2"
    assert view["vms"][0]["status"]["cpu"][0] == pytest.approx(160.0, rel=0.01)
    assert view["vms"][0]["status"]["source"] == "simulated:idle"

    lnms = {lnm["name"]: lnm for lnm in parse_json(await system.ush("list_lnm", "-s"))}
    assert lnms["lnm2"]["status"]["simulated_load"] == "idle"
    assert lnms["lnm2"]["status"]["vms"] == 1 and lnms["lnm1"]["status"]["vms"] == 0
    assert lnms["lnm2"]["status"]["cpu"][0] > lnms["lnm1"]["status"]["cpu"][0]

    listed = parse_json(await system.ush("list", "-s", "hot"))
    assert listed[0]["status"]["cpu"][0] == pytest.approx(160.0, rel=0.01)
    text = (await system.ush("list_lnm", "-s", json_output=False)).stdout
    assert "simulated:idle" in text and "simulated_load option" in text

    response = await Agent(reactor).request(b"GET", system.description["metrics_url"].encode())
    body = (await readBody(response)).decode()
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(body) for s in family.samples}
    assert found[("usher_vm_cpu_percent", (("lnm", "lnm2"), ("vm", hot),
                                           ("window", "1m")))] == pytest.approx(160.0, rel=0.01)
    assert found[("usher_lnms_connected", ())] == 2
    assert found[("usher_clients_connected", ())] >= 1
    assert found[("usher_requests_total", (("kind", "top"), ("outcome", "ok")))] >= 1
