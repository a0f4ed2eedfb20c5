"""The maintenance and evacuation PB methods through the real client port
and the client library (tests/clientgrid.py): administrators only, checked
arguments, progress until done."""

import pytest
import pytest_twisted

from usher.errors import InvalidRequest, NoSuchLNM, PermissionDenied

from tests.e2e import wait_for


@pytest_twisted.ensureDeferred
async def test_an_administrator_evacuates_an_lnm_through_the_client(client_grids):
    grid = await client_grids()
    alice = await grid.connected("alice")
    await alice.start(cluster="web", count=4, lnms=["lnm1"])
    root = await grid.connected("root")
    status = await root.maintenance("lnm1", True, reason="firmware", evacuate=True,
                                    concurrency=2)
    assert status["lnm"] == "lnm1" and status["maintenance"] is True
    assert status["reason"] == "firmware" and status["by"] == "root"
    await wait_for(lambda: grid.controller.maintenance.status("lnm1")["done"], timeout=30)
    status = await root.evacuation("lnm1")
    assert status["done"] and status["total"] == 4 and len(status["moved"]) == 4
    assert status["failed"] == [] and status["running"] == [] and status["waiting"] == 0
    lnms = {lnm["name"]: lnm for lnm in await root.list_lnm()}
    assert lnms["lnm1"]["vms"] == 0
    assert lnms["lnm1"]["holds"]["maintenance"]["reason"] == "firmware"
    status = await root.maintenance("lnm1", False)
    assert status["maintenance"] is False
    assert (await root.list_lnm(["lnm1"]))[0]["holds"] == {}


@pytest_twisted.ensureDeferred
async def test_only_administrators_and_checked_arguments(client_grids):
    grid = await client_grids()
    alice = await grid.connected("alice")
    with pytest.raises(PermissionDenied):
        await alice.maintenance("lnm1", True)
    with pytest.raises(PermissionDenied):
        await alice.evacuation("lnm1")
    assert not grid.controller.holds.held("lnm1")
    root = await grid.connected("root")
    with pytest.raises(NoSuchLNM):
        await root.maintenance("nosuch", True)
    with pytest.raises(InvalidRequest):
        await root.maintenance("lnm1", True, concurrency=1000)
    with pytest.raises(InvalidRequest):
        await root._remote("maintenance", "lnm1", "yes", None, False, None)
    with pytest.raises(InvalidRequest):
        await root._remote("evacuation", ["lnm1"])
    status = await root.evacuation("lnm2")
    assert status["maintenance"] is False and status["total"] == 0


def test_ush_shows_progress_and_a_summary():
    try:
        from usher.clients.ush import cmd_hosts
    except ImportError:
        from clients.ush import cmd_hosts
    status = {"lnm": "lnm1", "maintenance": True, "reason": "disks", "by": "root",
              "evacuating": True, "done": False, "total": 5,
              "moved": [{"name": "a", "to": "lnm2"}], "failed": [{"name": "b", "error": "x"}],
              "running": ["c", "d"], "waiting": 1}
    assert cmd_hosts.progress_line(status) == (
        "lnm1: 1 of 5 moved, 1 could not move, 2 moving, 1 waiting")
    text = cmd_hosts.format_status(status)
    assert "in maintenance (disks), set by root" in text and "under way" in text
    done = dict(status, evacuating=False, done=True, running=[], waiting=0,
                moved=[{"name": n, "to": "lnm2"} for n in ("a", "c", "d", "e")])
    text = cmd_hosts.format_status(done)
    assert "Evacuation done: 4 of 5 VMs moved, 1 could not move." in text
    assert "  c -> lnm2" in text and "Could not move:\n  b: x" in text
    assert "not in maintenance" in cmd_hosts.format_status(
        {"lnm": "lnm2", "maintenance": False})
