"""The LNM's resource monitoring: samples, rates, 1/5/15-minute averages and
the batched status reports to the controller (paper: "It reports resource
usage of CPU utilization, network receive and transmit loads, disk I/O
activity, and memory usage in 1, 5, and 15-minute averages").

Every ``sample_interval`` seconds the ``Monitor`` asks the VMM for raw
statistics (``domain_stats`` and ``node_stats``, which run in the VMM's
thread pool), turns cumulative counters into rates (CPU time into percent,
bytes into bytes per second) and folds each rate into exponentially damped
averages over ``usher.protocol.AVERAGE_WINDOWS``. Every ``report_interval``
seconds it sends the node's and every VM's figures to the controller in one
``report_status`` call: as deltas (issue 16; ``StatusDeltas``) to a
controller that takes them, the VMs whose figures changed in full and the
others named as kept.

The averages follow the kernel's load average, ``avg = avg * e + x * (1 - e)``,
with ``e = exp(-dt / window)`` computed from the time that really passed since
the last update (the kernel can use a constant because it samples exactly
every 5 s; a thread pool cannot promise that). ``x`` is the mean rate over
that interval, which makes the update exact for a load that was constant
over it, however long the interval. Unlike the kernel, an average starts at
its first value rather than at 0, so an LNM that restarts among busy VMs does
not look idle for a quarter of an hour.

A statistic the driver does not report stays None all the way to the
controller and the clients: never a made-up number. The one exception is
explicit: ``SimulatedLoad`` (the LNM's ``simulated_load`` option) fills in
what the driver lacks with synthetic counters, for sandboxes on the test
driver, and every figure it touched says so in its ``source``.
"""

import hashlib
import math

from twisted.internet import defer
from twisted.logger import Logger

from usher import states
from usher.liveness import HEARTBEAT_TICK, on_tick
from usher.loops import every, unfailing
from usher.protocol import AVERAGE_WINDOWS, FIGURES

log = Logger()

NANOSECONDS = 1e9
KIB_PER_MIB = 1024.0
# Figures are rounded to this many decimals on the wire (percent, bytes/s, MiB).
ROUND_DIGITS = 3

# figure -> (raw sample key, kind, scale to the figure's unit)
_VM_SOURCES = {
    "cpu": ("cpu_time_ns", "counter", 100.0 / NANOSECONDS),   # ns/s -> percent of a CPU
    "net_rx": ("net_rx_bytes", "counter", 1.0),
    "net_tx": ("net_tx_bytes", "counter", 1.0),
    "disk_read": ("disk_read_bytes", "counter", 1.0),
    "disk_write": ("disk_write_bytes", "counter", 1.0),
    "memory_used": ("memory_used_kib", "gauge", 1.0 / KIB_PER_MIB),
}
# A counter seen for the first time: available, but no rate until the next sample.
_NO_RATE_YET = object()
# Node figures that are sums of its VMs' rates (libvirt has no host-wide
# network or disk counters).
_SUMMED_FIGURES = ("net_rx", "net_tx", "disk_read", "disk_write")


class DampedAverages:
    """Exponentially damped averages of one figure over several windows."""

    __slots__ = ("windows", "values", "updated_at")

    def __init__(self, windows=AVERAGE_WINDOWS):
        self.windows = tuple(windows)
        self.values = None
        self.updated_at = None

    def add(self, value, now):
        """Fold in ``value``, the figure's mean since the last update (the
        first value becomes every average)."""
        if self.values is None:
            self.values = [float(value)] * len(self.windows)
            self.updated_at = now
            return
        elapsed = now - self.updated_at
        if elapsed <= 0:
            return  # no time has passed: nothing to weigh it by
        for index, window in enumerate(self.windows):
            decay = math.exp(-elapsed / window)
            self.values[index] = self.values[index] * decay + value * (1.0 - decay)
        self.updated_at = now

    def reset(self):
        self.values = None
        self.updated_at = None

    def rounded(self):
        if self.values is None:
            return None
        return [round(v, ROUND_DIGITS) for v in self.values]


