"""The LDAP plugin's cluster branches (usher.plugins.ldap.branches and the
plugin's event handling) with an in-memory directory and ``task.Clock``:
creation, idempotence, the delete/keep policy, the last VM of each (owner,
cluster), coalescing, a directory that goes down and comes back,
reconciliation, and the plugin's bounded wait on register_vm."""

import pytest
from twisted.internet import defer, task

from usher.plugins.ldap import Plugin
from usher.plugins.ldap.branches import ENSURED, LEFT, REMOVED, BranchKeeper
from usher.plugins.ldap.directory import DirectoryError, DirectoryUnavailable


class FakeDirectory:
    """The branches a Directory would hold; ``down``: every call raises
    DirectoryUnavailable; ``hold``: calls wait on a Deferred (run_blocking
    stands for the thread)."""

    def __init__(self):
        self.branches = {}          # (owner, cluster) -> {"admins": [...], "extra": [...]}
        self.down = False
        self.broken = None          # an exception every call raises
        self.calls = []

    def _call(self, name, *args):
        self.calls.append((name,) + args)
        if self.down:
            raise DirectoryUnavailable("the LDAP server ldap://test is unavailable: refused")
        if self.broken is not None:
            raise self.broken

    def ensure_cluster_branch(self, owner, cluster):
        self._call("ensure", owner, cluster)
        branch = self.branches.get((owner, cluster))
        if branch is None:
            self.branches[(owner, cluster)] = {"admins": [owner], "extra": []}
            return True
        if owner not in branch["admins"]:
            branch["admins"].append(owner)
            return True
        return False

    def remove_cluster_branch(self, owner, cluster):
        self._call("remove", owner, cluster)
        return self.branches.pop((owner, cluster), None) is not None

    def cluster_branches(self):
        self._call("list")
        return set(self.branches)


class Blocking:
    """run_blocking: synchronous, or held until ``release()`` when ``held``."""

    def __init__(self):
        self.held = False
        self.waiting = []

    def __call__(self, function, *args):
        if not self.held:
            return defer.maybeDeferred(function, *args)
        d = defer.Deferred()
        self.waiting.append((d, function, args))
        return d

    def release(self):
        waiting, self.waiting = self.waiting, []
        for d, function, args in waiting:
            defer.maybeDeferred(function, *args).chainDeferred(d)


class World:
    def __init__(self, policy="delete"):
        self.clock = task.Clock()
        self.directory = FakeDirectory()
        self.blocking = Blocking()
        self.vms = {}               # name -> (owner, cluster)
        self.keeper = BranchKeeper(self.directory, run_blocking=self.blocking,
                                   clock=self.clock, live=lambda: set(self.vms.values()),
                                   policy=policy, retry_initial=1.0, retry_max=8.0)
        self.keeper.ready = True


def outcome(d):
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


@pytest.fixture
def world():
    return World()


def test_a_cluster_with_a_vm_gets_its_branch_once(world):
    world.vms["1.web.alice"] = ("alice", "web")
    assert outcome(world.keeper.request("alice", "web")) == ENSURED
    assert world.directory.branches == {("alice", "web"): {"admins": ["alice"], "extra": []}}
    assert outcome(world.keeper.request("alice", "web")) == ENSURED       # idempotent
    assert list(world.directory.branches) == [("alice", "web")]


def test_delete_policy_removes_the_branch_with_the_clusters_last_vm_only(world):
    world.vms.update({"1.web.alice": ("alice", "web"), "2.web.alice": ("alice", "web"),
                      "1.web.bob": ("bob", "web"), "1.db.alice": ("alice", "db")})
    for key in set(world.vms.values()):
        outcome(world.keeper.request(*key))
    del world.vms["1.web.alice"]
    assert outcome(world.keeper.request("alice", "web")) == ENSURED      # 2.web is left
    del world.vms["2.web.alice"]
    assert outcome(world.keeper.request("alice", "web")) == REMOVED
    # Same cluster name, other owner; same owner, other cluster: untouched.
    assert set(world.directory.branches) == {("bob", "web"), ("alice", "db")}


