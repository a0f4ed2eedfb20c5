"""The controller's consolidated monitoring (usher.controller.monitoring):
reports, validation, bounded history, the plugin accessor; then the whole
path on an in-process grid (LNM monitors with simulated load on libvirt's
test driver -> reports -> list/list_lnm/top and least-loaded placement), and
the report over PB.
"""

import tracemalloc

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.spread import pb
from twisted.test import iosim

from usher.controller.core import Controller
from usher.controller.lnm_link import NodeReporter
from usher.controller.monitoring import Averages, Load, Monitoring
from usher.controller.state import GlobalState, LNMInfo
from usher.errors import InvalidRequest, NoSuchLNM, UsherError
from usher.lnm.link import RemoteReporter
from usher.lnm.monitor import Monitor
from usher.protocol import FIGURES

from tests.grid import DOMAIN, Grid


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def figures(cpu=None, **others):
    report = dict.fromkeys(FIGURES)
    if cpu is not None:
        report["cpu"] = list(cpu)
    for figure, value in others.items():
        report[figure] = list(value)
    return report


def node_report(cpu=(10.0, 8.0, 5.0), **extra):
    report = figures(cpu, memory_used=(1000.0, 1000.0, 1000.0))
    report.update(vms=2, cpus=8, memory_mib=16384, free_memory_mib=15000, sampled_at=50.0,
                  sample_interval=5.0, source="libvirt")
    report.update(extra)
    return report


def vm_report(name, cpu=(50.0, 40.0, 30.0), **extra):
    report = figures(cpu)
    report.update(name=name, sampled_at=50.0, source="libvirt")
    report.update(extra)
    return report


class Setup:
    def __init__(self, lnms=("lnm1", "lnm2"), vms_per_lnm=2, **kwargs):
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.state = GlobalState(DOMAIN)
        self.names = {}
        for lnm in lnms:
            self.state.lnms[lnm] = LNMInfo(lnm, {"cpus": 8}, handle=object())
            self.names[lnm] = []
            for i in range(1, vms_per_lnm + 1):
                name = full(f"{i}.on{lnm}")
                self.state.add(self.state.new_record(name, state="run", lnm=lnm,
                                                     memory_mib=256, vcpus=1))
                self.names[lnm].append(name)
        self.monitoring = Monitoring(self.state, self.clock, **kwargs)


# --- the store --------------------------------------------------------------------------

def test_report_keeps_latest_figures_for_clients_and_plugins():
    s = Setup()
    a, b = s.names["lnm1"]
    kept = s.monitoring.report("lnm1", node_report(), [vm_report(a), vm_report(b, cpu=None)])
    assert kept == 2
    s.clock.advance(3)
    lnm = s.monitoring.lnm_status("lnm1")
    assert lnm["cpu"] == [10.0, 8.0, 5.0] and lnm["net_rx"] is None
    assert lnm["vms"] == 2 and lnm["free_memory_mib"] == 15000 and lnm["age"] == 3.0
    assert lnm["source"] == "libvirt" and lnm["sample_interval"] == 5.0
    assert s.monitoring.vm_status(a)["cpu"] == [50.0, 40.0, 30.0]
    assert s.monitoring.vm_status(b)["cpu"] is None            # unavailable stays so
    assert s.monitoring.lnm_status("lnm2") == {} and s.monitoring.vm_status("x") == {}

    load = s.monitoring.lnm_load("lnm1")
    assert isinstance(load, Load) and load.cpu == Averages(10.0, 8.0, 5.0)
    assert load.cpu.one == 10.0 and load.figure("cpu", 15) == 5.0 and load.net_rx is None
    assert load.age == 3.0 and load.extra["cpus"] == 8
    assert s.monitoring.lnm_figure("lnm1", "cpu", 5) == 8.0
    assert s.monitoring.lnm_figure("lnm1", "net_rx") is None
    assert s.monitoring.lnm_figure("lnm2") is None and s.monitoring.lnm_load("lnm2") is None
    assert s.monitoring.vm_figure(a, "cpu", 1) == 50.0 and s.monitoring.vm_load(b).cpu is None
    with pytest.raises(InvalidRequest, match="window"):
        s.monitoring.lnm_figure("lnm1", "cpu", 2)
    with pytest.raises(InvalidRequest, match="figure"):
        s.monitoring.lnm_figure("lnm1", "temperature")


