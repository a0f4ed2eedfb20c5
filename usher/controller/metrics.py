"""The controller's Prometheus endpoint (optional: ``metrics_port`` in [ctrl]).

One ``CollectorRegistry`` per controller (never prometheus_client's global
default registry), holding:

- the consolidated monitoring figures, read at scrape time: per LNM
  ``usher_lnm_<figure>{lnm, window}`` and per VM ``usher_vm_<figure>{vm, lnm,
  window}`` for the 1/5/15-minute averages (a figure the hypervisor does not
  report has no sample), with the LNMs' VM counts, free memory, report ages
  and the source of their figures (``usher_lnm_figures_info{source=...}``:
  "libvirt" or "simulated:<profile>");
- the controller's health: LNMs connected and known, client sessions, VMs by
  state (lost and missing among them), unmanaged VMs, status reports
  received;
- request counts by kind and outcome, request latency and plugin-chain
  latency histograms, recorded as they happen;
- the process collector (CPU, memory, file descriptors of usherctrl).

The scrape is served by Twisted: ``prometheus_client.twisted.MetricsResource``
is a WSGIResource over the global reactor and its thread pool; this builds
the same resource with the injected reactor and the controller's pool. The
WSGI app (and so every collector) runs in that pool, so the collector takes
its snapshot of the controller's state on the reactor thread
(``blockingCallFromThread``) and formats it in the pool thread.
"""

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.process_collector import ProcessCollector
from twisted.internet import threads
from twisted.python import threadable
from twisted.web.resource import Resource
from twisted.web.wsgi import WSGIResource

from usher import states
from usher.controller.monitoring import WINDOW_MINUTES
from usher.protocol import AVERAGE_WINDOWS, FIGURES

MIB = 1024 * 1024
# figure -> (metric suffix, help, scale to the metric's unit)
FIGURE_METRICS = {
    "cpu": ("cpu_percent", "CPU utilisation in percent ({what})", 1.0),
    "net_rx": ("network_receive_bytes_per_second", "network bytes received per second", 1.0),
    "net_tx": ("network_transmit_bytes_per_second", "network bytes sent per second", 1.0),
    "disk_read": ("disk_read_bytes_per_second", "disk bytes read per second", 1.0),
    "disk_write": ("disk_write_bytes_per_second", "disk bytes written per second", 1.0),
    "memory_used": ("memory_used_bytes", "memory in use in bytes", float(MIB)),
}
_CPU_OF = {"lnm": "of the whole host", "vm": "of one host CPU"}
WINDOW_LABELS = tuple(f"{m}m" for m in WINDOW_MINUTES)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CHAIN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 10)


class ControllerMetrics:
    """The controller's registry and its instruments.

    ``install()`` makes the controller report requests and plugin chains
    here; ``resource()`` is the Twisted resource serving ``/metrics``.
    ``per_vm`` exports every VM's figures too (18 series per VM).
    """

    def __init__(self, controller, *, reactor, pool, per_vm=True):
        self.controller = controller
        self.reactor = reactor
        self.pool = pool
        self.per_vm = per_vm
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "usher_requests", "Client requests by kind and outcome (ok, partial, "
            "rejected, denied, invalid, error)", ["kind", "outcome"], registry=self.registry)
        self.request_seconds = Histogram(
            "usher_request_duration_seconds", "Time to answer a client request",
            ["kind"], buckets=REQUEST_BUCKETS, registry=self.registry)
        self.chain_seconds = Histogram(
            "usher_plugin_chain_duration_seconds", "Time a plugin event chain took",
            ["event", "outcome"], buckets=CHAIN_BUCKETS, registry=self.registry)
        ProcessCollector(namespace="usherctrl", registry=self.registry)
        self.registry.register(_ControllerCollector(self))

    # -- instruments (the controller calls these on the reactor thread) ---------

    def install(self):
        self.controller.instruments = self
        self.controller.chains.observer = self.chain

    def request(self, kind, outcome, seconds):
        self.requests.labels(kind, outcome).inc()
        self.request_seconds.labels(kind).observe(max(seconds, 0.0))

    def chain(self, event, outcome, seconds):
        self.chain_seconds.labels(event, outcome).observe(max(seconds, 0.0))

    # -- serving ------------------------------------------------------------------------

    def resource(self):
        """The site's root: ``/metrics`` is the exposition (text format, or
        OpenMetrics when the scraper asks for it)."""
        root = Resource()
        root.putChild(b"metrics", WSGIResource(self.reactor, self.pool,
                                               make_wsgi_app(self.registry)))
        return root

    def on_reactor(self, function):
        """Run ``function`` on the reactor thread and return its result."""
        if threadable.isInIOThread():
            return function()
        return threads.blockingCallFromThread(self.reactor, function)

    def snapshot(self):
        """What the collector needs, taken on the reactor thread."""
        controller = self.controller
        state = controller.state
        by_state = dict.fromkeys(states.ALL_STATES, 0)
        for record in state.vms.values():
            by_state[record["state"]] = by_state.get(record["state"], 0) + 1
        lnm_entries, vm_entries = controller.monitoring.snapshot()
        return {
            "now": controller.clock.seconds(),
            "lnms": {name: info.connected for name, info in state.lnms.items()},
            "clients": controller.client_sessions,
            "vms_by_state": by_state,
            "unmanaged": len(state.unmanaged),
            "reports": controller.monitoring.reports,
            "lnm_entries": lnm_entries,
            "vm_entries": vm_entries if self.per_vm else [],
        }


