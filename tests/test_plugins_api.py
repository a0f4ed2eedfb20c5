"""The plugin API: third-party plugins registered from the configuration file
and at run time through the client API, chains in ``order``, requests
modified and rejected, plugins that raise or hang, timers, per-plugin
timeouts, and the README's example plugin."""

import re
import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from zope.interface import directlyProvides

from usher import settings
from usher.config import load_config
from usher.controller.events import Event, EventChains, Request
from usher.controller.plugins import PluginRegistry
from usher.errors import ConfigError, InvalidRequest, PermissionDenied, Rejected
from usher.interfaces import IPlugin
from usher.config import load_plugin_config

from tests.clientgrid import plugin_instance
from tests.e2e import wait_for
from tests.grid import DOMAIN

README = Path(__file__).resolve().parent.parent / "README.md"


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return str(path)


AUDITOR = '''
    """Auditor: notes every request it sees (a test's third-party plugin)."""

    CONFIG_SPEC = """
    order = integer(default=99)
    tag = string(default='auditor')
    """


    class Plugin:
        def __init__(self, config, api):
            self.tag = config["tag"]
            self.order = config["order"]
            self.seen = []

        def entry_point(self, event):
            self.seen.append(event.name)
            if event.request is not None:
                event.request.note(f"{self.tag} saw {event.request.kind} "
                                   f"of {len(event.request.vms)} VMs")
'''

STAMP = '''
    """Stamp: trims, tags and vetoes requests (a test's third-party plugin)."""

    CONFIG_SPEC = "limit = integer(default=2)"


    class Plugin:
        def __init__(self, config, api):
            self.limit = config["limit"]

        async def entry_point(self, event):
            request = event.request
            if request.args.get("cluster") == "forbidden":
                request.reject("cluster 'forbidden' is off limits")
                return
            for vm in request.vms[self.limit:]:
                request.drop(vm, f"stamp allows {self.limit} VMs per request")
            request.args["stamped_by"] = "stamp"
            request.note("stamp saw os=" + str(request.args.get("os")))
'''

STEER = '''
    """Steer: places VMs where the steer_to argument says, after placement."""


    class Plugin:
        def __init__(self, config, api):
            pass

        def entry_point(self, event):
            target = event.request.args.get("steer_to")
            if target:
                for vm in event.request.vms:
                    event.request.place(vm, target)
'''


def ctrl_config(tmp_path, plugin_dir, registrations):
    path = write(tmp_path / "ctrl.config", f"""
        [ctrl]
        plugin_dir = {plugin_dir}
        [[plugins]]
        {registrations}
        """)
    return load_config(settings.CTRL, extra_files=[path], isolated=True)["ctrl"]