def test_keep_policy_leaves_the_branch():
    world = World(policy="keep")
    world.vms["1.web.alice"] = ("alice", "web")
    outcome(world.keeper.request("alice", "web"))
    del world.vms["1.web.alice"]
    assert outcome(world.keeper.request("alice", "web")) == LEFT
    assert outcome(world.keeper.reconcile()).removed == []
    assert ("alice", "web") in world.directory.branches
    assert not [c for c in world.directory.calls if c[0] == "remove"]


def test_nothing_is_removed_before_the_state_is_rebuilt(world):
    world.keeper.ready = False
    world.directory.branches[("alice", "web")] = {"admins": ["alice"], "extra": []}
    assert outcome(world.keeper.request("alice", "web")) == LEFT
    assert outcome(world.keeper.reconcile()).removed == []
    world.keeper.ready = True
    assert outcome(world.keeper.reconcile()).removed == [("alice", "web")]


def test_a_start_during_the_removal_keeps_the_branch(world):
    """The last VM goes and a new one of the cluster comes while the removal
    is on its way: the job after it looks at the state again."""
    world.vms["1.web.alice"] = ("alice", "web")
    outcome(world.keeper.request("alice", "web"))
    world.blocking.held = True
    del world.vms["1.web.alice"]
    removal = world.keeper.request("alice", "web")
    world.vms["2.web.alice"] = ("alice", "web")
    start = world.keeper.request("alice", "web")
    assert len(world.blocking.waiting) == 1          # one job at a time per cluster
    world.blocking.release()
    assert len(world.blocking.waiting) == 1          # the second run, after the first
    world.blocking.release()
    assert outcome(removal) == outcome(start) == ENSURED
    assert ("alice", "web") in world.directory.branches
    assert [c[0] for c in world.directory.calls[-2:]] == ["remove", "ensure"]


def test_many_events_of_one_cluster_coalesce(world):
    world.blocking.held = True
    waits = []
    for i in range(10):
        world.vms[f"{i}.big.alice"] = ("alice", "big")
        waits.append(world.keeper.request("alice", "big"))
    world.blocking.release()
    world.blocking.release()
    assert [outcome(d) for d in waits] == [ENSURED] * 10
    assert len([c for c in world.directory.calls if c[0] == "ensure"]) == 2
    assert not world.keeper.busy


def test_invalid_names_never_reach_the_directory(world):
    failure = outcome(world.keeper.request("Alice,ou=x", "web"))
    assert "invalid owner or cluster" in str(failure.value)
    failure = outcome(world.keeper.request("alice", "we b"))
    assert "invalid owner or cluster" in str(failure.value)
    assert world.directory.calls == []


def test_directory_down_is_one_outage_probed_with_backoff_then_caught_up(world):
    logged = []
    from twisted.logger import globalLogPublisher
    globalLogPublisher.addObserver(logged.append)
    try:
        world.directory.down = True
        world.vms["1.web.alice"] = ("alice", "web")
        first = outcome(world.keeper.request("alice", "web"))
        assert first.check(DirectoryUnavailable)
        assert world.keeper.down
        # While it is down, requests fail at once without a call.
        calls = len(world.directory.calls)
        world.vms["1.db.alice"] = ("alice", "db")
        assert outcome(world.keeper.request("alice", "db")).check(DirectoryUnavailable)
        assert len(world.directory.calls) == calls
        # Probes at 1, 2, 4, 8, 8 s (retry_max 8).
        probes = []
        for step in (1, 2, 4, 8, 8):
            world.clock.advance(step - 0.01)
            before = len(world.directory.calls)
            assert before == calls + len(probes)
            world.clock.advance(0.01)
            probes.append(step)
            assert len(world.directory.calls) == calls + len(probes)
        outages = [e for e in logged if "directory is unavailable" in e.get("log_format", "")]
        assert len(outages) == 1
        # Back: the next probe reconciles everything that was asked meanwhile.
        world.directory.down = False
        world.clock.advance(8)
        assert not world.keeper.down
        assert set(world.directory.branches) == {("alice", "web"), ("alice", "db")}
        backs = [e for e in logged if "directory is back" in e.get("log_format", "")]
        assert len(backs) == 1
        assert not world.clock.getDelayedCalls()
    finally:
        globalLogPublisher.removeObserver(logged.append)