def test_lnm_loads_lists_connected_lnms_only():
    s = Setup()
    s.monitoring.report("lnm1", node_report(), [])
    s.monitoring.report("lnm2", node_report(cpu=(90.0, 90.0, 90.0)), [])
    s.state.lnms["lnm2"].connected = False
    assert set(s.monitoring.lnm_loads()) == {"lnm1"}
    assert set(s.monitoring.lnm_loads(connected_only=False)) == {"lnm1", "lnm2"}


@pytest.mark.parametrize("node, vms, message", [
    ("x", [], "node figures must be a dict"),
    (node_report(cpu=(1.0, 2.0)), [], "cpu must be None or 3 finite numbers"),
    (node_report(cpu=(1.0, float("nan"), 2.0)), [], "cpu must be None"),
    (node_report(cpu=("1", 2.0, 3.0)), [], "cpu must be None"),
    (node_report(vms=-1), [], "vms must be a non-negative integer"),
    (node_report(source=["x"]), [], "source must be a short string"),
    (node_report(), [{"cpu": None}], "without a valid name"),
    (node_report(), [vm_report("1.onlnm1.alice.usher.test", cpu=(True, 1, 1))], "cpu must"),
    # As LNMs send them, JSON lists of floats (the fast path): still finite only.
    (node_report(cpu=[1.0, float("inf"), 2.0]), [], "cpu must be None"),
    (node_report(cpu=[float("-inf"), 1.0, 2.0]), [], "cpu must be None"),
    (node_report(), [vm_report("1.onlnm1.alice.usher.test", cpu=[1.0, 2.0, float("nan")])],
     r"from lnm1, VM 1\.onlnm1\.alice\.usher\.test: figure cpu must be None"),
    (node_report(), [vm_report("1.onlnm1.alice.usher.test", source=7)],
     r"VM 1\.onlnm1\.alice\.usher\.test: source must be a short string"),
    (node_report(), "chunk", "must be a list"),
])
def test_a_malformed_report_is_refused_whole_and_changes_nothing(node, vms, message):
    s = Setup()
    a = s.names["lnm1"][0]
    s.monitoring.report("lnm1", node_report(cpu=(1.0, 1.0, 1.0)), [vm_report(a)])
    with pytest.raises(InvalidRequest, match=message):
        s.monitoring.report("lnm1", node, vms if vms != "chunk" else "chunk")
    assert s.monitoring.lnm_status("lnm1")["cpu"] == [1.0, 1.0, 1.0]
    assert s.monitoring.vm_status(a)["cpu"] == [50.0, 40.0, 30.0]


def test_figures_as_json_lists_or_tuples_of_ints_and_floats_are_kept_alike():
    s = Setup()
    a = s.names["lnm1"][0]
    s.monitoring.report("lnm1", node_report(cpu=[1, 2.5, 3]),
                        [vm_report(a, cpu=[50.0, 40.0, 30.0], net_rx=(0, 1, 2))])
    assert s.monitoring.lnm_status("lnm1")["cpu"] == [1.0, 2.5, 3.0]
    assert s.monitoring.vm_status(a)["cpu"] == [50.0, 40.0, 30.0]
    assert s.monitoring.vm_status(a)["net_rx"] == [0.0, 1.0, 2.0]


def test_figures_only_for_vms_the_state_places_on_the_reporting_lnm():
    s = Setup()
    other = s.names["lnm2"][0]
    kept = s.monitoring.report("lnm1", node_report(), [vm_report(other),
                                                       vm_report("nobody.knows")])
    assert kept == 0 and s.monitoring.ignored_vms == 2
    assert s.monitoring.vm_status(other) == {}