@pytest_twisted.ensureDeferred
async def test_third_party_plugin_from_config_and_at_run_time(tmp_path, client_grids):
    plugin_dir = tmp_path / "thirdparty"
    write(plugin_dir / "auditor.py", AUDITOR)
    write(plugin_dir / "stamp.py", STAMP)
    write(plugin_dir / "steer.py", STEER)
    auditor_config = write(tmp_path / "auditor.config", "order = 5\ntag = audit\n")
    ctrl = ctrl_config(tmp_path, plugin_dir, f"""
        [[[open_authz]]]
        events = start_request, list_request
        [[[auditor]]]
        events = start_request, start_complete
        config = {auditor_config}
        [[[roundrobin]]]
        events = start_request, migrate_request
        """)
    grid = await client_grids(plugin_dir=ctrl["plugin_dir"], registrations=ctrl["plugins"])
    root = await grid.connected("root")
    alice = await grid.connected("alice")

    description = await root.plugins()
    assert {"auditor", "stamp", "steer", "roundrobin", "limits", "pack", "spread",
            "leastloaded", "rebalancer", "open_authz"} <= set(description["available"])
    assert description["about"]["stamp"].startswith("Stamp: trims")
    start_chain = [(r["plugin"], r["order"]) for r in description["registered"]
                   if r["event"] == "start_request"]
    assert start_chain == [("auditor", 5), ("open_authz", 10), ("roundrobin", 50)]

    # Registered at run time by an administrator, between authorization and
    # placement (stamp) and after placement (steer).
    await root.register_plugin("stamp", "start_request", None, 30)
    description = await root.register_plugin("steer", "start_request", None, 60)
    assert [r["plugin"] for r in description["registered"] if r["event"] == "start_request"] \
        == ["auditor", "open_authz", "stamp", "roundrobin", "steer"]

    result = await alice.start(cluster="web", count=4, args={"os": "debian",
                                                             "steer_to": "lnm3"})
    # the chain ran in order: auditor saw all 4 VMs, stamp then trimmed to 2
    assert result["notes"] == ["audit saw start of 4 VMs", "stamp saw os=debian"]
    assert sorted(s["name"] for s in result["started"]) == [full("1.web"), full("2.web")]
    assert {s["lnm"] for s in result["started"]} == {"lnm3"}    # steer moved them
    assert sorted(f["name"] for f in result["failed"]) == [full("3.web"), full("4.web")]
    assert {f["error"] for f in result["failed"]} == {"stamp allows 2 VMs per request"}
    record = grid.controller.state.vms[full("1.web")]
    assert record["args"]["stamped_by"] == "stamp" and record["args"]["os"] == "debian"

    with pytest.raises(Rejected, match=r"cluster 'forbidden' is off limits \(rejected by "
                                       r"stamp\)"):
        await alice.start(cluster="forbidden", count=1)
    assert not [n for n in grid.controller.state.vms if "forbidden" in n]

    auditor = plugin_instance(grid, "auditor")
    assert auditor.seen == ["start_request", "start_complete", "start_complete",
                            "start_request"]

    # unregistered at run time: requests are no longer trimmed
    await root.unregister_plugin("stamp")
    await root.unregister_plugin("steer", "start_request")
    result = await alice.start(cluster="db", count=3)
    assert len(result["started"]) == 3 and result["failed"] == []
    assert result["notes"] == ["audit saw start of 3 VMs"]
    assert [r["plugin"] for r in (await root.plugins())["registered"]
            if r["event"] == "start_request"] == ["auditor", "open_authz", "roundrobin"]
    with pytest.raises(InvalidRequest, match="not registered"):
        await root.unregister_plugin("stamp")


@pytest_twisted.ensureDeferred
async def test_plugin_administration_is_for_administrators_and_checks_input(tmp_path,
                                                                             client_grids):
    plugin_dir = tmp_path / "thirdparty"
    write(plugin_dir / "broken.py", "def oops(:\n")
    write(plugin_dir / "noentry.py", "class Plugin:\n    def __init__(self, c, a): pass\n")
    write(plugin_dir / "noinit.py", "class Plugin:\n    def entry_point(self, e): pass\n")
    grid = await client_grids(plugin_dir=str(plugin_dir))
    bob = await grid.connected("bob")
    root = await grid.connected("root")
    for call in (bob.plugins(), bob.register_plugin("pack", "start_request"),
                 bob.unregister_plugin("roundrobin")):
        with pytest.raises(PermissionDenied, match="only administrators"):
            await call
    assert "roundrobin" in [r.plugin.name for r in grid.controller.chains.registrations()]

    with pytest.raises(InvalidRequest, match=r"no such plugin: 'nosuch' \(available: .*pack"):
        await root.register_plugin("nosuch", "start_request")
    with pytest.raises(InvalidRequest, match="broken.*failed to load"):
        await root.register_plugin("broken", "start_request")
    with pytest.raises(InvalidRequest, match="does not provide entry_point"):
        await root.register_plugin("noentry", "start_request")
    with pytest.raises(InvalidRequest, match="noinit.*failed to start: TypeError"):
        await root.register_plugin("noinit", "start_request")
    with pytest.raises(InvalidRequest, match="unknown event 'start_requests'"):
        await root.register_plugin("pack", "start_requests")
    with pytest.raises(InvalidRequest, match="absolute path"):
        await root.register_plugin("pack", "start_request", "pack.config")
    bad = write(tmp_path / "pack.config", "suggestion = sometimes\n")
    with pytest.raises(Exception, match=r"pack.config:1.*suggestion"):
        await root.register_plugin("pack", "start_request", bad)
    with pytest.raises(InvalidRequest, match="already registered"):
        await root.register_plugin("roundrobin", "start_request")
    with pytest.raises(InvalidRequest, match="needs an interval"):
        await root.register_plugin("pack", "timer")
    # nothing changed by any of the refused calls
    assert sorted((r.plugin.name, r.event) for r in grid.controller.chains.registrations()
                  if r.event == "start_request") == [("limits", "start_request"),
                                                     ("open_authz", "start_request"),
                                                     ("roundrobin", "start_request")]


