"""The HA plugin's policy (plugins/ha): grace, the fence agent with retries
and backoff, priorities and the rate bound, on a task.Clock with an API
double; the fence agent hook with real commands; then the plugin on a real
controller (tests/grid.py) fencing with a real script."""

import stat

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from usher import states
from usher.config import load_plugin_config
from usher.controller.holds import HostHolds
from usher.controller.plugin_api import thread_pool_runner
from usher.controller.plugins import _with_common_options
from usher.controller.state import GlobalState, LNMInfo
from usher.records import decode_chunks
from usher.errors import ConfigError, InvalidRequest, PermissionDenied
from usher.plugins import ha
from usher.plugins.ha.agent import FenceOutcome, check_command, command_for, run_fence_command
from usher.plugins.ha.policy import RestartQueue, priority_of

from tests.e2e import wait_for
from tests.grid import DOMAIN, Grid
from tests.test_fencing import hosts_of


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


class FakeFencing:
    def __init__(self, holds):
        self.holds = holds
        self.stale_copies = "delete"

    def fenced(self, lnm):
        return self.holds.has(lnm, "fenced")

    def evidence_valid(self, lnm):
        details = self.holds.get(lnm, "fenced")
        return details is not None and not details.get("back_since")

    def clean_up(self, lnm):
        """As the core's: the hold goes once its host has no stale copy left
        (``removed``: the copies gone by now, as the test says)."""
        self.cleaned = getattr(self, "cleaned", 0) + 1
        details = self.holds.get(lnm, "fenced") or {}
        left = [n for n in details.get("stale", []) if n not in self.removed]
        if left:
            self.holds.update(lnm, "fenced", stale=left)
        else:
            self.holds.release(lnm, "fenced")

    removed = ()


class FakeAPI:
    """What the plugin uses of the controller; restarts and fence agents
    answer as the test says."""

    def __init__(self):
        self.clock = task.Clock()
        self.state = GlobalState(DOMAIN)
        self.holds = HostHolds()
        self.fencing = FakeFencing(self.holds)
        self.queries = {}
        self.restarts = []           # batches asked
        self.fence_runs = []         # argvs run
        self.fence_answers = []      # FenceOutcomes to give, in turn
        self.restart_answer = None   # a Deferred to give, or None: all start

    def register_query(self, name, handler, owner=None):
        self.queries[name] = handler

    def run_blocking(self, function, argv, timeout):
        self.fence_runs.append(argv)
        return defer.succeed(self.fence_answers.pop(0))

    def confirm_fenced(self, lnm, evidence, by="usher"):
        if self.state.lnms[lnm].connected:
            raise InvalidRequest("connected")
        return self.holds.hold(lnm, "fenced", evidence=evidence, by=by, restarted=[])

    def restart_elsewhere(self, names, by="usher"):
        self.restarts.append(list(names))
        if self.restart_answer is not None:
            return self.restart_answer
        for name in names:
            self.state.update(name, state=states.RUN, lnm="lnm2")
        return defer.succeed({"started": [{"name": n, "lnm": "lnm2"} for n in names],
                              "failed": [], "notes": []})

    # -- the test's world --

    def lnm(self, name, hostname=None, connected=True):
        self.state.lnms[name] = LNMInfo(name, {"hostname": hostname or name},
                                        handle=object() if connected else None)
        self.state.lnms[name].connected = connected

    def vm(self, short, lnm, **args):
        rec = self.state.new_record(full(short), state=states.RUN, lnm=lnm, args=args)
        self.state.add(rec)
        return rec["name"]

    def lose(self, lnm):
        info = self.state.lnms[lnm]
        info.connected, info.handle = False, None
        for name in sorted(info.vms):
            self.state.update(name, state=states.LOST)


class Event:
    def __init__(self, name, **data):
        self.name = name
        self.__dict__.update(data)


def status(api, user="root", admin=True):
    """The ha.status answer (the handler does not wait)."""
    answers = []
    defer.ensureDeferred(api.queries["ha.status"](user, admin, {})).addBoth(answers.append)
    [answer] = answers
    if isinstance(answer, Exception) or hasattr(answer, "raiseException"):
        answer.raiseException()
    return answer


def plugin(api, **options):
    config = load_plugin_config(_with_common_options(ha.CONFIG_SPEC), None)
    config.update(options)
    return ha.Plugin(config, api)


@pytest.fixture
def world():
    api = FakeAPI()
    for name in ("lnm1", "lnm2", "lnm3"):
        api.lnm(name)
    return api


