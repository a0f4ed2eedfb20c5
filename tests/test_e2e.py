"""End to end: a controller and three LNMs as separate processes over real
TLS on 127.0.0.1 (``usher sandbox``), driven by the client library and by
ush in a subprocess."""

import os
import subprocess
import sys
import textwrap

import pytest
import pytest_twisted

from usher import pki, states
from usher.client import Selection, UsherClient
from usher.errors import (AuthenticationFailed, InvalidRequest, NoSuchVM, PermissionDenied,
                          Rejected, Unavailable, UsherError)

from tests.e2e import parse_json, wait_for

DOMAIN = "usher.test"


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


@pytest_twisted.ensureDeferred
async def test_start_cluster_spread_over_lnms_and_listed(system):
    alice = await system.connected_client()
    result = await alice.start(cluster="e2estart", count=6)
    assert result["failed"] == []
    assert sorted(s["name"] for s in result["started"]) == sorted(
        full(f"{i}.e2estart") for i in range(1, 7))
    assert {s["lnm"] for s in result["started"]} == {"lnm1", "lnm2", "lnm3"}
    # the cache follows, by notification, without asking
    await wait_for(lambda: all(alice.vms.get(full(f"{i}.e2estart"), {}).get("state")
                               == states.RUN for i in range(1, 7)))
    listed = await alice.list(Selection(clusters=["e2estart"]))
    assert [r["name"] for r in listed] == sorted(full(f"{i}.e2estart") for i in range(1, 7))
    remote = await alice.list(Selection(clusters=["e2estart"]), status=True)
    assert len(remote) == 6 and all("status" in r for r in remote)
    lnms = await alice.list_lnm()
    assert [lnm["name"] for lnm in lnms] == ["lnm1", "lnm2", "lnm3"]
    assert all(lnm["connected"] and lnm["cpus"] == 16 for lnm in lnms)


@pytest_twisted.ensureDeferred
async def test_every_table3_operation(system):
    alice = await system.connected_client()
    await alice.start(["ops1"])
    vm = full("ops1")
    for operation, expected in [("pause", states.PAUSED), ("resume", states.RUN),
                                ("hibernate", states.HIBERNATED), ("restore", states.RUN),
                                ("reboot", states.RUN), ("shutdown", states.SHUTOFF),
                                ("cycle", states.RUN)]:
        result = await getattr(alice, operation)([vm])
        assert result["failed"] == [], (operation, result)
        assert result["done"] == [{"name": vm, "state": expected}]
        await wait_for(lambda: alice.vms[vm]["state"] == expected)
    result = await alice.destroy([vm])          # Table 3's hard shutdown: kept
    assert result["done"] == [{"name": vm, "state": states.SHUTOFF}]
    await wait_for(lambda: alice.vms[vm]["state"] == states.SHUTOFF)
    result = await alice.delete([vm])
    assert result["done"] == [{"name": vm, "state": None}]
    await wait_for(lambda: vm not in alice.vms)


@pytest_twisted.ensureDeferred
async def test_migration(system):
    alice = await system.connected_client()
    await alice.start(["mig1"], lnms=["lnm1"])
    vm = full("mig1")
    result = await alice.migrate([vm], ["lnm2"])
    assert result["migrated"] == [{"name": vm, "from": "lnm1", "to": "lnm2"}]
    await wait_for(lambda: alice.vms[vm]["lnm"] == "lnm2"
                   and alice.vms[vm]["state"] == states.RUN)
    # the VM is really on lnm2 now: operations reach it there
    assert (await alice.pause([vm]))["done"] == [{"name": vm, "state": states.PAUSED}]
    assert (await alice.migrate([vm], ["lnm3"]))["migrated"][0]["to"] == "lnm3"
    await wait_for(lambda: alice.vms[vm]["state"] == states.PAUSED
                   and alice.vms[vm]["lnm"] == "lnm3")


@pytest_twisted.ensureDeferred
async def test_notifications_reach_a_second_client(system):
    first = await system.connected_client()
    second = await system.connected_client()
    seen = []
    second.on_change(lambda changed, removed: seen.extend(
        (r["name"], r["state"]) for r in changed))
    await first.start(["note1"])
    vm = full("note1")
    await wait_for(lambda: (vm, states.RUN) in seen)
    await first.pause([vm])
    await wait_for(lambda: (vm, states.PAUSED) in seen)
    assert second.vms[vm]["state"] == states.PAUSED