def test_removal_missed_during_an_outage_is_made_after_it(world):
    world.vms["1.web.alice"] = ("alice", "web")
    outcome(world.keeper.request("alice", "web"))
    world.directory.down = True
    del world.vms["1.web.alice"]
    assert outcome(world.keeper.request("alice", "web")).check(DirectoryUnavailable)
    world.directory.down = False
    world.clock.advance(1)
    assert world.directory.branches == {}


def test_reconcile_makes_missing_branches_and_removes_those_without_vms(world):
    world.vms.update({"1.web.alice": ("alice", "web"), "1.db.bob": ("bob", "db")})
    world.directory.branches = {("alice", "web"): {"admins": [], "extra": []},
                                ("alice", "old"): {"admins": ["alice"], "extra": ["x"]},
                                ("carol", "gone"): {"admins": ["carol"], "extra": []}}
    result = outcome(world.keeper.reconcile())
    assert sorted(result.ensured) == [("alice", "web"), ("bob", "db")]
    assert sorted(result.removed) == [("alice", "old"), ("carol", "gone")]
    assert set(world.directory.branches) == {("alice", "web"), ("bob", "db")}
    # An existing branch is completed (its owner back in admin).
    assert world.directory.branches[("alice", "web")]["admins"] == ["alice"]


def test_reconciliations_do_not_overlap(world):
    world.vms["1.web.alice"] = ("alice", "web")
    world.blocking.held = True
    first = world.keeper.reconcile()
    second = world.keeper.reconcile()
    third = world.keeper.reconcile()
    assert len(world.blocking.waiting) == 1
    while world.blocking.waiting:
        world.blocking.release()
    assert outcome(first).ensured == outcome(second).ensured == [("alice", "web")]
    assert outcome(third).ensured == [("alice", "web")]
    assert len([c for c in world.directory.calls if c[0] == "list"]) == 2


def test_an_unexpected_directory_error_is_logged_and_not_an_outage(world):
    logged = []
    from twisted.logger import globalLogPublisher
    globalLogPublisher.addObserver(logged.append)
    try:
        world.directory.broken = DirectoryError("LDAP adding x: insufficientAccessRights")
        world.vms["1.web.alice"] = ("alice", "web")
        assert outcome(world.keeper.request("alice", "web")).check(DirectoryError)
        assert not world.keeper.down
        assert [e for e in logged if "log_failure" in e]
    finally:
        globalLogPublisher.removeObserver(logged.append)


def test_stop_cancels_the_probe(world):
    world.directory.down = True
    world.vms["1.web.alice"] = ("alice", "web")
    outcome(world.keeper.request("alice", "web"))
    assert world.clock.getDelayedCalls()
    world.keeper.stop()
    assert not world.clock.getDelayedCalls()


# -- the plugin's events, on a fake controller ----------------------------------------------

class FakeState:
    def __init__(self):
        self.vms = {}
        self.domain = "usher.test"


class FakeAPI:
    def __init__(self, clock, blocking):
        self.clock = clock
        self.state = FakeState()
        self.run_blocking = blocking
        self.settle = defer.Deferred()

    async def settled(self):
        await self.settle


class Event:
    def __init__(self, name, vm):
        self.name = name
        self.vm = vm


def vm(name, owner, cluster):
    return {"name": f"{name}.{owner}.usher.test", "owner": owner, "cluster": cluster}


