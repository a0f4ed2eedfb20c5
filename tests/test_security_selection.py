"""Attacks on selections and queries, through the real client interface (PB
over TLS against a real controller): oversized selections (issue 10, hole 1),
catastrophic regular expressions (hole 2) and other users' VMs (hole 7).

Each attack is refused or contained, another user is answered meanwhile,
and nothing changes."""

import os
import re

import pytest
import pytest_twisted
from twisted.internet import defer, task

from usher import states
from usher.client import Selection
from usher.controller.core import Controller
from usher.controller.state import LNMInfo
from usher.errors import InvalidRequest, NoSuchVM, PermissionDenied

from tests.e2e import RunningSandbox, parse_json, sleep, wait_for

DOMAIN = "usher.test"
MiB = 1024 * 1024
# The attack of the issue: 331 bytes, 2 million names.
ATTACK = ["[1-100000].x"] * 20
LNM_ATTACK = ["lnm[1-100000]"] * 20
# 60 letters: Python's re would take about 2**60 steps on this name.
LONG = "a" * 60
EVIL = "([a-z]+)+!"


def full(short, owner):
    return f"{short}.{owner}.{DOMAIN}"


@pytest_twisted.async_yield_fixture(scope="module")
async def system(tmp_path_factory):
    box = RunningSandbox(tmp_path_factory.mktemp("sandbox"), lnms=2)
    await box.start()           # alice, the sandbox's user, is an administrator
    box.add_user("bob", "bob-secret")
    box.add_user("carol", "carol-secret")
    box.bob = await box.connected_client("bob", "bob-secret")
    box.carol = await box.connected_client("carol", "carol-secret")
    box.admin = await box.connected_client()
    await box.bob.start([LONG, "b1"], args={"token": "bob-secret-token"})
    await box.carol.start(["c1"], args={"token": "carol-secret-token"})
    await wait_for(lambda: all(
        client.vms.get(name, {}).get("state") == states.RUN
        for client, name in ((box.bob, full(LONG, "bob")), (box.bob, full("b1", "bob")),
                             (box.carol, full("c1", "carol")))))
    yield box
    await box.stop()


async def figures_for_every_vm(system, timeout=30.0):
    """Wait until the administrator's top shows every VM (the sandbox's LNMs
    report simulated figures every few seconds)."""
    from twisted.internet import reactor
    deadline = reactor.seconds() + timeout
    while True:
        names = {vm["name"] for vm in (await system.admin.top(count=50))["vms"]}
        if {full("c1", "carol"), full("b1", "bob"), full(LONG, "bob")} <= names:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"no figures for every VM within {timeout} s: {names}")
        await sleep(0.5)


