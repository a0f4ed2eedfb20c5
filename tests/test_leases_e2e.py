"""Leases through real processes (a controller and LNMs over TLS): the real
ush starts a VM with a short lease, an interactive ush session that stays
connected prints the warning notice live, then the lease's action runs and
the real ush shows and renews leases."""

import os
import sys
import textwrap

import pytest_twisted
from twisted.internet import defer, protocol, reactor

from tests.e2e import parse_json, wait_for

DOMAIN = "usher.test"
SANDBOX_LNMS = 2
LEASE_EVENTS = ("start_request", "start_complete", "vm_removed", "timer")


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


class Session(protocol.ProcessProtocol):
    """An interactive ush reading its commands from a pipe."""

    def __init__(self):
        self.output = ""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data.decode("utf-8", "replace")

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)

    def type(self, line):
        self.transport.write(line.encode() + b"\n")


def interactive_ush(system):
    session = Session()
    reactor.spawnProcess(session, sys.executable,
                         [sys.executable, "-m", "usher.clients.ush", "--config",
                          system.description["configs"]["ush"]],
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return session


@pytest_twisted.ensureDeferred
async def test_a_real_ush_session_is_warned_then_the_lease_ends(system, tmp_path):
    config = tmp_path / "leases.config"
    config.write_text(textwrap.dedent("""\
        interval = 1
        warn_before = 6s
        max_lease = 1d
        action = shutdown
        """), encoding="utf-8")
    admin = await system.connected_client()
    for event in LEASE_EVENTS:
        await admin.register_plugin("leases", event, str(config))
    session = interactive_ush(system)
    try:
        session.type("connect")
        await wait_for(lambda: "alice:ush>" in session.output or "Connected" in session.output
                       or "connected" in session.output, timeout=30)
        started = await system.ush("start", "--lease", "9s", "short")
        assert started.returncode == 0, started.stdout + started.stderr
        assert [s["name"] for s in parse_json(started)] == [full("short")]
        shown = parse_json(await system.ush("lease"))
        assert [(r["name"], r["action"]) for r in shown] == [(full("short"), "shutdown")]
        await wait_for(lambda: f"[notice] lease: the lease of {full('short')} ends in"
                       in session.output, timeout=30)
        assert "then it is shut down" in session.output
        await wait_for(lambda: f"[notice] lease: lease ended: {full('short')} was shut down"
                       in session.output, timeout=30)
        listed = parse_json(await system.ush("list", "short"))
        assert listed[0]["state"] == "shutoff"
        assert parse_json(await system.ush("lease")) == []

        # ush renews: within the bound, and beyond it refused with the reason.
        await system.ush("start", "--lease", "1h", "long", check=True)
        renewed = await system.ush("lease", "renew", "long", "2h", json_output=False)
        assert renewed.returncode == 0, renewed.stdout + renewed.stderr
        assert "Renewed 1 lease for 2h:" in renewed.stdout
        assert full("long") in renewed.stdout
        refused = await system.ush("lease", "renew", "long", "2d")
        assert refused.returncode == 1
        assert "longer than this site allows (max_lease 1d)" in refused.stdout
        bad = await system.ush("start", "--lease", "soon", "x", json_output=False)
        assert bad.returncode == 2 and "not a duration" in bad.stderr
    finally:
        session.type("quit")
        await session.ended
        for event in LEASE_EVENTS:
            await admin.unregister_plugin("leases", event)