@pytest_twisted.ensureDeferred
async def test_cluster_filter_limits_the_cache(system):
    alice = await system.connected_client()
    await alice.start(cluster="filtered", count=2)
    await alice.start(cluster="unfiltered", count=1)
    narrow = await system.connected_client(clusters=["filtered"])
    assert sorted(narrow.vms) == [full("1.filtered"), full("2.filtered")]


@pytest_twisted.ensureDeferred
async def test_users_act_only_on_their_own_vms(system):
    alice = await system.connected_client()
    await alice.start(["mine"])
    bob = await system.connected_client("bob", "bob-secret")
    assert bob.vms == {}
    with pytest.raises(PermissionDenied):
        await bob.delete([full("mine")], {"force": True})
    with pytest.raises(PermissionDenied):
        await bob.destroy([full("mine")])
    # straight to the controller, bypassing the client's own check
    with pytest.raises(PermissionDenied):
        await bob._remote("op_on", "destroy", {"names": [full("mine")]}, None)
    assert alice.vms[full("mine")]["state"] == states.RUN


@pytest_twisted.ensureDeferred
async def test_plugin_chain_modifies_and_rejects(system):
    plugin_dir = os.path.join(system.dir, "plugins")
    with open(os.path.join(plugin_dir, "e2e_quota.py"), "w") as f:
        f.write(textwrap.dedent('''
            """Test plugin: at most two VMs per start; 'forbidden' clusters refused."""

            class Plugin:
                def __init__(self, config, api):
                    self.order = 5

                def entry_point(self, event):
                    request = event.request
                    if request.args.get("cluster") == "forbidden":
                        request.reject("cluster name 'forbidden' is not allowed here")
                    for vm in request.vms[2:]:
                        request.drop(vm, "quota: at most 2 VMs per request")
                    request.note("e2e_quota checked this request")
        '''))
    admin = await system.connected_client()
    described = await admin.register_plugin("e2e_quota", "start_request")
    assert {"plugin": "e2e_quota", "event": "start_request", "order": 5,
            "config": None, "timeout": 10} in described["registered"]
    try:
        result = await admin.start(cluster="quota", count=4)
        assert sorted(s["name"] for s in result["started"]) == [full("1.quota"),
                                                                 full("2.quota")]
        assert sorted(f["name"] for f in result["failed"]) == [full("3.quota"),
                                                                full("4.quota")]
        assert all("quota" in f["error"] for f in result["failed"])
        assert "e2e_quota checked this request" in result["notes"]
        with pytest.raises(Rejected, match="forbidden"):
            await admin.start(cluster="forbidden", count=1)
        assert not any(".forbidden." in n for n in admin.vms)
        bob = await system.connected_client("bob", "bob-secret")
        with pytest.raises(PermissionDenied):
            await bob.unregister_plugin("e2e_quota")
    finally:
        await admin.unregister_plugin("e2e_quota")
    result = await admin.start(cluster="quota2", count=3)
    assert len(result["started"]) == 3


@pytest_twisted.ensureDeferred
async def test_bad_input_gets_clear_errors_and_changes_nothing(system):
    alice = await system.connected_client()
    await alice.start(["bad1"])
    await wait_for(lambda: alice.vms.get(full("bad1"), {}).get("state") == states.RUN)
    before = {n: dict(r) for n, r in alice.vms.items()}
    with pytest.raises(NoSuchVM):
        await alice.pause(["doesnotexist"])
    with pytest.raises(NoSuchVM):
        await alice._remote("op_on", "pause", {"names": ["doesnotexist"]}, None)
    with pytest.raises(InvalidRequest, match="regular expression"):
        await alice._remote("op_on", "pause", {"regex": "(unclosed"}, None)
    with pytest.raises(InvalidRequest, match="range"):
        await alice._remote("op_on", "pause", {"names": ["[9-1].x"]}, None)
    with pytest.raises(InvalidRequest, match="unknown operation"):
        await alice._remote("op_on", "explode", {"names": ["bad1"]}, None)
    with pytest.raises(InvalidRequest):
        await alice._remote("start", ["UPPER_case!"], [], {})
    with pytest.raises(InvalidRequest):
        await alice._remote("start", "not-a-list", [], {})
    with pytest.raises(InvalidRequest):
        await alice._remote("op_on", "pause", {"names": ["bad1"], "evil": 1}, None)
    with pytest.raises(UsherError):
        await alice._remote("no_such_method")
    assert {n: dict(r) for n, r in alice.vms.items()} == before
    # the controller still serves
    assert (await alice.pause(["bad1"]))["done"][0]["state"] == states.PAUSED