def tick(api, p, seconds=5.0):
    api.clock.advance(seconds)
    p.entry_point(Event("timer"))


def partition(api, p, lnm="lnm1"):
    api.lose(lnm)
    p.entry_point(Event("lnm_disconnected", lnm=lnm, lost=[]))


def test_without_evidence_nothing_is_restarted_however_long_the_host_is_away(world):
    api = world
    vms = [api.vm(f"a{i}", "lnm1") for i in range(3)]
    p = plugin(api, grace=30.0)
    partition(api, p)
    for _ in range(100):              # 500 s, far past the grace
        tick(api, p)
    assert api.restarts == [] and api.fence_runs == []
    assert all(api.state.vms[n]["state"] == states.LOST for n in vms)
    # The administrator's word is evidence: now they are restarted.
    api.confirm_fenced("lnm1", "admin: pulled the plug", by="root")
    p.entry_point(Event("lnm_hold_changed", lnm="lnm1", kind="fenced", held=True,
                        details={}))
    assert sorted(sum(api.restarts, [])) == sorted(vms)


def test_the_fence_agent_runs_after_the_grace_and_its_success_restarts(world):
    api = world
    vms = [api.vm("b1", "lnm1"), api.vm("b2", "lnm1")]
    p = plugin(api, grace=30.0, fence_command=["/usr/sbin/fence", "--host", "{hostname}",
                                               "--lnm", "{lnm}"])
    partition(api, p)
    for _ in range(5):                # 25 s: within the grace
        tick(api, p)
    assert api.fence_runs == []
    api.fence_answers.append(FenceOutcome(True, evidence="fence: chassis off"))
    tick(api, p)                      # 30 s
    assert api.fence_runs == [["/usr/sbin/fence", "--host", "lnm1", "--lnm", "lnm1"]]
    hold = api.holds.get("lnm1", "fenced")
    assert hold["evidence"] == "fence: chassis off" and hold["by"] == "ha"
    assert sorted(sum(api.restarts, [])) == sorted(vms)


def test_a_failing_fence_agent_is_retried_with_backoff_and_never_restarts(world):
    api = world
    api.vm("c1", "lnm1")
    p = plugin(api, grace=0.0, fence_command=["fence", "{lnm}"], retry_initial=10.0,
               retry_max=40.0, interval=1.0)
    api.fence_answers.extend(FenceOutcome(False, error="exit status 1") for _ in range(20))
    partition(api, p)                 # grace 0: the agent runs at once
    assert len(api.fence_runs) == 1
    runs_at = []
    for second in range(1, 200):
        before = len(api.fence_runs)
        tick(api, p, 1.0)
        if len(api.fence_runs) > before:
            runs_at.append(second)
    # Then +10, +20, +40, +40 ...: doubling up to retry_max.
    assert runs_at[:5] == [10, 30, 70, 110, 150]
    assert api.restarts == [] and not api.holds.has("lnm1", "fenced")
    [host, _queue] = status(api)
    assert host["fence_attempts"] == len(runs_at) + 1 and host["last_error"] == "exit status 1"
    assert not host["fenced"]


def test_max_fence_attempts_gives_up_and_waits_for_the_administrator(world):
    api = world
    api.vm("c2", "lnm1")
    p = plugin(api, grace=0.0, fence_command=["fence"], max_fence_attempts=2,
               retry_initial=1.0)
    api.fence_answers.extend(FenceOutcome(False, error="timeout") for _ in range(5))
    partition(api, p)
    for _ in range(50):
        tick(api, p)
    assert len(api.fence_runs) == 2 and api.restarts == []


def test_priorities_the_rate_bound_and_never_restarted_vms(world):
    api = world
    low = api.vm("low", "lnm1", ha_priority="100")
    mid = [api.vm(f"mid{i}", "lnm1") for i in range(3)]           # default 500
    high = api.vm("high", "lnm1", ha_priority="900")
    never = api.vm("never", "lnm1", ha_priority="0")
    p = plugin(api, max_restarts_per_minute=2)
    partition(api, p)
    api.confirm_fenced("lnm1", "admin", by="root")
    p.entry_point(Event("lnm_hold_changed", lnm="lnm1", kind="fenced", held=True,
                        details={}))
    assert api.restarts == [[high, mid[0]]]
    for _ in range(11):               # 55 s: the minute is not over
        tick(api, p)
    assert api.restarts == [[high, mid[0]]]
    tick(api, p)                      # 60 s
    assert api.restarts[1] == [mid[1], mid[2]]
    for _ in range(12):
        tick(api, p)
    assert api.restarts[2] == [low]
    assert never not in sum(api.restarts, [])
    assert api.state.vms[never]["state"] == states.LOST
    [_host, queue] = status(api)
    assert queue["never"] == [never] and queue["waiting"] == []


