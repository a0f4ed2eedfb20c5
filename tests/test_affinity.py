"""Affinity and anti-affinity of virtual clusters (usher.controller.affinity),
in isolation: the rules and their file, the requests that set them, and the
placement check of the PlacementPlugin base class on a controller of fake
hosts (task.Clock) across start, VMs started again, migrations (a whole
together cluster, a host held for maintenance as evacuation does) and HA
restarts (a start request's relocate); and the rebalancer's planning."""

import json

import pytest
import pytest_twisted
from twisted.internet import task

from usher import states
from usher.controller.affinity import AffinityRules, check_rule, move_refusal
from usher.controller.capacity import CapacityPolicy, Ledger
from usher.controller.core import Controller
from usher.controller.events import Event, Request
from usher.controller.state import LNMInfo
from usher.errors import InvalidRequest, PermissionDenied
from usher.plugins import rebalancer, roundrobin, spread

DOMAIN = "usher.test"


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def controller(hosts=("lnm1", "lnm2", "lnm3"), state_dir=None, cpus=8, memory_mib=8192):
    made = Controller(domain=DOMAIN, clock=task.Clock(), admins=["root"], state_dir=state_dir)
    for name in hosts:
        made.state.lnms[name] = LNMInfo(name, {"cpus": cpus, "memory_mib": memory_mib},
                                        handle=object())
    return made


def add_vm(ctrl, short, lnm, state=states.RUN, owner="alice", memory_mib=256):
    record = ctrl.state.new_record(full(short, owner), state=state, lnm=lnm,
                                   memory_mib=memory_mib, vcpus=1)
    ctrl.state.add(record)
    return record


def placer(ctrl, module=roundrobin, **config):
    return module.Plugin(dict(config), ctrl.api)


def start_request(ctrl, names, cluster=None, user="alice", **args):
    vms = [full(n, user) for n in names]
    request = Request("start", user, vms=vms, args=dict(args, memory_mib=256, vcpus=1),
                      records={n: {"memory_mib": 256, "vcpus": 1} for n in vms})
    if cluster:
        request.args["cluster"] = cluster
    return request


def migrate_request(ctrl, names, lnms=(), user="usher"):
    vms = [full(n) for n in names]
    return Request("migrate", user, admin=True, vms=vms, lnms=list(lnms),
                   records={n: dict(ctrl.state.vms[n]) for n in vms})


def place(ctrl, plugin, request):
    name = "start_request" if request.kind == "start" else "migrate_request"
    plugin.entry_point(Event(name, ctrl.api, request=request))
    return request


async def set_rule(ctrl, cluster, rule, owner="alice"):
    await ctrl.affinity.set(owner, cluster, rule)


# -- the rules and their file ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_rules_survive_a_restart_in_affinity_json_and_none_removes_them(tmp_path):
    rules = AffinityRules(str(tmp_path))
    await rules.set("alice", "db", "apart")
    await rules.set("bob", "web", "together")
    assert json.loads((tmp_path / "affinity.json").read_text())["rules"] == [
        {"owner": "alice", "cluster": "db", "rule": "apart"},
        {"owner": "bob", "cluster": "web", "rule": "together"}]
    again = AffinityRules(str(tmp_path))
    assert (again.rule("alice", "db"), again.rule("bob", "web")) == ("apart", "together")
    await again.set("alice", "db", None)
    assert AffinityRules(str(tmp_path)).listing() == [
        {"owner": "bob", "cluster": "web", "rule": "together"}]


@pytest_twisted.ensureDeferred
async def test_rules_are_written_off_the_reactor_when_there_is_a_thread_pool(tmp_path):
    ctrl = controller(state_dir=str(tmp_path))
    ran = []

    def in_thread(function, *args):
        ran.append(function.__name__)
        from twisted.internet import defer
        return defer.maybeDeferred(function, *args)
    ctrl.api.run_in_thread = in_thread
    await ctrl.affinity.set("alice", "db", "apart")
    assert ran == ["write_json_atomic"]
    assert AffinityRules(str(tmp_path)).rule("alice", "db") == "apart"


def test_without_a_state_dir_rules_stay_in_memory_and_bad_files_are_survived(tmp_path):
    assert AffinityRules(None).path is None
    (tmp_path / "affinity.json").write_text(json.dumps({"rules": [
        {"owner": "alice", "cluster": "db", "rule": "apart"},
        {"owner": "Bad User", "cluster": "x", "rule": "apart"},
        {"owner": "alice", "cluster": "y", "rule": "sideways"}, "junk"]}))
    assert AffinityRules(str(tmp_path)).listing() == [
        {"owner": "alice", "cluster": "db", "rule": "apart"}]
    (tmp_path / "affinity.json").write_text("{not json")
    assert AffinityRules(str(tmp_path)).listing() == []


