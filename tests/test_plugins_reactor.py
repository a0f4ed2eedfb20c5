"""Plugins and the reactor: ``api.run_blocking`` runs a plugin's blocking
work in the controller's plugin thread pool (the controller keeps serving
meanwhile), the daemon's service owns that pool, and the chains warn when a
plugin's synchronous part holds the reactor too long (measured with a fake
timer, never the wall clock)."""

import os
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool

from usher import passwdfile, settings
from usher.config import load_config
from usher.controller.events import Event, EventChains, Request
from usher.controller.plugin_api import PluginAPI, thread_pool_runner
from usher.controller.service import PluginsService, make_service
from usher.daemon import ThreadPoolService
from usher.errors import Rejected

from tests.clientgrid import plugin_instance
from tests.e2e import wait_for
from tests.test_plugins_api import Recorder, full, write


def outcome(d):
    """What a Deferred that has fired holds (a failure counts as handled)."""
    seen = []
    d.addBoth(seen.append)
    assert seen, "the Deferred has not fired"
    return seen[0]


def synchronous(function, *args, **kwargs):
    """A fake plugin thread pool: runs the work at once, on this thread."""
    return defer.maybeDeferred(function, *args, **kwargs)


@pytest.fixture
def warnings():
    """The hold warnings the event chains log during the test."""
    seen = []

    def observe(event):
        if "held the reactor" in event.get("log_format", ""):
            seen.append(event)
    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


# -- run_blocking ------------------------------------------------------------------------

def test_run_blocking_hands_the_work_to_the_injected_runner():
    api = PluginAPI(controller=None, run_in_thread=synchronous)
    assert outcome(api.run_blocking(lambda a, b=0: a + b, 2, b=3)) == 5

    def broken():
        raise OSError("disk full")
    failure = outcome(api.run_blocking(broken))
    assert failure.check(OSError) and str(failure.value) == "disk full"


def test_run_blocking_without_a_pool_fails_instead_of_blocking():
    failure = outcome(PluginAPI(controller=None).run_blocking(lambda: "never run"))
    assert failure.check(RuntimeError) and "no plugin thread pool" in str(failure.value)


@pytest_twisted.ensureDeferred
async def test_run_blocking_runs_in_a_pool_thread_and_answers_on_the_reactor():
    pool = ThreadPool(minthreads=0, maxthreads=1, name="test-plugins")
    pool.start()
    try:
        api = PluginAPI(controller=None, run_in_thread=thread_pool_runner(reactor, pool))
        worker = await api.run_blocking(threading.get_ident)
        assert worker != threading.get_ident()
    finally:
        pool.stop()


ARCHIVER = '''
    """Archiver: writes every pause request down, blocking (a test's plugin)."""
    import threading


    class Plugin:
        def __init__(self, config, api):
            self.entered = threading.Event()    # the blocking write has begun
            self.gate = threading.Event()       # the test lets it finish
            self.written = []

        def write_down(self, vms):
            self.entered.set()
            if not self.gate.wait(30):
                raise RuntimeError("the test never opened the gate")
            return len(vms)

        async def entry_point(self, event):
            count = await event.api.run_blocking(self.write_down, list(event.request.vms))
            self.written.append(count)
    '''


@pytest_twisted.ensureDeferred
async def test_a_plugin_blocking_in_run_blocking_does_not_stall_the_controller(
        tmp_path, client_grids):
    plugin_dir = tmp_path / "thirdparty"
    write(plugin_dir / "archiver.py", ARCHIVER)
    grid = await client_grids(plugin_dir=str(plugin_dir))
    pool = ThreadPool(minthreads=0, maxthreads=2, name="test-plugins")
    pool.start()
    grid.controller.api.run_in_thread = thread_pool_runner(reactor, pool)
    archiver = None
    try:
        root = await grid.connected("root")
        alice = await grid.connected("alice")
        await alice.start(["early"])
        await wait_for(lambda: alice.vms.get(full("early"), {}).get("state") == "run")
        await root.register_plugin("archiver", "pause_request")
        archiver = plugin_instance(grid, "archiver")

        paused = alice.pause([full("early")])
        await wait_for(archiver.entered.is_set)
        # The plugin's write is blocked in a pool thread; the reactor serves
        # other requests meanwhile.
        result = await alice.start(["other"])
        assert [s["name"] for s in result["started"]] == [full("other")]
        assert sorted(r["name"] for r in await alice.list(remote=True)) == [
            full("early"), full("other")]
        assert not paused.called and archiver.written == []

        archiver.gate.set()
        result = await paused
        assert result["done"] == [{"name": full("early"), "state": "paused"}]
        assert archiver.written == [1]
    finally:
        if archiver is not None:
            archiver.gate.set()
        pool.stop()


# -- the daemon's service owns the plugin pool ------------------------------------------