def test_vm_figures_go_with_the_vm_its_next_report_or_its_lnm():
    s = Setup()
    a, b = s.names["lnm1"]
    s.monitoring.report("lnm1", node_report(), [vm_report(a), vm_report(b)])
    s.monitoring.report("lnm1", node_report(), [vm_report(a)])          # b shut off
    assert s.monitoring.vm_status(b) == {} and s.monitoring.vm_status(a) != {}
    s.state.remove(a)                                                      # destroyed
    assert s.monitoring.vm_status(a) == {} and len(s.monitoring) == 0
    s.monitoring.report("lnm1", node_report(), [vm_report(b)])
    s.monitoring.lnm_detached("lnm1")
    assert s.monitoring.vm_status(b) == {}
    assert s.monitoring.lnm_status("lnm1")["cpu"] == [10.0, 8.0, 5.0]    # kept, aging
    s.monitoring.forget_lnm("lnm1")
    assert s.monitoring.lnm_status("lnm1") == {}


def test_a_migrated_vm_keeps_the_figures_of_its_new_host():
    s = Setup()
    a = s.names["lnm1"][0]
    s.monitoring.report("lnm1", node_report(), [vm_report(a, cpu=(1.0, 1.0, 1.0))])
    s.state.update(a, lnm="lnm2")
    s.monitoring.report("lnm2", node_report(), [vm_report(a, cpu=(2.0, 2.0, 2.0))])
    s.monitoring.report("lnm1", node_report(), [])     # the old host no longer has it
    assert s.monitoring.vm_status(a)["cpu"] == [2.0, 2.0, 2.0]


def test_history_is_a_bounded_ring_of_one_minute_averages():
    s = Setup(lnm_history=3, vm_history=2, history_interval=60.0)
    a = s.names["lnm1"][0]
    for minute in range(5):
        for _ in range(4):        # reports every 15 s: one history row a minute
            s.monitoring.report("lnm1", node_report(cpu=(minute, 0.0, 0.0)),
                                [vm_report(a, cpu=(minute * 10, 0.0, 0.0))])
            s.clock.advance(15)
    rows = s.monitoring.history("lnm1")
    assert [row[1]["cpu"] for row in rows] == [2.0, 3.0, 4.0]
    assert [row[0] for row in rows] == [1120.0, 1180.0, 1240.0]
    assert rows[0][1]["net_rx"] is None and rows[0][1]["memory_used"] == 1000.0
    assert [row[1]["cpu"] for row in s.monitoring.vm_history_rows(a)] == [30.0, 40.0]
    assert s.monitoring.history("lnm2") == []
    none = Setup(lnm_history=0, vm_history=0)
    none.monitoring.report("lnm1", node_report(), [])
    assert none.monitoring.history("lnm1") == []


def test_busiest_vms():
    s = Setup(vms_per_lnm=3)
    for lnm, base in (("lnm1", 10.0), ("lnm2", 20.0)):
        s.monitoring.report(lnm, node_report(), [
            vm_report(name, cpu=(base + i, 0.0, 0.0)) for i, name in enumerate(s.names[lnm])])
    top = s.monitoring.busiest_vms(count=2)
    assert top == [(s.names["lnm2"][2], 22.0), (s.names["lnm2"][1], 21.0)]
    assert s.monitoring.busiest_vms(["lnm1"], count=1) == [(s.names["lnm1"][2], 12.0)]


def test_memory_stays_small_at_scale():
    """2,000 VMs on 100 LNMs with full histories: well under 2 KB a VM (the
    bench in the README: 13 MB for 10,000 VMs on 500 LNMs)."""
    s = Setup(lnms=[f"lnm{i}" for i in range(100)], vms_per_lnm=20)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(16):
            for lnm, names in s.names.items():
                s.monitoring.report(lnm, node_report(), [vm_report(n) for n in names])
            s.clock.advance(60)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(s.monitoring) == 2000
    assert len(s.monitoring.vm_history_rows(s.names["lnm0"][0])) == 15
    assert used / 2000 < 2048, f"{used / 2000:.0f} bytes a VM"


# --- the whole path on an in-process grid ------------------------------------------------

class MonitoredGrid:
    """A grid whose LNMs run monitors with simulated load (the test driver
    reports no statistics) on their own task.Clock."""

    def __init__(self, grid):
        self.grid = grid
        self.clock = task.Clock()
        self.clock.advance(10_000)
        self.monitors = {}
        for name, node in grid.nodes.items():
            monitor = Monitor(grid.vmms[name], name=name, clock=self.clock,
                              simulated_load="idle", vm_args=node.vm_args,
                              reporter_of=lambda node=node: node.reporter)
            node.set_monitor(monitor)
            self.monitors[name] = monitor

    async def run(self, seconds, step=5.0):
        """Sample every ``step`` seconds for ``seconds``, then report."""
        for _ in range(int(seconds / step) + 1):
            for monitor in self.monitors.values():
                await monitor.sample()
            self.clock.advance(step)
        for monitor in self.monitors.values():
            await monitor.report()