def test_rule_words():
    assert [check_rule(w) for w in ("apart", " Together ", "none", None)] == [
        "apart", "together", None, None]
    for bad in ("sideways", 3, ""):
        with pytest.raises(InvalidRequest, match="apart, together or none"):
            check_rule(bad)
    with pytest.raises(InvalidRequest):
        check_rule("none", allow_none=False)


@pytest_twisted.ensureDeferred
async def test_the_affinity_request_reads_sets_and_says_when_vms_do_not_meet_it():
    ctrl = controller()
    add_vm(ctrl, "1.db", "lnm1")
    add_vm(ctrl, "2.db", "lnm1")
    assert await ctrl.set_affinity("alice", False, "db") == {
        "owner": "alice", "cluster": "db", "rule": None, "vms": 2, "hosts": {"lnm1": 2},
        "honoured": True}
    result = await ctrl.set_affinity("alice", False, "db", "apart")
    assert result["rule"] == "apart" and not result["honoured"]
    assert "share lnm1" in result["note"]
    assert (await ctrl.set_affinity("alice", False, "db", "together"))["honoured"]
    assert (await ctrl.set_affinity("alice", False, "db", "none"))["rule"] is None
    # administrators name other users' clusters; users only their own
    assert (await ctrl.set_affinity("root", True, "alice/db", "apart"))["owner"] == "alice"
    assert ctrl.affinity.rule("alice", "db") == "apart"
    with pytest.raises(PermissionDenied, match="alice/db"):
        await ctrl.set_affinity("bob", False, "alice/db", "none")
    assert (await ctrl.set_affinity("bob", False, "bob/db"))["owner"] == "bob"
    for bad_cluster in ("", "Not A Label", "x" * 200, 7):
        with pytest.raises(InvalidRequest):
            await ctrl.set_affinity("alice", False, bad_cluster, "apart")
    with pytest.raises(InvalidRequest):
        await ctrl.set_affinity("alice", False, "db", "sideways")


@pytest_twisted.ensureDeferred
async def test_the_start_argument_sets_the_rule_and_a_contradicting_start_is_refused():
    ctrl = controller()
    args = {"affinity": "apart", "cluster": "db"}
    undo = await ctrl.affinity.take_start_arg(ctrl.state, DOMAIN, "alice",
                                              [full("1.db")], args)
    assert "affinity" not in args and ctrl.affinity.rule("alice", "db") == "apart"
    await undo()                          # the request was rejected after all
    assert ctrl.affinity.rule("alice", "db") is None
    await set_rule(ctrl, "db", "apart")
    add_vm(ctrl, "1.db", "lnm1")
    with pytest.raises(InvalidRequest, match="cluster db has the rule affinity apart"):
        await ctrl.affinity.take_start_arg(ctrl.state, DOMAIN, "alice", [full("2.db")],
                                           {"affinity": "together", "cluster": "db"})
    # the same rule again is no change; an empty cluster may change its rule
    assert await ctrl.affinity.take_start_arg(ctrl.state, DOMAIN, "alice", [full("3.db")],
                                              {"affinity": "apart"}) is None
    await ctrl.affinity.take_start_arg(ctrl.state, DOMAIN, "alice", [full("1.web")],
                                       {"affinity": "together"})
    assert ctrl.affinity.rule("alice", "web") == "together"
    with pytest.raises(InvalidRequest):
        await ctrl.affinity.take_start_arg(ctrl.state, DOMAIN, "alice", [full("1.x")],
                                           {"affinity": "none"})


# -- placement: new VMs ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_apart_refuses_hosts_running_the_cluster_naming_the_rule_and_each_host():
    ctrl = controller()
    await set_rule(ctrl, "db", "apart")
    add_vm(ctrl, "1.db", "lnm1")
    request = place(ctrl, placer(ctrl), start_request(ctrl, ["2.db", "3.db", "4.db"]))
    assert sorted(request.placement.values()) == ["lnm2", "lnm3"]
    rule = "affinity apart of cluster db (alice)"
    hosts = {h: n for n, h in request.placement.items()}
    assert request.dropped == {full("4.db"): (
        "no LNM can start it (256 MiB and 1 vCPU): "
        f"lnm1: runs 1.db of cluster db, kept apart ({rule}); "
        f"lnm2: runs {hosts['lnm2'].split('.alice')[0]} of cluster db, kept apart ({rule}); "
        f"lnm3: runs {hosts['lnm3'].split('.alice')[0]} of cluster db, kept apart ({rule})")}
    # other clusters and other users' VMs of the same name are not concerned
    other = place(ctrl, placer(ctrl), start_request(ctrl, ["1.web", "2.web"]))
    assert not other.dropped
    bobs = place(ctrl, placer(ctrl), start_request(ctrl, ["5.db", "6.db"], user="bob"))
    assert not bobs.dropped


