"""HA restart only with fencing, end to end (issue 15, part B): a real
usherctrl and three usherlnm processes over TLS, each LNM on its own private
libvirtd (tests/libvirtd.py), the link to lnm2 cut by a proxy the test holds
(bench.proxy.CuttableProxy) -- a partition: lnm2 and its VMs run on, only
the controller cannot reach them. The HA plugin is registered through the
real client API, its fence agent is a real script. Where each VM runs is
asked of each libvirtd directly.
"""

import libvirt
import pytest
import pytest_twisted

from usher import states
from usher.errors import InvalidRequest

from tests import libvirtd
from tests.e2e import parse_json, sleep
# (proxied_system: lnm2 behind a CuttableProxy, the fixture of the failure tests.)
from tests.test_failures_e2e import proxied_system, states_of, until  # noqa: F401

pytestmark = pytest.mark.skipif(not libvirtd.available(),
                                reason="needs root and libvirtd (Debian: libvirt-daemon)")

HA_EVENTS = ("lnm_disconnected", "lnm_connected", "lnm_hold_changed", "timer")
GRACE = 1.0


def write_agent(tmp_path):
    """A fence agent that fails ("BMC unreachable") until the file
    ``permit`` exists, then says the host is off; each call is recorded."""
    calls, permit = tmp_path / "fence-calls", tmp_path / "permit"
    agent = tmp_path / "fence-agent"
    agent.write_text(f"""#!/bin/sh
echo "$1 $2" >> {calls}
if [ -e {permit} ]; then echo "chassis power of $1 is off"; exit 0; fi
echo "BMC of $1 unreachable" >&2
exit 1
""")
    agent.chmod(0o755)
    return agent, calls, permit


async def register_ha(admin, tmp_path, **options):
    config = tmp_path / "ha.config"
    settings = dict({"interval": 0.2, "grace": GRACE, "retry_initial": 0.3,
                     "retry_max": 0.6, "max_restarts_per_minute": 100}, **options)
    config.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
    for event in HA_EVENTS:
        await admin.register_plugin("ha", event, str(config))


async def ha_status(admin):
    items = await admin.query("ha.status")
    hosts = {item["lnm"]: item for item in items if item["kind"] == "host"}
    [queue] = [item for item in items if item["kind"] == "queue"]
    return hosts, queue


async def start_spread(client, cluster, count=6):
    result = await client.start(cluster=cluster, count=count)
    assert result["failed"] == []
    by_lnm = {}
    for s in result["started"]:
        by_lnm.setdefault(s["lnm"], []).append(s["name"])
    names = sorted(s["name"] for s in result["started"])
    await until(lambda: all(s == states.RUN for s in states_of(client, names).values()))
    assert sorted(by_lnm) == ["lnm1", "lnm2", "lnm3"]
    return names, by_lnm


def running_copies(inventories, name):
    return sorted(lnm for lnm, domains in inventories.items()
                  if domains.get(name) == libvirt.VIR_DOMAIN_RUNNING)


