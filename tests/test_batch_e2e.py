"""usherbatchd end to end: a real sandbox (usherctrl and 3 usherlnm
processes over TLS), the real usherbatchd process, jobs queued with the real
``usher-batch`` command, and power hooks that are real scripts recording
their calls. Jobs are packed on one host, the empty hosts are put in
maintenance and powered down, a job that fits nowhere powers one up again,
and cancel, guest shut-off, status and report go through the command."""

import json
import os
import subprocess
import sys

import pytest_twisted
from twisted.internet import reactor, threads

from tests.e2e import RunningSandbox, wait_for
from usher.client import Selection
from usher.sandbox import LoggedProcess


def usher_batch(config, *args):
    argv = [sys.executable, "-m", "usher.clients.batchd.cli", "--config", config, "--json",
            *args]
    return threads.deferToThread(subprocess.run, argv, capture_output=True, text=True,
                                 timeout=60, stdin=subprocess.DEVNULL)


def write_setup(tmp_path, description):
    hook = tmp_path / "power-hook"
    calls = tmp_path / "power-calls"
    hook.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    hook.chmod(0o755)
    password = tmp_path / "batchd.password"
    password.write_text(description["password"] + "\n")
    password.chmod(0o600)
    config = tmp_path / "batchd.config"
    config.write_text(f"""[batchd]
controller_host = 127.0.0.1
controller_port = {description["client_port"]}
controller_tls_name = localhost
ssl_ca_file = {description["ca_file"]}
username = {description["user"]}
password_file = {password}
queue_dir = {tmp_path}/queue
state_dir = {tmp_path}/state
poll_interval = 0.5
idle_before_power_off = 1
min_powered_on = 1
power_on_after = 0
stop_grace = 5
power_off_command = {hook} off {{lnm}} {{hostname}}
power_on_command = {hook} on {{lnm}}
log_file = {tmp_path}/usherbatchd.log
""")
    return str(config), calls


def recorded(calls):
    try:
        return [line.split() for line in calls.read_text().splitlines()]
    except FileNotFoundError:
        return []


def status_of(tmp_path):
    try:
        with open(tmp_path / "state" / "status.json", encoding="utf-8") as f:
            return {j["id"]: j for j in json.load(f)["jobs"]}
    except (FileNotFoundError, ValueError):
        return {}


@pytest_twisted.ensureDeferred
async def test_usher_batch_jobs_run_packed_and_hosts_power_down_and_up(tmp_path):
    sandbox = await RunningSandbox(str(tmp_path / "sandbox"), lnms=3).start()
    daemon = None
    try:
        config, calls = write_setup(tmp_path, sandbox.description)
        process = LoggedProcess("usherbatchd", str(tmp_path / "usherbatchd.out"))
        argv = [sys.executable, "-m", "usher.clients.batchd", "--isolated", "--config", config,
                "--ready-file", str(tmp_path / "ready")]
        transport = reactor.spawnProcess(process, argv[0], argv, env=dict(os.environ))
        daemon = (process, transport)
        await wait_for(lambda: os.path.exists(tmp_path / "ready"), timeout=60)

        ids = []
        for _ in range(3):
            done = await usher_batch(config, "submit", "--vcpus", "4", "--memory", "1024",
                                     "--walltime", "600", "--arg", "purpose=e2e")
            assert done.returncode == 0, done.stderr
            ids.append(json.loads(done.stdout)["job"])
        await wait_for(lambda: all(status_of(tmp_path).get(i, {}).get("state") == "running"
                                   for i in ids), timeout=60)
        hosts = {status_of(tmp_path)[i]["lnm"] for i in ids}
        assert len(hosts) == 1, hosts           # packed onto one host
        busy = hosts.pop()
        client = await sandbox.connected_client()
        vm = client.vms[f"{ids[0]}.batch.{client.user}.{client.domain}"]
        assert vm["lnm"] == busy and vm["vcpus"] == 4 and vm["args"]["guaranteed"] == "yes"

        # The two empty hosts: maintenance, then the power-off hook.
        others = sorted(set(sandbox.description["lnms"]) - {busy})
        await wait_for(lambda: sorted(c[1] for c in recorded(calls) if c[0] == "off") == others,
                       timeout=60)
        lnms = {info["name"]: info for info in await client.list_lnm()}
        for name in others:
            assert lnms[name]["holds"]["maintenance"]["reason"] == "powered down by usherbatchd"
        assert "maintenance" not in lnms[busy].get("holds", {})

        # A job that fits on no powered-on host powers one up.
        done = await usher_batch(config, "submit", "--vcpus", "16", "--memory", "2048",
                                 "--walltime", "600")
        big = json.loads(done.stdout)["job"]
        await wait_for(lambda: status_of(tmp_path).get(big, {}).get("state") == "running",
                       timeout=60)
        powered_on = [c[1] for c in recorded(calls) if c[0] == "on"]
        assert powered_on == [status_of(tmp_path)[big]["lnm"]]
        lnms = {info["name"]: info for info in await client.list_lnm()}
        assert "maintenance" not in lnms[powered_on[0]].get("holds", {})

        # Cancel one with the command, let another's guest shut itself off.
        done = await usher_batch(config, "cancel", ids[1])
        assert done.returncode == 0, done.stderr
        await client.shutdown(Selection(names=[f"{ids[2]}.batch"]))
        await wait_for(lambda: status_of(tmp_path)[ids[1]]["state"] == "cancelled"
                       and status_of(tmp_path)[ids[2]]["state"] == "done", timeout=60)
        shown = await usher_batch(config, "status", "--all")
        states = {j["id"]: j["state"] for j in json.loads(shown.stdout)["jobs"]}
        assert states[ids[0]] == "running" and states[big] == "running"
        report = await usher_batch(config, "report")
        figures = json.loads(report.stdout)
        assert figures["usherbatchd"]["jobs_done"] == 2 and figures["baseline"]["jobs"] == 2
        # Ended jobs' VMs are removed.
        await wait_for(lambda: f"{ids[1]}.batch.{client.user}.{client.domain}" not in client.vms,
                       timeout=30)
        assert "Traceback" not in (tmp_path / "usherbatchd.log").read_text()
    finally:
        if daemon is not None and not daemon[0].ended.called:
            daemon[1].signalProcess("TERM")
            await daemon[0].ended
        await sandbox.stop()