def plugin_world(policy="delete", interval=30.0):
    clock = task.Clock()
    blocking = Blocking()
    api = FakeAPI(clock, blocking)
    directory = FakeDirectory()
    plugin = Plugin({"cluster_branch_policy": policy, "reconcile_interval": interval,
                     "timeout": None}, api, directory=directory)
    return plugin, api, directory


def add_vm(api, record):
    api.state.vms[record["name"]] = record
    return record


def test_the_plugin_reconciles_after_recovery_then_every_interval():
    plugin, api, directory = plugin_world()
    directory.branches[("alice", "stale")] = {"admins": ["alice"], "extra": []}
    add_vm(api, vm("1.web", "alice", "web"))
    # Recovering: no removal, no periodic reconciliation yet.
    api.clock.advance(100)
    assert directory.calls == []
    api.settle.callback(None)
    result = outcome(plugin.reconciled)
    assert result.ensured == [("alice", "web")] and result.removed == [("alice", "stale")]
    directory.branches[("alice", "stale2")] = {"admins": ["alice"], "extra": []}
    api.clock.advance(30)
    assert set(directory.branches) == {("alice", "web")}
    plugin.stop()
    assert not api.clock.getDelayedCalls()


def test_register_vm_waits_a_bounded_time_and_the_branch_follows():
    plugin, api, directory = plugin_world()
    api.settle.callback(None)
    api.run_blocking.held = True
    record = add_vm(api, vm("1.web", "alice", "web"))
    waited = defer.ensureDeferred(plugin.entry_point(Event("register_vm", record)))
    assert not waited.called
    api.clock.advance(plugin.branch_wait)
    assert waited.called and outcome(waited) is None        # the start goes on
    api.run_blocking.release()
    assert ("alice", "web") in directory.branches


def test_register_vm_with_the_directory_down_does_not_wait():
    plugin, api, directory = plugin_world()
    api.settle.callback(None)
    directory.down = True
    record = add_vm(api, vm("1.web", "alice", "web"))
    waited = defer.ensureDeferred(plugin.entry_point(Event("register_vm", record)))
    assert outcome(waited) is None
    second = add_vm(api, vm("2.web", "alice", "web"))
    calls = len(directory.calls)
    assert outcome(defer.ensureDeferred(plugin.entry_point(Event("vm_adopted", second)))) \
        is None
    assert len(directory.calls) == calls
    directory.down = False
    api.clock.advance(1)
    assert ("alice", "web") in directory.branches
    plugin.stop()


def test_vm_removed_removes_with_the_last_vm_of_that_owner_and_cluster():
    plugin, api, directory = plugin_world()
    api.settle.callback(None)
    records = [add_vm(api, vm(n, o, c)) for n, o, c in
               (("1.web", "alice", "web"), ("2.web", "alice", "web"), ("1.web", "bob", "web"))]
    for record in records:
        outcome(defer.ensureDeferred(plugin.entry_point(Event("register_vm", record))))
    assert set(directory.branches) == {("alice", "web"), ("bob", "web")}
    for record, left in ((records[0], {("alice", "web"), ("bob", "web")}),
                         (records[1], {("bob", "web")}), (records[2], set())):
        del api.state.vms[record["name"]]
        plugin.entry_point(Event("vm_removed", record))
        assert set(directory.branches) == left
    plugin.stop()


def test_vm_removed_under_keep_leaves_the_branch():
    plugin, api, directory = plugin_world(policy="keep")
    api.settle.callback(None)
    record = add_vm(api, vm("1.web", "alice", "web"))
    outcome(defer.ensureDeferred(plugin.entry_point(Event("register_vm", record))))
    del api.state.vms[record["name"]]
    plugin.entry_point(Event("vm_removed", record))
    api.clock.advance(60)
    assert set(directory.branches) == {("alice", "web")}
    plugin.stop()
