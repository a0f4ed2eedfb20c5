"""The controller's logic on an in-process grid of real libvirt test hosts."""

import pytest
import pytest_twisted
from twisted.internet import reactor

from usher import states
from usher.errors import InvalidRequest, NoSuchLNM, NoSuchVM, PermissionDenied, Rejected
from usher.vmset import Selection

from tests.grid import DOMAIN, Grid


@pytest.fixture
def grid(tmp_path):
    g = Grid(reactor, tmp_path)
    pytest_twisted.blockon(pytest_twisted._ensure_deferred(g.start())
                           if hasattr(pytest_twisted, "_ensure_deferred") else _start(g))
    yield g
    pytest_twisted.blockon(_stop(g))


def _start(g):
    from twisted.internet import defer
    return defer.ensureDeferred(g.start())


def _stop(g):
    from twisted.internet import defer
    return defer.ensureDeferred(g.stop())


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


async def start_cluster(grid, count=10, user="alice", cluster="sneetch", lnms=()):
    return await grid.controller.start(user, False, [], list(lnms),
                                       {"cluster": cluster, "count": count})


@pytest_twisted.ensureDeferred
async def test_start_cluster_names_and_spreads_over_lnms(grid):
    result = await start_cluster(grid)
    names = sorted(s["name"] for s in result["started"])
    assert names == sorted(full(f"{i}.sneetch") for i in range(1, 11))
    assert result["failed"] == []
    per_lnm = {}
    for s in result["started"]:
        per_lnm[s["lnm"]] = per_lnm.get(s["lnm"], 0) + 1
    assert sorted(per_lnm.values()) == [3, 3, 4]
    state = grid.controller.state
    for name in names:
        assert state.vms[name]["state"] == states.RUN
        assert state.vms[name]["cluster"] == "sneetch"
        assert state.vms[name]["owner"] == "alice"
        # really running on the host the controller believes
        info = await grid.vmms[state.vms[name]["lnm"]].domain_info(name)
        assert info["state"] == states.RUN
    # a second start continues the numbering
    more = await start_cluster(grid, count=2)
    assert sorted(s["name"] for s in more["started"]) == [full("11.sneetch"),
                                                          full("12.sneetch")]


@pytest_twisted.ensureDeferred
async def test_lnm_suggestion_is_honoured(grid):
    result = await start_cluster(grid, count=3, lnms=["lnm2"])
    assert {s["lnm"] for s in result["started"]} == {"lnm2"}


@pytest_twisted.ensureDeferred
async def test_every_operation(grid):
    await start_cluster(grid, count=2)
    c = grid.controller
    sel = Selection(names=["1.sneetch"])
    vm = full("1.sneetch")
    for operation, expected in [("pause", states.PAUSED), ("resume", states.RUN),
                                ("hibernate", states.HIBERNATED), ("restore", states.RUN),
                                ("reboot", states.RUN), ("shutdown", states.SHUTOFF),
                                ("cycle", states.RUN)]:
        result = await c.op_on("alice", False, operation, sel)
        assert result["failed"] == [], (operation, result)
        assert c.state.vms[vm]["state"] == expected, operation
        info = await grid.vmms[c.state.vms[vm]["lnm"]].domain_info(vm)
        assert info["state"] == expected, operation
    result = await c.op_on("alice", False, "destroy", sel)
    assert result["done"] == [{"name": vm, "state": states.SHUTOFF}]
    assert c.state.vms[vm]["state"] == states.SHUTOFF
    result = await c.op_on("alice", False, "delete", sel)
    assert result["done"] == [{"name": vm, "state": None}]
    assert vm not in c.state.vms
    assert full("2.sneetch") in c.state.vms


def _plugin(cls):
    from zope.interface import directlyProvides
    from usher.interfaces import IPlugin
    plugin = cls()
    directlyProvides(plugin, IPlugin)
    return plugin


class _Removals:
    """Records the vm_removed notifications."""
    name = "removals"
    order = 1

    def __init__(self):
        self.removed = []

    def entry_point(self, event):
        self.removed.append(event.vm["name"])