def registrations(*placement):
    regs = {"open_authz": {"plugin": "open_authz", "events": ["start_request",
                                                             "migrate_request",
                                                             "list_request"],
                           "config": None, "order": None}}
    for name in placement:
        regs[name] = {"plugin": name, "events": ["start_request", "migrate_request"],
                      "config": None, "order": None}
    return regs


@pytest.fixture
def grid(tmp_path):
    g = Grid(reactor, tmp_path, registrations=registrations("leastloaded"))
    pytest_twisted.blockon(defer.ensureDeferred(g.start()))
    yield g
    pytest_twisted.blockon(defer.ensureDeferred(g.stop()))


async def start(grid, name, lnms=(), **args):
    result = await grid.controller.start("alice", False, [name], list(lnms), args)
    assert result["failed"] == [], result
    return result["started"][0]["lnm"]


@pytest_twisted.ensureDeferred
async def test_list_status_and_list_lnm_status_show_the_consolidated_figures(grid):
    watched = MonitoredGrid(grid)
    await start(grid, "hot", ["lnm1"], vcpus=4, simulated_cpu="50")
    await start(grid, "cold", ["lnm2"])
    await watched.run(60)
    controller = grid.controller
    records = {r["name"]: r for r in await controller.list("alice", False, None, status=True)}
    hot = records[full("hot")]["status"]
    assert hot["cpu"] == [pytest.approx(200.0)] * 3        # 50 % of 4 vCPUs
    assert hot["source"] == "simulated:idle" and hot["age"] >= 0
    assert records[full("cold")]["status"]["cpu"] == [0.0, 0.0, 0.0]
    plain = await controller.list("alice", False, None)
    assert "status" not in plain[0]

    lnms = {lnm["name"]: lnm for lnm in controller.list_lnm("alice", False, (), status=True)}
    lnm1 = lnms["lnm1"]["status"]
    assert lnm1["cpu"][0] == pytest.approx(200.0 / 8 + 1.0)    # 8 CPUs, 1 % host overhead
    assert lnm1["vms"] == 1 and lnm1["simulated_load"] == "idle"
    assert lnm1["free_memory_mib"] is not None and lnm1["source"] == "simulated:idle"
    assert lnms["lnm3"]["status"]["vms"] == 0
    assert "status" not in controller.list_lnm("alice", False, ())[0]

    top = await controller.top("alice", False, [], 1)
    assert [vm["name"] for vm in top["vms"]] == [full("hot")]
    assert top["vms"][0]["status"]["cpu"][0] == pytest.approx(200.0)
    assert [lnm["name"] for lnm in top["lnms"]] == ["lnm1", "lnm2", "lnm3"]
    with pytest.raises(InvalidRequest, match="count"):
        await controller.top("alice", False, [], -1)


@pytest_twisted.ensureDeferred
async def test_least_loaded_placement_follows_the_figures(grid):
    watched = MonitoredGrid(grid)
    await start(grid, "hot1", ["lnm1"], vcpus=8, simulated_cpu="90")
    await start(grid, "warm2", ["lnm2"], vcpus=8, simulated_cpu="40")
    await watched.run(60)
    assert await start(grid, "new1") == "lnm3"              # the idle host
    assert await start(grid, "hot3", ["lnm3"], vcpus=8, simulated_cpu="100") == "lnm3"
    await watched.run(300)                                  # lnm3 heats up
    assert grid.controller.monitoring.lnm_figure("lnm3") > \
        grid.controller.monitoring.lnm_figure("lnm2")
    assert await start(grid, "new2") == "lnm2"              # now the least loaded
    # lnm1 cools down (its VM is paused) and becomes the least loaded in turn.
    await grid.controller.op_on("alice", False, "pause", {"names": ["hot1"]})
    await watched.run(600)
    assert await start(grid, "new3") == "lnm1"


