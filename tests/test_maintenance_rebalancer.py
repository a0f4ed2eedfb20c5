"""The rebalancer leaves held hosts alone: it moves nothing off a host in
maintenance (not even one listed in drain, nor one overloaded) and nothing
onto it; once out of maintenance the host is a target again."""

import pytest_twisted
from twisted.internet import task

from tests.grid import DOMAIN
from tests.test_plugins_policies import FakeMonitoring, config_file, registrations


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def where(grid, *names):
    return [grid.controller.state.vms[n]["lnm"] for n in names]


async def rebalancer(client_grids, tmp_path, text, **grid_kwargs):
    grid = await client_grids(registrations=registrations(tmp_path), **grid_kwargs)
    grid.controller.chains.clock = task.Clock()
    plugin = grid.registry.register("rebalancer", "timer",
                                    config_file(tmp_path, "rebalancer", text))
    plugin.clock = task.Clock()
    return grid, plugin


@pytest_twisted.ensureDeferred
async def test_the_rebalancer_moves_nothing_off_or_onto_a_host_in_maintenance(
        tmp_path, client_grids):
    grid, plugin = await rebalancer(client_grids, tmp_path,
                                    "interval = 10\nsustain = 1\nbalance = always\n"
                                    "drain = lnm1\nmax_concurrent = 4\n",
                                    lnms=3, cpus=2, memory_mib=2048)
    c = grid.controller
    alice = await grid.connected("alice")
    await alice.start(cluster="w", count=4, lnms=["lnm1"])
    c.monitoring = FakeMonitoring(c.monitoring, hosts={"lnm1": 99.0, "lnm2": 0.0,
                                                      "lnm3": 0.0})
    await c.maintenance.set("lnm1", True, by="root", reason="firmware")
    await c.maintenance.set("lnm3", True, by="root")
    timers = c.chains.clock
    for _ in range(3):
        timers.advance(10)           # drained, overloaded, unbalanced: but held
    await plugin.idle()
    assert plugin.history == []
    names = [full(f"{i}.w") for i in range(1, 5)]
    assert where(grid, *names) == ["lnm1"] * 4
    # Out of maintenance: drained off lnm1, never onto lnm3 (still held).
    await c.maintenance.set("lnm1", False, by="root")
    timers.advance(10)
    await plugin.idle()
    assert plugin.history and {m.target for m in plugin.history} == {"lnm2"}
    assert {m.source for m in plugin.history} == {"lnm1"}