@pytest_twisted.ensureDeferred
async def test_partition_no_evidence_no_restart_then_fenced_then_healed(proxied_system,
                                                                        tmp_path):
    system = proxied_system
    agent, calls, permit = write_agent(tmp_path)
    alice = await system.client()
    await register_ha(alice, tmp_path, fence_command=f"{agent}, {{lnm}}, {{hostname}}")
    names, by_lnm = await start_spread(alice, "ha")
    victims = sorted(by_lnm["lnm2"])

    system.proxies["lnm2"].cut()
    await until(lambda: all(s == states.LOST for s in states_of(alice, victims).values()))
    # Without evidence: the agent fails, is retried, and nothing restarts,
    # well past the grace.
    await until(lambda: calls.exists() and len(calls.read_text().splitlines()) >= 3)
    await sleep(GRACE * 2)
    assert all(s == states.LOST for s in states_of(alice, victims).values())
    hosts, queue = await ha_status(alice)
    assert hosts["lnm2"]["fenced"] is None and hosts["lnm2"]["fence_attempts"] >= 3
    assert "BMC of lnm2 unreachable" in hosts["lnm2"]["last_error"]
    assert queue["waiting"] == []
    inventories = await system.inventories()
    for name in victims:
        assert running_copies(inventories, name) == ["lnm2"]
    # A host that answers cannot be fenced by hand either.
    with pytest.raises(InvalidRequest, match="connected"):
        await alice.confirm_fenced("lnm1", "no")

    permit.write_text("")                 # the agent now powers it "off"
    await until(lambda: all(alice.vms[n]["state"] == states.RUN
                            and alice.vms[n]["lnm"] in ("lnm1", "lnm3") for n in victims),
                timeout=30)
    lnms = {lnm["name"]: lnm for lnm in await alice.list_lnm()}
    fenced = lnms["lnm2"]["holds"]["fenced"]
    assert fenced["evidence"].startswith("fence-agent: chassis power of lnm2 is off")
    assert fenced["by"] == "ha" and sorted(fenced["restarted"]) == victims
    # The agent here lied (the partitioned host still runs them): two copies
    # until the host is back -- which is exactly what the heal must undo.
    inventories = await system.inventories()
    for name in victims:
        assert running_copies(inventories, name) == sorted(["lnm2", alice.vms[name]["lnm"]])

    system.proxies["lnm2"].heal()

    async def one_copy_each():
        inventories = await system.inventories()
        return all(len(running_copies(inventories, n)) == 1 for n in names) and all(
            not any(n in domains for lnm, domains in inventories.items()
                    if lnm != alice.vms[n]["lnm"]) for n in names)
    deadline = 30
    while not await one_copy_each():
        deadline -= 0.2
        assert deadline > 0, "the stale copies were not destroyed"
        await sleep(0.2)
    lnms = {lnm["name"]: lnm for lnm in await alice.list_lnm()}
    assert lnms["lnm2"]["connected"] and "fenced" not in lnms["lnm2"]["holds"]
    inventories = await system.inventories()
    for name in names:
        assert running_copies(inventories, name) == [alice.vms[name]["lnm"]], name
        assert alice.vms[name]["state"] == states.RUN
    assert not any(n in inventories["lnm2"] for n in victims)
    # The host takes VMs again.
    more = await alice.start(cluster="after", count=3, lnms=["lnm2"])
    assert [s["lnm"] for s in more["started"]] == ["lnm2"] * 3


@pytest_twisted.ensureDeferred
async def test_without_an_agent_the_administrators_ush_fenced_restarts(proxied_system,
                                                                      tmp_path):
    system = proxied_system
    alice = await system.client()
    await register_ha(alice, tmp_path)          # no fence agent
    names, by_lnm = await start_spread(alice, "adm")
    victims = sorted(by_lnm["lnm2"])
    system.proxies["lnm2"].cut()
    await until(lambda: all(s == states.LOST for s in states_of(alice, victims).values()))
    await sleep(GRACE * 3)
    assert all(s == states.LOST for s in states_of(alice, victims).values())

    done = parse_json(await system.box.ush("fenced", "lnm2", "--evidence", "pulled the plug"))
    assert done["lnm"] == "lnm2" and done["fenced"]["evidence"] == "pulled the plug"
    await until(lambda: all(alice.vms[n]["state"] == states.RUN
                            and alice.vms[n]["lnm"] in ("lnm1", "lnm3") for n in victims),
                timeout=30)
    system.proxies["lnm2"].heal()
    deadline = 30
    while True:
        inventories = await system.inventories()
        if all(running_copies(inventories, n) == [alice.vms[n]["lnm"]] for n in names):
            break
        deadline -= 0.2
        assert deadline > 0, "the stale copies were not destroyed"
        await sleep(0.2)