@pytest_twisted.ensureDeferred
async def test_wrong_password_and_unknown_user_refused(system):
    with pytest.raises(AuthenticationFailed):
        await system.client("alice", "wrong").connect()
    with pytest.raises(AuthenticationFailed):
        await system.client("mallory", "whatever").connect()
    assert (await system.connected_client()).connected


@pytest_twisted.ensureDeferred
async def test_untrusted_controller_certificate_refused(system, tmp_path):
    pki.init_ca(tmp_path, common_name="Other CA")
    d = system.description
    from twisted.internet import reactor
    client = UsherClient(reactor, "127.0.0.1", d["client_port"],
                         ca_file=str(tmp_path / "ca_cert.pem"), tls_name="localhost",
                         username=d["user"], password=d["password"], timeout=10)
    with pytest.raises(Unavailable):
        await client.connect()
    mismatched = UsherClient(reactor, "127.0.0.1", d["client_port"], ca_file=d["ca_file"],
                             tls_name="not-the-controller", username=d["user"],
                             password=d["password"], timeout=10)
    with pytest.raises(Unavailable):
        await mismatched.connect()


def test_lnm_with_untrusted_certificate_is_refused(system, tmp_path):
    """An LNM whose certificate is signed by another CA never attaches."""
    pki.init_ca(tmp_path / "rogue", common_name="Rogue CA")
    pki.issue_cert(tmp_path / "rogue", "lnm9", tmp_path / "rogue", role="lnm")
    d = system.description
    config = tmp_path / "rogue.config"
    config.write_text(textwrap.dedent(f"""
        [lnm]
        name = lnm9
        controller_host = 127.0.0.1
        controller_port = {d['lnm_port']}
        controller_tls_name = localhost
        ssl_key_file = {tmp_path}/rogue/lnm9_key.pem
        ssl_cert_file = {tmp_path}/rogue/lnm9_cert.pem
        ssl_ca_file = {d['ca_file']}
        state_dir = {tmp_path}/rogue-state
        test_host = yes
        reconnect_initial_delay = 0.2
        reconnect_max_delay = 0.5
    """))
    proc = subprocess.Popen([sys.executable, "-m", "usher.lnm.main", "--isolated",
                             "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=4)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "attached" not in out.replace("not attached", "")
    listed = subprocess.run(
        [sys.executable, "-m", "usher.clients.ush", "--config", d["configs"]["ush"],
         "--json", "list_lnm"], capture_output=True, text=True, timeout=60)
    assert "lnm9" not in listed.stdout


@pytest_twisted.ensureDeferred
async def test_ush_one_shot_json(system):
    started = parse_json(await system.ush("start", "-n", "ushjson", "-c", "3"))
    assert sorted(s["name"] for s in started) == sorted(full(f"{i}.ushjson")
                                                        for i in (1, 2, 3))
    assert all(s["lnm"].startswith("lnm") for s in started)
    listed = parse_json(await system.ush("list", "-n", "ushjson"))
    assert {(r["name"], r["state"], r["cluster"], r["owner"]) for r in listed} == {
        (full(f"{i}.ushjson"), "run", "ushjson", "alice") for i in (1, 2, 3)}
    assert all(r["lnm"] for r in listed)
    lnms = parse_json(await system.ush("list_lnm"))
    assert {lnm["name"] for lnm in lnms} >= {"lnm1", "lnm2", "lnm3"}
    assert all("vms" in lnm for lnm in lnms)
    # The sandbox's hosts are test hosts (test_host = yes), and say so.
    assert all(lnm["test_host"] is True for lnm in lnms)
    table = await system.ush("list_lnm", json_output=False)
    assert table.stdout.splitlines()[2].split()[-1] == "test"
    assert all(line.split()[-1] == "TEST" for line in table.stdout.splitlines()[4:])
    paused = await system.ush("pause", "-n", "ushjson")
    assert paused.returncode == 0, paused.stdout + paused.stderr
    vm = listed[0]
    target = "lnm1" if vm["lnm"] != "lnm1" else "lnm2"
    moved = await system.ush("migrate", vm["name"], target)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    listed = parse_json(await system.ush("list", vm["name"]))
    assert listed[0]["lnm"] == target and listed[0]["state"] == "paused"
    failed = await system.ush("resume", "nosuchvm")
    assert failed.returncode != 0 and "error" in parse_json(failed)
    usage = await system.ush("pause", "-r", "(bad")
    assert usage.returncode == 2


@pytest_twisted.ensureDeferred
async def test_ush_wrong_password_exit_code(system, tmp_path):
    config = tmp_path / "bad.config"
    text = open(system.description["configs"]["ush"]).read()
    config.write_text(text.replace(f"password = {system.description['password']}",
                                   "password = wrong"))
    completed = await system.ush("list", config=str(config))
    assert completed.returncode == 3
    assert "error" in parse_json(completed)


def test_invalid_controller_configuration_names_file_line_key(tmp_path):
    config = tmp_path / "ctrl.config"
    config.write_text("[ctrl]\ndomain = x.test\nclient_port = abc\n")
    completed = subprocess.run([sys.executable, "-m", "usher.controller.main", "--isolated",
                                "--config", str(config)], capture_output=True, text=True,
                               timeout=60)
    assert completed.returncode == 2
    assert f"{config}:3" in completed.stderr and "client_port" in completed.stderr


@pytest_twisted.ensureDeferred
async def test_oversized_and_hostile_messages_leave_the_controller_serving(system, monkeypatch):
    attacker = await system.connected_client()
    with pytest.raises(InvalidRequest, match="cannot be sent"):
        # Our own side refuses to send a string over banana's 640 KiB …
        await attacker._remote("start", ["x" * (700 * 1024)], [], {})
    from twisted.spread import banana
    monkeypatch.setattr(banana, "SIZE_LIMIT", 4 * 1024 * 1024)
    with pytest.raises(Unavailable):
        # … and the controller drops a connection that sends one anyway.
        await attacker._remote("start", ["x" * (700 * 1024)], [], {})
    monkeypatch.undo()
    other = await system.connected_client()
    with pytest.raises(InvalidRequest):
        await other._remote("start", ["a"] * 5, [], {"count": "many"})
    with pytest.raises(InvalidRequest):
        await other._remote("op_on", "pause", {"names": [{"nested": "dict"}]}, None)
    with pytest.raises(InvalidRequest):
        await other._remote("start", [], [], {"cluster": "x", "count": 10 ** 9})
    assert (await other.list_lnm())[0]["connected"]


@pytest_twisted.ensureDeferred
async def test_administrator_acts_on_another_users_vm_by_full_name(system):
    bob = await system.connected_client("bob", "bob-secret")
    await bob.start(["bobs"])
    vm = full("bobs", "bob")
    await wait_for(lambda: bob.vms.get(vm, {}).get("state") == states.RUN)
    admin = await system.connected_client()          # alice has the admin role
    assert admin.admin and vm not in admin.vms
    result = await admin.pause([vm])
    assert result["done"] == [{"name": vm, "state": states.PAUSED}]
    await wait_for(lambda: bob.vms[vm]["state"] == states.PAUSED)
    with pytest.raises(NoSuchVM):
        await admin.pause([full("nosuch", "bob")])


@pytest_twisted.ensureDeferred
async def test_forget_lnm_is_for_administrators_and_disconnected_lnms(system):
    from usher.errors import NoSuchLNM
    bob = await system.connected_client("bob", "bob-secret")
    with pytest.raises(PermissionDenied):
        await bob.forget_lnm("lnm1")
    admin = await system.connected_client()
    with pytest.raises(InvalidRequest, match="connected"):
        await admin.forget_lnm("lnm1")
    with pytest.raises(NoSuchLNM):
        await admin.forget_lnm("lnm99")
    refused = await system.ush("forget_lnm", "lnm1")
    assert refused.returncode != 0 and "connected" in parse_json(refused)["error"]
