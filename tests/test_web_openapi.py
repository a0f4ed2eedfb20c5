"""usherweb as its own process (as the init scripts run it) over HTTPS:
it refuses to start without a certificate, serves its OpenAPI document
(valid, checked with openapi-spec-validator), and property tests that
schemathesis generates from that document (a bounded number of examples
per operation, valid and invalid data) get no 5xx and answers that match
the document."""

import json
import os
import signal
import subprocess
import sys

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from twisted.internet import threads
from twisted.internet.error import ConnectError

from usher import pki
from usher.clients.web import document
from usher.sandbox import free_port

from tests.e2e import sleep
from tests.webclient import WebClient

SANDBOX_LNMS = 1
EXAMPLES = 12
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")


def write_config(path, system, port, tmp_path, **options):
    d = system.description
    pki_dir = os.path.join(system.dir, "pki")
    lines = dict(port=port, controller_host="127.0.0.1", controller_port=d["client_port"],
                 controller_tls_name="localhost", ssl_ca_file=d["ca_file"],
                 ssl_cert_file=f"{pki_dir}/webproc_cert.pem",
                 ssl_key_file=f"{pki_dir}/webproc_key.pem",
                 gateway_cert_file=f"{pki_dir}/webproc_cert.pem",
                 gateway_key_file=f"{pki_dir}/webproc_key.pem",
                 static_dir=str(tmp_path), log_file=f"{tmp_path}/usherweb.log")
    lines.update(options)
    path.write_text("[web]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items()
                                        if v is not None))


@pytest_twisted.async_yield_fixture(scope="module")
async def daemon(system, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("usherweb")
    (tmp_path / "index.html").write_text("<!doctype html><title>Usher</title>")
    pki.issue_cert(os.path.join(system.dir, "pki"), "webproc", os.path.join(system.dir, "pki"),
                   role="gateway", hostnames=["localhost"], ips=["127.0.0.1"], force=True)
    port = free_port()
    config = tmp_path / "web.config"
    write_config(config, system, port, tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "usher.clients.web", "--isolated",
                                "--config", str(config)], stdin=subprocess.DEVNULL)
    url = f"https://localhost:{port}"
    ca = system.description["ca_file"]
    for _ in range(200):
        try:
            await WebClient(url, ca).get("/api/v1/openapi.json")
            break
        except ConnectError:
            await sleep(0.05)
    else:
        raise AssertionError("usherweb did not start: " + open(tmp_path / "usherweb.log").read())
    yield url, ca, tmp_path
    process.send_signal(signal.SIGTERM)
    for _ in range(200):
        if process.poll() is not None:
            break
        await sleep(0.05)
    else:
        process.kill()
    assert process.returncode == 0


def test_refuses_to_start_without_a_certificate(tmp_path, system):
    config = tmp_path / "web.config"
    write_config(config, system, free_port(), tmp_path, ssl_cert_file=None,
                 ssl_key_file=None)
    completed = subprocess.run([sys.executable, "-m", "usher.clients.web", "--isolated",
                                "--config", str(config)], capture_output=True, text=True,
                               timeout=60, stdin=subprocess.DEVNULL)
    assert completed.returncode == 2
    assert "usherweb: configuration error: [web] ssl_cert_file and ssl_key_file are not " \
           "set: usherweb serves HTTPS only" in completed.stderr


@pytest_twisted.ensureDeferred
async def test_process_serves_https_pages_and_the_api(daemon, system):
    url, ca, tmp_path = daemon
    client = WebClient(url, ca)
    page = await client.get("/")
    assert page.code == 200 and b"<title>Usher</title>" in page.raw
    assert page.header(b"content-security-policy").startswith("default-src 'self'")
    assert page.header(b"strict-transport-security")
    assert (await client.get("/nothing-here")).code == 404
    assert (await client.get("/.hidden")).code == 404
    assert (await client.login("alice", system.description["password"])).code == 200
    assert (await client.get("/api/v1/vms")).code == 200
    with pytest.raises(Exception):          # plain HTTP is not served
        await WebClient(url.replace("https://localhost", "http://127.0.0.1")).get("/")
    log_text = open(tmp_path / "usherweb.log").read()
    assert f"usherweb serving on https://127.0.0.1:{url.rsplit(':', 1)[1]}/" in log_text
    assert "session for alice opened from 127.0.0.1" in log_text
    # Nothing secret in the log.
    assert system.description["password"] not in log_text
    assert client.cookies["usher_session"] not in log_text and client.csrf not in log_text


@pytest_twisted.ensureDeferred
async def test_openapi_document_is_valid_and_served(daemon):
    from openapi_spec_validator import validate
    url, ca, _ = daemon
    served = await WebClient(url, ca).get("/api/v1/openapi.json")
    assert served.code == 200 and served.json == json.loads(json.dumps(document()))
    validate(served.json)
    paths = set(served.json["paths"])
    assert {"/vms", "/vms/start", "/vms/pause", "/vms/migrate", "/stream", "/plugins",
            "/problems", "/lnms/{name}", "/tokens"} <= paths


# Not generated: /login (failed logins would arm the controller's back-off
# for the tests that follow; test_web_api covers it), /logout and
# /tokens/current (they end the session the other examples use), /stream
# (an answer that never ends).
SKIPPED = {("POST", "/login"), ("POST", "/logout"), ("DELETE", "/tokens/current"),
           ("GET", "/stream")}


@pytest_twisted.ensureDeferred
async def test_schemathesis_property_tests_against_the_daemon(daemon, system):
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    url, ca, _ = daemon
    client = WebClient(url, ca)
    assert (await client.login("bob", "bob-secret")).code == 200
    headers = {"Cookie": f"usher_session={client.cookies['usher_session']}",
               "X-CSRF-Token": client.csrf}
    schema = schemathesis.openapi.from_dict(document())
    operations = [result.ok() for result in schema.get_all_operations()]
    tested = []

    def run(operation, mode):
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call(base_url=f"{url}/api/v1", headers=headers, verify=ca,
                                 timeout=60)
            assert response.status_code < 500, (case.method, case.formatted_path,
                                                response.status_code, response.text)
            # Every check but "schema-valid data is accepted": the document
            # says the types; what the controller checks beyond them (a
            # name is a DNS label, a regex is RE2, a VM exists) it answers
            # with a 4xx, which is right.
            case.validate_response(response, headers=headers,
                                   excluded_checks=[positive_data_acceptance],
                                   transport_kwargs={"verify": ca, "timeout": 60})
        try:
            check()
        except Unsatisfiable:
            # No invalid input exists (an operation without parameters).
            assert mode == GenerationMode.NEGATIVE

    for operation in operations:
        if (operation.method.upper(), operation.path) in SKIPPED:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            await threads.deferToThread(run, operation, mode)
        tested.append(operation.path)
    assert len(tested) >= 20
    # The session survived it all.
    assert (await client.get("/api/v1/session")).code == 200
    await client.post("/api/v1/vms/delete", {"force": True, "regex": "."})
