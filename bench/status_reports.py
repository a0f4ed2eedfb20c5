"""What LNM status reports cost the controller: ``python -m bench.status_reports``.

Drives the controller's real PB entry point for status reports
(``usher.controller.lnm_link.NodeReporter.remote_report_status``: the
``usher.controller.lnm_input`` checks, then ``Monitoring.report``) with the
reports of ``--lnms`` LNMs (2,000) of ``--vms`` VMs each (25), as they arrive
off the wire (the node as one JSON object, the VMs as JSON chunks), without
banana and the network. One round is one report from every LNM (one
``status_report_interval`` of the whole fleet); the figures are the median
of ``--rounds`` rounds. Nothing is asserted: it prints microseconds.

Kinds of report:

- ``full``: every VM's figures (an LNM before issue 16, the first report
  after attaching, and every ``FULL_REPORT_EVERY``-th report);
- ``delta, idle``: nothing changed, every VM named as kept;
- ``delta, N changed``: N VMs sent in full, the others kept;
- ``cycle``: the idle steady state of a delta LNM, one full report in
  ``FULL_REPORT_EVERY`` and the others idle deltas (the mean).
"""

import argparse
import inspect
import statistics
import sys
import time

from twisted.internet import task

from usher import records, states
from usher.controller.core import Controller
from usher.controller.lnm_link import NodeReporter
from usher.controller.state import LNMInfo
from usher.protocol import FIGURES

DOMAIN = "usher.bench"
try:
    from usher.lnm.monitor import FULL_REPORT_EVERY
except ImportError:          # before issue 16: every report is full
    FULL_REPORT_EVERY = 1


def _figures(seed):
    base = (seed % 97) / 10.0
    return {figure: [round(base + i, 3), round(base, 3), round(base / 2, 3)]
            for i, figure in enumerate(FIGURES)}


def build(lnms, vms):
    clock = task.Clock()
    clock.advance(100_000)
    controller = Controller(domain=DOMAIN, clock=clock)
    state = controller.state
    fleet = {}
    for i in range(lnms):
        lnm = f"lnm{i:04d}"
        state.lnms[lnm] = LNMInfo(lnm, {"cpus": 32}, handle=object())
        names = []
        for j in range(vms):
            name = f"{j}.vm{i}.user{i % 50}.{DOMAIN}"
            state.add(state.new_record(name, state=states.RUN, lnm=lnm, memory_mib=1024,
                                       vcpus=1))
            names.append(name)
        fleet[lnm] = names
    return controller, clock, fleet


def node_status(sampled_at, vms):
    node = _figures(7)
    node.update(vms=vms, cpus=32, memory_mib=262144, free_memory_mib=200000,
                sampled_at=sampled_at, sample_interval=5.0, source="libvirt")
    return node


def vm_status(name, seed, sampled_at):
    status = {"name": name}
    status.update(_figures(seed))
    status.update(state=states.RUN, sampled_at=sampled_at, source="libvirt")
    return status


class Bench:
    def __init__(self, lnms, vms):
        self.controller, self.clock, self.fleet = build(lnms, vms)
        self.reporters = {lnm: NodeReporter(self.controller, lnm) for lnm in self.fleet}
        self.vms = vms
        self.deltas = "kept" in inspect.signature(NodeReporter.remote_report_status).parameters
        self.sampled_at = 1000.0

    def wire(self, changed):
        """The arguments of one round's reports: {lnm: args}; ``changed`` None
        for full reports, else how many VMs each sends in full."""
        self.sampled_at += 15.0
        at = self.sampled_at
        reports = {}
        for n, (lnm, names) in enumerate(self.fleet.items()):
            node = records.encode_object(node_status(at, len(names)))
            if changed is None:
                reports[lnm] = (node, records.encode_chunks(
                    [vm_status(name, n + j, at) for j, name in enumerate(names)]))
            else:
                sent = [vm_status(name, n + j + int(at), at)
                        for j, name in enumerate(names[:changed])]
                reports[lnm] = (node, records.encode_chunks(sent),
                                records.encode_chunks(names[changed:]))
        return reports

    def round(self, changed):
        """-> seconds of one round of reports (the wire form made beforehand)."""
        reports = self.wire(changed)
        failures = []
        started = time.perf_counter()
        for lnm, args in reports.items():
            self.reporters[lnm].remote_report_status(*args).addErrback(failures.append)
        elapsed = time.perf_counter() - started
        if failures:
            raise SystemExit(f"a report was refused: {failures[0].getErrorMessage()}")
        self.clock.advance(15.0)
        return elapsed

    def measure(self, changed, rounds):
        """-> median µs per report over ``rounds`` rounds (after a full round,
        so that the controller holds every VM's figures)."""
        self.round(None)
        times = [self.round(changed) for _ in range(rounds)]
        return statistics.median(times) / len(self.fleet) * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lnms", type=int, default=2000)
    parser.add_argument("--vms", type=int, default=25, help="VMs per LNM")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=float, default=15.0,
                        help="status_report_interval (for the CPU share)")
    args = parser.parse_args(argv)
    print(f"building {args.lnms} LNMs x {args.vms} VMs ...", file=sys.stderr)
    bench = Bench(args.lnms, args.vms)
    kinds = [("full", None)]
    if bench.deltas:
        kinds += [("delta, idle", 0), ("delta, 1 changed", 1),
                  (f"delta, {args.vms // 5} changed", args.vms // 5)]
    else:
        print("(this controller takes full reports only)", file=sys.stderr)
    results = {}
    print(f"{args.lnms} LNMs x {args.vms} VMs, median of {args.rounds} rounds")
    cpu = f"CPU at {args.interval:g} s"
    print(f"{'report':<22} {'µs/report':>10} {'µs/VM':>8} {cpu:>14}")

    def line(label, us):
        share = us * args.lnms / (args.interval * 1e6) * 100
        print(f"{label:<22} {us:10.1f} {us / args.vms:8.2f} {share:13.2f}%")

    for label, changed in kinds:
        results[label] = bench.measure(changed, args.rounds)
        line(label, results[label])
    if bench.deltas and FULL_REPORT_EVERY > 1:
        cycle = (results["full"] + (FULL_REPORT_EVERY - 1) * results["delta, idle"]) \
            / FULL_REPORT_EVERY
        line(f"cycle (1 full in {FULL_REPORT_EVERY})", cycle)
    print("(CPU: of one core, every LNM reporting once per interval)")


if __name__ == "__main__":
    main()