class CounterRate:
    """Rates from a cumulative counter."""

    __slots__ = ("value", "at")

    def __init__(self):
        self.value = None
        self.at = None

    def rate(self, value, now):
        """-> the mean rate per second since the previous value, or None
        (first value, no time passed, or the counter went backwards: the
        domain was restarted, restored or migrated here)."""
        previous, previous_at = self.value, self.at
        self.value, self.at = value, now
        if value is None or previous is None or now <= previous_at or value < previous:
            return None
        return (value - previous) / (now - previous_at)


class _Figures:
    """The averages of every figure for one VM or the node, with the
    counters they come from."""

    __slots__ = ("averages", "counters", "sources", "uuid")

    def __init__(self, uuid=None):
        self.uuid = uuid
        self.averages = {figure: DampedAverages() for figure in FIGURES}
        self.counters = {}
        self.sources = set()

    def counter(self, key):
        counter = self.counters.get(key)
        if counter is None:
            counter = self.counters[key] = CounterRate()
        return counter

    def set_figure(self, figure, value, now):
        """A new value (None: the driver does not report it now)."""
        if value is None:
            self.averages[figure].reset()
        else:
            self.averages[figure].add(value, now)

    def as_dict(self):
        return {figure: self.averages[figure].rounded() for figure in FIGURES}


def _source_label(sources, simulated_profile):
    parts = []
    if "libvirt" in sources:
        parts.append("libvirt")
    if "simulated" in sources:
        parts.append(f"simulated:{simulated_profile}")
    return "+".join(parts) or None


# --- simulated load --------------------------------------------------------------

SIMULATED_PROFILES = ("idle", "steady", "wave", "bursty")
# The request argument that sets one VM's simulated CPU load (percent of its
# vCPUs), e.g. ``start hot --arg simulated_cpu=90``.
SIMULATED_CPU_ARG = "simulated_cpu"
# Per busy vCPU: what a fully busy VM moves, in bytes per second.
_SIM_RATES = {"net_rx_bytes": 1_250_000.0, "net_tx_bytes": 600_000.0,
              "disk_read_bytes": 2_000_000.0, "disk_write_bytes": 1_000_000.0}
_SIM_WAVE_PERIOD = 600.0     # seconds
_SIM_BURST_SLOT = 60.0       # seconds
_SIM_HOST_BASE_KIB = 256 * 1024
_SIM_HOST_OVERHEAD = 0.01    # share of the host's CPUs the host itself uses