def watch_removals(controller):
    """-> a _Removals plugin on the controller's vm_removed chain."""
    removals = _plugin(_Removals)
    controller.chains.add(removals, "vm_removed")
    return removals


@pytest_twisted.ensureDeferred
async def test_destroy_keeps_the_vm_off_and_start_boots_it_again(grid):
    """Issue 17: destroy is Table 3's hard shutdown; the VM stays defined."""
    await start_cluster(grid, count=2)
    c = grid.controller
    removals = watch_removals(c)
    vm = full("1.sneetch")
    lnm = c.state.vms[vm]["lnm"]
    result = await c.op_on("alice", False, "destroy", Selection(names=["1.sneetch"]))
    assert result == {"operation": "destroy", "done": [{"name": vm, "state": "shutoff"}],
                      "failed": [], "notes": []}
    info = await grid.vmms[lnm].domain_info(vm)
    assert info["state"] == states.SHUTOFF
    # Destroying it again: already off, nothing sent.
    again = await c.op_on("alice", False, "destroy", Selection(names=["1.sneetch"]))
    assert again["done"] == [{"name": vm, "state": "shutoff", "already": True}]
    started = await c.start("alice", False, ["1.sneetch"])
    assert started["started"] == [{"name": vm, "lnm": lnm}], started
    assert c.state.vms[vm]["state"] == states.RUN
    assert (await grid.vmms[lnm].domain_info(vm))["state"] == states.RUN
    assert removals.removed == []


@pytest_twisted.ensureDeferred
async def test_delete_removes_the_vm_and_fires_vm_removed(grid):
    await start_cluster(grid, count=3)
    c = grid.controller
    removals = watch_removals(c)
    names = [full(f"{i}.sneetch") for i in (1, 2, 3)]
    lnms = {n: c.state.vms[n]["lnm"] for n in names}
    await c.op_on("alice", False, "shutdown", Selection(names=["1.sneetch"]))
    await c.op_on("alice", False, "hibernate", Selection(names=["2.sneetch"]))
    result = await c.op_on("alice", False, "delete", Selection(clusters=["sneetch"]))
    assert result["done"] == [{"name": names[0], "state": None},
                              {"name": names[1], "state": None}]
    # A running VM is refused, with what to do about it.
    assert result["failed"] == [{"name": names[2], "error": (
        "cannot delete a VM that is run: shut it down or destroy it first, or force the "
        "delete (ush delete --force), which powers it off"), "code": "wrong_state"}]
    assert sorted(c.state.vms) == [names[2]]
    for name in names[:2]:
        with pytest.raises(NoSuchVM):
            await grid.vmms[lnms[name]].domain_info(name)
    assert (await grid.vmms[lnms[names[2]]].domain_info(names[2]))["state"] == states.RUN
    # Forced: powered off hard, then deleted.
    forced = await c.op_on("alice", False, "delete", Selection(names=["3.sneetch"]),
                           {"force": True})
    assert forced["done"] == [{"name": names[2], "state": None}], forced
    assert c.state.vms == {}
    with pytest.raises(NoSuchVM):
        await grid.vmms[lnms[names[2]]].domain_info(names[2])
    await _turn()
    assert sorted(removals.removed) == names


@pytest_twisted.ensureDeferred
async def test_delete_goes_through_its_chain_and_a_plugin_may_refuse_it(grid):
    await start_cluster(grid, count=2)
    c = grid.controller

    class Keeper:
        name = "keeper"
        order = 1
        seen = []

        def entry_point(self, event):
            self.seen.append((event.name, event.request.kind, event.request.args))
            event.request.reject("this site keeps its VMs")
    keeper = _plugin(Keeper)
    c.chains.add(keeper, "delete_request")
    await c.op_on("alice", False, "destroy", Selection(clusters=["sneetch"]))
    with pytest.raises(Rejected, match="this site keeps its VMs"):
        await c.op_on("alice", False, "delete", Selection(clusters=["sneetch"]),
                      {"force": True})
    assert keeper.seen == [("delete_request", "delete", {"force": True})]
    assert sorted(c.state.vms) == [full("1.sneetch"), full("2.sneetch")]
    # force is for delete only, and only true or false.
    with pytest.raises(InvalidRequest, match="force"):
        await c.op_on("alice", False, "destroy", Selection(clusters=["sneetch"]),
                      {"force": True})
    with pytest.raises(InvalidRequest, match="force"):
        await c.op_on("alice", False, "delete", Selection(clusters=["sneetch"]),
                      {"force": "yes"})