@pytest_twisted.ensureDeferred
async def test_status_report_from_a_detached_lnm_is_refused(grid):
    grid.cut("lnm2")
    with pytest.raises(NoSuchLNM):
        grid.controller.lnm_status_report("lnm2", node_report(), [])
    assert grid.controller.monitoring.lnm_status("lnm2") == {}


# --- over PB -----------------------------------------------------------------------------

class _Root(pb.Root):
    def __init__(self, reporter):
        self.reporter = reporter

    def remote_reporter(self):
        return self.reporter


def test_report_status_over_pb_reaches_the_controller():
    clock = task.Clock()
    controller = Controller(domain=DOMAIN, clock=clock)
    controller.state.lnms["lnm1"] = LNMInfo("lnm1", {}, handle=object())
    name = full("1.web")
    controller.state.add(controller.state.new_record(name, state="run", lnm="lnm1"))
    server = pb.PBServerFactory(_Root(NodeReporter(controller, "lnm1")))
    client = pb.PBClientFactory()
    _, _, pump = iosim.connectedServerAndClient(lambda: server.buildProtocol(None),
                                                lambda: client.buildProtocol(None))
    roots = []
    client.getRootObject().addCallback(roots.append)
    pump.flush()
    refs = []
    roots[0].callRemote("reporter").addCallback(refs.append)
    pump.flush()
    reporter = RemoteReporter(refs[0], clock=clock, timeout=30)

    results = []
    defer.Deferred.fromCoroutine(reporter.report_status(
        node_report(), [vm_report(name)])).addBoth(results.append)
    pump.flush()
    assert results == [{"resend": []}]
    assert controller.monitoring.vm_status(name)["cpu"] == [50.0, 40.0, 30.0]
    assert controller.monitoring.lnm_status("lnm1")["vms"] == 2

    errors = []
    defer.Deferred.fromCoroutine(reporter.report_status(
        node_report(cpu=(1.0,)), [])).addErrback(errors.append)
    pump.flush()
    assert errors and isinstance(errors[0].value, UsherError)
    assert "cpu must be None" in str(errors[0].value)
    assert controller.monitoring.lnm_status("lnm1")["cpu"] == [10.0, 8.0, 5.0]

    # The node's figures travel as one JSON object; anything else is refused.
    for hostile in ["not json", "[1, 2]", {"cpu": None}, 7]:
        errors = []
        refs[0].callRemote("report_status", hostile, []).addErrback(errors.append)
        pump.flush()
        assert errors and "JSON object" in errors[0].getErrorMessage(), hostile
    assert controller.monitoring.lnm_status("lnm1")["cpu"] == [10.0, 8.0, 5.0]


class HideOthers:
    """A list_request policy: ordinary users see only their own VMs."""
    name = "hide_others"
    order = 10

    def entry_point(self, event):
        request = event.request
        for vm in list(request.vms):
            if request.records[vm]["owner"] != request.user and not request.admin:
                request.drop(vm, "not yours")


@pytest_twisted.ensureDeferred
async def test_top_shows_only_what_list_request_plugins_let_through():
    clock = task.Clock()
    # A site that lets users see each other's VMs: what the plugin hides counts.
    controller = Controller(domain=DOMAIN, clock=clock, user_visibility="all")
    controller.state.lnms["lnm1"] = LNMInfo("lnm1", {}, handle=object())
    mine, theirs = full("1.web"), full("1.db", owner="bob")
    for name in (mine, theirs):
        controller.state.add(controller.state.new_record(name, state="run", lnm="lnm1"))
    controller.lnm_status_report("lnm1", node_report(), [
        vm_report(mine, cpu=(10.0, 10.0, 10.0)), vm_report(theirs, cpu=(90.0, 90.0, 90.0))])
    view = (await controller.top("alice", False))["vms"]
    assert [vm["name"] for vm in view] == [theirs, mine]
    assert "args" not in view[0] and "args" in view[1]       # never another user's args
    controller.chains.add(HideOthers(), "list_request")
    assert [vm["name"] for vm in (await controller.top("alice", False))["vms"]] == [mine]
    assert [vm["name"] for vm in (await controller.top("bob", False, count=5))["vms"]] == \
        [theirs]