def test_a_vm_that_could_not_be_placed_waits_then_is_tried_again(world):
    api = world
    vm = api.vm("d1", "lnm1")
    p = plugin(api, retry_restart_after=60.0)
    partition(api, p)
    api.confirm_fenced("lnm1", "admin", by="root")
    api.restart_answer = defer.succeed({"started": [], "notes": [], "failed": [
        {"name": vm, "error": "no LNM can restart it elsewhere"}]})
    tick(api, p)
    assert api.restarts == [[vm]]
    [_host, queue] = status(api)
    assert queue["waiting"][0]["error"] == "no LNM can restart it elsewhere"
    api.restart_answer = None
    for _ in range(11):
        tick(api, p)
    assert len(api.restarts) == 1
    tick(api, p)
    assert api.restarts[-1] == [vm] and api.state.vms[vm]["state"] == states.RUN


def test_a_host_back_before_its_fence_agent_answers_is_not_fenced(world):
    api = world
    api.vm("e1", "lnm1")
    answer = defer.Deferred()
    api.run_blocking = lambda function, argv, timeout: answer
    p = plugin(api, grace=0.0, fence_command=["fence"])
    partition(api, p)
    tick(api, p)
    api.state.lnms["lnm1"].connected = True
    p.entry_point(Event("lnm_connected", lnm="lnm1", info={}))
    answer.callback(FenceOutcome(True, evidence="off"))
    assert not api.holds.has("lnm1", "fenced") and api.restarts == []


def test_a_fenced_host_back_is_checked_again_for_its_stale_copies(world):
    api = world
    p = plugin(api)
    api.holds.hold("lnm1", "fenced", restarted=["x"], stale=["x"], back_since=1)
    tick(api, p)
    assert api.fencing.cleaned == 1 and api.holds.has("lnm1", "fenced")
    api.fencing.removed = ("x",)          # the administrator removed it by hand
    tick(api, p)
    assert api.fencing.cleaned == 2 and not api.holds.has("lnm1", "fenced")


def test_a_host_lost_again_after_its_fencing_is_fenced_anew_before_any_restart(world):
    api = world
    api.vm("b1", "lnm1")
    api.fence_answers = [FenceOutcome(True, evidence="ipmi: off")]
    p = plugin(api, grace=30.0, fence_command=["fence"])
    api.holds.hold("lnm1", "fenced", restarted=["x"], stale=["x"], back_since=1)
    api.fencing.clean_up = lambda lnm: None      # the stale copy stays
    partition(api, p)
    tick(api, p)
    assert api.restarts == [] and api.fence_runs == []
    api.clock.advance(30)
    tick(api, p)
    assert api.fence_runs == [["fence"]]
    assert api.holds.get("lnm1", "fenced")["evidence"] == "ipmi: off"


def test_ha_status_is_for_administrators_and_the_plugin_sets_the_stale_policy(world):
    api = world
    p = plugin(api, stale_copies="hold")
    assert api.fencing.stale_copies == "hold"
    with pytest.raises(PermissionDenied):
        status(api, "alice", False)
    p.stop()
    assert api.fencing.stale_copies == "delete"
    # The policy's name before issue 17 still means removing the copies.
    p = plugin(api, stale_copies="destroy")
    assert api.fencing.stale_copies == "delete"
    p.stop()


# -- the pieces -----------------------------------------------------------------

def test_priority_of_reads_ha_priority_with_bounds():
    assert priority_of({"args": {"ha_priority": "900"}}, 500) == 900
    assert priority_of({"args": {"ha_priority": 0}}, 500) == 0
    assert priority_of({"args": {"ha_priority": "1001"}}, 500) == 500
    assert priority_of({"args": {"ha_priority": "high"}}, 500) == 500
    assert priority_of({"args": {}}, 7) == 7
    # A user's own value is capped; a site plugin's is not.
    assert priority_of({"args": {"ha_priority": "900"}}, 500, 600) == 600
    assert priority_of({"args": {"ha_priority": "900"}, "plugin_args": ["ha_priority"]},
                       500, 600) == 900


def test_the_restart_queue_counts_a_sliding_minute():
    queue = RestartQueue(per_minute=3, retry_after=10)
    for i in range(5):
        queue.add(f"v{i}", "lnm1", 500, now=0)
    assert queue.take(0) == ["v0", "v1", "v2"]
    queue.discard("v0")
    assert queue.take(59.9) == []
    assert queue.take(60) == ["v1", "v2", "v3"]