def _unit_hash(*parts):
    """A stable number in [0, 1) from the parts (the same VM name gives the
    same load in every process and run)."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


class SimulatedLoad:
    """Synthetic counters for what the driver does not report: SIMULATED.

    For sandboxes on libvirt's test driver, whose statistics are fixed, so
    that placement and rebalancing can be seen reacting to load. The load of
    a running VM is a share of its vCPUs, by profile:

    - ``idle``: none;
    - ``steady``: a constant 10-70 %, chosen by the VM's name;
    - ``wave``: rises and falls over 10 minutes, each VM with its own phase
      and height (so the 1-, 5- and 15-minute averages differ);
    - ``bursty``: minute-long bursts of 90 % a quarter of the time, else 5 %.

    A VM started with the request argument ``simulated_cpu=PERCENT`` runs at
    that load whatever the profile. Network and disk rates follow the CPU
    load; memory in use is a quarter of the VM's memory plus up to 60 % more
    with load. A paused VM keeps its memory and does nothing. The node's
    counters are the sums of its VMs' plus a little host overhead.

    Counters are integrated over time from these levels, and go through the
    same rate and averaging code as real ones.
    """

    def __init__(self, profile):
        if profile not in SIMULATED_PROFILES:
            raise ValueError(f"unknown simulated load profile {profile!r}; the profiles "
                             f"are {', '.join(SIMULATED_PROFILES)}")
        self.profile = profile
        self._vms = {}          # name -> {"at", counters..., "memory_used_kib"}
        self._node = None       # {"at", "cpu_busy_ns", "cpu_total_ns"}
        self._bad_args = set()

    def level(self, name, now, args=None):
        """The share (0-1) of its vCPUs a running VM keeps busy at ``now``."""
        requested = (args or {}).get(SIMULATED_CPU_ARG)
        if requested is not None:
            try:
                percent = float(requested)
                if not 0 <= percent <= 100:
                    raise ValueError(percent)
                return percent / 100.0
            except (TypeError, ValueError):
                if name not in self._bad_args:
                    self._bad_args.add(name)
                    log.warn("VM {vm}: {arg}={value!r} is not a percentage from 0 to 100; "
                             "using the {profile} profile", vm=name, arg=SIMULATED_CPU_ARG,
                             value=requested, profile=self.profile)
        height = _unit_hash(name, "height")
        if self.profile == "idle":
            return 0.0
        if self.profile == "steady":
            return 0.1 + 0.6 * height
        if self.profile == "wave":
            phase = _unit_hash(name, "phase")
            swing = 0.5 + 0.5 * math.sin(2 * math.pi * (now / _SIM_WAVE_PERIOD + phase))
            return 0.05 + (0.25 + 0.65 * height) * swing
        slot = math.floor(now / _SIM_BURST_SLOT)
        return 0.9 if _unit_hash(name, slot) < 0.25 else 0.05

    def fill(self, node, domains, now, args_of):
        """Fill the None counters of the raw samples in place; -> the set of
        (name or None for the node, counter key) that were simulated."""
        filled = set()
        seen = set()
        cpu_delta_ns = 0.0
        used_kib = 0.0
        for sample in domains:
            name = sample["name"]
            seen.add(name)
            vm = self._vms.get(name)
            if vm is None or vm.get("uuid") != sample.get("uuid"):
                vm = self._vms[name] = dict.fromkeys(_SIM_RATES, 0.0)
                vm.update(at=now, cpu_time_ns=0.0, uuid=sample.get("uuid"), level=0.0)
            elapsed = max(now - vm["at"], 0.0)
            vcpus = sample.get("vcpus") or 1
            running = sample.get("state") == states.RUN
            # The load over the interval, taken at its middle (smooth profiles).
            level = self.level(name, now - elapsed / 2, args_of(name)) if running else 0.0
            busy = level * vcpus
            if running:
                vm["level"] = level
            step_ns = busy * elapsed * NANOSECONDS
            vm["cpu_time_ns"] += step_ns
            for key, per_cpu in _SIM_RATES.items():
                vm[key] += busy * per_cpu * elapsed
            vm["at"] = now
            for key in ("cpu_time_ns",) + tuple(_SIM_RATES):
                if sample.get(key) is None:
                    sample[key] = int(vm[key])
                    filled.add((name, key))
            memory_kib = sample.get("memory_kib") or 0
            simulated_used = memory_kib * (0.25 + 0.6 * vm["level"])
            if sample.get("memory_used_kib") is None:
                sample["memory_used_kib"] = int(simulated_used)
                filled.add((name, "memory_used_kib"))
            cpu_delta_ns += step_ns
            used_kib += sample["memory_used_kib"]
        for name in [n for n in self._vms if n not in seen]:
            del self._vms[name]
        self._fill_node(node, now, cpu_delta_ns, used_kib, filled)
        return filled

    def _fill_node(self, node, now, cpu_delta_ns, used_kib, filled):
        cpus = node.get("cpus") or 1
        state = self._node
        if state is None:
            state = self._node = {"at": now, "cpu_busy_ns": 0.0, "cpu_total_ns": 0.0}
        elapsed = max(now - state["at"], 0.0)
        state["cpu_total_ns"] += cpus * elapsed * NANOSECONDS
        state["cpu_busy_ns"] += (min(cpu_delta_ns, cpus * elapsed * NANOSECONDS)
                                 + _SIM_HOST_OVERHEAD * cpus * elapsed * NANOSECONDS)
        state["at"] = now
        if node.get("cpu_busy_ns") is None or node.get("cpu_total_ns") is None:
            node["cpu_busy_ns"] = int(state["cpu_busy_ns"])
            node["cpu_total_ns"] = int(state["cpu_total_ns"])
            filled.add((None, "cpu_busy_ns"))
        total_kib = node.get("memory_kib") or 0
        used = min(used_kib + _SIM_HOST_BASE_KIB, total_kib) if total_kib else None
        if node.get("memory_used_kib") is None and used is not None:
            node["memory_used_kib"] = int(used)
            filled.add((None, "memory_used_kib"))
        if node.get("memory_free_kib") is None and used is not None:
            node["memory_free_kib"] = int(total_kib - used)
            filled.add((None, "memory_free_kib"))


# --- deltas ------------------------------------------------------------------------

# Every FULL_REPORT_EVERY-th report on a connection is full even when the
# controller takes deltas (the first is): once a minute at the default
# status_report_interval of 15 s, so that whatever the controller and the
# LNM came to disagree on heals by itself (usher.protocol, report_status).
FULL_REPORT_EVERY = 4


def _fingerprint(status, node_sampled_at):
    """What must be unchanged for a VM to be named as kept: its figures,
    source, state, and sampled_at relative to the node's."""
    sampled_at = status.get("sampled_at")
    if sampled_at is not None and node_sampled_at is not None:
        sampled_at = sampled_at - node_sampled_at
    return (tuple(tuple(v) if v is not None else None
                  for v in (status.get(figure) for figure in FIGURES)),
            status.get("source"), status.get("state"), sampled_at)


