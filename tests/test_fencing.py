"""HA restart only with fencing, the core's mechanism (usher.controller.fencing)
on an in-process grid (tests/grid.py): real NodeManagers on libvirt test
hosts; a cut link is the partition, the hosts themselves say where each VM
runs. Nothing is restarted unless its host is fenced; a fenced host that
comes back loses its stale copies (by policy) and is used again."""

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from usher import states
from usher.controller.core import Controller
from usher.controller.known_lnms import KnownLNMs
from usher.controller.recovery import Recovery
from usher.errors import InvalidRequest, NoSuchLNM, OperationFailed

from tests.e2e import wait_for
from tests.grid import DOMAIN
# (grid: the in-process grid fixture, shared with the controller's failure tests.)
from tests.test_failures_controller import full, grid, hosts_of  # noqa: F401


async def start_on(grid, lnm, *shorts, args=None, user="alice"):
    result = await grid.controller.start(user, user == "root", list(shorts), [lnm],
                                         dict(args or {}))
    assert result["failed"] == [], result
    return [full(s, user) for s in shorts]


def fenced_restarted(c, lnm):
    return (c.holds.get(lnm, "fenced") or {}).get("restarted")


@pytest_twisted.ensureDeferred
async def test_a_lost_vm_is_not_restarted_while_its_host_is_not_fenced(grid):
    c = grid.controller
    [vm] = await start_on(grid, "lnm1", "a1")
    grid.cut("lnm1")
    assert c.state.vms[vm]["state"] == states.LOST
    result = await c.restart_elsewhere([vm, full("nosuch")])
    assert result["started"] == []
    errors = {f["name"]: f["error"] for f in result["failed"]}
    assert "not fenced" in errors[vm] and "never on silence alone" in errors[vm]
    assert "no VM" in errors[full("nosuch")]
    assert c.state.vms[vm]["lnm"] == "lnm1"
    assert await hosts_of(grid, vm) == ["lnm1"]


@pytest_twisted.ensureDeferred
async def test_confirm_fenced_only_for_a_known_disconnected_lnm(grid):
    c = grid.controller
    with pytest.raises(InvalidRequest, match="connected"):
        c.confirm_fenced("lnm1", evidence="ipmi: off", by="root")
    with pytest.raises(NoSuchLNM):
        c.confirm_fenced("lnm9", evidence="ipmi: off", by="root")
    grid.cut("lnm1")
    with pytest.raises(InvalidRequest, match="evidence"):
        c.confirm_fenced("lnm1", evidence="  ", by="root")
    details = c.confirm_fenced("lnm1", evidence="ipmi: chassis power off", by="root")
    assert details["evidence"] == "ipmi: chassis power off" and details["by"] == "root"
    assert details["restarted"] == [] and isinstance(details["since"], int)
    # A fenced host takes no new VM.
    result = await c.start("alice", False, ["b1"], ["lnm1"], {})
    assert result["started"] == []


@pytest_twisted.ensureDeferred
async def test_restart_elsewhere_then_the_fenced_host_comes_back_with_stale_copies(grid):
    c = grid.controller
    vms = await start_on(grid, "lnm1", "r1", "r2", "r3")
    grid.cut("lnm1")
    c.confirm_fenced("lnm1", evidence="pdu outlet 4 off", by="root")
    heard = []
    c.holds.listen(lambda lnm, kind, details: heard.append(
        (kind, None if details is None else list(details.get("restarted", [])))))
    result = await c.restart_elsewhere(vms[:2])
    assert result["failed"] == []
    assert sorted(s["name"] for s in result["started"]) == vms[:2]
    # The restarted list was persisted before the start was sent.
    assert heard[0] == ("fenced", sorted(vms[:2]))
    assert fenced_restarted(c, "lnm1") == sorted(vms[:2])
    for vm in vms[:2]:
        rec = c.state.vms[vm]
        assert rec["state"] == states.RUN and rec["lnm"] in ("lnm2", "lnm3")
        # The partitioned host still runs its copy: two, until it is back.
        assert sorted(await hosts_of(grid, vm)) == sorted(["lnm1", rec["lnm"]])
    assert c.state.vms[vms[2]]["state"] == states.LOST

    await grid.attach("lnm1")                    # the partition heals
    await wait_for(lambda: not c.holds.has("lnm1", "fenced"), timeout=10)
    for vm in vms[:2]:
        assert await hosts_of(grid, vm) == [c.state.vms[vm]["lnm"]]
    # The VM that was not restarted is the only copy: it simply comes back.
    assert c.state.vms[vms[2]]["state"] == states.RUN
    assert c.state.vms[vms[2]]["lnm"] == "lnm1"
    assert await hosts_of(grid, vms[2]) == ["lnm1"]
    # And the host takes VMs again.
    assert (await c.start("alice", False, ["n1"], ["lnm1"], {}))["failed"] == []