@pytest_twisted.ensureDeferred
async def test_best_effort_places_the_vm_anyway_with_a_note():
    ctrl = controller(hosts=("lnm1", "lnm2"))
    await set_rule(ctrl, "db", "apart")
    request = place(ctrl, placer(ctrl, affinity="best_effort"),
                    start_request(ctrl, ["1.db", "2.db", "3.db"]))
    assert len(request.placement) == 3 and not request.dropped
    assert request.notes == [
        "round-robin: 3.db placed on lnm1 against its cluster's affinity rule (lnm1: runs "
        "1.db of cluster db, kept apart (affinity apart of cluster db (alice))); this site's "
        "affinity policy is best_effort"]


@pytest_twisted.ensureDeferred
async def test_together_follows_the_clusters_host_and_refuses_when_it_is_full_or_held():
    ctrl = controller(memory_mib=1024)
    await set_rule(ctrl, "web", "together")
    add_vm(ctrl, "1.web", "lnm2")
    request = place(ctrl, placer(ctrl), start_request(ctrl, ["2.web", "3.web"]))
    assert request.placement == {full("2.web"): "lnm2", full("3.web"): "lnm2"}
    add_vm(ctrl, "2.web", "lnm2")
    add_vm(ctrl, "3.web", "lnm2")
    add_vm(ctrl, "filler", "lnm2")
    full_request = place(ctrl, placer(ctrl), start_request(ctrl, ["4.web"]))
    assert full_request.dropped[full("4.web")] == (
        "no LNM can start it (256 MiB and 1 vCPU): "
        "lnm1, lnm3: the other VMs of cluster web are on lnm2 (affinity together of cluster "
        "web (alice)); lnm2: memory: needs 256 MiB, 0 MiB uncommitted (VMs' configured "
        "memory commits 1024 of 1024 MiB)")
    ctrl.state.remove(full("filler"))
    ctrl.holds.hold("lnm2", "maintenance", reason="disks")
    held = place(ctrl, placer(ctrl), start_request(ctrl, ["5.web"]))
    assert "lnm2: in maintenance: disks" in held.dropped[full("5.web")]


@pytest_twisted.ensureDeferred
async def test_a_new_together_cluster_goes_where_all_of_it_fits():
    ctrl = controller(memory_mib=1024)
    await set_rule(ctrl, "web", "together")
    add_vm(ctrl, "big", "lnm1", memory_mib=768)      # lnm1 could take one, not three
    request = place(ctrl, placer(ctrl), start_request(ctrl, ["1.web", "2.web", "3.web"]))
    assert set(request.placement.values()) == {"lnm2"} and len(request.placement) == 3


@pytest_twisted.ensureDeferred
async def test_a_vm_started_again_is_checked_on_its_own_host():
    ctrl = controller()
    await set_rule(ctrl, "db", "apart")
    add_vm(ctrl, "1.db", "lnm1")
    add_vm(ctrl, "2.db", "lnm1", state=states.SHUTOFF)
    request = Request("start", "alice", vms=[full("2.db")],
                      records={full("2.db"): dict(ctrl.state.vms[full("2.db")])})
    place(ctrl, placer(ctrl), request)
    assert request.dropped[full("2.db")] == (
        "cannot start it again on its host lnm1: runs 1.db of cluster db, kept apart "
        "(affinity apart of cluster db (alice))")
    again = Request("start", "alice", vms=[full("2.db")],
                    records={full("2.db"): dict(ctrl.state.vms[full("2.db")])})
    place(ctrl, placer(ctrl, affinity="best_effort"), again)
    assert again.placement == {full("2.db"): "lnm1"} and "best_effort" in again.notes[0]


@pytest_twisted.ensureDeferred
async def test_every_placement_policy_honours_the_rule():
    ctrl = controller()
    await set_rule(ctrl, "db", "apart")
    add_vm(ctrl, "1.db", "lnm1")
    request = place(ctrl, placer(ctrl, spread), start_request(ctrl, ["2.db", "3.db", "4.db"]))
    assert sorted(request.placement.values()) == ["lnm2", "lnm3"]
    assert "kept apart" in request.dropped[full("4.db")]


# -- placement: migrations, evacuation, HA restarts -----------------------------------------