@pytest_twisted.ensureDeferred
async def test_delete_goes_through_the_destroy_chain_until_it_has_plugins_of_its_own(grid):
    """Issue 17, upgraded sites: authorization set up on destroy_request (when
    destroy removed VMs) applies to delete while nothing is registered on
    delete_request."""
    await start_cluster(grid, count=2)
    c = grid.controller

    class Guard:
        name = "guard"
        order = 1
        seen = []

        def entry_point(self, event):
            self.seen.append((event.name, event.request.kind))
            if event.request.kind == "delete":
                event.request.reject("this site keeps its VMs")

    class Approver:
        name = "approver"
        order = 1

        def entry_point(self, event):
            pass
    # A site's explicit [[plugins]] from before issue 17: nothing on delete_request.
    c.chains.remove("open_authz", "delete_request")
    guard = _plugin(Guard)
    c.chains.add(guard, "destroy_request")
    with pytest.raises(Rejected, match=r"this site keeps its VMs \(rejected by guard\)"):
        await c.op_on("alice", False, "delete", Selection(clusters=["sneetch"]),
                      {"force": True})
    assert guard.seen == [("delete_request", "delete")]
    assert sorted(c.state.vms) == [full("1.sneetch"), full("2.sneetch")]
    # Destroy itself still goes through its chain.
    result = await c.op_on("alice", False, "destroy", Selection(names=["1.sneetch"]))
    assert result["done"] == [{"name": full("1.sneetch"), "state": "shutoff"}]
    # Once delete_request has a plugin, its chain is its own.
    c.chains.add(_plugin(Approver), "delete_request")
    result = await c.op_on("alice", False, "delete", Selection(clusters=["sneetch"]),
                           {"force": True})
    assert result["done"] == [{"name": full("1.sneetch"), "state": None},
                              {"name": full("2.sneetch"), "state": None}], result
    assert guard.seen == [("delete_request", "delete"), ("destroy_request", "destroy")]
    assert c.state.vms == {}


@pytest_twisted.ensureDeferred
async def test_delete_of_a_missing_vm_removes_its_record(grid):
    await start_cluster(grid, count=1, lnms=["lnm2"])
    c = grid.controller
    vm = full("1.sneetch")
    await grid.remove_on_host("lnm2", vm)
    await grid.report()
    assert c.state.vms[vm]["state"] == states.MISSING
    refused = await c.op_on("alice", False, "destroy", Selection(names=["1.sneetch"]))
    assert refused["failed"] == [{"name": vm, "error": "cannot destroy a VM that is missing: it "
                                  "is gone from its host; delete removes its record", "code": "wrong_state"}]
    result = await c.op_on("alice", False, "delete", Selection(names=["1.sneetch"]))
    assert result["done"] == [{"name": vm, "state": None}]
    assert vm not in c.state.vms


@pytest_twisted.ensureDeferred
async def test_operation_from_wrong_state_fails_without_change(grid):
    await start_cluster(grid, count=1)
    c = grid.controller
    result = await c.op_on("alice", False, "reboot", Selection(names=["1.sneetch"]))
    assert result["done"] == [{"name": full("1.sneetch"), "state": states.RUN}]
    await c.op_on("alice", False, "shutdown", Selection(names=["1.sneetch"]))
    result = await c.op_on("alice", False, "resume", Selection(names=["1.sneetch"]))
    assert result["done"] == []
    assert result["failed"] == [{"name": full("1.sneetch"), "code": "wrong_state",
                                 "error": "cannot resume a VM that is shutoff"}]
    assert c.state.vms[full("1.sneetch")]["state"] == states.SHUTOFF


