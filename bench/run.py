"""``make bench`` (``python -m bench.run``): Usher's figures at scale.

A real controller process (``usherctrl``) and a fleet of real LNMs in this
process (``usher.lnm.fleet``: each its own libvirt test host, NodeManager and
mutual-TLS link), real clients, all on 127.0.0.1, default settings. The
large profile (``--scale large``) keeps 100 LNMs here and runs the others in
``usherlnm --fleet`` processes of 500 each, as they would run on hosts of
their own. The figures, in the order they are taken (see ``bench/report.py``
for targets and the peers' figures):

1. one ``start`` of 1,000 VMs over 100 LNMs, request sent -> every VM ``run``
   in the client's cache (median of 3 such starts), and its time relative to
   1,000 raw libvirt ``createXML`` calls in one loop (same domain XML, fresh
   test hosts, median of 3); then the fleet grows to 500 LNMs and one more
   start fills it to 10,000 VMs;
2. a fresh client's connect + initial sync of the 10,000 VMs, and a ``list``
   of all of them from the controller (median of 3);
3. the controller's resident memory and CPU over an idle window, with the
   10,000 VMs, 500 LNMs and 20 clients connected (from /proc; 19 of the
   clients in a process of their own, ``bench.clients --idle``, where they
   stay through figures 6 and 5);
6. notification latency: out-of-band state changes (suspend/resume through
   the fleet hosts' own libvirt connections) at 100 per second, from the
   libvirt call to the client's change callback, p50 and p99;
5. one LNM's link falls silent (a relay stops passing bytes, nothing is
   closed): time until the client sees all its VMs ``lost``;
4. controller ``kill -9``, restart, until a client that reconnects counts all
   10,000 VMs running again;
7. 100 clients, each with VMs of its own, issuing pause/resume/list
   operations back to back for 60 s: operations per second, p99 latency,
   errors (the clients in two processes of their own, ``bench.clients``, so
   that their work does not slow the fleet).

``--quick`` runs the same harness at toy scale in seconds (the test suite
does, to keep it working); its numbers mean nothing.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback

from twisted.internet import defer, protocol, task, utils
from twisted.internet.threads import deferToThreadPool

from bench import report
from bench.proxy import CuttableProxy
from bench.system import DOMAIN, MAX_REQUEST_VMS, USER, BenchSystem, ProcessStats, sleep, wait_for
from usher import daemon, states


@dataclasses.dataclass
class Scale:
    # Which targets the table holds the figures to (bench/report.py).
    profile: str = "full"
    start_lnms: int = 100
    start_vms: int = 1000
    lnms: int = 500
    vms: int = 10000
    idle_clients: int = 20
    idle_settle: float = 10.0
    idle_window: float = 30.0
    notify_rate: float = 100.0
    notify_duration: float = 30.0
    notify_vms: int = 500
    ops_clients: int = 100
    ops_workers: int = 2
    ops_vms: int = 4
    ops_duration: float = 60.0
    repeats: int = 3
    # Figure 2's repeats (None: ``repeats``); the large profile's single
    # start of figure 1 need not make its sync and list single runs too.
    list_repeats: int = None
    # The fill's VMs per request, and the pause between requests (the large
    # profile's one fleet process must keep answering its heartbeats).
    # LNMs added at a time when the fleet grows (0: all at once); the large
    # profile's 1,500 at once starved the running LNMs' heartbeats.
    grow_batch: int = 0
    # 0: every LNM in this process's fleet (the default profile). Else only
    # LNMs 1..inprocess_lnms (whose hosts figure 6 flips through their own
    # libvirt connections) and figure 5's victim are here, and the others run
    # in ``usherlnm --fleet`` processes of fleet_process_size members each,
    # as they would run on hosts of their own: one process holding 2,000
    # LNMs starved their heartbeats while it served the fill.
    inprocess_lnms: int = 0
    fleet_process_size: int = 500
    fill_chunk: int = MAX_REQUEST_VMS
    fill_pause: float = 0.0
    # Options written into the generated files over the defaults.
    ctrl_settings: dict = dataclasses.field(default_factory=dict)
    lnm_settings: dict = dataclasses.field(default_factory=dict)
    # How long to wait for things that should take seconds.
    patience: float = 300.0


FULL = Scale()
# ``make bench SCALE=large``: the 50,000 VMs on 2,000 fleet LNMs with
# 50 idle clients, notifications at 500 changes/s. Bounded for a 2-core
# machine: one start of 5,000 VMs on 500 LNMs for figure 1 (not three; figure
# 2 stays a median of three), then
# the fleet grows to 2,000 and the rest is filled in requests of at most
# MAX_REQUEST_VMS; figure 7 runs 20 s instead of 60.
LARGE = Scale(profile="large", start_lnms=500, start_vms=5000, lnms=2000, vms=50000,
              idle_clients=50, idle_settle=15.0, idle_window=30.0, notify_rate=500.0,
              notify_duration=10.0, notify_vms=2000, ops_duration=20.0, repeats=1,
              list_repeats=3, inprocess_lnms=100, fleet_process_size=500, fill_chunk=5000, fill_pause=2.0,
              patience=600.0)
PROFILES = {"full": FULL, "large": LARGE}
QUICK = Scale(start_lnms=3, start_vms=30, lnms=5, vms=100, idle_clients=2, idle_settle=0.5,
              idle_window=1.0, notify_rate=50.0, notify_duration=1.0, notify_vms=20,
              ops_clients=4, ops_workers=1, ops_vms=2, ops_duration=2.0, repeats=2,
              ctrl_settings={"lnm_ping_interval": 0.5, "lnm_ping_timeout": 2},
              lnm_settings={"ping_interval": 0.5, "ping_timeout": 2,
                            "reconnect_initial_delay": 0.2, "reconnect_max_delay": 1},
              patience=60.0)
# The same with the large profile's layout: LNMs in fleet processes of
# their own beside the in-process ones (the test suite runs both).
QUICK_SPLIT = dataclasses.replace(QUICK, inprocess_lnms=2, fleet_process_size=2)


def full_name(short):
    return f"{short}.{USER}.{DOMAIN}"


def percentile(values, fraction):
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class Progress:
    def __init__(self, out):
        self.out = out
        self.started = time.monotonic()

    def __call__(self, text):
        print(f"[{time.monotonic() - self.started:7.1f} s] {text}", file=self.out, flush=True)


class RunWatcher:
    """Counts, from a client's change callbacks, the VMs of a set that are in
    a state (without scanning the cache at every poll)."""

    def __init__(self, client, names, state):
        self.names = set(names)
        self.state = state
        self.there = {n for n in self.names if client.vms.get(n, {}).get("state") == state}
        self.done_at = None
        self._stop = client.on_change(self._changed)
        self._check()

    def _changed(self, changed, removed):
        for record in changed:
            name = record["name"]
            if name in self.names:
                if record["state"] == self.state:
                    self.there.add(name)
                else:
                    self.there.discard(name)
        for name in removed:
            self.there.discard(name)
        self._check()

    def _check(self):
        if self.done_at is None and len(self.there) == len(self.names):
            self.done_at = time.monotonic()

    @property
    def done(self):
        return self.done_at is not None

    def close(self):
        self._stop()


class Bench:
    """One run. ``settle_heap``: tune this process's garbage collector as
    usherlnm does once its LNMs are up (a test run leaves it alone)."""

    def __init__(self, reactor, scale, directory, progress, settle_heap=True):
        self.reactor = reactor
        self.settle_heap = settle_heap
        self.scale = scale
        self.progress = progress
        self.system = BenchSystem(reactor, directory, lnms=scale.lnms,
                                  ctrl_settings=scale.ctrl_settings,
                                  lnm_settings=scale.lnm_settings)
        self.results = {}
        self.details = {}
        self.errors = {}
        self.watcher = None          # the client that watches everything
        self.relay = None
        self.idle_clients = None     # figure 3's clients (a ClientWorker)
        self.victim = f"lnm{scale.lnms}"

    # -- set-up --------------------------------------------------------------------

    async def set_up(self):
        scale = self.scale
        self.progress(f"preparing certificates and configuration for {scale.lnms} LNMs")
        self.system.prepare()
        self.system.start_controller()
        await self.system.wait_controller()
        self.progress(f"controller up (pid {self.system.controller_pid}); "
                      f"fleet of {scale.start_lnms} LNMs")
        self.system.start_fleet()
        here = scale.inprocess_lnms or scale.start_lnms
        await self.system.fleet.add(range(1, min(here, scale.start_lnms) + 1))
        # As usherlnm does once its LNMs are up (usher.daemon.settle_heap).
        if self.settle_heap:
            daemon.settle_heap()
        self.watcher = await self.system.connected_client(timeout=120)
        await self.start_fleet_processes(here + 1, scale.start_lnms)
        await self.wait_lnms(scale.start_lnms)

    async def start_fleet_processes(self, first, last):
        """LNMs ``first``..``last`` in fleet processes of their own, one
        process at a time, each attached before the next starts."""
        size = self.scale.fleet_process_size
        for start in range(first, last + 1, size):
            count = min(size, last + 1 - start)
            pid = await self.system.start_fleet_process(start, count, self.scale.patience)
            self.progress(f"fleet process {pid}: lnm{start}..lnm{start + count - 1}")
            await self.wait_lnms(start + count - 1)

    async def wait_lnms(self, count):
        async def connected():
            return sum(1 for lnm in await self.watcher.list_lnm() if lnm["connected"])
        started = time.monotonic()
        while (now := await connected()) < count:
            if time.monotonic() - started > self.scale.patience:
                raise TimeoutError(f"only {now} of {count} LNMs connected")
            await sleep(self.reactor, 0.2)
        self.progress(f"{count} LNMs attached")

    # -- figure 1 ------------------------------------------------------------------

    async def figure_start(self):
        """``repeats`` starts of ``start_vms`` VMs each (clusters burst1 ...),
        each right after as many raw ``createXML`` calls in one loop (this
        machine's speed drifts: each pair is measured under the same
        conditions); the medians are the figures."""
        scale = self.scale
        runs, raws, ratios = [], [], []
        for run in range(1, scale.repeats + 1):
            raws.append(raw_libvirt_loop(os.path.join(self.system.dir, f"raw{run}"),
                                         scale.start_vms, scale.start_lnms))
            await sleep(self.reactor, 0.5)
            cluster = f"burst{run}"
            names = [full_name(f"{i}.{cluster}") for i in range(1, scale.start_vms + 1)]
            watch = RunWatcher(self.watcher, names, states.RUN)
            started = time.monotonic()
            result = await self.watcher.start(cluster=cluster, count=scale.start_vms)
            answered = time.monotonic()
            if result["failed"]:
                raise RuntimeError(f"{len(result['failed'])} VMs failed to start: "
                                   f"{result['failed'][:3]}")
            await wait_for(self.reactor, lambda w=watch: w.done, scale.patience,
                           what="every VM run in the client's cache")
            watch.close()
            runs.append(max(answered, watch.done_at) - started)
            ratios.append(runs[-1] / raws[-1])
            self.progress(f"  start {run}: {scale.start_vms:,} VMs in {runs[-1]:.3f} s; raw "
                          f"createXML loop {raws[-1]:.3f} s ({ratios[-1]:.1f}x)")
            await sleep(self.reactor, 1.0)
        elapsed = statistics.median(runs)
        self.results["start_vms_per_s"] = scale.start_vms / elapsed
        self.results["start_vs_raw_libvirt"] = statistics.median(ratios)
        self.details.update(start_s=elapsed, start_runs_s=runs, raw_libvirt_runs_s=raws,
                            raw_libvirt_s=statistics.median(raws), start_ratios=ratios)
        self.progress(f"figure 1: {scale.start_vms:,} VMs in {elapsed:.3f} s (median of "
                      f"{len(runs)}; {scale.start_vms / elapsed:,.0f} VMs/s), "
                      f"{statistics.median(ratios):.1f}x the raw libvirt loop")

    async def grow_and_fill(self):
        scale = self.scale
        self.relay = CuttableProxy(self.reactor, "127.0.0.1", self.system.lnm_port)
        await self.relay.start()
        self.progress(f"growing the fleet to {scale.lnms} LNMs ({self.victim} through a relay)")
        fleet = self.system.fleet
        if scale.inprocess_lnms:
            await self.start_fleet_processes(scale.start_lnms + 1, scale.lnms - 1)
        numbers = [] if scale.inprocess_lnms else list(range(scale.start_lnms + 1, scale.lnms))
        batch = scale.grow_batch or len(numbers) or 1
        for first in range(0, len(numbers), batch):
            await fleet.add(numbers[first:first + batch])
            if scale.grow_batch:
                await self.wait_lnms(scale.start_lnms + first + len(numbers[first:first + batch]))
        await fleet.add([scale.lnms], overrides={"controller_port": self.relay.port})
        if self.settle_heap:
            daemon.settle_heap()
        await self.wait_lnms(scale.lnms)
        fill = scale.vms - scale.start_vms * scale.repeats
        names = [full_name(f"{i}.fill") for i in range(1, fill + 1)]
        watch = RunWatcher(self.watcher, names, states.RUN)
        started = time.monotonic()
        # In requests of at most fill_chunk (the default profile's fill is
        # one request).
        done = 0
        while done < fill:
            if done and scale.fill_pause:
                await sleep(self.reactor, scale.fill_pause)
            count = min(scale.fill_chunk, fill - done)
            result = await self.watcher.start(cluster="fill", count=count)
            if result["failed"]:
                raise RuntimeError(f"{len(result['failed'])} VMs failed to start")
            done += count
        await wait_for(self.reactor, lambda: watch.done, scale.patience,
                       what="the fill VMs running")
        watch.close()
        elapsed = watch.done_at - started
        self.details["fill_vms_per_s"] = fill / elapsed
        self.progress(f"filled: {fill:,} more VMs in {elapsed:.2f} s ({fill / elapsed:,.0f} "
                      f"VMs/s); {len(self.watcher.vms):,} VMs in all")

    # -- figure 2 ------------------------------------------------------------------

    async def figure_sync_and_list(self):
        scale = self.scale
        syncs, lists = [], []
        repeats = scale.list_repeats or scale.repeats
        for _ in range(repeats):
            client = self.system.client(timeout=120)
            started = time.monotonic()
            await client.connect()
            syncs.append(time.monotonic() - started)
            if len(client.vms) != scale.vms:
                raise RuntimeError(f"the fresh client has {len(client.vms)} VMs, "
                                   f"not {scale.vms}")
            started = time.monotonic()
            listed = await client.list(remote=True)
            lists.append(time.monotonic() - started)
            if len(listed) != scale.vms:
                raise RuntimeError(f"list returned {len(listed)} VMs, not {scale.vms}")
            await client.disconnect()
            self.system.clients.remove(client)
        self.results["sync_10k_s"] = statistics.median(syncs)
        self.results["list_10k_s"] = statistics.median(lists)
        self.details.update(sync_runs_s=syncs, list_runs_s=lists)
        self.progress(f"figure 2: connect + sync {statistics.median(syncs):.3f} s, list "
                      f"{statistics.median(lists):.3f} s (median of {repeats})")
        # The same number of domains listed on one libvirt connection, as
        # ``virsh list --all`` does (measured now, under the same load).
        # In a process of its own: creating 50,000 domains here would hold
        # the fleet's reactor (and every LNM's heartbeat) for seconds.
        out = await utils.getProcessOutput(
            sys.executable, ["-m", "bench.run", "--raw-list", str(scale.vms),
                             "--dir", os.path.join(self.system.dir, "rawlist"),
                             "--repeats", str(repeats)],
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                + [p for p in [os.environ.get("PYTHONPATH")] if p])),
            reactor=self.reactor)
        virsh = float(out.decode().strip().splitlines()[-1])
        self.results["list_vs_virsh"] = self.results["list_10k_s"] / virsh
        self.details.update(virsh_list_s=virsh)
        self.progress(f"  listAllDomains + name/state/info of {scale.vms:,} domains on one "
                      f"test:/// connection: {virsh:.3f} s; the controller's list is "
                      f"{self.results['list_vs_virsh']:.1f}x that")

    # -- figure 3 ------------------------------------------------------------------

    async def figure_idle(self):
        scale = self.scale
        # The other clients in a process of their own (they receive every
        # change pushed to them, as figures 6 and 5 go on), the watcher is
        # the last one.
        self.idle_clients = ClientWorker(self.reactor, self.system,
                                         count=scale.idle_clients - 1, idle=True)
        await self.idle_clients.ready.addTimeout(scale.patience, self.reactor)
        # The watcher is the 20th client.
        await sleep(self.reactor, scale.idle_settle)
        stats = self.system.controller_stats()
        fleet = [ProcessStats(pid) for pid in [os.getpid()] + self.system.fleet_pids()]

        def fleet_cpu():
            return sum(process.cpu_seconds() for process in fleet)
        fleet_before = fleet_cpu()
        cpu_before, at_before = stats.cpu_seconds(), time.monotonic()
        rss = [stats.rss_mb()]
        end = at_before + scale.idle_window
        while time.monotonic() < end:
            await sleep(self.reactor, min(1.0, max(0.0, end - time.monotonic())))
            rss.append(stats.rss_mb())
        cpu_after, at_after = stats.cpu_seconds(), time.monotonic()
        cpu = 100.0 * (cpu_after - cpu_before) / (at_after - at_before)
        # The fleet's own load (this process and the fleet processes: the
        # LNMs' scans, samples and heartbeats), for the record.
        self.details["fleet_idle_cpu_pct"] = 100.0 * (fleet_cpu() - fleet_before) / (
            at_after - at_before)
        self.details["fleet_processes"] = len(fleet)
        self.results["ctrl_rss_mb"] = max(rss)
        self.results["ctrl_idle_cpu_pct"] = cpu
        self.results["ctrl_rss_mb_per_1k_vms"] = max(rss) / scale.vms * 1000
        self.results["ctrl_idle_cpu_pct_per_1k_lnms"] = cpu / scale.lnms * 1000
        self.details.update(idle_window_s=at_after - at_before,
                            idle_clients=scale.idle_clients)
        self.progress(f"figure 3: RSS {max(rss):.1f} MB, CPU {cpu:.2f}% over "
                      f"{at_after - at_before:.0f} s (the fleet's process: "
                      f"{self.details['fleet_idle_cpu_pct']:.0f}%)")

    # -- figure 6 ------------------------------------------------------------------

    async def figure_notify(self):
        scale = self.scale
        fleet = self.system.fleet
        by_lnm = {}
        for record in self.watcher.vms.values():
            # Only this process's hosts can be flipped behind Usher's back.
            if (record["state"] == states.RUN and record["lnm"] != self.victim
                    and record["lnm"] in fleet.members):
                by_lnm.setdefault(record["lnm"], []).append(record["name"])
        # Spread over the hosts: one VM per LNM in turn.
        chosen = []
        while len(chosen) < scale.notify_vms and any(by_lnm.values()):
            for lnm in sorted(by_lnm):
                if by_lnm[lnm] and len(chosen) < scale.notify_vms:
                    chosen.append((lnm, by_lnm[lnm].pop()))
        pending = {}                 # (name, state) -> time of the libvirt call
        latencies = []

        def changed(records, removed):
            now = time.monotonic()
            for record in records:
                sent = pending.pop((record["name"], record["state"]), None)
                if sent is not None:
                    latencies.append(now - sent)

        stop = self.watcher.on_change(changed)
        paused = set()
        errors = []

        def flip(lnm, name, pause):
            domain = fleet.libvirt_connection(lnm).lookupByName(name)
            if pause:
                domain.suspend()
            else:
                domain.resume()

        count = int(scale.notify_rate * scale.notify_duration)
        step = [0]

        def tick():
            if step[0] >= count:
                loop.stop()
                return
            lnm, name = chosen[step[0] % len(chosen)]
            step[0] += 1
            pause = name not in paused
            target = states.PAUSED if pause else states.RUN
            (paused.add if pause else paused.discard)(name)
            pending[(name, target)] = time.monotonic()
            deferToThreadPool(self.reactor, fleet.pool, flip, lnm, name, pause).addErrback(
                lambda f: errors.append(f.getErrorMessage()))

        loop = task.LoopingCall(tick)
        loop.clock = self.reactor
        controller, here = self.system.controller_stats(), ProcessStats(os.getpid())
        cpu_before = controller.cpu_seconds(), here.cpu_seconds(), time.monotonic()
        await loop.start(1.0 / scale.notify_rate)
        await wait_for(self.reactor, lambda: not pending, 30, interval=0.05,
                       what="every change notified")
        window = time.monotonic() - cpu_before[2]
        # Who was busy meanwhile: the controller, and this process (the
        # LNMs whose hosts change, the libvirt calls, the watching client).
        self.details["notify_ctrl_cpu_pct"] = 100.0 * (controller.cpu_seconds()
                                                       - cpu_before[0]) / window
        self.details["notify_bench_cpu_pct"] = 100.0 * (here.cpu_seconds()
                                                        - cpu_before[1]) / window
        stop()
        if errors:
            raise RuntimeError(f"{len(errors)} libvirt calls failed: {errors[:3]}")
        # Leave every VM running for what follows.
        for lnm, name in chosen:
            if name in paused:
                await deferToThreadPool(self.reactor, fleet.pool, flip, lnm, name, False)
        await wait_for(self.reactor, lambda: all(
            self.watcher.vms[n]["state"] == states.RUN for _l, n in chosen), 30,
            what="the notified VMs running again")
        ms = [1000.0 * v for v in latencies]
        self.results["notify_p50_ms"] = percentile(ms, 0.50)
        self.results["notify_p99_ms"] = percentile(ms, 0.99)
        self.details.update(notify_changes=len(ms), notify_max_ms=max(ms),
                            notify_rate=scale.notify_rate)
        self.progress(f"figure 6: {len(ms)} changes at {scale.notify_rate:g}/s: p50 "
                      f"{percentile(ms, 0.5):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms, "
                      f"max {max(ms):.1f} ms (CPU: controller "
                      f"{self.details['notify_ctrl_cpu_pct']:.0f}%, this process "
                      f"{self.details['notify_bench_cpu_pct']:.0f}%)")

    # -- figure 5 ------------------------------------------------------------------

    async def figure_silent_lnm(self):
        scale = self.scale
        names = [n for n, r in self.watcher.vms.items() if r["lnm"] == self.victim]
        if not names:
            raise RuntimeError(f"{self.victim} runs no VM")
        lost = RunWatcher(self.watcher, names, states.LOST)
        started = time.monotonic()
        self.relay.cut()
        await wait_for(self.reactor, lambda: lost.done, scale.patience,
                       what=f"the VMs of {self.victim} lost")
        lost.close()
        elapsed = lost.done_at - started
        self.results["lost_detect_s"] = elapsed
        self.details["lost_vms"] = len(names)
        self.progress(f"figure 5: {len(names)} VMs of the silent {self.victim} lost after "
                      f"{elapsed:.2f} s")
        back = RunWatcher(self.watcher, names, states.RUN)
        self.relay.heal()
        await wait_for(self.reactor, lambda: back.done, scale.patience,
                       what=f"the VMs of {self.victim} back")
        back.close()
        self.progress(f"  {self.victim} back, its VMs running after "
                      f"{back.done_at - started - elapsed:.2f} s")

    # -- figure 4 ------------------------------------------------------------------

    async def figure_recovery(self):
        scale = self.scale
        # Only the counting client from here on: figure 3's are done.
        if self.idle_clients is not None:
            self.idle_clients.stop("TERM")
            await self.idle_clients.done
            self.idle_clients = None
        await self.watcher.disconnect()
        self.system.clients.remove(self.watcher)
        self.watcher = None
        fleet = [ProcessStats(pid) for pid in [os.getpid()] + self.system.fleet_pids()]
        fleet_before = sum(process.cpu_seconds() for process in fleet)
        started = time.monotonic()
        await self.system.kill_controller()
        self.system.start_controller()
        controller = self.system.controller_stats()
        counter = None
        while counter is None:
            client = self.system.client(timeout=120)
            try:
                await client.connect()
                counter = client
            except Exception:
                await client.disconnect()
                self.system.clients.remove(client)
                if time.monotonic() - started > scale.patience:
                    raise
                await sleep(self.reactor, 0.02)
        connected = time.monotonic() - started

        def all_running():
            return len(counter.vms) >= scale.vms and sum(
                1 for r in counter.vms.values() if r["state"] == states.RUN) >= scale.vms

        await wait_for(self.reactor, all_running, scale.patience, interval=0.02,
                       what="all VMs running after the restart")
        elapsed = time.monotonic() - started
        self.results["recovery_s"] = elapsed
        self.details["recovery_client_connected_s"] = connected
        # Whose CPU the recovery took (the new controller's from its start,
        # on the cores it shares with the fleet here).
        self.details["recovery_ctrl_cpu_s"] = controller.cpu_seconds()
        self.details["recovery_fleet_cpu_s"] = sum(
            process.cpu_seconds() for process in fleet) - fleet_before
        self.watcher = counter
        self.progress(f"figure 4: killed, restarted; a client counts {scale.vms:,} VMs "
                      f"running after {elapsed:.2f} s (CPU meanwhile: controller "
                      f"{self.details['recovery_ctrl_cpu_s']:.1f} s, fleet "
                      f"{self.details['recovery_fleet_cpu_s']:.1f} s)")

    # -- figure 7 ------------------------------------------------------------------

    async def figure_clients(self):
        scale = self.scale
        workers = []
        per_worker = -(-scale.ops_clients // scale.ops_workers)
        first = 1
        while first <= scale.ops_clients:
            count = min(per_worker, scale.ops_clients - first + 1)
            workers.append(ClientWorker(self.reactor, self.system, first=first, count=count,
                                        vms=scale.ops_vms, duration=scale.ops_duration))
            first += count
        try:
            await defer.gatherResults([w.ready.addTimeout(scale.patience, self.reactor)
                                       for w in workers])
            self.progress(f"{scale.ops_clients} clients with {scale.ops_vms} VMs each, in "
                          f"{len(workers)} process{'es' if len(workers) > 1 else ''}; "
                          f"operating for {scale.ops_duration:g} s")
            for worker in workers:
                worker.go()
            outcomes = await defer.gatherResults([
                w.done.addTimeout(scale.ops_duration + scale.patience, self.reactor)
                for w in workers])
        finally:
            for worker in workers:
                worker.stop()
        latencies, errors, elapsed = [], [], 0.0
        for outcome in outcomes:
            if "fatal" in outcome:
                raise RuntimeError(f"a client process failed: {outcome['fatal']}")
            latencies.extend(outcome["latencies"])
            errors.extend(outcome["errors"])
            elapsed = max(elapsed, outcome["elapsed"])
        ms = [1000.0 * v for v in latencies]
        self.results["ops_per_s"] = len(ms) / elapsed
        self.results["ops_p99_ms"] = percentile(ms, 0.99)
        self.results["ops_errors"] = len(errors)
        self.details.update(ops=len(ms), ops_p50_ms=percentile(ms, 0.5),
                            ops_error_samples=errors[:10], ops_elapsed_s=elapsed,
                            ops_client_processes=len(workers))
        self.progress(f"figure 7: {len(ms):,} operations in {elapsed:.1f} s "
                      f"({len(ms) / elapsed:,.0f}/s), p50 {percentile(ms, 0.5):.1f} ms, "
                      f"p99 {percentile(ms, 0.99):.1f} ms, {len(errors)} errors")

    # -- the whole run -----------------------------------------------------------------

    async def run(self):
        steps = [("set-up", self.set_up), ("figure 1", self.figure_start),
                 ("fill", self.grow_and_fill), ("figure 2", self.figure_sync_and_list),
                 ("figure 3", self.figure_idle), ("figure 6", self.figure_notify),
                 ("figure 5", self.figure_silent_lnm), ("figure 4", self.figure_recovery),
                 ("figure 7", self.figure_clients)]
        try:
            for what, step in steps:
                try:
                    await step()
                except Exception as e:
                    self.errors[what] = f"{e.__class__.__name__}: {e}"
                    self.progress(f"{what} FAILED: {self.errors[what]}")
                    traceback.print_exc()
                    if what in ("set-up", "fill"):
                        break   # nothing after it can be measured
        finally:
            self.progress("stopping")
            if self.idle_clients is not None:
                self.idle_clients.stop()
            if self.relay is not None:
                await self.relay.stop()
            await self.system.shutdown()


class ClientWorker(protocol.ProcessProtocol):
    """One ``bench.clients`` process: ``ready`` once its clients' VMs run,
    ``go()`` to start operating (SIGUSR1), ``done`` with its JSON outcome."""

    def __init__(self, reactor, system, *, first=1, count, vms=0, duration=0.0, idle=False):
        self.ready = defer.Deferred()
        self.done = defer.Deferred()
        self._buffer = b""
        self._stderr = b""
        argv = [sys.executable, "-m", "bench.clients", "--port", str(system.client_port),
                "--ca", os.path.join(system.pki_dir, "ca_cert.pem"), "--user", USER,
                "--domain", DOMAIN, "--first", str(first), "--count", str(count),
                "--vms", str(vms), "--duration", str(duration)] + (["--idle"] if idle else [])
        env = dict(os.environ, USHER_BENCH_PASSWORD=system.password, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(
                       [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                       + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        self.transport = reactor.spawnProcess(self, argv[0], argv, env=env)

    def outReceived(self, data):
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            line = line.strip()
            if line == b"ready" and not self.ready.called:
                self.ready.callback(None)
            elif line.startswith(b"{") and not self.done.called:
                outcome = json.loads(line)
                if "fatal" in outcome and not self.ready.called:
                    self.ready.errback(RuntimeError(outcome["fatal"]))
                self.done.callback(outcome)

    def errReceived(self, data):
        self._stderr = (self._stderr + data)[-4000:]

    def go(self):
        self.transport.signalProcess(signal.SIGUSR1)

    def processEnded(self, reason):
        why = RuntimeError(f"client process ended ({reason.getErrorMessage()}): "
                           f"{self._stderr.decode(errors='replace')[-800:]}")
        if not self.ready.called:
            self.ready.errback(why)
        if not self.done.called:
            self.done.errback(why)

    def stop(self, how="KILL"):
        try:
            self.transport.signalProcess(how)
        except Exception:
            pass


def raw_libvirt_loop(directory, count, hosts):
    """Seconds for ``count`` createXML calls in one loop over ``hosts`` fresh
    test-driver hosts, with the domain XML Usher itself builds (connections
    opened and XML built beforehand, outside the timing). Blocking: the
    reactor waits the fraction of a second it takes."""
    import libvirt

    from usher.lnm import domain_xml
    from usher.lnm.libvirt_connection import quiet_libvirt
    from usher.lnm.testhost import write_test_host

    quiet_libvirt()
    connections = []
    for number in range(hosts):
        uri = write_test_host(os.path.join(directory, f"host{number}.xml"),
                              hostname=f"raw{number}", cpus=64, memory_mib=262144,
                              model="usher-test-host")
        connections.append(libvirt.open(uri))
    xmls = []
    for i in range(count):
        spec = domain_xml.normalize_spec({
            "name": full_name(f"{i + 1}.raw"), "memory_mib": 256, "vcpus": 1,
            "owner": USER, "cluster": "raw", "args": {}})
        xmls.append(domain_xml.build_domain_xml(spec, driver="test", state_dir=directory,
                                                template=None, defaults={}))
    started = time.perf_counter()
    for i, xml in enumerate(xmls):
        connections[i % hosts].createXML(xml, 0)
    elapsed = time.perf_counter() - started
    for connection in connections:
        connection.close()
    return elapsed


def raw_libvirt_list(directory, count, repeats=1):
    """Seconds (median of ``repeats``) to list ``count`` domains on one
    test-driver connection as ``virsh list --all`` does: listAllDomains,
    then each domain's name, state and info (libvirt-python, in this
    process; the domains created beforehand, outside the timing)."""
    import libvirt

    from usher.lnm import domain_xml
    from usher.lnm.libvirt_connection import quiet_libvirt
    from usher.lnm.testhost import write_test_host

    quiet_libvirt()
    os.makedirs(directory, exist_ok=True)
    uri = write_test_host(os.path.join(directory, "host.xml"), hostname="rawlist",
                          cpus=100000, memory_mib=256 * count + 262144,
                          model="usher-test-host")
    connection = libvirt.open(uri)
    try:
        for i in range(count):
            spec = domain_xml.normalize_spec({
                "name": full_name(f"{i + 1}.rawlist"), "memory_mib": 256, "vcpus": 1,
                "owner": USER, "cluster": "rawlist", "args": {}})
            connection.createXML(domain_xml.build_domain_xml(
                spec, driver="test", state_dir=directory, template=None, defaults={}), 0)
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            rows = [(d.name(), d.state(), d.info()) for d in connection.listAllDomains(0)]
            runs.append(time.perf_counter() - started)
            if len(rows) != count:
                raise RuntimeError(f"listAllDomains returned {len(rows)}, not {count}")
        return statistics.median(runs)
    finally:
        connection.close()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="toy scale, seconds long (what the test suite runs)")
    parser.add_argument("--scale", choices=sorted(PROFILES), default="full",
                        help="full (the default: 10,000 VMs on 500 LNMs) or large "
                             "(50,000 VMs on 2,000 LNMs, 50 idle clients)")
    parser.add_argument("--json", help="where to write the results (default "
                                       "bench/results.json; bench/results-large.json for "
                                       "--scale large)")
    parser.add_argument("--dir", help="working directory (default: a temporary one, "
                                      "removed afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument("--raw-list", type=int, metavar="N", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.raw_list:
        # (bench.run's own helper process for figure 2's ratio.)
        print(raw_libvirt_list(options.dir, options.raw_list, repeats=options.repeats))
        return 0
    scale = QUICK if options.quick else PROFILES[options.scale]
    if options.json is None:
        options.json = os.path.join(os.path.dirname(__file__), "results.json"
                                    if scale.profile == "full" else "results-large.json")
    directory = options.dir or tempfile.mkdtemp(prefix="usher-bench-")
    results = run(scale, directory, out=sys.stdout)
    report.write_json(options.json, results["results"],
                      extra={"details": results["details"], "errors": results["errors"],
                             "scale": "quick" if options.quick else options.scale})
    print()
    print(report.table(results["results"], scale=dataclasses.asdict(scale),
                       errors=results["errors"], profile=scale.profile))
    print(f"\n(written to {options.json}; machine: {report.describe_machine()})")
    if not options.keep and not options.dir:
        shutil.rmtree(directory, ignore_errors=True)
    else:
        print(f"working directory kept: {directory}")
    return 1 if results["errors"] else 0


def run(scale, directory, out=sys.stdout):
    """Run the whole benchmark at ``scale`` in ``directory`` -> {"results",
    "details", "errors"}. Runs (and stops) the reactor."""
    bench = run_on_reactor(lambda reactor, progress: Bench(reactor, scale, directory, progress),
                           directory, out)
    return {"results": bench.results, "details": bench.details, "errors": bench.errors}


def run_on_reactor(make_bench, directory, out=sys.stdout):
    """Log to ``directory``/logs/fleet.log, then ``make_bench(reactor,
    progress).run()`` with the reactor running (started and stopped here)
    -> the bench object, once its run is over."""
    from twisted.internet import reactor

    os.makedirs(os.path.join(directory, "logs"), exist_ok=True)
    daemon.start_logging(os.path.join(directory, "logs", "fleet.log"), "info")
    bench = make_bench(reactor, Progress(out))

    async def main_coroutine():
        try:
            await bench.run()
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(main_coroutine()))
    reactor.run()
    return bench

if __name__ == "__main__":
    sys.exit(main())