class Recorder:
    def __init__(self, name, order=None, behaviour=None, timeout=None):
        self.name = name
        self.order = order
        self.timeout = timeout
        self.behaviour = behaviour
        self.calls = []
        directlyProvides(self, IPlugin)

    def entry_point(self, event):
        self.calls.append(event.name)
        if self.behaviour is not None:
            return self.behaviour(event)


def hang(event):
    return defer.Deferred()


def explode(event):
    raise RuntimeError("plugin bug")


@pytest_twisted.ensureDeferred
async def test_a_raising_plugin_rejects_requests_and_is_skipped_on_notifications(
        client_grids):
    grid = await client_grids()
    chains = grid.controller.chains
    faulty = Recorder("faulty", order=20, behaviour=explode)
    after = Recorder("after", order=30)
    chains.add(faulty, "start_request")
    chains.add(after, "start_request")
    alice = await grid.connected("alice")
    with pytest.raises(Rejected, match=r"plugin faulty failed: RuntimeError: plugin bug "
                                       r"\(rejected by faulty\)"):
        await alice.start(cluster="web", count=2)
    assert after.calls == [] and grid.controller.state.vms == {}   # failed closed

    chains.remove("faulty")
    chains.add(Recorder("faulty", order=20, behaviour=explode), "start_complete")
    chains.add(after, "start_complete")
    result = await alice.start(cluster="web", count=2)
    assert len(result["started"]) == 2
    await task.deferLater(reactor, 0, lambda: None)
    assert after.calls == ["start_request", "start_complete", "start_complete"]


@pytest_twisted.ensureDeferred
async def test_a_hanging_plugin_does_not_stall_the_controller(tmp_path, client_grids):
    plugin_dir = tmp_path / "thirdparty"
    write(plugin_dir / "slow.py", '''
        """Slow: never answers (a test's third-party plugin)."""
        from twisted.internet import defer


        class Plugin:
            def __init__(self, config, api):
                pass

            def entry_point(self, event):
                return defer.Deferred()
        ''')
    slow_config = write(tmp_path / "slow.config", "timeout = 3\n")
    grid = await client_grids(plugin_dir=str(plugin_dir))
    clock = task.Clock()
    grid.controller.chains.clock = clock       # the plugin timeouts' clock
    root = await grid.connected("root")
    alice = await grid.connected("alice")
    await alice.start(["early"])
    await wait_for(lambda: alice.vms.get(full("early"), {}).get("state") == "run")
    description = await root.register_plugin("slow", "pause_request", slow_config, 5)
    assert [r["timeout"] for r in description["registered"] if r["plugin"] == "slow"] == [3]
    await root.register_plugin("slow", "start_complete", slow_config)

    stuck = alice.pause([full("early")])
    # Meanwhile the controller serves everything else, and a notification
    # plugin that hangs does not hold up the start it is told about.
    result = await alice.start(cluster="web", count=2)
    assert len(result["started"]) == 2
    assert len(await alice.list(remote=True)) == 3
    assert not stuck.called
    clock.advance(2.9)
    await task.deferLater(reactor, 0, lambda: None)
    assert not stuck.called
    clock.advance(0.2)   # the plugin's own timeout (3 s), not the default (10 s)
    with pytest.raises(Rejected, match=r"plugin slow failed: TimeoutError.*\(rejected by slow\)"):
        await stuck
    assert grid.controller.state.vms[full("early")]["state"] == "run"


# -- the chains and timers, in isolation ---------------------------------------------

def registry_with(tmp_path, clock, plugin_source=None):
    chains = EventChains(clock, timeout=10)
    plugin_dir = tmp_path / "thirdparty"
    plugin_dir.mkdir(exist_ok=True)
    if plugin_source:
        write(plugin_dir / "ticker.py", plugin_source)
    registry = PluginRegistry(chains, api=object(), third_party_dir=str(plugin_dir),
                              load_config=load_plugin_config)
    return registry


TICKER = '''
    """Ticker: counts timer events; may be told to hang or fail."""
    from twisted.internet import defer

    DEFAULT_INTERVAL = 30


    class Plugin:
        def __init__(self, config, api):
            self.ticks = []
            self.mode = "ok"
            self.pending = None

        def entry_point(self, event):
            self.ticks.append((event.name, event.tick, event.interval))
            if self.mode == "fail":
                raise RuntimeError("tick failed")
            if self.mode == "hang":
                self.pending = defer.Deferred()
                return self.pending
    '''