@pytest_twisted.ensureDeferred
async def test_operation_on_a_vm_already_in_its_result_state_is_done_already(grid):
    await start_cluster(grid, count=2)
    c = grid.controller
    vm1, vm2 = full("1.sneetch"), full("2.sneetch")
    await c.op_on("alice", False, "pause", Selection(names=["1.sneetch"]))
    result = await c.op_on("alice", False, "pause", Selection(clusters=["sneetch"]))
    assert result["failed"] == []
    assert result["done"] == [{"name": vm1, "state": states.PAUSED, "already": True},
                              {"name": vm2, "state": states.PAUSED}]
    result = await c.op_on("alice", False, "resume", Selection(clusters=["sneetch"]))
    result = await c.op_on("alice", False, "resume", Selection(names=["1.sneetch"]))
    assert result["done"] == [{"name": vm1, "state": states.RUN, "already": True}]
    started = await c.start("alice", False, ["1.sneetch"])
    assert started["failed"] == []
    assert started["started"] == [{"name": vm1, "lnm": c.state.vms[vm1]["lnm"],
                                   "already": True}]


@pytest_twisted.ensureDeferred
async def test_whole_cluster_by_name_and_regex(grid):
    await start_cluster(grid, count=4)
    await start_cluster(grid, count=2, cluster="other")
    c = grid.controller
    result = await c.op_on("alice", False, "pause", Selection(clusters=["sneetch"]))
    assert len(result["done"]) == 4
    result = await c.op_on("alice", False, "resume", Selection(regex=r"^[12]\.sneetch"))
    assert sorted(d["name"] for d in result["done"]) == [full("1.sneetch"), full("2.sneetch")]
    assert c.state.vms[full("1.other")]["state"] == states.RUN


@pytest_twisted.ensureDeferred
async def test_bad_input_changes_nothing(grid):
    await start_cluster(grid, count=2)
    await start_cluster(grid, count=1, user="bob")
    c = grid.controller
    before = {n: dict(r) for n, r in c.state.vms.items()}
    with pytest.raises(PermissionDenied):
        await c.op_on("alice", False, "destroy", Selection(names=[full("1.sneetch", "bob")]))
    with pytest.raises(NoSuchVM):
        await c.op_on("alice", False, "pause", Selection(names=["1.sneetch", "9.nope"]))
    with pytest.raises(InvalidRequest):
        await c.op_on("alice", False, "explode", Selection(names=["1.sneetch"]))
    with pytest.raises(InvalidRequest):
        Selection(regex="(unclosed")
    with pytest.raises(InvalidRequest):
        Selection(names=["[3-1].sneetch"])
    with pytest.raises(InvalidRequest):
        await c.start("alice", False, ["Bad_Name!"], [], {})
    # Running already: started, and nothing changes.
    assert (await c.start("alice", False, ["1.sneetch"], [], {}))["started"][0]["already"]
    with pytest.raises(NoSuchLNM):
        await c.migrate("alice", False, Selection(names=["1.sneetch"]), ["nosuchlnm"])
    assert {n: dict(r) for n, r in c.state.vms.items()} == before


@pytest_twisted.ensureDeferred
async def test_admin_may_act_on_any_vm(grid):
    await start_cluster(grid, count=1, user="bob")
    result = await grid.controller.op_on("root", True, "pause",
                                         Selection(names=[full("1.sneetch", "bob")]))
    assert result["done"][0]["state"] == states.PAUSED


@pytest_twisted.ensureDeferred
async def test_migrate_moves_the_vm(grid):
    await start_cluster(grid, count=1, lnms=["lnm1"])
    c = grid.controller
    vm = full("1.sneetch")
    result = await c.migrate("alice", False, Selection(names=[vm]), ["lnm3"])
    assert result["migrated"] == [{"name": vm, "from": "lnm1", "to": "lnm3"}]
    assert c.state.vms[vm]["lnm"] == "lnm3"
    assert c.state.vms[vm]["state"] == states.RUN
    assert (await grid.vmms["lnm3"].domain_info(vm))["state"] == states.RUN
    assert vm not in [d["name"] for d in await grid.vmms["lnm1"].list_domains()]
    # and it can still be operated on its new host
    result = await c.op_on("alice", False, "pause", Selection(names=[vm]))
    assert result["done"][0]["state"] == states.PAUSED