class _ControllerCollector:
    """Reads the controller at scrape time (no series kept for VMs that are
    gone)."""

    def __init__(self, metrics):
        self.metrics = metrics

    def describe(self):
        return []   # collected names vary with what is reported; skip the check

    def collect(self):
        snap = self.metrics.on_reactor(self.metrics.snapshot)
        yield _gauge("usher_lnms_connected", "LNMs attached to the controller",
                     sum(1 for c in snap["lnms"].values() if c))
        yield _gauge("usher_lnms_known", "LNMs the controller knows (attached or not)",
                     len(snap["lnms"]))
        yield _gauge("usher_clients_connected", "Logged-in client sessions", snap["clients"])
        vms = GaugeMetricFamily("usher_vms", "Managed VMs by state", labels=["state"])
        for state, count in sorted(snap["vms_by_state"].items()):
            vms.add_metric([state], count)
        yield vms
        yield _gauge("usher_vms_lost", "VMs whose LNM or hypervisor stopped answering",
                     snap["vms_by_state"].get(states.LOST, 0))
        yield _gauge("usher_vms_missing", "VMs their LNM saw vanish",
                     snap["vms_by_state"].get(states.MISSING, 0))
        yield _gauge("usher_vms_unmanaged", "Domains on Usher's hosts it does not manage",
                     snap["unmanaged"])
        yield CounterMetricFamily("usher_status_reports", "Monitoring reports received "
                                  "from LNMs", value=snap["reports"])
        yield from self._lnm_families(snap)
        if self.metrics.per_vm:
            yield from _figure_families("vm", ["vm", "lnm"], (
                ([name, entry.lnm], entry) for name, entry in snap["vm_entries"]))

    def _lnm_families(self, snap):
        now = snap["now"]
        entries = snap["lnm_entries"]
        connected = GaugeMetricFamily("usher_lnm_connected", "1 while the LNM is attached",
                                      labels=["lnm"])
        for name, is_connected in sorted(snap["lnms"].items()):
            connected.add_metric([name], 1 if is_connected else 0)
        yield connected
        extras = {
            "vms": GaugeMetricFamily("usher_lnm_vms", "Active VMs on the host (last report)",
                                     labels=["lnm"]),
            "free_memory_mib": GaugeMetricFamily(
                "usher_lnm_free_memory_bytes", "Free memory on the host (last report)",
                labels=["lnm"]),
        }
        age = GaugeMetricFamily("usher_lnm_report_age_seconds",
                                "Seconds since the LNM's last monitoring report",
                                labels=["lnm"])
        info = InfoMetricFamily("usher_lnm_figures", "Where the LNM's figures come from",
                                labels=["lnm"])
        for name, entry in entries:
            extra = entry.extra or {}
            if extra.get("vms") is not None:
                extras["vms"].add_metric([name], extra["vms"])
            if extra.get("free_memory_mib") is not None:
                extras["free_memory_mib"].add_metric([name], extra["free_memory_mib"] * MIB)
            age.add_metric([name], max(now - entry.received_at, 0.0))
            info.add_metric([name], {"source": entry.source or "none"})
        yield from extras.values()
        yield age
        yield info
        yield from _figure_families("lnm", ["lnm"], (([name], e) for name, e in entries))


def _gauge(name, documentation, value):
    return GaugeMetricFamily(name, documentation, value=value)


def _figure_families(kind, labels, rows):
    """One gauge family per figure, a sample per (labels, window) where the
    figure is available."""
    width = len(AVERAGE_WINDOWS)
    families = []
    for figure in FIGURES:
        suffix, documentation, _scale = FIGURE_METRICS[figure]
        documentation = documentation.format(what=_CPU_OF[kind])
        families.append(GaugeMetricFamily(
            f"usher_{kind}_{suffix}", f"{documentation}: 1, 5 and 15-minute averages",
            labels=labels + ["window"]))
    for label_values, entry in rows:
        values = entry.values
        for index, figure in enumerate(FIGURES):
            scale = FIGURE_METRICS[figure][2]
            for offset, window in enumerate(WINDOW_LABELS):
                value = values[index * width + offset]
                if value == value:   # NaN: unavailable, no sample
                    families[index].add_metric(label_values + [window], value * scale)
    return families