@pytest_twisted.ensureDeferred
async def test_migration_targets_honour_apart_also_off_a_held_host_as_evacuation_does():
    ctrl = controller(hosts=("lnm1", "lnm2", "lnm3", "lnm4"))
    await set_rule(ctrl, "db", "apart")
    for i, host in enumerate(("lnm1", "lnm2", "lnm3"), 1):
        add_vm(ctrl, f"{i}.db", host)
    ctrl.holds.hold("lnm1", "maintenance", reason="firmware", evacuate=True)
    # evacuation: the system migrates each VM with no suggestion
    request = place(ctrl, placer(ctrl), migrate_request(ctrl, ["1.db"]))
    assert request.placement == {full("1.db"): "lnm4"}
    ctrl.holds.hold("lnm4", "maintenance", reason="also")
    stuck = place(ctrl, placer(ctrl), migrate_request(ctrl, ["1.db"]))
    rule = "kept apart (affinity apart of cluster db (alice))"
    assert stuck.dropped[full("1.db")] == (
        "no LNM can migrate it (256 MiB and 1 vCPU): lnm1: the VM is already there; "
        f"lnm2: runs 2.db of cluster db, {rule}; lnm3: runs 3.db of cluster db, {rule}; "
        "lnm4: in maintenance: also")
    # an administrator's suggestion does not break the rule either
    asked = place(ctrl, placer(ctrl), migrate_request(ctrl, ["1.db"], lnms=["lnm2"]))
    assert "lnm2: runs 2.db of cluster db" in asked.dropped[full("1.db")]


@pytest_twisted.ensureDeferred
async def test_a_together_cluster_moves_whole_in_one_request_never_one_vm_alone():
    ctrl = controller()
    await set_rule(ctrl, "web", "together")
    for i in (1, 2, 3):
        add_vm(ctrl, f"{i}.web", "lnm1")
    alone = place(ctrl, placer(ctrl), migrate_request(ctrl, ["2.web"]))
    assert alone.dropped[full("2.web")].endswith(
        "lnm2, lnm3: the other VMs of cluster web are on lnm1 (affinity together of cluster "
        "web (alice)); they are on this VM's own host: migrate the whole cluster in one "
        "request")
    whole = place(ctrl, placer(ctrl), migrate_request(ctrl, ["1.web", "2.web", "3.web"]))
    assert len(set(whole.placement.values())) == 1 and len(whole.placement) == 3
    assert "lnm1" not in whole.placement.values()
    # the whole cluster, as evacuation of lnm1 would move it after a hold
    ctrl.holds.hold("lnm1", "maintenance")
    evacuated = place(ctrl, placer(ctrl), migrate_request(ctrl, ["1.web", "2.web", "3.web"],
                                                          lnms=["lnm3"]))
    assert set(evacuated.placement.values()) == {"lnm3"}


@pytest_twisted.ensureDeferred
async def test_a_together_vm_that_cannot_move_anchors_the_rest_of_the_request():
    ctrl = controller(memory_mib=1024)
    await set_rule(ctrl, "web", "together")
    add_vm(ctrl, "1.web", "lnm1", memory_mib=1024)       # fits on no other host
    add_vm(ctrl, "2.web", "lnm1", memory_mib=1)
    add_vm(ctrl, "x", "lnm2", memory_mib=512)
    add_vm(ctrl, "y", "lnm3", memory_mib=512)
    request = place(ctrl, placer(ctrl), migrate_request(ctrl, ["1.web", "2.web"]))
    assert full("1.web") in request.dropped
    assert full("2.web") in request.dropped     # alone it would split the cluster
    assert "the other VMs of cluster web are on lnm1" in request.dropped[full("2.web")]


@pytest_twisted.ensureDeferred
async def test_an_ha_restart_honours_apart_and_together():
    ctrl = controller(hosts=("lnm1", "lnm2", "lnm3", "lnm4"))
    await set_rule(ctrl, "db", "apart")
    await set_rule(ctrl, "web", "together")
    add_vm(ctrl, "1.db", "lnm1", state=states.LOST)
    add_vm(ctrl, "2.db", "lnm2")
    add_vm(ctrl, "3.db", "lnm3")
    for i in (1, 2):
        add_vm(ctrl, f"{i}.web", "lnm1", state=states.LOST)
    ctrl.state.lnms["lnm1"].connected = False      # lnm1 is gone (fenced)
    ctrl.state.lnms["lnm1"].handle = None
    names = [full("1.db"), full("1.web"), full("2.web")]
    request = Request("start", "usher", admin=True, vms=names,
                      records={n: dict(ctrl.state.vms[n]) for n in names})
    request.relocate = dict.fromkeys(names, "lnm1")
    place(ctrl, placer(ctrl), request)
    assert request.placement[full("1.db")] == "lnm4"
    assert request.placement[full("1.web")] == request.placement[full("2.web")]
    # with lnm4 full of another user's VMs, the db VM has nowhere to go
    ctrl.holds.hold("lnm4", "maintenance")
    again = Request("start", "usher", admin=True, vms=[full("1.db")],
                    records={full("1.db"): dict(ctrl.state.vms[full("1.db")])})
    again.relocate = {full("1.db"): "lnm1"}
    place(ctrl, placer(ctrl), again)
    assert again.dropped[full("1.db")].startswith("no LNM can restart it elsewhere")
    assert "lnm2: runs 2.db of cluster db, kept apart" in again.dropped[full("1.db")]