@pytest_twisted.ensureDeferred
async def test_lnm_failure_marks_vms_lost_then_recovers(grid):
    await start_cluster(grid, count=3)
    c = grid.controller
    on_lnm1 = sorted(c.state.lnms["lnm1"].vms)
    assert on_lnm1
    grid.cut("lnm1")
    for name in on_lnm1:
        assert c.state.vms[name]["state"] == states.LOST
    assert sorted(r["name"] for r in c.state.lost()) == on_lnm1
    await grid.attach("lnm1")
    for name in on_lnm1:
        assert c.state.vms[name]["state"] == states.RUN


@pytest_twisted.ensureDeferred
async def test_out_of_band_changes(grid):
    await start_cluster(grid, count=3, lnms=["lnm2"])
    c = grid.controller
    victim = full("1.sneetch")
    await grid.remove_on_host("lnm2", victim)
    await grid.vmms["lnm2"].create({"name": full("7.adopted"), "uuid": None,
                                    "memory_mib": 128, "vcpus": 1, "owner": "alice",
                                    "cluster": "adopted", "args": {}})
    await grid.vmms["lnm2"].create({"name": "stranger", "uuid": None, "memory_mib": 128,
                                    "vcpus": 1, "owner": "", "cluster": "", "args": {}})
    await grid.report()
    assert c.state.vms[victim]["state"] == states.MISSING
    # A managed name the controller did not start there is quarantined: not
    # alice's (it could be anyone's forgery), listed as unmanaged with why.
    assert full("7.adopted") not in c.state.vms
    assert full("7.adopted") not in c.state.owned_by("alice")
    stray = c.state.unmanaged[full("7.adopted")]
    assert (stray["owner"], stray["managed"], stray["lnm"]) == (None, False, "lnm2")
    assert "no record" in stray["quarantined"]
    assert "stranger" in c.state.unmanaged
    assert "quarantined" not in c.state.unmanaged["stranger"]


class _Recorder:
    def __init__(self):
        self.batches = []

    def __call__(self, seq, chunks, removed):
        from usher.records import decode_records
        self.batches.append((seq, decode_records(chunks), removed))


@pytest_twisted.ensureDeferred
async def test_subscribers_get_batched_deltas_of_their_own_vms(grid):
    c = grid.controller
    alice, bob = _Recorder(), _Recorder()
    c.hub.add("alice", False, None, alice)
    c.hub.add("bob", False, None, bob)
    await start_cluster(grid, count=3)
    await _turn()
    assert alice.batches and not bob.batches
    latest = {}
    for seq, changed, removed in alice.batches:
        for rec in changed:
            latest[rec["name"]] = rec["state"]
    assert latest == {full(f"{i}.sneetch"): states.RUN for i in (1, 2, 3)}
    assert [b[0] for b in alice.batches] == list(range(1, len(alice.batches) + 1))


@pytest_twisted.ensureDeferred
async def test_plugin_chain_rejects(grid):
    class Veto:
        name = "veto"
        order = 1

        def entry_point(self, event):
            event.request.reject("no VMs on Sundays")
    from zope.interface import directlyProvides
    from usher.interfaces import IPlugin
    plugin = Veto()
    directlyProvides(plugin, IPlugin)
    grid.controller.chains.add(plugin, "start_request")
    with pytest.raises(Rejected, match="no VMs on Sundays"):
        await start_cluster(grid, count=2)
    assert grid.controller.state.vms == {}


async def _turn():
    from twisted.internet import task
    await task.deferLater(reactor, 0.01, lambda: None)


class _SlowPlacer:
    """An asynchronous plugin: it answers a reactor turn later, and gives
    each VM an address of its own."""
    name = "slowplacer"
    order = 1

    def __init__(self):
        from zope.interface import directlyProvides
        from usher.interfaces import IPlugin
        directlyProvides(self, IPlugin)
        self.counter = 0

    async def entry_point(self, event):
        await _turn()
        for vm in event.request.vms:
            self.counter += 1
            event.request.set_vm_arg(vm, "ip", f"10.0.0.{self.counter}")