@pytest_twisted.ensureDeferred
async def test_policy_hold_keeps_the_host_held_and_lists_its_stale_copies(grid, monkeypatch):
    c = grid.controller
    c.fencing.stale_copies = "hold"
    [vm] = await start_on(grid, "lnm1", "h1")
    grid.cut("lnm1")
    c.confirm_fenced("lnm1", evidence="admin", by="root")
    assert (await c.restart_elsewhere([vm]))["failed"] == []
    notify, errors = c.chains.notify, []

    def recording(event):
        if event.name == "error":
            errors.append(event.kind)
        return notify(event)
    monkeypatch.setattr(c.chains, "notify", recording)
    await grid.attach("lnm1")
    await wait_for(lambda: (c.holds.get("lnm1", "fenced") or {}).get("stale") == [vm],
                   timeout=10)
    assert len(await hosts_of(grid, vm)) == 2
    # A known stale copy is the fencing's to settle, not a "duplicate_vm"
    # complaint (which would say it is kept where it is).
    await grid.report()
    assert errors == []
    assert "fenced" in c.holds.reason("lnm1")
    # The administrator removes it by hand; the next check releases the host.
    await grid.remove_on_host("lnm1", vm)
    assert await c.fencing.clean_up("lnm1") is None
    assert not c.holds.has("lnm1", "fenced")
    assert await hosts_of(grid, vm) == [c.state.vms[vm]["lnm"]]


@pytest_twisted.ensureDeferred
async def test_a_restart_with_no_room_elsewhere_leaves_the_vm_lost_and_not_listed(grid):
    c = grid.controller
    [vm] = await start_on(grid, "lnm1", "big", args={"memory_mib": 12000})
    await start_on(grid, "lnm2", "f2", args={"memory_mib": 12000}, user="root")
    await start_on(grid, "lnm3", "f3", args={"memory_mib": 12000}, user="root")
    grid.cut("lnm1")
    c.confirm_fenced("lnm1", evidence="admin", by="root")
    result = await c.restart_elsewhere([vm])
    assert result["started"] == []
    [failure] = result["failed"]
    assert "restart it elsewhere" in failure["error"]
    assert c.state.vms[vm]["state"] == states.LOST and c.state.vms[vm]["lnm"] == "lnm1"
    assert fenced_restarted(c, "lnm1") == []


@pytest_twisted.ensureDeferred
async def test_a_start_refused_by_the_new_host_puts_the_vm_back_lost(grid):
    c = grid.controller
    [vm] = await start_on(grid, "lnm1", "u1")
    grid.cut("lnm1")
    c.confirm_fenced("lnm1", evidence="admin", by="root")
    for name in ("lnm2", "lnm3"):
        grid.to_lnm(name).refuse["start_many"] = OperationFailed("no disk")
    result = await c.restart_elsewhere([vm])
    assert result["started"] == [] and len(result["failed"]) == 1
    assert c.state.vms[vm]["state"] == states.LOST and c.state.vms[vm]["lnm"] == "lnm1"
    assert fenced_restarted(c, "lnm1") == []
    assert await hosts_of(grid, vm) == ["lnm1"]


@pytest_twisted.ensureDeferred
async def test_a_restarted_controller_never_adopts_the_fenced_hosts_stale_copy(grid, tmp_path):
    c = grid.controller
    known = KnownLNMs(str(tmp_path / "lnms.json"))
    for name in ("lnm1", "lnm2", "lnm3"):
        known.remember(name, hostname=name)
    vms = await start_on(grid, "lnm1", "s1", "s2")
    grid.cut("lnm1")
    c.confirm_fenced("lnm1", evidence="admin", by="root")
    [started] = (await c.restart_elsewhere(vms[:1]))["started"]
    # The hold as the dying controller persisted it.
    known.remember("lnm1", holds=c.holds.of("lnm1"))
    fresh = Controller(domain=DOMAIN, clock=reactor, known_lnms=KnownLNMs(
        str(tmp_path / "lnms.json")))
    fresh.recovery = Recovery(["lnm1", "lnm2", "lnm3"], clock=task.Clock(), window=30,
                              on_done=fresh.resolve_soon)
    fresh.watch_lnms(fresh.recovery)
    await grid.attach("lnm1", fresh)             # the stale host first
    assert vms[0] not in fresh.state.vms         # not adopted from there
    assert fresh.state.vms[vms[1]]["lnm"] == "lnm1"   # the only copy: adopted
    for name in ("lnm2", "lnm3"):
        await grid.attach(name, fresh)
    await wait_for(lambda: not fresh.holds.has("lnm1", "fenced"), timeout=10)
    assert fresh.state.vms[vms[0]]["lnm"] == started["lnm"]
    assert await hosts_of(grid, vms[0]) == [started["lnm"]]
    assert await hosts_of(grid, vms[1]) == ["lnm1"]