def test_a_plugin_on_a_timer_is_called_periodically_until_unregistered(tmp_path):
    clock = task.Clock()
    registry = registry_with(tmp_path, clock, TICKER)
    config = write(tmp_path / "ticker.config", "interval = 5\ntimeout = 60\n")
    plugin = registry.register("ticker", "timer", config)
    assert registry.describe()["registered"][0]["interval"] == 5
    clock.advance(4.9)
    assert plugin.ticks == []
    clock.pump([0.1] + [5] * 2)
    assert plugin.ticks == [("timer", 1, 5), ("timer", 2, 5), ("timer", 3, 5)]

    plugin.mode = "fail"                  # a failing tick is logged; the timer goes on
    clock.advance(5)
    plugin.mode = "ok"
    clock.advance(5)
    assert [t[1] for t in plugin.ticks] == [1, 2, 3, 4, 5]

    plugin.mode = "hang"                  # a slow tick is never piled upon
    clock.advance(5)
    plugin.mode = "ok"
    clock.advance(5)
    clock.advance(5)
    timer = registry.timer("ticker")
    assert [t[1] for t in plugin.ticks] == [1, 2, 3, 4, 5, 6] and timer.skipped == 2
    plugin.pending.callback(None)
    clock.advance(5)
    assert [t[1] for t in plugin.ticks] == [1, 2, 3, 4, 5, 6, 7]

    registry.unregister("ticker")
    clock.advance(60)
    assert len(plugin.ticks) == 7 and not timer.running and registry.timer("ticker") is None


def test_a_hanging_timer_call_times_out_and_the_timer_goes_on(tmp_path):
    clock = task.Clock()
    registry = registry_with(tmp_path, clock, TICKER)
    plugin = registry.register("ticker", "timer")      # DEFAULT_INTERVAL 30
    plugin.mode = "hang"
    clock.advance(30)
    plugin.mode = "ok"
    clock.advance(10)          # the chains' default timeout gives up on tick 1
    assert plugin.pending.called
    clock.advance(20)
    assert [t[1] for t in plugin.ticks] == [1, 2]


def test_a_plugin_unregistered_while_a_chain_runs_is_not_called(tmp_path):
    chains = EventChains(task.Clock())
    late = Recorder("late", order=20)

    def unregister_late(event):
        chains.remove("late")
    chains.add(Recorder("first", order=10, behaviour=unregister_late), "vm_lost")
    chains.add(late, "vm_lost")
    chains.notify(Event("vm_lost", None, vm={}))
    assert late.calls == []


def test_request_rejected_by_a_timed_out_plugin_names_it():
    clock = task.Clock()
    chains = EventChains(clock, timeout=10)
    chains.add(Recorder("stuck", order=1, behaviour=hang, timeout=2), "start_request")
    request = Request("start", "alice", vms=["a"])
    d = defer.Deferred.fromCoroutine(chains.fire_request(Event("start_request", None,
                                                               request=request)))
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.1)
    failure = []
    d.addErrback(failure.append)
    assert failure and failure[0].check(Rejected)
    assert request.rejected_by == "stuck"


# -- the README's example ---------------------------------------------------------------

def readme_example():
    text = README.read_text(encoding="utf-8")
    plugin = re.search(r"```python\n(# /etc/usher/plugins/quota\.py.*?)```", text, re.S)
    config = re.search(r"```ini\n(# /etc/usher/quota\.config.*?)```", text, re.S)
    assert plugin and config, "the README's example plugin and its config file"
    return plugin.group(1), config.group(1)


@pytest_twisted.ensureDeferred
async def test_the_readme_example_plugin_works_as_documented(tmp_path, client_grids):
    source, config = readme_example()
    plugin_dir = tmp_path / "plugins"
    write(plugin_dir / "quota.py", source)
    config_file = write(tmp_path / "quota.config", config)
    grid = await client_grids(plugin_dir=str(plugin_dir))
    root = await grid.connected("root")
    alice = await grid.connected("alice")
    for event in ("start_request", "migrate_request"):
        await root.register_plugin("quota", event, config_file)

    description = await root.plugins()
    assert [r["plugin"] for r in description["registered"] if r["event"] == "start_request"] \
        == ["open_authz", "limits", "quota", "roundrobin"]
    result = await alice.start(cluster="web", count=5)
    assert len(result["started"]) == 3
    assert sorted(f["name"] for f in result["failed"]) == [full("4.web"), full("5.web")]
    assert all("at most 3 VMs per request" in f["error"] for f in result["failed"])
    assert result["notes"] == ["quota: 3 of 5 VMs allowed"]
    with pytest.raises(Rejected, match="only administrators may start VMs in 'prod'"):
        await alice.start(cluster="prod", count=1)
    result = await root.start(cluster="prod", count=1)
    assert len(result["started"]) == 1
    await root.unregister_plugin("quota")
    assert len((await alice.start(cluster="big", count=5))["started"]) == 5


