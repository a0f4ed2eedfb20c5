"""Anti-affinity through the operations themselves, not their requests
alone: the real evacuation of a host in maintenance
(usher.controller.maintenance) and the real HA restart off a fenced host
(usher.controller.fencing) put a cluster's VMs only where its rule allows,
and say so when nowhere does. In-process grid behind the real client port."""

import pytest_twisted

from usher import states

from tests.e2e import wait_for
from tests.test_affinity_grid import RULE_DB, errors, full, hosts_of, registrations


@pytest_twisted.ensureDeferred
async def test_evacuation_and_ha_restart_keep_a_cluster_apart(tmp_path, client_grids):
    grid = await client_grids(lnms=4, registrations=registrations(tmp_path))
    controller = grid.controller
    alice = await grid.connected("alice")
    placed = hosts_of(await alice.start(cluster="db", count=3, args={"affinity": "apart"}))
    assert len(set(placed.values())) == 3
    free = ({"lnm1", "lnm2", "lnm3", "lnm4"} - set(placed.values())).pop()
    db1, db2, db3 = full("1.db"), full("2.db"), full("3.db")
    await wait_for(lambda: all(controller.state.vms[n]["state"] == states.RUN
                               for n in placed))

    # Evacuating 1.db's host: the only host without a VM of db is the free one.
    evacuated = placed[db1]
    await controller.maintenance.set(evacuated, True, by="root", reason="disks",
                                     evacuate=True)
    await controller.maintenance.wait(evacuated)
    status = controller.maintenance.status(evacuated)
    assert status["failed"] == [] and status["moved"] == [{"name": db1, "to": free}]

    # 2.db's host is lost and fenced: the evacuated host is in maintenance and
    # every other has a VM of db, so the restart is refused, naming the rule.
    lost = placed[db2]
    grid.grid.cut(lost)
    await wait_for(lambda: controller.state.vms[db2]["state"] == states.LOST)
    controller.confirm_fenced(lost, evidence="pdu outlet off", by="root")
    refused = await controller.restart_elsewhere([db2])
    assert refused["started"] == []
    error = errors(refused)[db2]
    assert RULE_DB in error and f"{evacuated}: in maintenance: disks" in error
    assert controller.state.vms[db2]["lnm"] == lost

    # Out of maintenance, that host is the one place db's VM may go.
    await controller.maintenance.set(evacuated, False, by="root")
    restarted = await controller.restart_elsewhere([db2])
    assert [(s["name"], s["lnm"]) for s in restarted["started"]] == [(db2, evacuated)]
    where = {n: controller.state.vms[n]["lnm"] for n in (db1, db2, db3)}
    assert len(set(where.values())) == 3 and lost not in where.values()
    assert (await alice.affinity("db"))["honoured"] is True
