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