# -- a plugin's position on its chains ------------------------------------------------------

# A third-party plugin with a module default order and no ``order`` in its
# CONFIG_SPEC, written as the shipped plugins are: its configuration always
# holds ``order`` (None when unset), so its own fallback never applies.
EARLY = '''
    """Early: a plugin that wants to run early (a test's third-party plugin)."""

    DEFAULT_ORDER = 5


    class Plugin:
        def __init__(self, config, api):
            self.order = config.get("order", DEFAULT_ORDER)

        def entry_point(self, event):
            pass
'''

UNORDERED = '''
    """Unordered: says nothing about its order (a test's third-party plugin)."""


    class Plugin:
        def __init__(self, config, api):
            pass

        def entry_point(self, event):
            pass
'''


def orders(registry, event):
    return [(r["plugin"], r["order"]) for r in registry.describe()["registered"]
            if r["event"] == event]


def test_order_from_the_daemons_configuration_path(tmp_path):
    """[[plugins]] in ctrl.config, registered as the daemon does: an order in
    the registration beats the plugin's configuration file, which beats the
    module's DEFAULT_ORDER, which beats 1000."""
    from usher.controller.service import PluginsService

    plugin_dir = tmp_path / "thirdparty"
    write(plugin_dir / "early.py", EARLY)
    write(plugin_dir / "unordered.py", UNORDERED)
    seven = write(tmp_path / "early7.config", "order = 7\n")
    ctrl = ctrl_config(tmp_path, plugin_dir, f"""
        [[[early]]]
        events = start_request
        [[[unordered]]]
        events = start_request
        [[[early_configured]]]
        plugin = early
        events = list_request
        config = {seven}
        [[[early_placed]]]
        plugin = early
        events = migrate_request
        config = {seven}
        order = 3
        """)
    registry = PluginRegistry(EventChains(task.Clock()), api=object(),
                              third_party_dir=ctrl["plugin_dir"],
                              load_config=load_plugin_config)
    service = PluginsService(registry, ctrl["plugins"])
    service.startService()
    assert orders(registry, "start_request") == [("early", 5), ("unordered", 1000)]
    assert orders(registry, "list_request") == [("early", 7)]
    assert orders(registry, "migrate_request") == [("early", 3)]
    service.stopService()
    assert registry.chains.registrations() == []


@pytest_twisted.ensureDeferred
async def test_order_of_a_plugin_registered_at_run_time(tmp_path, client_grids):
    plugin_dir = tmp_path / "thirdparty"
    write(plugin_dir / "early.py", EARLY)
    grid = await client_grids(plugin_dir=str(plugin_dir))
    root = await grid.connected("root")
    description = await root.register_plugin("early", "start_request")
    assert [(r["plugin"], r["order"]) for r in description["registered"]
            if r["event"] == "start_request"] == [
        ("early", 5), ("open_authz", 10), ("limits", 20), ("roundrobin", 50)]
    description = await root.register_plugin("early", "list_request", None, 60)
    assert [(r["plugin"], r["order"]) for r in description["registered"]
            if r["event"] == "list_request"] == [("open_authz", 10), ("early", 60)]


def test_register_configured_registers_a_whole_section_and_stops_at_a_failure(tmp_path):
    plugin_dir = tmp_path / "thirdparty"
    write(plugin_dir / "unordered.py", UNORDERED)
    registry = PluginRegistry(EventChains(task.Clock()), api=object(),
                              third_party_dir=str(plugin_dir), load_config=load_plugin_config)
    registry.register_configured(settings.default_plugin_registrations())
    assert orders(registry, "start_request") == [
        ("open_authz", 10), ("limits", 20), ("roundrobin", 50)]
    with pytest.raises(ConfigError, match=r"\[\[\w+\]\]: unknown event 'no_such_event'"):
        registry.register_configured({
            "unordered": {"plugin": None, "events": ["vm_lost", "no_such_event"],
                          "config": None, "order": None}})
    assert [r.plugin.name for r in registry.chains.registrations("vm_lost")] == ["unordered"]
    registry.unregister_all()
    assert registry.chains.registrations() == []
