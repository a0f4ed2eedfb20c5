"""Plugins through real processes: a controller and three LNMs over TLS
(``usher sandbox``), driven by ush in a subprocess and by the client library."""

import json
import os
import textwrap

import pytest
import pytest_twisted

from usher.errors import Rejected

from tests.e2e import parse_json

DOMAIN = "usher.test"


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(text).lstrip("\n"))
    return str(path)


@pytest_twisted.ensureDeferred
async def test_ush_manages_plugins_and_swaps_placement(system, tmp_path):
    listed = parse_json(await system.ush("plugins"))
    assert {"limits", "pack", "spread", "leastloaded", "rebalancer"} <= set(listed["available"])

    limits = write(tmp_path / "limits.config", """
        max_vms_per_cluster = 2
        admins_exempt = no
        """)
    # In place of the default registration (the default quotas).
    await system.ush("unregister_plugin", "limits", "start_request", check=True)
    done = await system.ush("register_plugin", "limits", "start_request", limits,
                            json_output=False)
    assert done.returncode == 0, done.stderr
    assert "Plugin limits registered for start_request." in done.stdout
    await system.ush("unregister_plugin", "roundrobin", "start_request", check=True)
    await system.ush("register_plugin", "pack", "start_request", check=True)
    try:
        started = parse_json(await system.ush("start", "-n", "packed", "-c", "3"))
        placed = [s for s in started if "lnm" in s]
        # pack puts both allowed VMs on one host; limits leaves the third out
        assert len(placed) == 2 and len({s["lnm"] for s in placed}) == 1
        assert [s["error"] for s in started if "error" in s] == [
            "over the limit: at most 2 VMs per virtual cluster (packed has 2)"]
    finally:
        admin = await system.connected_client()
        await admin.unregister_plugin("pack")
        await admin.unregister_plugin("limits")
        await admin.register_plugin("limits", "start_request")
        await admin.register_plugin("roundrobin", "start_request")
    started = await admin.start(cluster="rr", count=3)
    assert len({s["lnm"] for s in started["started"]}) == 3

    bob_config = tmp_path / "bob.config"
    text = open(system.description["configs"]["ush"]).read()
    bob_config.write_text(text.replace(f"username = {system.description['user']}",
                                       "username = bob").replace(
        f"password = {system.description['password']}", "password = bob-secret"))
    refused = await system.ush("plugins", config=str(bob_config))
    assert refused.returncode == 1
    assert json.loads(refused.stdout) == {"error": "only administrators may manage plugins",
                                          "code": "permission_denied"}


@pytest_twisted.ensureDeferred
async def test_a_hanging_plugin_times_out_while_the_controller_keeps_serving(system,
                                                                           tmp_path):
    write(os.path.join(system.dir, "plugins", "e2e_hang.py"), '''
        """Test plugin: never answers."""
        from twisted.internet import defer


        class Plugin:
            def __init__(self, config, api):
                self.order = 1

            def entry_point(self, event):
                return defer.Deferred()
        ''')
    config = write(tmp_path / "hang.config", "timeout = 1.5\n")
    admin = await system.connected_client()
    await admin.register_plugin("e2e_hang", "start_request", config)
    try:
        from twisted.internet import reactor
        stuck = admin.start(["hung"])
        began = reactor.seconds()
        lnms = await admin.list_lnm()            # answered while the plugin hangs
        assert len(lnms) == 3 and not stuck.called
        assert reactor.seconds() - began < 1.5
        with pytest.raises(Rejected, match="plugin e2e_hang failed: TimeoutError"):
            await stuck
    finally:
        await admin.unregister_plugin("e2e_hang")
    assert full("hung") not in admin.vms
