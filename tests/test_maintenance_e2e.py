"""Evacuation end to end: a real usherctrl and three real usherlnm over TLS,
each LNM on its own private libvirtd (tests/libvirtd.py, as in
tests/test_failures_e2e.py), driven through the real ush. An LNM with 50 VMs
is evacuated: it is left empty and every VM runs elsewhere exactly once,
counted on every host through its own libvirt connection (not only the
controller's view); leaving maintenance makes it a target again."""

import libvirt
import pytest_twisted

from tests.e2e import parse_json, sleep, wait_for
from tests.test_failures_e2e import DOMAIN, System

VMS = 50


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


@pytest_twisted.async_yield_fixture
async def system(tmp_path):
    box = System(tmp_path, ctrl={"evacuation_concurrency": 4, "call_timeout": 30,
                                 "start_timeout": 60})
    await box.start()
    yield box
    await box.stop()


async def evacuated(system, lnm, names):
    """Asked of every host's own libvirtd: ``lnm`` has no VM left, and each
    of ``names`` runs on exactly one other host. -> the inventories."""
    inventories = await system.inventories()
    assert inventories[lnm] == {}
    for name in names:
        hosts = [host for host, domains in inventories.items() if name in domains]
        assert len(hosts) == 1 and hosts[0] != lnm, (name, hosts)
        assert inventories[hosts[0]][name] == libvirt.VIR_DOMAIN_RUNNING
    return inventories


@pytest_twisted.ensureDeferred
async def test_evacuating_an_lnm_with_50_vms_through_ush(system):
    ush = system.box.ush
    alice = await system.client()
    result = await alice.start(cluster="evac", count=VMS, lnms=["lnm1"])
    assert result["failed"] == [] and {s["lnm"] for s in result["started"]} == {"lnm1"}
    names = sorted(s["name"] for s in result["started"])
    assert len((await system.inventories())["lnm1"]) == VMS

    # By host: the VMs on lnm1, through the real ush.
    listed = parse_json(await ush("list", "--lnm", "lnm1", "-n", "evac"))
    assert sorted(r["name"] for r in listed) == names

    done = await ush("evacuate", "lnm1", "--concurrency", "4", "--reason", "new disks",
                     "--wait", "--interval", "0.2")
    assert done.returncode == 0, done.stdout + done.stderr
    status = parse_json(done)
    assert status["done"] and status["maintenance"] and status["reason"] == "new disks"
    assert status["total"] == VMS and status["failed"] == [] and status["waiting"] == 0
    assert sorted(m["name"] for m in status["moved"]) == names
    assert {m["to"] for m in status["moved"]} <= {"lnm2", "lnm3"}

    # Every host asked directly: lnm1 is empty, each VM runs exactly once.
    inventories = await evacuated(system, "lnm1", names)
    moved_to = {m["name"]: m["to"] for m in status["moved"]}
    for name in names:
        assert name in inventories[moved_to[name]]
    # The controller agrees, and shows the hold.
    await wait_for(lambda: all(alice.vms.get(n, {}).get("lnm") in ("lnm2", "lnm3")
                               for n in names), timeout=20)
    lnms = {lnm["name"]: lnm for lnm in parse_json(await ush("list_lnm"))}
    assert lnms["lnm1"]["vms"] == 0
    assert lnms["lnm1"]["holds"]["maintenance"]["reason"] == "new disks"
    shown = parse_json(await ush("evacuation", "lnm1"))
    assert shown["done"] and len(shown["moved"]) == VMS

    # While held: a start asking for it is refused with the reason.
    refused = await alice.start(["late"], lnms=["lnm1"])
    assert refused["started"] == [] and "in maintenance" in refused["failed"][0]["error"]
    # Out of maintenance: a target again.
    off = await ush("maintenance", "lnm1", "off")
    assert off.returncode == 0 and parse_json(off)["maintenance"] is False
    back = await alice.start(["back"], lnms=["lnm1"])
    assert back["started"] == [{"name": full("back"), "lnm": "lnm1"}]
    # migrate --from: the VMs on lnm2 go where placement puts them.
    on2 = sorted(r["name"] for r in parse_json(await ush("list", "--lnm", "lnm2", "-a")))
    moved = await ush("migrate", "--from", "lnm2", "--to", "lnm1")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert sorted(m["name"] for m in parse_json(moved)["migrated"]) == on2
    assert (await system.inventories())["lnm2"] == {}


@pytest_twisted.ensureDeferred
async def test_ush_host_commands_refuse_bad_use(system):
    ush = system.box.ush
    usage = await ush("maintenance", "lnm1", "maybe")
    assert usage.returncode == 2
    usage = await ush("evacuate", "lnm1", "--concurrency", "100")
    assert usage.returncode == 2
    unknown = await ush("evacuation", "lnm9")
    assert unknown.returncode != 0 and "no such LNM" in parse_json(unknown)["error"]
    unknown = await ush("list", "--lnm", "lnm9")
    assert unknown.returncode != 0 and "no such LNM: lnm9" in parse_json(unknown)["error"]
    text = await ush("help", "evacuate", json_output=False)
    assert "evacuate LNM" in text.stdout and "could not move" in text.stdout


async def evacuation_status(client, lnm):
    """The evacuation's status, or None while the controller is away."""
    try:
        return await client.evacuation(lnm)
    except Exception:
        return None


@pytest_twisted.ensureDeferred
async def test_an_evacuation_resumes_after_the_controller_is_killed(system):
    """kill -9 of usherctrl in the middle of an evacuation (a move may be
    under way): the restarted controller resumes it once the LNMs are back,
    and every VM ends on another host, once."""
    alice = await system.client()
    count = 16
    result = await alice.start(cluster="resume", count=count, lnms=["lnm1"])
    assert result["failed"] == []
    names = sorted(s["name"] for s in result["started"])
    await alice.maintenance("lnm1", True, reason="resume test", evacuate=True, concurrency=1)
    latest = {}

    async def progressed():
        latest["status"] = await evacuation_status(alice, "lnm1")
        return latest["status"] is not None and len(latest["status"]["moved"]) >= 3
    for _ in range(3000):
        if await progressed():
            break
        await sleep(0.01)
    assert not latest["status"]["done"], "the evacuation ended before the kill"
    await system.box.kill("usherctrl")
    system.box.restart("usherctrl")

    async def finished():
        status = await evacuation_status(alice, "lnm1")
        return status if status is not None and status.get("done") else None
    status = None
    for _ in range(600):
        status = await finished()
        if status is not None:
            break
        await sleep(0.1)
    assert status is not None, "the evacuation did not resume"
    assert status["maintenance"] and status["reason"] == "resume test"
    assert status["failed"] == [], status["failed"]
    # The moves after the restart, and those before it, cover every VM.
    await evacuated(system, "lnm1", names)
