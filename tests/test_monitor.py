"""LNM monitoring (usher.lnm.monitor): damped averages, rates from counters,
statistics a driver lacks, simulated load, and the reports to the controller.

Time is a task.Clock throughout; the hypervisor is a fake whose counters the
test sets, or libvirt's test driver (in a real thread pool) for what that
driver does and does not report.
"""

import math
import os

import pytest
import pytest_twisted
from twisted.internet import defer, task

from usher.errors import NoSuchVM
from usher.lnm import libvirt_stats
from usher.lnm.libvirt_vmm import LibvirtVMM
from usher.lnm.monitor import CounterRate, DampedAverages, Monitor, SimulatedLoad
from usher.lnm.node import NodeManager
from usher.lnm.testhost import write_test_host
from usher.protocol import FIGURES

VM = "1.web.alice.usher.test"
GIB_NS = 1e9


def approx(value, rel=1e-6, abs=1e-6):
    return pytest.approx(value, rel=rel, abs=abs)


# --- averages and rates ---------------------------------------------------------------

def test_average_starts_at_its_first_value_and_stays_for_a_constant_load():
    averages = DampedAverages()
    averages.add(40.0, 0)
    for t in range(5, 3600, 5):
        averages.add(40.0, t)
    assert averages.values == [approx(40.0)] * 3


def test_a_step_moves_the_1_minute_average_first_like_the_kernel_load_average():
    averages = DampedAverages()
    averages.add(0.0, 0)
    for t in range(5, 65, 5):
        averages.add(100.0, t)
    one, five, fifteen = averages.values
    # After one window the average has covered 1 - 1/e of the step.
    assert one == approx(100 * (1 - math.exp(-1)))
    assert five == approx(100 * (1 - math.exp(-60 / 300)))
    assert fifteen == approx(100 * (1 - math.exp(-60 / 900)))
    assert one > five > fifteen > 0


def test_irregular_intervals_give_the_same_averages_as_regular_ones():
    regular, irregular = DampedAverages(), DampedAverages()
    regular.add(10.0, 0)
    irregular.add(10.0, 0)
    for t in range(5, 125, 5):
        regular.add(70.0, t)
    for t in (1, 2, 9, 30, 31, 77, 120):     # late, early, bunched samples
        irregular.add(70.0, t)
    assert irregular.values == [approx(v) for v in regular.values]


def test_no_elapsed_time_changes_nothing():
    averages = DampedAverages()
    averages.add(5.0, 10)
    averages.add(500.0, 10)
    assert averages.values == [5.0, 5.0, 5.0]


def test_counter_rate_needs_two_values_and_restarts_when_the_counter_goes_back():
    counter = CounterRate()
    assert counter.rate(1000, 0) is None
    assert counter.rate(3000, 2) == 1000.0
    assert counter.rate(100, 4) is None        # restarted domain
    assert counter.rate(600, 5) == 500.0
    assert counter.rate(None, 6) is None


# --- the monitor on a hypervisor whose counters the test sets ----------------------------