def test_fence_commands_are_checked_when_the_configuration_is_read():
    assert check_command(["fence", "{lnm}", "{hostname}"], "fence_command") == [
        "fence", "{lnm}", "{hostname}"]
    with pytest.raises(ConfigError, match="fence_command: unknown placeholder {host}"):
        check_command(["fence", "{host}"], "fence_command")
    with pytest.raises(ConfigError, match="hosts/vmm1/fence_command"):
        check_command(["fence", "{lnm"], "hosts/vmm1/fence_command")
    with pytest.raises(ConfigError, match="hosts/vmm1/fence_command"):
        plugin(FakeAPI(), hosts={"vmm1": {"fence_command": ["x", "{nope}"],
                                          "hostname": None}})


def test_a_hostname_from_an_lnm_must_be_a_plain_name():
    assert command_for(["f", "{hostname}"], "lnm1", "vmm1.example.org") == [
        "f", "vmm1.example.org"]
    for bad in ("-rf", "a b", "", None, "x;reboot"):
        with pytest.raises(ValueError, match="no usable hostname"):
            command_for(["f", "{hostname}"], "lnm1", bad)
    assert command_for(["f", "{lnm}"], "lnm1", None) == ["f", "lnm1"]


def script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_the_fence_agent_hook_with_real_commands(tmp_path):
    ok = script(tmp_path, "ok", 'echo "chassis power is off ($1)"\necho more\n')
    assert run_fence_command([ok, "vmm1"], 10) == FenceOutcome(
        True, evidence="ok: chassis power is off (vmm1)")
    bad = script(tmp_path, "bad", 'echo "BMC unreachable" >&2\nexit 3\n')
    assert run_fence_command([bad], 10) == FenceOutcome(
        False, error="bad exit status 3: BMC unreachable")
    slow = script(tmp_path, "slow", "sleep 30 & sleep 30\n")
    outcome = run_fence_command([slow], 0.3)
    assert not outcome.fenced and "did not answer within 0.3 s" in outcome.error
    missing = run_fence_command([str(tmp_path / "nosuch")], 10)
    assert not missing.fenced and "could not run" in missing.error


# -- on a real controller ----------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_the_plugin_fences_with_its_agent_and_the_controller_restarts(tmp_path):
    calls = tmp_path / "fence-calls"
    agent = script(tmp_path, "fence-agent",
                   f'echo "$1" >> {calls}\necho "powered off $1"\n')
    config = tmp_path / "ha.config"
    config.write_text(f"interval = 0.05\ngrace = 0.3\nfence_command = {agent}, {{lnm}}\n"
                      "max_restarts_per_minute = 100\n")
    registrations = {
        "roundrobin": {"plugin": "roundrobin", "events": ["start_request"],
                       "config": None, "order": None},
        "ha": {"plugin": "ha", "events": ["lnm_disconnected", "lnm_connected",
                                          "lnm_hold_changed", "timer"],
               "config": str(config), "order": None}}
    grid = Grid(reactor, tmp_path / "grid", registrations=registrations)
    await grid.start()
    grid.controller.api.run_in_thread = thread_pool_runner(reactor, grid.pool)
    try:
        c = grid.controller
        result = await c.start("alice", False, [], ["lnm1"], {"cluster": "web", "count": 4})
        vms = sorted(s["name"] for s in result["started"])
        assert len(vms) == 4
        grid.cut("lnm1")
        await wait_for(lambda: c.holds.has("lnm1", "fenced"), timeout=10)
        assert calls.read_text() == "lnm1\n"
        assert c.holds.get("lnm1", "fenced")["evidence"] == "fence-agent: powered off lnm1"
        await wait_for(lambda: all(c.state.vms[n]["state"] == states.RUN for n in vms),
                       timeout=10)
        assert {c.state.vms[n]["lnm"] for n in vms} <= {"lnm2", "lnm3"}
        await grid.attach("lnm1")
        await wait_for(lambda: not c.holds.has("lnm1", "fenced"), timeout=10)
        for vm in vms:
            assert await hosts_of(grid, vm) == [c.state.vms[vm]["lnm"]]
        answer = decode_chunks(await c.plugins.queries.answer("ha.status", "root", True, {}))
        [queue] = [i for i in answer if i["kind"] == "queue"]
        assert queue["waiting"] == []
    finally:
        await grid.stop()