class StatusDeltas:
    """Which VMs a status report sends in full, per connection.

    ``acked`` holds, for the current reporter (one per connection: a new
    one after each attach), the fingerprint of every VM whose figures the
    controller acknowledged holding. A report names as kept the VMs whose
    fingerprint is unchanged; the others go in full. Full reports: the
    first on a connection, every ``full_every``-th, the one after a report
    failed (its outcome is unknown), one while another is in flight, and
    every report to a controller whose answer was not a dict (older: it
    takes full reports only)."""

    def __init__(self, full_every=FULL_REPORT_EVERY):
        if full_every < 1:
            raise ValueError("full_every must be at least 1")
        self.full_every = full_every
        self.reporter = None
        self.acked = {}
        self.takes_deltas = False
        self.count = 0              # reports acknowledged on this connection
        self.in_flight = 0
        self.full_reports = 0
        self.delta_reports = 0

    def prepare(self, reporter, node, vms):
        """-> (vms to send in full, kept names or None for a full report,
        the fingerprints the controller holds once it acknowledges)."""
        if reporter is not self.reporter:
            self.reporter = reporter
            self.acked = {}
            self.takes_deltas = False
            self.count = 0
            self.in_flight = 0
        node_sampled_at = node.get("sampled_at")
        pending = {vm["name"]: _fingerprint(vm, node_sampled_at) for vm in vms}
        full = (not self.takes_deltas or self.in_flight
                or self.count % self.full_every == 0)
        self.in_flight += 1
        if full:
            self.full_reports += 1
            return vms, None, pending
        self.delta_reports += 1
        acked = self.acked
        sent, kept = [], []
        for vm in vms:
            name = vm["name"]
            if acked.get(name) == pending[name]:
                kept.append(name)
            else:
                sent.append(vm)
        return sent, kept, pending

    def acknowledged(self, reporter, pending, answer):
        """The controller answered the report that would make it hold
        ``pending``."""
        if reporter is not self.reporter:
            return
        self.in_flight = max(self.in_flight - 1, 0)
        self.count += 1
        if not isinstance(answer, dict):
            self.takes_deltas = False
            self.acked = {}
            return
        self.takes_deltas = True
        resend = answer.get("resend")
        if isinstance(resend, (list, tuple)):
            for name in resend:
                if isinstance(name, str):
                    pending.pop(name, None)
        self.acked = pending

    def failed(self, reporter):
        """The report failed: the controller may or may not have taken it,
        so the next one is full."""
        if reporter is not self.reporter:
            return
        self.in_flight = max(self.in_flight - 1, 0)
        self.acked = {}
        self.count = 0