@pytest_twisted.ensureDeferred
async def test_concurrent_starts_never_pick_the_same_names(grid):
    from twisted.internet import defer
    grid.controller.chains.add(_SlowPlacer(), "start_request")
    first, second = await defer.gatherResults([
        defer.ensureDeferred(start_cluster(grid, count=3)),
        defer.ensureDeferred(start_cluster(grid, count=3))])
    names = [s["name"] for s in first["started"] + second["started"]]
    assert sorted(names) == sorted(full(f"{i}.sneetch") for i in range(1, 7))
    ips = {grid.controller.state.vms[n]["args"]["ip"] for n in names}
    assert len(ips) == 6
    outcomes = await defer.DeferredList([
        defer.ensureDeferred(grid.controller.start("alice", False, ["solo"], [], {})),
        defer.ensureDeferred(grid.controller.start("alice", False, ["solo"], [], {}))],
        consumeErrors=True)
    assert outcomes[0][0] and outcomes[0][1]["started"][0]["name"] == full("solo")
    assert not outcomes[1][0] and outcomes[1][1].check(InvalidRequest)
    assert "already being started" in str(outcomes[1][1].value)
    assert grid.controller.state.vms[full("solo")]["state"] == states.RUN


@pytest_twisted.ensureDeferred
async def test_forget_a_retired_lnm(grid):
    from usher.errors import NoSuchLNM
    await start_cluster(grid, count=3)
    c = grid.controller
    on_lnm2 = sorted(c.state.lnms["lnm2"].vms)
    with pytest.raises(InvalidRequest, match="connected"):
        c.forget_lnm("lnm2")
    grid.cut("lnm2")
    assert c.forget_lnm("lnm2") == on_lnm2
    assert "lnm2" not in c.state.lnms
    assert not any(n in c.state.vms for n in on_lnm2)
    assert len(c.state.vms) == 3 - len(on_lnm2)
    with pytest.raises(NoSuchLNM):
        c.forget_lnm("lnm2")


class _StateWatcher:
    """A plugin on vm_state_changed: every change it hears of."""
    name = "statewatcher"
    order = 1

    def __init__(self):
        from zope.interface import directlyProvides
        from usher.interfaces import IPlugin
        directlyProvides(self, IPlugin)
        self.changes = []

    def entry_point(self, event):
        self.changes.append((event.vm["name"], event.old_state, event.new_state))


@pytest_twisted.ensureDeferred
async def test_plugins_hear_of_every_state_change_once(grid):
    c = grid.controller
    watcher = _StateWatcher()
    c.chains.add(watcher, "vm_state_changed")
    vm = full("w1")
    await c.start("alice", False, ["w1"], ["lnm1"], {})
    assert watcher.changes == [(vm, states.STARTING, states.RUN)]
    await grid.report()                        # the LNM confirms: nothing new
    await c.op_on("alice", False, "pause", Selection(names=[vm]))
    await grid.report()
    await c.op_on("alice", False, "resume", Selection(names=[vm]))
    await c.migrate("root", True, Selection(names=[vm]), ["lnm2"])
    await grid.report()
    assert watcher.changes == [(vm, states.STARTING, states.RUN),
                               (vm, states.RUN, states.PAUSED),
                               (vm, states.PAUSED, states.RUN),
                               (vm, states.RUN, states.MIGRATING),
                               (vm, states.MIGRATING, states.RUN)]
    del watcher.changes[:]
    await grid.vmms["lnm2"].operate("pause", vm)   # behind Usher's back
    await grid.report()
    grid.cut("lnm2")
    assert watcher.changes == [(vm, states.RUN, states.PAUSED),
                               (vm, states.PAUSED, states.LOST)]


class _OldLNM:
    """The node API of an LNM before issue 17, as the controller's handle
    sees it: destroy undefined the VM (answering None); delete is unknown."""

    def __init__(self):
        self.sent = []

    async def op_on(self, operation, name):
        self.sent.append(operation)
        if operation == "delete":
            raise InvalidRequest(f"unknown operation {operation!r}")
        return None


@pytest_twisted.ensureDeferred
async def test_removing_a_vm_on_an_lnm_before_issue_17_sends_no_delete():
    """A forced delete or a stale copy's removal powers off first; an old
    LNM's destroy already removed the VM, so no delete follows."""
    from usher.controller.commands import hard_off
    old = _OldLNM()
    assert await hard_off(old, "x") is None
    assert old.sent == ["destroy"]