@pytest_twisted.ensureDeferred
async def test_a_fenced_host_that_came_back_needs_fresh_evidence_when_lost_again(grid):
    """The hold outlives the host's return while a stale copy is kept; the
    evidence does not: lost again, its running VMs are not restarted."""
    c = grid.controller
    c.fencing.stale_copies = "hold"
    x1, y1 = await start_on(grid, "lnm1", "x1", "y1")
    grid.cut("lnm1")
    c.confirm_fenced("lnm1", evidence="pdu outlet 4 off", by="root")
    assert (await c.restart_elsewhere([x1]))["failed"] == []
    await grid.attach("lnm1")
    await wait_for(lambda: (c.holds.get("lnm1", "fenced") or {}).get("stale") == [x1],
                   timeout=10)
    assert c.state.vms[y1]["state"] == states.RUN
    grid.cut("lnm1")                              # a second, unfenced outage
    assert c.state.vms[y1]["state"] == states.LOST
    assert c.fencing.fenced("lnm1") and not c.fencing.evidence_valid("lnm1")
    result = await c.restart_elsewhere([y1])
    assert result["started"] == []
    assert "came back after it was fenced" in result["failed"][0]["error"]
    assert await hosts_of(grid, y1) == ["lnm1"]
    # Fresh evidence makes it restartable again (and keeps what was restarted).
    c.confirm_fenced("lnm1", evidence="pdu outlet 4 off again", by="root")
    assert fenced_restarted(c, "lnm1") == [x1]
    assert (await c.restart_elsewhere([y1]))["failed"] == []


@pytest_twisted.ensureDeferred
async def test_after_a_restart_an_unknown_record_is_not_proof_of_a_stale_copy(grid, tmp_path):
    """The controller died after noting the restart and before sending it:
    the fenced host's copy is the only one and must survive its return."""
    c = grid.controller
    known = KnownLNMs(str(tmp_path / "lnms.json"))
    for name in ("lnm1", "lnm2", "lnm3"):
        known.remember(name, hostname=name)
    [vm] = await start_on(grid, "lnm1", "only")
    grid.cut("lnm1")
    c.confirm_fenced("lnm1", evidence="admin", by="root")
    c.fencing._note_restarted({vm: "lnm1"})       # persisted; no start sent
    known.remember("lnm1", holds=c.holds.of("lnm1"))
    fresh = Controller(domain=DOMAIN, clock=reactor, known_lnms=KnownLNMs(
        str(tmp_path / "lnms.json")))
    fresh.recovery = Recovery(["lnm1", "lnm2", "lnm3"], clock=task.Clock(), window=30,
                              on_done=fresh.resolve_soon)
    fresh.watch_lnms(fresh.recovery)
    for name in ("lnm1", "lnm2", "lnm3"):
        await grid.attach(name, fresh)
    await fresh.settled()
    await fresh.fencing.clean_up("lnm1")
    assert await hosts_of(grid, vm) == ["lnm1"]
    assert vm in (fresh.holds.get("lnm1", "fenced") or {}).get("waiting", [])


@pytest_twisted.ensureDeferred
async def test_a_restarted_vm_its_owner_removed_leaves_a_stale_copy_to_delete(grid):
    c = grid.controller
    [vm] = await start_on(grid, "lnm1", "gone1")
    grid.cut("lnm1")
    c.confirm_fenced("lnm1", evidence="admin", by="root")
    [started] = (await c.restart_elsewhere([vm]))["started"]
    await wait_for(lambda: c.state.vms[vm]["state"] == states.RUN)
    from usher.vmset import Selection
    await c.op_on("alice", False, "destroy", Selection(names=[vm]))
    assert c.state.vms[vm]["state"] == states.SHUTOFF     # destroy keeps the VM
    await c.op_on("alice", False, "delete", Selection(names=[vm]))
    assert vm not in c.state.vms
    assert (c.holds.get("lnm1", "fenced") or {}).get("gone") == [vm]
    await grid.attach("lnm1")
    await wait_for(lambda: not c.holds.has("lnm1", "fenced"), timeout=10)
    assert await hosts_of(grid, vm) == []