# --- the monitor -------------------------------------------------------------------

class Monitor:
    """Samples the VMM, keeps the averages and reports them.

    ``reporter_of()`` returns the current reporter (the NodeManager's: None
    while detached); a reporter without ``report_status`` is skipped.
    ``vm_args(name)`` returns a VM's request arguments (for
    ``simulated_cpu``). ``simulated_load`` is a profile name or None.
    """

    def __init__(self, vmm, *, name, clock, sample_interval=5.0, report_interval=15.0,
                 simulated_load=None, reporter_of=lambda: None, vm_args=lambda name: {},
                 sample_phase=None, full_report_every=FULL_REPORT_EVERY):
        if sample_interval <= 0 or report_interval <= 0:
            raise ValueError("the sample and report intervals must be positive")
        self.vmm = vmm
        self.name = name
        self.clock = clock
        self.sample_interval = sample_interval
        # Seconds from the first sample (at start) to the second; afterwards
        # every sample_interval. LNMs started together are given random
        # ones, so that their samples do not all fall together.
        self.sample_phase = sample_interval if sample_phase is None else sample_phase
        self._sample_start = None
        self.report_interval = report_interval
        self.simulation = SimulatedLoad(simulated_load) if simulated_load else None
        self._reporter_of = reporter_of
        self.deltas = StatusDeltas(full_report_every)
        self._vm_args = vm_args
        self._vms = {}                  # name -> _Figures
        self._vm_meta = {}              # name -> {"state", "sampled_at"}
        self._node = _Figures()
        self._node_extra = {}           # vms, cpus, memory_mib, free_memory_mib
        self.sampled_at = None
        self.samples = 0
        self.reports = 0
        self._failing = False
        self._sample_loop = None
        self._report_loop = None
        self._report_start = None
        self._in_flight = set()

    @property
    def simulated_profile(self):
        return self.simulation.profile if self.simulation else None

    # -- lifecycle -------------------------------------------------------------

    def start(self):
        """Sample now and every ``sample_interval``; report every
        ``report_interval``."""
        if self._sample_loop is not None or self._sample_start is not None:
            return
        if self.sample_phase >= self.sample_interval:
            self._sample_loop = self._loop(self.sample, self.sample_interval, now=True)
        else:
            self._sample_loop = self._loop(self.sample, self.sample_interval, now=True,
                                           once=True)

            def start_sampling():
                self._sample_start = None
                self._sample_loop = self._loop(self.sample, self.sample_interval, now=True)

            self._sample_start = self.clock.callLater(self.sample_phase, start_sampling)

        def start_reporting():
            self._report_start = None
            self._report_loop = self._loop(self.report, self.report_interval, now=False)

        # On a heartbeat tick, so that the controller hears reports together
        # with other LNMs' pings and reports (usher.liveness.HEARTBEAT_TICK).
        self._report_start = self.clock.callLater(
            on_tick(self.clock, 0, HEARTBEAT_TICK), start_reporting)
        log.info("LNM {lnm}: sampling every {sample} s, reporting every {report} s"
                 "{simulated}", lnm=self.name, sample=self.sample_interval,
                 report=self.report_interval,
                 simulated=(f"; SIMULATED load ({self.simulation.profile}) where the "
                            "driver has no statistics") if self.simulation else "")

    def _loop(self, function, interval, *, now, once=False):
        call = unfailing(function, log=log, message="LNM {lnm}: periodic {what} failed",
                         lnm=self.name, what=function.__name__)

        def tick():
            d = call()
            self._in_flight.add(d)
            d.addBoth(lambda result: self._in_flight.discard(d) or result)
            return d

        if once:
            # One call now, tracked like a loop's (stop waits for it).
            tick()
            return None
        return every(interval, tick, clock=self.clock, now=now)

    async def stop(self):
        """Stop both loops and wait for a sample or report in flight."""
        for pending in (self._report_start, self._sample_start):
            if pending is not None and pending.active():
                pending.cancel()
        self._report_start = self._sample_start = None
        for loop in (self._sample_loop, self._report_loop):
            if loop is not None and loop.running:
                loop.stop()
        self._sample_loop = self._report_loop = None
        if self._in_flight:
            await defer.DeferredList(list(self._in_flight), consumeErrors=True)

    # -- sampling ------------------------------------------------------------------

    async def sample(self):
        """Take one sample of the node and every active domain."""
        try:
            node, domains = await defer.gatherResults(
                [self.vmm.node_stats(), self.vmm.domain_stats()], consumeErrors=True)
        except Exception as e:
            error = e.subFailure.value if isinstance(e, defer.FirstError) else e
            if not self._failing:
                log.warn("LNM {lnm}: cannot sample the hypervisor ({error}); its figures "
                         "are unavailable until it answers", lnm=self.name,
                         error=str(error) or error.__class__.__name__)
            self._failing = True
            self._vms.clear()
            self._vm_meta.clear()
            self._node = _Figures()
            return
        if self._failing:
            log.info("LNM {lnm}: sampling the hypervisor again", lnm=self.name)
        self._failing = False
        self.apply(node, domains, self.clock.seconds())

    def apply(self, node, domains, now):
        """Fold raw samples (``LibvirtVMM.node_stats``/``domain_stats``)
        taken at ``now`` into the averages."""
        node = dict(node)
        domains = [dict(d) for d in domains if isinstance(d, dict)
                   and isinstance(d.get("name"), str)]
        simulated = set()
        if self.simulation is not None:
            simulated = self.simulation.fill(node, domains, now, self._vm_args)
        seen = set()
        vm_rates = []
        for sample in domains:
            name = sample["name"]
            seen.add(name)
            figures = self._vms.get(name)
            if figures is None or figures.uuid != sample.get("uuid"):
                figures = self._vms[name] = _Figures(sample.get("uuid"))
            rates = self._update_vm(figures, name, sample, now, simulated)
            vm_rates.append(rates)
            self._vm_meta[name] = {"state": sample.get("state"), "sampled_at": now}
        for name in [n for n in self._vms if n not in seen]:
            del self._vms[name]
            self._vm_meta.pop(name, None)
        self._update_node(node, now, vm_rates, simulated)
        self.sampled_at = now
        self.samples += 1

    def _update_vm(self, figures, name, sample, now, simulated):
        """-> this sample's rates by figure (None: unavailable, or no rate yet)."""
        rates = {}
        figures.sources = set()
        for figure, (key, kind, scale) in _VM_SOURCES.items():
            raw = sample.get(key)
            if raw is None:
                figures.set_figure(figure, None, now)
                figures.counters.pop(key, None)
                rates[figure] = None
                continue
            figures.sources.add("simulated" if (name, key) in simulated else "libvirt")
            if kind == "gauge":
                value = raw * scale
            else:
                rate = figures.counter(key).rate(raw, now)
                if rate is None:
                    rates[figure] = _NO_RATE_YET
                    continue
                value = rate * scale
            figures.set_figure(figure, value, now)
            rates[figure] = value
        return rates

    def _update_node(self, node, now, vm_rates, simulated):
        figures = self._node
        figures.sources = set()
        cpus = node.get("cpus") or None
        busy, total = node.get("cpu_busy_ns"), node.get("cpu_total_ns")
        if busy is not None and total is not None:
            figures.sources.add("simulated" if (None, "cpu_busy_ns") in simulated
                                else "libvirt")
            busy_rate = figures.counter("cpu_busy_ns").rate(busy, now)
            total_rate = figures.counter("cpu_total_ns").rate(total, now)
            if busy_rate is not None and total_rate:
                figures.set_figure("cpu", min(100.0 * busy_rate / total_rate, 100.0), now)
        elif cpus and vm_rates and all(r.get("cpu") is not None for r in vm_rates):
            # No host counters: the host is at least as busy as its VMs.
            figures.sources.add("libvirt")
            rates = [r["cpu"] for r in vm_rates if r["cpu"] is not _NO_RATE_YET]
            if rates:
                figures.set_figure("cpu", min(sum(rates) / cpus, 100.0), now)
        else:
            figures.set_figure("cpu", None, now)
        for figure in _SUMMED_FIGURES:
            values = [r.get(figure) for r in vm_rates]
            if any(v is None for v in values):
                figures.set_figure(figure, None, now)
            elif not vm_rates:
                # No VM, no traffic; unless the driver could not have told.
                figures.set_figure(figure, None if self.vmm_has_fixed_stats() else 0.0, now)
            elif all(v is _NO_RATE_YET for v in values):
                pass    # only first samples: the next one gives the first rates
            else:
                # A VM sampled for the first time adds nothing measurable yet.
                figures.set_figure(figure, sum(v for v in values if v is not _NO_RATE_YET),
                                   now)
        used = node.get("memory_used_kib")
        if used is not None:
            figures.sources.add("simulated" if (None, "memory_used_kib") in simulated
                                else "libvirt")
            figures.set_figure("memory_used", used / KIB_PER_MIB, now)
        else:
            figures.set_figure("memory_used", None, now)
        free_kib = node.get("memory_free_kib")
        self._node_extra = {
            "vms": len(vm_rates),
            "cpus": node.get("cpus"),
            "memory_mib": (node["memory_kib"] // 1024) if node.get("memory_kib") else None,
            "free_memory_mib": int(free_kib // 1024) if free_kib is not None else None,
        }

    def vmm_has_fixed_stats(self):
        return bool(getattr(self.vmm, "fixed_stats", False)) and self.simulation is None

    # -- figures -------------------------------------------------------------------

    def vm_status(self, name):
        """The figures of one VM, or None if it is not sampled (not running
        or paused here, or no sample yet)."""
        figures = self._vms.get(name)
        if figures is None:
            return None
        status = {"name": name}
        status.update(figures.as_dict())
        meta = self._vm_meta.get(name, {})
        status["state"] = meta.get("state")
        status["sampled_at"] = meta.get("sampled_at")
        status["source"] = _source_label(figures.sources, self.simulated_profile)
        return status

    def vm_statuses(self):
        return [self.vm_status(name) for name in sorted(self._vms)]

    def node_status(self):
        """The node's figures, plus vms (active domains), cpus, memory_mib
        and free_memory_mib."""
        status = self._node.as_dict()
        status.update(self._node_extra)
        status["sampled_at"] = self.sampled_at
        status["sample_interval"] = self.sample_interval
        status["source"] = _source_label(self._node.sources, self.simulated_profile)
        if self.simulation is not None:
            status["simulated_load"] = self.simulation.profile
        return status

    # -- reporting -----------------------------------------------------------------

    async def report(self):
        """Send the current figures to the controller (when attached and
        sampled); failures are logged and the next report tries again."""
        reporter = self._reporter_of()
        if reporter is None or self.sampled_at is None:
            return
        send = getattr(reporter, "report_status", None)
        if send is None:
            return
        node = self.node_status()
        sent, kept, pending = self.deltas.prepare(reporter, node, self.vm_statuses())
        try:
            if kept is None:
                answer = await send(node, sent)
            else:
                answer = await send(node, sent, kept)
        except Exception as e:
            self.deltas.failed(reporter)
            log.warn("LNM {lnm}: status report failed ({error}); next one in {interval} s",
                     lnm=self.name, error=str(e) or e.__class__.__name__,
                     interval=self.report_interval)
            return
        self.deltas.acknowledged(reporter, pending, answer)
        self.reports += 1