# -- the rebalancer ---------------------------------------------------------------------------

def test_move_refusal_apart_and_together():
    ctrl = controller()
    rules = ctrl.affinity
    rules._rules[("alice", "db")] = "apart"
    rules._rules[("alice", "web")] = "together"
    a = add_vm(ctrl, "1.db", "lnm1")
    add_vm(ctrl, "2.db", "lnm2")
    w = add_vm(ctrl, "1.web", "lnm1")
    add_vm(ctrl, "2.web", "lnm3")
    ledger = Ledger(ctrl.state, CapacityPolicy())
    assert "lnm2 runs another VM of cluster db" in move_refusal(rules, ledger, a, "lnm2")
    assert move_refusal(rules, ledger, a, "lnm3") is None
    assert move_refusal(rules, ledger, w, "lnm3") is None        # joins the other
    assert "not all on lnm2" in move_refusal(rules, ledger, w, "lnm2")
    assert move_refusal(None, ledger, a, "lnm2") is None


@pytest_twisted.ensureDeferred
async def test_the_rebalancer_drains_and_balances_without_breaking_a_rule():
    ctrl = controller(hosts=("lnm1", "lnm2", "lnm3"), memory_mib=2048)
    await set_rule(ctrl, "db", "apart")
    add_vm(ctrl, "1.db", "lnm1")
    add_vm(ctrl, "2.db", "lnm2")
    add_vm(ctrl, "big", "lnm3", memory_mib=1536)     # lnm3 is the fullest host
    plugin = rebalancer.Plugin({"drain": ["lnm1"], "balance": "never"}, ctrl.api)
    plugin.api = ctrl.api
    launched = []
    plugin._launch = launched.append
    plugin.run_pass(count_load=False)
    # lnm2 is emptier but runs 2.db: 1.db goes to lnm3
    assert [(m.vm, m.target) for m in launched] == [(full("1.db"), "lnm3")]
    launched.clear()
    ctrl.state.remove(full("big"))
    add_vm(ctrl, "3.db", "lnm3")
    plugin.run_pass(count_load=False)
    assert launched == []                            # nowhere to drain 1.db to

    # balance: 1.db and 2.db on lnm1; lnm2 runs 3.db: only lnm3 may take one
    ctrl2 = controller(hosts=("lnm1", "lnm2"), memory_mib=1024)
    await set_rule(ctrl2, "db", "apart")
    add_vm(ctrl2, "1.db", "lnm1")
    add_vm(ctrl2, "2.db", "lnm1")
    add_vm(ctrl2, "3.db", "lnm2")
    balancer = rebalancer.Plugin({"balance": "always", "tolerance": 0.1}, ctrl2.api)
    balancer._launch = launched.append
    balancer.run_pass(count_load=False)
    assert launched == []
    ctrl2.state.remove(full("3.db"))
    balancer.run_pass(count_load=False)
    assert [(m.vm, m.target) for m in launched] == [(full("1.db"), "lnm2")]


@pytest_twisted.ensureDeferred
async def test_one_owner_has_a_bounded_number_of_rules(tmp_path, monkeypatch):
    from usher.controller import affinity as affinity_module
    monkeypatch.setattr(affinity_module, "MAX_RULES_PER_OWNER", 3)
    rules = affinity_module.AffinityRules(None)
    for i in range(3):
        await rules.set("alice", f"c{i}", "apart")
    with pytest.raises(InvalidRequest, match="already has 3 affinity rules"):
        await rules.set("alice", "c3", "apart")
    await rules.set("alice", "c0", "together")       # changing one is fine
    await rules.set("bob", "c0", "apart")            # another owner's own budget
    await rules.set("alice", "c1", None)
    await rules.set("alice", "c3", "apart")
    assert rules.count("alice") == 3