def controller_rss(system):
    _child, transport = system.box.children["usherctrl"]
    with open(f"/proc/{transport.pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def everything(system):
    """What the administrator sees: every VM's name, state, host and args."""
    return sorted((r["name"], r["state"], r["lnm"], repr(r.get("args")))
                  for r in await system.admin.list(remote=True))


async def refused_while_carol_is_answered(system, attack):
    """Run ``attack`` (a coroutine) as another user lists her VMs; -> the
    attack's error. Nothing may have changed, nor the controller grown."""
    before, rss = await everything(system), controller_rss(system)
    attacked = defer.ensureDeferred(attack)
    answered = system.carol.list(remote=True)
    with pytest.raises(InvalidRequest) as refused:
        await attacked
    assert [r["name"] for r in await answered] == [full("c1", "carol")]
    assert await everything(system) == before
    assert controller_rss(system) - rss < 32 * MiB      # the attack took +287 MiB
    return str(refused.value)


# -- hole 1: selections without a total cap ---------------------------------------

SELECTION_ATTACKS = {
    "list": ("list", {"names": ATTACK}, False),
    "list_names_as_a_list": ("list", ATTACK, False),
    "pause": ("op_on", "pause", {"names": ATTACK}, None),
    "destroy": ("op_on", "destroy", ATTACK, None),
    "delete": ("op_on", "delete", ATTACK, {"force": True}),
    "migrate": ("migrate", {"names": ATTACK}, [], None),
    "migrate_to_lnms": ("migrate", ["b1"], LNM_ATTACK, None),
    "start": ("start", ATTACK, [], None),
    "start_on_lnms": ("start", ["new"], LNM_ATTACK, None),
    "top": ("top", LNM_ATTACK, 10),
    "list_lnm": ("list_lnm", LNM_ATTACK, False),
    "subscribe": ("subscribe", ["c"] * 20_001),
}


@pytest.mark.parametrize("attack", sorted(SELECTION_ATTACKS))
@pytest_twisted.ensureDeferred
async def test_a_selection_past_the_name_limit_is_refused_whole(system, attack):
    method, *args = SELECTION_ATTACKS[attack]
    error = await refused_while_carol_is_answered(system, system.bob._remote(method, *args))
    assert "too many names in one request: at most 10000" in error


@pytest_twisted.ensureDeferred
async def test_too_many_ranges_or_regexes_are_refused(system):
    error = await refused_while_carol_is_answered(
        system, system.bob._remote("list", {"names": ["[1-2].x"] * 40}, False))
    assert "too many ranges and regular expressions in one request: at most 32" in error
    error = await refused_while_carol_is_answered(
        system, system.bob._remote("list_lnm", ["~lnm"] * 33, False))
    assert "at most 32" in error


@pytest_twisted.ensureDeferred
async def test_bob_still_gets_his_notifications_after_a_refused_subscription(system):
    bob = system.bob
    with pytest.raises(InvalidRequest):
        await bob._remote("subscribe", [["nested"]])
    await bob.pause(["b1"])
    await wait_for(lambda: bob.vms[full("b1", "bob")]["state"] == states.PAUSED)
    await bob.resume(["b1"])
    await wait_for(lambda: bob.vms[full("b1", "bob")]["state"] == states.RUN)


@pytest_twisted.ensureDeferred
async def test_ten_thousand_names_are_still_a_request(system):
    # At the limit: every name is looked up (none exists), none is refused
    # for the count.
    with pytest.raises(NoSuchVM, match=r"no such VM: 1.nosuch.bob.usher.test.*9995 more"):
        await system.bob._remote("list", {"names": ["[1-10000].nosuch"]}, False)
    with pytest.raises(NoSuchVM):
        await system.bob._remote("list", {"names": ["[1-9999].nosuch", "b2"]}, False)
    with pytest.raises(InvalidRequest, match="too many names"):
        await system.bob._remote("list", {"names": ["[1-10000].nosuch", "b2"]}, False)
    # and the client refuses it before sending
    with pytest.raises(InvalidRequest, match="too many names"):
        await system.bob.list(Selection(names=ATTACK), remote=True)


# -- hole 2: regular expressions ---------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_catastrophic_regex_answers_right_and_others_meanwhile(system):
    bob, carol = system.bob, system.carol
    asked = bob.list(Selection(regex=EVIL), remote=True)
    answered = carol.list(remote=True)
    assert await asked == []
    assert [r["name"] for r in await answered] == [full("c1", "carol")]
    matching = await bob.list(Selection(regex=r"^([a-z]+)+\.bob\."), remote=True)
    assert [r["name"] for r in matching] == [full(LONG, "bob")]
    # The client filters its cache with the same engine.
    assert await bob.list(Selection(regex=EVIL)) == []
    assert [r["name"] for r in await bob.list(Selection(regex=r"([a-z]+)+\.bob"))] == [
        full(LONG, "bob")]
    # LNM patterns and top too.
    assert await bob.list_lnm(["~([a-z0-9]+)+!"]) == []
    assert (await bob.top(["/([a-z0-9]+)+!/"]))["lnms"] == []
    # An administrator's ush, over every VM of the site.
    completed = await system.ush("list", "-a", "-r", EVIL)
    # Matches nothing, the answer right (issue 17: nothing matched is 4).
    assert completed.returncode == 4 and parse_json(completed) == []


@pytest.mark.parametrize("regex, reason", [
    (r"(a)\1", "backreferences are not supported"),
    ("(?=a)", "lookahead and lookbehind are not supported"),
    ("(?<!a)b", "lookahead and lookbehind are not supported"),
    ("x" * 257, "too long"),
    ("[a-z]{1001}", "invalid repetition size"),
    (r"\pL{1000}", "too large"),
    ("(", "missing \\)"),
    (12, "must be a string"),
])
@pytest_twisted.ensureDeferred
async def test_malformed_or_unsupported_regexes_are_refused(system, regex, reason):
    error = await refused_while_carol_is_answered(
        system, system.bob._remote("list", {"regex": regex}, False))
    assert re.search(reason, error), error
    if isinstance(regex, str):
        with pytest.raises(InvalidRequest, match=reason):
            await system.bob.list_lnm([f"~{regex}"])


# -- hole 7: other users' VMs -------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_an_ordinary_user_sees_only_their_own_vms(system):
    bob, carol = system.bob, system.carol
    mine = {full(LONG, "bob"), full("b1", "bob")}
    carols = full("c1", "carol")
    for selection in (None, Selection(everything=True), Selection(clusters=["c1", "default"]),
                      Selection(regex="carol"), Selection(regex="")):
        listed = await bob.list(selection, remote=True)
        assert {r["name"] for r in listed} <= mine, selection
        assert all(r["args"] == {"token": "bob-secret-token"} for r in listed)
    assert {r["name"] for r in await bob.list(remote=True, status=True)} == mine
    with pytest.raises(PermissionDenied, match="c1.carol.usher.test does not belong to bob"):
        await bob._remote("list", {"names": [carols]}, False)
    with pytest.raises(PermissionDenied):
        await bob.list([carols], remote=True)
    # top: once the LNMs have reported figures for every VM, the
    # administrator's shows carol's; bob's only his own.
    await figures_for_every_vm(system)
    top = await bob.top(count=50)
    assert {vm["name"] for vm in top["vms"]} == mine and len(top["lnms"]) == 2
    assert all(vm["args"] == {"token": "bob-secret-token"} for vm in top["vms"])
    # No push about carol's VMs ever reaches bob: carol changes hers, then
    # bob his own; his cache gets his and only his.
    await carol.pause(["c1"])
    await bob.pause(["b1"])
    await wait_for(lambda: bob.vms[full("b1", "bob")]["state"] == states.PAUSED)
    assert set(bob.vms) == mine
    await carol.resume(["c1"])
    await bob.resume(["b1"])
    await wait_for(lambda: bob.vms[full("b1", "bob")]["state"] == states.RUN)
    assert set(bob.vms) == mine


@pytest_twisted.ensureDeferred
async def test_administrators_see_everything_with_args(system):
    listed = {r["name"]: r for r in await system.admin.list(remote=True)}
    assert listed[full("c1", "carol")]["args"] == {"token": "carol-secret-token"}
    assert listed[full("b1", "bob")]["args"] == {"token": "bob-secret-token"}
    await figures_for_every_vm(system)
    top = {vm["name"]: vm for vm in (await system.admin.top(count=50))["vms"]}
    assert top[full("c1", "carol")]["args"] == {"token": "carol-secret-token"}
    by_name = await system.admin.list([full("c1", "carol")], remote=True)
    assert [r["args"] for r in by_name] == [{"token": "carol-secret-token"}]


async def grid_with_stranger(client_grids, **options):  # noqa: F811
    grid = await client_grids(controller_options=options)
    await grid.grid.vmms["lnm1"].create({"name": "stranger", "uuid": None, "memory_mib": 128,
                                         "vcpus": 1, "owner": "", "cluster": "", "args": {}})
    await grid.grid.report()
    assert "stranger" in grid.controller.state.unmanaged
    return grid


@pytest_twisted.ensureDeferred
async def test_unmanaged_vms_are_for_administrators_by_default(client_grids):  # noqa: F811
    grid = await grid_with_stranger(client_grids)
    alice, root = await grid.connected("alice"), await grid.connected("root")
    await alice.start(["a1"], args={"token": "t"})
    assert {r["name"] for r in await alice.list(remote=True)} == {full("a1", "alice")}
    assert await alice.list(Selection(regex="stranger"), remote=True) == []
    assert "stranger" in {r["name"] for r in await root.list(remote=True)}


@pytest_twisted.ensureDeferred
async def test_a_site_may_show_every_vm_but_never_another_users_args(client_grids):  # noqa: F811
    grid = await grid_with_stranger(client_grids, user_visibility="all")
    alice, bob = await grid.connected("alice"), await grid.connected("bob")
    await alice.start(["a1"], args={"token": "alices"})
    await bob.start(["b1"], args={"token": "bobs"})
    for selection in (None, Selection(regex="."), Selection(clusters=["default"])):
        listed = {r["name"]: r for r in await bob.list(selection, remote=True)}
        assert set(listed) == {full("a1", "alice"), full("b1", "bob"), "stranger"}
        assert "args" not in listed[full("a1", "alice")]
        assert listed[full("b1", "bob")]["args"] == {"token": "bobs"}
    named = await bob.list([full("a1", "alice")], remote=True)
    assert [r["name"] for r in named] == [full("a1", "alice")] and "args" not in named[0]
    # Seeing is not acting.
    with pytest.raises(PermissionDenied):
        await bob._remote("op_on", "pause", [full("a1", "alice")], None)
    assert grid.controller.state.vms[full("a1", "alice")]["state"] == states.RUN
    # The cache (and so every push) is still bob's own.
    assert set(bob.vms) == {full("b1", "bob")}


# -- fast checks of the controller beside them --------------------------------------

class CountingClock(task.Clock):
    """Counts the turns given back to the reactor (calls for "now")."""

    turns = 0

    def callLater(self, delay, *args, **kwargs):
        self.turns += delay == 0
        return super().callLater(delay, *args, **kwargs)


def test_a_long_regex_scan_lets_other_requests_through():
    clock = CountingClock()
    controller = Controller(domain=DOMAIN, clock=clock, admins=["root"])
    controller.state.lnms["lnm1"] = LNMInfo("lnm1", {}, handle=object())
    for i in range(5000):
        controller.state.add(controller.state.new_record(full(f"{i}.web", "alice"),
                                                         state="run", lnm="lnm1"))
    controller.state.add(controller.state.new_record(full("b1", "bob"), state="run",
                                                     lnm="lnm1"))
    scan = defer.ensureDeferred(controller.list("root", True, {"regex": r"^4999\."}))
    assert not scan.called
    # Meanwhile another user is answered.
    other = defer.ensureDeferred(controller.list("bob", False, None))
    assert [r["name"] for r in other.result] == [full("b1", "bob")]
    clock.advance(0)
    assert [r["name"] for r in scan.result] == [full("4999.web", "alice")]
    # One pause per 16 KiB of names scanned.
    assert clock.turns == sum(len(n) for n in controller.state.vms) // 16_384


def test_limits_are_the_controllers_settings():
    controller = Controller(domain=DOMAIN, clock=task.Clock(), max_selection_names=5,
                            max_selection_patterns=1)
    with pytest.raises(InvalidRequest, match="at most 5"):
        controller.selection({"names": ["[1-3].a", "b", "c", "d"]})
    with pytest.raises(InvalidRequest, match="at most 5"):
        controller.selection({"names": ["a"], "clusters": ["1", "2", "3", "4", "5"]})
    with pytest.raises(InvalidRequest, match="at most 1"):
        controller.selection({"names": ["[1-2].a"], "regex": "x"})
    # One budget for a whole request: the VMs and the LNMs of a migration.
    for lnm in ("l1", "l2", "l3"):
        controller.state.lnms[lnm] = LNMInfo(lnm, {}, handle=object())
    assert controller.visibility.check_lnm_list(["l1", "l2", "l3"]) == ["l1", "l2", "l3"]
    budget = controller.budget()
    controller.selection({"names": ["[1-3].a"]}, budget)
    with pytest.raises(InvalidRequest, match="at most 5"):
        controller.visibility.check_lnm_list(["l1", "l2", "l3"], budget)
    with pytest.raises(ValueError):
        Controller(domain=DOMAIN, clock=task.Clock(), user_visibility="some")


def test_the_sample_config_states_the_limits():
    sample = os.path.join(os.path.dirname(__file__), "..", "etc", "ctrl.config.orig")
    text = open(sample, encoding="utf-8").read()
    for line in ("max_selection_names = 10000", "max_selection_patterns = 32",
                 "user_visibility = own"):
        assert f"\n{line}\n" in text