class CountingVMM:
    """Raw samples from counters advanced by a load the test sets."""

    def __init__(self, clock, *, cpus=4, missing=()):
        self.clock = clock
        self.cpus = cpus
        self.missing = set(missing)   # counters this "driver" does not report
        self.domains = {}
        self.node_busy = 0.0
        self.node_total = 0.0
        self.at = clock.seconds()
        self.fixed_stats = False
        self.fail = None
        self.calls = 0

    def add(self, name, *, vcpus=1, load=0.0, net=0.0, memory_kib=262144):
        self.domains[name] = {"uuid": f"uuid-{name}", "vcpus": vcpus, "load": load,
                              "net": net, "memory_kib": memory_kib, "cpu_time_ns": 0.0,
                              "net_rx_bytes": 0.0, "disk_write_bytes": 0.0}

    def _advance(self):
        now = self.clock.seconds()
        elapsed, self.at = now - self.at, now
        for dom in self.domains.values():
            dom["cpu_time_ns"] += dom["load"] * dom["vcpus"] * elapsed * GIB_NS
            dom["net_rx_bytes"] += dom["net"] * elapsed
            self.node_busy += dom["load"] * dom["vcpus"] * elapsed * GIB_NS
        self.node_total += self.cpus * elapsed * GIB_NS

    def _or_missing(self, key, value):
        return None if key in self.missing else int(value)

    def domain_stats(self):
        self.calls += 1
        if self.fail is not None:
            return defer.fail(self.fail)
        self._advance()
        return defer.succeed([{
            "name": name, "uuid": dom["uuid"], "state": "run", "vcpus": dom["vcpus"],
            "memory_kib": dom["memory_kib"],
            "cpu_time_ns": self._or_missing("cpu_time_ns", dom["cpu_time_ns"]),
            "net_rx_bytes": self._or_missing("net_rx_bytes", dom["net_rx_bytes"]),
            "net_tx_bytes": self._or_missing("net_tx_bytes", 0),
            "disk_read_bytes": self._or_missing("disk_read_bytes", 0),
            "disk_write_bytes": self._or_missing("disk_write_bytes", dom["disk_write_bytes"]),
            "memory_used_kib": self._or_missing("memory_used_kib", dom["memory_kib"] // 2),
        } for name, dom in self.domains.items()])

    def node_stats(self):
        if self.fail is not None:
            return defer.fail(self.fail)
        self._advance()
        return defer.succeed({
            "cpus": self.cpus, "memory_kib": 8 * 1024 * 1024, "vms": len(self.domains),
            "cpu_busy_ns": self._or_missing("cpu_busy_ns", self.node_busy),
            "cpu_total_ns": self._or_missing("cpu_total_ns", self.node_total),
            "memory_used_kib": self._or_missing("node_memory", 1024 * 1024),
            "memory_free_kib": self._or_missing("node_memory", 7 * 1024 * 1024)})


class Reporter:
    def __init__(self):
        self.reports = []
        self.fail = None

    async def report_status(self, node, vms):
        if self.fail is not None:
            raise self.fail
        self.reports.append((node, vms))
        return True


def make_monitor(vmm, clock, **kwargs):
    kwargs.setdefault("sample_interval", 5.0)
    kwargs.setdefault("report_interval", 15.0)
    return Monitor(vmm, name="lnm1", clock=clock, **kwargs)


def run_for(clock, seconds, step=5.0):
    for _ in range(int(seconds / step)):
        clock.advance(step)


def test_averages_follow_the_load_as_it_changes():
    clock = task.Clock()
    vmm = CountingVMM(clock, cpus=4)
    vmm.add(VM, vcpus=2, load=0.1, net=1000.0)
    monitor = make_monitor(vmm, clock)
    monitor.start()
    run_for(clock, 900)                       # a quiet quarter of an hour
    quiet = monitor.vm_status(VM)
    assert quiet["cpu"] == [approx(20.0, rel=1e-3)] * 3      # 0.1 of 2 vCPUs
    assert quiet["net_rx"] == [approx(1000.0, rel=1e-3)] * 3
    assert monitor.node_status()["cpu"] == [approx(5.0, rel=1e-3)] * 3   # 20 % of 1 of 4

    vmm.domains[VM]["load"] = 0.9             # the VM gets busy
    run_for(clock, 60)
    one, five, fifteen = monitor.vm_status(VM)["cpu"]
    assert one == approx(20 + 160 * (1 - math.exp(-1)), rel=1e-3)
    assert one > five > fifteen > 20
    node_one, node_five, node_fifteen = monitor.node_status()["cpu"]
    assert node_one == approx(one / 4, rel=1e-3) and node_one > node_five > node_fifteen

    run_for(clock, 4500)                      # busy long enough: all agree again
    assert monitor.vm_status(VM)["cpu"] == [approx(180.0, rel=1e-2)] * 3

    vmm.domains[VM]["load"] = 0.0             # and quiet again: 1-minute falls first
    run_for(clock, 120)
    one, five, fifteen = monitor.vm_status(VM)["cpu"]
    assert one < five < fifteen < 180.0
    assert monitor.vm_status(VM)["source"] == "libvirt"


def test_samples_at_irregular_intervals_average_the_same():
    regular_clock, late_clock = task.Clock(), task.Clock()
    results = []
    for clock, steps in ((regular_clock, [5.0] * 48), (late_clock, [3.0, 11.0, 7.0, 19.0] * 6)):
        vmm = CountingVMM(clock)
        vmm.add(VM, load=0.0)
        monitor = make_monitor(vmm, clock)
        defer.ensureDeferred(monitor.sample())
        vmm.domains[VM]["load"] = 0.5
        for step in steps:
            clock.advance(step)
            defer.ensureDeferred(monitor.sample())
        assert clock.seconds() == 240.0
        results.append(monitor.vm_status(VM)["cpu"])
    assert results[1] == [approx(v, rel=1e-3) for v in results[0]]


def test_statistics_the_driver_lacks_are_unavailable_not_zero():
    clock = task.Clock()
    vmm = CountingVMM(clock, missing={"net_rx_bytes", "disk_write_bytes", "memory_used_kib",
                                      "node_memory"})
    vmm.add(VM, load=0.5, net=5000.0)
    monitor = make_monitor(vmm, clock)
    monitor.start()
    run_for(clock, 60)
    vm = monitor.vm_status(VM)
    assert vm["cpu"] == [approx(50.0)] * 3
    assert vm["net_rx"] is None and vm["disk_write"] is None and vm["memory_used"] is None
    assert vm["net_tx"] == [0.0, 0.0, 0.0]     # reported, and truly zero
    node = monitor.node_status()
    assert node["net_rx"] is None and node["disk_write"] is None   # a sum with a gap
    assert node["memory_used"] is None and node["free_memory_mib"] is None
    assert node["cpu"] is not None

    vmm.missing.add("cpu_time_ns")             # the driver stops reporting CPU
    clock.advance(5)
    assert monitor.vm_status(VM)["cpu"] is None


def test_node_cpu_from_its_vms_when_the_host_has_no_counters():
    clock = task.Clock()
    vmm = CountingVMM(clock, cpus=4, missing={"cpu_busy_ns", "cpu_total_ns"})
    vmm.add(VM, vcpus=2, load=1.0)
    monitor = make_monitor(vmm, clock)
    monitor.start()
    run_for(clock, 30)
    assert monitor.node_status()["cpu"] == [approx(50.0)] * 3


def test_a_vanished_vm_loses_its_figures_and_a_new_one_starts_afresh():
    clock = task.Clock()
    vmm = CountingVMM(clock)
    vmm.add(VM, load=0.5)
    monitor = make_monitor(vmm, clock)
    monitor.start()
    run_for(clock, 30)
    del vmm.domains[VM]
    clock.advance(5)
    assert monitor.vm_status(VM) is None
    vmm.add(VM, load=0.1)                     # same name, another domain
    clock.advance(5)
    assert monitor.vm_status(VM)["cpu"] is None      # one sample: no rate yet
    clock.advance(5)
    assert monitor.vm_status(VM)["cpu"] == [approx(10.0)] * 3


def test_a_failing_hypervisor_makes_every_figure_unavailable_until_it_answers():
    clock = task.Clock()
    vmm = CountingVMM(clock)
    vmm.add(VM, load=0.5)
    monitor = make_monitor(vmm, clock)
    monitor.start()
    run_for(clock, 30)
    vmm.fail = RuntimeError("connection reset")
    clock.advance(5)
    assert monitor.vm_status(VM) is None
    assert monitor.node_status()["cpu"] is None
    vmm.fail = None
    run_for(clock, 10)
    assert monitor.vm_status(VM)["cpu"] == [approx(50.0)] * 3
    assert monitor._sample_loop.running       # the loop survived the failure


def test_reports_go_out_every_report_interval_while_attached():
    clock = task.Clock()
    vmm = CountingVMM(clock)
    vmm.add(VM, load=0.25)
    reporter = Reporter()
    attached = []
    monitor = make_monitor(vmm, clock, reporter_of=lambda: attached[0] if attached else None)
    monitor.start()
    run_for(clock, 30)
    assert reporter.reports == [] and monitor.reports == 0      # detached
    attached.append(reporter)
    run_for(clock, 30)
    assert len(reporter.reports) == 2
    node, vms = reporter.reports[-1]
    assert node["vms"] == 1 and node["cpus"] == 4 and node["sample_interval"] == 5.0
    assert [vm["name"] for vm in vms] == [VM]
    assert vms[0]["cpu"] == [approx(25.0)] * 3
    reporter.fail = RuntimeError("controller gone")
    clock.advance(15)                         # a failed report is logged, not fatal
    reporter.fail = None
    clock.advance(15)
    assert len(reporter.reports) == 3


@pytest_twisted.ensureDeferred
async def test_stop_ends_both_loops():
    clock = task.Clock()
    vmm = CountingVMM(clock)
    monitor = make_monitor(vmm, clock)
    monitor.start()
    await monitor.stop()
    calls = vmm.calls
    clock.advance(60)
    assert vmm.calls == calls


# --- simulated load ---------------------------------------------------------------

def test_simulated_profiles_are_deterministic_and_documented_shapes():
    sim = SimulatedLoad("wave")
    levels = [sim.level(VM, t) for t in range(0, 600, 10)]
    assert max(levels) - min(levels) > 0.2          # it really rises and falls
    assert levels == [SimulatedLoad("wave").level(VM, t) for t in range(0, 600, 10)]
    assert SimulatedLoad("idle").level(VM, 5) == 0.0
    assert 0.1 <= SimulatedLoad("steady").level(VM, 5) <= 0.7
    bursty = {SimulatedLoad("bursty").level(f"{i}.x", 30) for i in range(50)}
    assert bursty == {0.9, 0.05}
    assert sim.level(VM, 5, {"simulated_cpu": "80"}) == 0.8
    assert sim.level(VM, 5, {"simulated_cpu": "lots"}) == sim.level(VM, 5)
    with pytest.raises(ValueError, match="wave"):
        SimulatedLoad("heavy")


def test_simulation_fills_only_what_the_driver_lacks_and_says_so():
    clock = task.Clock()
    vmm = CountingVMM(clock, missing={"net_rx_bytes"})
    vmm.add(VM, load=0.5)
    monitor = make_monitor(vmm, clock, simulated_load="steady",
                           vm_args=lambda name: {"simulated_cpu": "10"})
    monitor.start()
    run_for(clock, 30)
    vm = monitor.vm_status(VM)
    assert vm["cpu"] == [approx(50.0)] * 3      # real figure kept, not the simulated 10
    assert vm["net_rx"] is not None             # simulated
    assert vm["source"] == "libvirt+simulated:steady"
    assert monitor.node_status()["simulated_load"] == "steady"


# --- on libvirt's test driver --------------------------------------------------------------

async def make_test_host(reactor, pool, tmp_path):
    uri = write_test_host(os.path.join(tmp_path, "host.xml"), hostname="lnm1", cpus=4,
                          memory_mib=8192, model="test")
    vmm = LibvirtVMM(uri, reactor=reactor, pool=pool, state_dir=str(tmp_path), events=False)
    await vmm.connect()
    await vmm.create({"name": VM, "memory_mib": 512, "vcpus": 2, "owner": "alice",
                      "cluster": "web", "args": {}})
    return vmm


@pytest_twisted.ensureDeferred
async def test_the_test_driver_reports_sizes_but_no_statistics(pool, tmp_path):
    from twisted.internet import reactor
    vmm = await make_test_host(reactor, pool, tmp_path)
    try:
        assert vmm.fixed_stats
        [sample] = await vmm.domain_stats()
        assert sample["name"] == VM and sample["vcpus"] == 2 and sample["memory_kib"] == 524288
        assert all(sample[key] is None for key in libvirt_stats.DOMAIN_COUNTERS)
        assert sample["memory_used_kib"] is None
        node = await vmm.node_stats()
        assert node["cpus"] == 4 and node["memory_kib"] == 8192 * 1024 and node["vms"] == 1
        assert node["cpu_busy_ns"] is None and node["memory_free_kib"] is None

        clock = task.Clock()
        monitor = make_monitor(vmm, clock)
        for _ in range(3):
            await monitor.sample()
            clock.advance(5)
        assert all(monitor.vm_status(VM)[f] is None for f in FIGURES)
        node_status = monitor.node_status()
        assert all(node_status[f] is None for f in FIGURES)
        assert node_status["source"] is None and node_status["vms"] == 1
    finally:
        await vmm.close()


@pytest_twisted.ensureDeferred
async def test_simulated_load_on_the_test_driver_through_the_node_manager(pool, tmp_path):
    from twisted.internet import reactor
    vmm = await make_test_host(reactor, pool, tmp_path)
    clock = task.Clock()
    manager = NodeManager(vmm, name="lnm1", clock=clock, scan_interval=3600,
                          report_interval=3600)
    try:
        await manager.startup()
        await manager.receive([{"name": VM, "state": "run", "memory_mib": 512, "vcpus": 2,
                                "owner": "alice", "cluster": "web",
                                "args": {"simulated_cpu": "75"}}])
        monitor = make_monitor(vmm, clock, simulated_load="idle", vm_args=manager.vm_args)
        manager.set_monitor(monitor)
        for _ in range(4):
            await monitor.sample()
            clock.advance(5)
        status = await manager.get_status(VM)
        assert status["cpu"] == [approx(150.0)] * 3          # 75 % of 2 vCPUs
        assert status["memory_used"] == [approx(512 * (0.25 + 0.6 * 0.75), rel=1e-3)] * 3
        assert status["source"] == "simulated:idle"
        node = await manager.get_node_status()
        assert node["vms"] == 1
        assert node["cpu"][0] == approx(150.0 / 4 + 1.0)     # plus the host's own 1 %
        assert node["free_memory_mib"] == approx(8192 - 256 - 512 * 0.7, abs=1)
        assert node["simulated_load"] == "idle" and node["source"] == "simulated:idle"

        await vmm.operate("pause", VM)          # a paused VM uses no CPU
        for _ in range(30):
            await monitor.sample()
            clock.advance(5)
        one, five, fifteen = (await manager.get_status(VM))["cpu"]
        assert one < five < fifteen < 150.0
        assert (await manager.get_status(VM))["state"] == "paused"

        await vmm.operate("destroy", VM)
        await monitor.sample()
        with pytest.raises(NoSuchVM):
            await manager.get_status("nosuch.vm")
    finally:
        await manager.shutdown()
        await vmm.close()


@pytest_twisted.ensureDeferred
async def test_get_status_without_a_monitor_says_unavailable(pool, tmp_path):
    from twisted.internet import reactor
    vmm = await make_test_host(reactor, pool, tmp_path)
    manager = NodeManager(vmm, name="lnm1", clock=task.Clock(), scan_interval=3600,
                          report_interval=3600)
    try:
        await manager.startup()
        status = await manager.get_status(VM)
        assert status["name"] == VM and status["state"] == "run"
        assert all(status[f] is None for f in FIGURES) and status["source"] is None
        node = await manager.get_node_status()
        assert node == {"vms": 1, "free_memory_mib": None}
    finally:
        await manager.shutdown()
        await vmm.close()


# --- libvirt's bulk statistics, as a real driver returns them --------------------------

def test_bulk_statistics_are_summed_over_devices():
    stats = {"state.state": 1, "cpu.time": 123_000_000, "vcpu.current": 2,
             "balloon.current": 131072, "balloon.rss": 90000,
             "net.count": 2, "net.0.rx.bytes": 100, "net.0.tx.bytes": 10,
             "net.1.rx.bytes": 50, "net.1.tx.bytes": 5,
             "block.count": 1, "block.0.rd.bytes": 4096, "block.0.wr.bytes": 512}
    sample = libvirt_stats.sample_from_bulk_stats(VM, "u-1", stats)
    assert sample == {"name": VM, "uuid": "u-1", "state": "run", "vcpus": 2,
                      "memory_kib": 131072, "cpu_time_ns": 123_000_000,
                      "net_rx_bytes": 150, "net_tx_bytes": 15, "disk_read_bytes": 4096,
                      "disk_write_bytes": 512, "memory_used_kib": 90000}


def test_bulk_statistics_a_driver_left_out_are_none_and_no_devices_are_zero():
    sample = libvirt_stats.sample_from_bulk_stats(VM, "u-1", {"state.state": 3,
                                                            "net.count": 0})
    assert sample["state"] == "paused"
    assert sample["net_rx_bytes"] == 0 and sample["net_tx_bytes"] == 0
    assert sample["cpu_time_ns"] is None and sample["disk_read_bytes"] is None
    assert sample["memory_used_kib"] is None
    partial = libvirt_stats.sample_from_bulk_stats(VM, "u", {"block.count": 2,
                                                           "block.0.rd.bytes": 1})
    assert partial["disk_read_bytes"] is None      # one disk unreported: no sum


def test_memory_in_use_prefers_the_resident_set_then_the_guest_view():
    assert libvirt_stats.memory_used_kib({"rss": 500, "available": 1000, "unused": 100}) == 500
    assert libvirt_stats.memory_used_kib({"available": 1000, "unused": 100}) == 900
    assert libvirt_stats.memory_used_kib({}) is None


def test_node_counters_from_libvirt_node_calls():
    assert libvirt_stats.node_cpu_counters({"kernel": 10, "user": 30, "idle": 50,
                                          "iowait": 10}) == (40, 100)
    assert libvirt_stats.node_cpu_counters({"kernel": 10}) == (None, None)
    assert libvirt_stats.node_memory_used_kib({"total": 1000, "free": 200, "buffers": 100,
                                             "cached": 300}) == 400
    assert libvirt_stats.node_memory_used_kib({"free": 1}) is None
    xml = ("<domain><devices><interface type='network'><target dev='vnet3'/></interface>"
           "<disk type='file'><target dev='vda'/></disk><disk type='file'>"
           "<target dev='vdb'/></disk></devices></domain>")
    assert libvirt_stats.device_targets(xml) == (["vnet3"], ["vda", "vdb"])