def test_the_hello_says_whether_destroy_keeps_the_vm():
    """Issue 17: an LNM's hello says its destroy keeps the VM; one without
    the field is older."""
    from usher.controller.lnm_input import check_hello
    from usher.protocol import PROTOCOL_VERSION
    assert check_hello({"protocol": PROTOCOL_VERSION, "destroy_keeps": True},
                       PROTOCOL_VERSION)["destroy_keeps"] is True
    assert check_hello({"protocol": PROTOCOL_VERSION}, PROTOCOL_VERSION)["destroy_keeps"] is False
    assert check_hello(None, PROTOCOL_VERSION)["destroy_keeps"] is False
    with pytest.raises(InvalidRequest, match="destroy_keeps must be true or false"):
        check_hello({"protocol": PROTOCOL_VERSION, "destroy_keeps": "yes"}, PROTOCOL_VERSION)


def _old_lnm_link(grid, name):
    """LNM ``name`` of the grid as an usherlnm before issue 17 would be on
    the wire: a hello without destroy_keeps, a destroy that removes the VM
    (answering None) and no delete. -> the operations it was sent."""
    from twisted.internet import defer
    from usher.lnm.api import NodeAPI
    from usher.lnm.link import ControllerLinkFactory
    sent = []
    new = grid.lnm_links[name]

    class OldNodeAPI(NodeAPI):
        def remote_op_on(self, operation, vm):
            sent.append(operation)
            if operation != "destroy":
                return NodeAPI.remote_op_on(self, operation, vm)

            async def destroy_and_undefine():
                await NodeAPI.remote_op_on(self, "destroy", vm)
                await NodeAPI.remote_op_on(self, "delete", vm)
                return None
            return defer.Deferred.fromCoroutine(destroy_and_undefine())

    class OldLink(ControllerLinkFactory):
        def hello(self):
            hello = super().hello()
            del hello["destroy_keeps"]
            return hello
    grid.lnm_links[name] = OldLink(new.manager, OldNodeAPI(new.manager), clock=new.clock,
                                   call_timeout=new.call_timeout)
    return sent


@pytest_twisted.ensureDeferred
async def test_an_lnm_before_issue_17_is_not_sent_destroy_and_delete_is_its_destroy(grid):
    """Mixed versions: an older LNM's destroy removes the VM, so the
    controller refuses destroy there (with what to do) and sends delete as
    that destroy."""
    await start_cluster(grid, count=3, lnms=["lnm1"])
    c = grid.controller
    sent = _old_lnm_link(grid, "lnm1")
    await grid.attach("lnm1")
    assert not c.inventory.destroy_keeps("lnm1") and c.inventory.destroy_keeps("lnm2")
    names = [full(f"{i}.sneetch") for i in (1, 2, 3)]
    refused = await c.op_on("alice", False, "destroy", Selection(clusters=["sneetch"]))
    assert refused["done"] == []
    assert refused["failed"] == [{"name": n, "error": (
        "LNM lnm1 runs an older usherlnm whose destroy removes the VM: upgrade it, or use "
        "delete --force"), "code": "operation_failed"} for n in names]
    assert sent == []
    assert sorted(c.state.vms) == names
    assert (await grid.vmms["lnm1"].domain_info(names[0]))["state"] == states.RUN
    # A shut-off VM is deleted with the old destroy; a running one by force.
    await c.op_on("alice", False, "shutdown", Selection(names=["1.sneetch"]))
    deleted = await c.op_on("alice", False, "delete", Selection(names=["1.sneetch"]))
    assert deleted["done"] == [{"name": names[0], "state": None}], deleted
    forced = await c.op_on("alice", False, "delete", Selection(names=["2.sneetch"]),
                           {"force": True})
    assert forced["done"] == [{"name": names[1], "state": None}], forced
    assert sent == ["shutdown", "destroy", "destroy"]
    assert sorted(c.state.vms) == [names[2]]
    for name in names[:2]:
        with pytest.raises(NoSuchVM):
            await grid.vmms["lnm1"].domain_info(name)