def test_the_controller_service_gives_plugins_a_pool_it_starts_and_stops(tmp_path, pki_dir):
    passwdfile.add_user(str(tmp_path / "passwd"), "root", "secret", rounds=4)
    path = write(tmp_path / "ctrl.config", f"""
        [ctrl]
        ssl_cert_file = {os.path.join(pki_dir, "usherctrl_cert.pem")}
        ssl_key_file = {os.path.join(pki_dir, "usherctrl_key.pem")}
        ssl_ca_file = {os.path.join(pki_dir, "ca_cert.pem")}
        state_dir = {tmp_path / "state"}
        passwd_file = {tmp_path / "passwd"}
        plugin_hold_warning = 0.25
        """)
    config = load_config(settings.CTRL, extra_files=[path], isolated=True)
    root, controller = make_service(config, reactor)
    assert controller.chains.hold_warning == 0.25
    services = list(root)
    pools = [s for s in services if isinstance(s, ThreadPoolService)
             and s.pool.name == "usherctrl-plugins"]
    assert len(pools) == 1
    plugin_pool = pools[0]
    plugins = next(s for s in services if isinstance(s, PluginsService))
    # Started before the plugins register, stopped after they are gone.
    assert services.index(plugin_pool) < services.index(plugins)

    plugin_pool.startService()
    try:
        ran = []
        done = threading.Event()
        # (its Deferred fires on a later reactor turn; nothing waits for it)
        controller.api.run_blocking(lambda: (ran.append(threading.get_ident()), done.set()))
        assert done.wait(10)
        assert ran and ran[0] != threading.get_ident()
        assert plugin_pool.pool.started
    finally:
        plugin_pool.stopService()
    assert not plugin_pool.pool.started


# -- the hold warning ---------------------------------------------------------------------

class FakeMonotonic:
    """A monotonic clock that moves only when a plugin "computes"."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def compute(self, seconds):
        def behaviour(event):
            self.now += seconds
        return behaviour


def chains_with_fake_timer(threshold=0.1):
    monotonic = FakeMonotonic()
    return EventChains(task.Clock(), hold_warning=threshold, monotonic=monotonic), monotonic


def test_a_plugin_holding_the_reactor_past_the_threshold_is_named_in_a_warning(warnings):
    chains, monotonic = chains_with_fake_timer(0.1)
    chains.add(Recorder("quick", order=10, behaviour=monotonic.compute(0.02)), "vm_lost")
    chains.add(Recorder("hog", order=20, behaviour=monotonic.compute(0.35)), "vm_lost")
    chains.add(Recorder("borderline", order=30, behaviour=monotonic.compute(0.1)), "vm_lost")
    chains.notify(Event("vm_lost", None, vm={}))
    assert [(w["plugin"], w["event"], w["held_ms"], w["threshold_ms"]) for w in warnings] \
        == [("hog", "vm_lost", 350, 100)]
    assert warnings[0]["log_level"].name == "warn"


def test_the_threshold_is_the_chains_setting(warnings):
    chains, monotonic = chains_with_fake_timer(0.5)
    chains.add(Recorder("hog", behaviour=monotonic.compute(0.35)), "vm_lost")
    chains.notify(Event("vm_lost", None, vm={}))
    assert warnings == []
    chains.hold_warning = 0.3
    chains.notify(Event("vm_lost", None, vm={}))
    assert [w["held_ms"] for w in warnings] == [350]


def test_only_the_synchronous_part_of_a_coroutine_counts(warnings):
    chains, monotonic = chains_with_fake_timer(0.1)
    waiting = defer.Deferred()

    async def first_step_then_wait(event):
        monotonic.now += 0.2          # computes before its first await: counts
        await waiting
        monotonic.now += 5            # after the chain moved on: not this call's hold

    plugin = Recorder("stepper", behaviour=first_step_then_wait)
    chains.add(plugin, "start_request")
    request = Request("start", "alice")
    done = defer.Deferred.fromCoroutine(chains.fire_request(
        Event("start_request", None, request=request)))
    assert [(w["plugin"], w["event"], w["held_ms"]) for w in warnings] == [
        ("stepper", "start_request", 200)]
    waiting.callback(None)
    assert outcome(done) is request
    assert len(warnings) == 1


def test_a_plugin_that_raises_after_holding_the_reactor_is_still_measured(warnings):
    chains, monotonic = chains_with_fake_timer(0.1)

    def hog_then_fail(event):
        monotonic.now += 0.4
        raise RuntimeError("plugin bug")

    chains.add(Recorder("faulty", behaviour=hog_then_fail), "start_request")
    done = defer.Deferred.fromCoroutine(chains.fire_request(
        Event("start_request", None, request=Request("start", "alice"))))
    assert outcome(done).check(Rejected)
    assert [(w["plugin"], w["held_ms"]) for w in warnings] == [("faulty", 400)]


def test_timer_calls_are_measured_too(tmp_path, warnings):
    from usher.config import load_plugin_config
    from usher.controller.plugins import PluginRegistry

    monotonic = FakeMonotonic()
    clock = task.Clock()
    chains = EventChains(clock, hold_warning=0.1, monotonic=monotonic)
    plugin_dir = tmp_path / "thirdparty"
    write(plugin_dir / "slowtick.py", '''
        """Slowtick: computes a while on every tick (a test's plugin)."""
        DEFAULT_INTERVAL = 5


        class Plugin:
            def __init__(self, config, api):
                self.compute = None

            def entry_point(self, event):
                self.compute(event)
        ''')
    registry = PluginRegistry(chains, api=None, third_party_dir=str(plugin_dir),
                              load_config=load_plugin_config)
    plugin = registry.register("slowtick", "timer")
    plugin.compute = monotonic.compute(0.15)
    clock.advance(5)
    assert [(w["plugin"], w["event"], w["held_ms"]) for w in warnings] == [
        ("slowtick", "timer", 150)]
    registry.unregister_all()
