"""``make bench-web`` (``python -m bench.web``): what usherweb costs.

A real controller process, a fleet of real LNMs in this process
(``bench.system``), ``vms`` VMs of one user running, and usherweb as its own
process over HTTPS (a certificate of the benchmark's CA, role gateway).
Measured, each from the HTTP client's side:

- GET /api/v1/vms?limit=5000, twice (the second after the first warmed up);
- the stream's snapshot: GET /api/v1/stream until ``snapshot-end`` with
  every record (``vms`` of them);
- the latency from a change made by another client (an UsherClient pausing
  or resuming one VM) to the ``changes`` event that shows it (the median and
  the worst of ``repeats``);
- usherweb's CPU with ``sessions`` logged-in sessions each holding an open
  stream, over ``window`` seconds idle and ``window`` seconds while another
  client changes ``change_rate`` VMs a second.

Prints the figures; ``--quick`` runs the same at toy scale (the test suite
does); its numbers mean nothing. No assertion on time.
"""

import dataclasses
import os
import statistics
import sys
import time
import traceback

from bench import cli as bench_cli
from bench import run as run_scale
from bench.run import RunWatcher, full_name
from bench.system import BenchSystem, ProcessStats, USER, sleep, wait_for
from usher import pki, states
from usher.sandbox import LoggedProcess, free_port


@dataclasses.dataclass
class WebScale:
    vms: int = 10000
    lnms: int = 200
    sessions: int = 20
    window: float = 30.0
    change_rate: float = 10.0
    repeats: int = 5
    patience: float = 600.0
    ctrl_settings: dict = dataclasses.field(default_factory=dict)
    lnm_settings: dict = dataclasses.field(default_factory=dict)


FULL = WebScale()
QUICK = WebScale(vms=40, lnms=3, sessions=2, window=1.0, change_rate=5.0, repeats=2,
                 patience=60.0, ctrl_settings=run_scale.QUICK.ctrl_settings,
                 lnm_settings=run_scale.QUICK.lnm_settings)


class WebBench:
    def __init__(self, reactor, scale, directory, progress):
        self.reactor = reactor
        self.scale = scale
        self.dir = directory
        self.progress = progress
        self.system = BenchSystem(reactor, os.path.join(directory, "system"), lnms=scale.lnms,
                                  ctrl_settings=scale.ctrl_settings,
                                  lnm_settings=scale.lnm_settings)
        self.results = {}
        self.errors = {}
        self.web = None
        self.url = None
        self.readers = []

    async def run(self):
        try:
            await self._set_up()
            await self._measure()
        except Exception as e:
            self.errors["web bench"] = f"{e.__class__.__name__}: {e}"
            self.progress(f"FAILED: {self.errors['web bench']}")
            traceback.print_exc()
        finally:
            for reader in self.readers:
                reader.close()
            await self._stop_web()
            await self.system.shutdown()

    # -- the system -----------------------------------------------------------------

    async def _set_up(self):
        scale, system = self.scale, self.system
        system.prepare()
        system.start_controller()
        await system.wait_controller()
        system.start_fleet()
        await system.fleet.add(range(1, scale.lnms + 1))
        self.client = await system.connected_client(timeout=scale.patience)

        async def connected():
            return sum(1 for lnm in await self.client.list_lnm() if lnm["connected"])
        await self._until(connected, scale.lnms, "the fleet attached")
        self.progress(f"starting {scale.vms:,} VMs on {scale.lnms} LNMs")
        names = [full_name(f"{i}.web") for i in range(1, scale.vms + 1)]
        watch = RunWatcher(self.client, names, states.RUN)
        result = await self.client.start(cluster="web", count=scale.vms, args={"memory_mib": 64})
        if result["failed"]:
            raise RuntimeError(f"{len(result['failed'])} VMs failed to start: "
                               f"{result['failed'][:3]}")
        await wait_for(self.reactor, lambda: watch.done, scale.patience, what="every VM run")
        watch.close()
        self._start_web()
        from tests.webclient import WebClient
        self.ca = os.path.join(system.pki_dir, "ca_cert.pem")
        started = time.monotonic()
        while True:
            try:
                await WebClient(self.url, self.ca).get("/api/v1/openapi.json")
                break
            except Exception:
                if time.monotonic() - started > 60:
                    raise RuntimeError("usherweb did not start; see its log") from None
                await sleep(self.reactor, 0.1)

    async def _until(self, probe, wanted, what):
        started = time.monotonic()
        while await probe() < wanted:
            if time.monotonic() - started > self.scale.patience:
                raise TimeoutError(what)
            await sleep(self.reactor, 0.2)

    def _start_web(self):
        system = self.system
        pki.issue_cert(system.pki_dir, "usherweb", system.pki_dir, role=pki.ROLE_GATEWAY,
                       hostnames=["localhost"], ips=["127.0.0.1"], force=True)
        port = free_port()
        static = os.path.join(self.dir, "static")
        os.makedirs(static, exist_ok=True)
        config = os.path.join(self.dir, "web.config")
        cert, key = (os.path.join(system.pki_dir, f"usherweb_{k}.pem") for k in ("cert", "key"))
        with open(config, "w", encoding="utf-8") as f:
            f.write(f"[web]\nport = {port}\nssl_cert_file = {cert}\nssl_key_file = {key}\n"
                    f"gateway_cert_file = {cert}\ngateway_key_file = {key}\n"
                    f"controller_host = 127.0.0.1\ncontroller_port = {system.client_port}\n"
                    f"controller_tls_name = localhost\n"
                    f"ssl_ca_file = {system.pki_dir}/ca_cert.pem\nstatic_dir = {static}\n"
                    f"call_timeout = {self.scale.patience}\n"
                    f"log_file = {self.dir}/usherweb.log\n")
        process = LoggedProcess("usherweb", os.path.join(self.dir, "usherweb.out"))
        argv = [sys.executable, "-m", "usher.clients.web", "--isolated", "--config", config]
        transport = self.reactor.spawnProcess(process, argv[0], argv, env=dict(os.environ))
        self.web = (process, transport)
        self.url = f"https://localhost:{port}"

    async def _stop_web(self):
        if self.web is None:
            return
        process, transport = self.web
        try:
            transport.signalProcess("TERM")
        except Exception:
            pass
        await process.ended
        self.web = None

    # -- the figures ------------------------------------------------------------------

    async def _login(self):
        from tests.webclient import WebClient
        client = WebClient(self.url, self.ca)
        response = await client.login(USER, self.system.password)
        if response.code != 200:
            raise RuntimeError(f"login: {response.code} {response.raw[:200]}")
        return client

    async def _measure(self):
        scale, r = self.scale, self.results
        r["vms"], r["sessions"] = scale.vms, scale.sessions
        web = await self._login()
        for attempt in (1, 2):
            started = time.monotonic()
            response = await web.get("/api/v1/vms?limit=5000")
            r[f"list_5000_s_{attempt}"] = time.monotonic() - started
            if response.code != 200 or len(response.json["vms"]) != min(5000, scale.vms):
                raise RuntimeError(f"GET /vms: {response.code} {response.raw[:200]}")
            self.progress(f"  GET /vms?limit=5000 ({attempt}): "
                          f"{r[f'list_5000_s_{attempt}']:.3f} s")

        started = time.monotonic()
        reader = await web.stream()
        self.readers.append(reader)
        records = await reader.snapshot().addTimeout(scale.patience, self.reactor)
        r["snapshot_s"] = time.monotonic() - started
        r["snapshot_bytes"] = reader.bytes
        if len(records) != scale.vms:
            raise RuntimeError(f"snapshot of {len(records)} records, not {scale.vms}")
        self.progress(f"  stream snapshot of {len(records):,} records: {r['snapshot_s']:.3f} s")

        latencies = []
        for i in range(scale.repeats):
            # Apart by more than stream_coalesce: each change is the first
            # of its window, as one a user makes is.
            await sleep(self.reactor, 0.3)
            name = full_name(f"{i + 1}.web")
            operation = "pause" if self.client.vms[name]["state"] == states.RUN else "resume"
            wanted = states.PAUSED if operation == "pause" else states.RUN
            seen = len(reader.events)
            waiting = reader.wait(lambda n, data, seen=seen, name=name, wanted=wanted:
                                  n == "changes" and any(
                                      rec["name"] == name and rec["state"] == wanted
                                      for rec in data["changed"]))
            started = time.monotonic()
            await self.client.op_on(operation, [name])
            await waiting
            latencies.append(time.monotonic() - started)
        r["change_latency_median_s"] = statistics.median(latencies)
        r["change_latency_max_s"] = max(latencies)
        self.progress(f"  change -> SSE event: median {r['change_latency_median_s']:.3f} s, "
                      f"worst {r['change_latency_max_s']:.3f} s")

        self.progress(f"  opening {scale.sessions} streaming sessions")
        for _ in range(scale.sessions - 1):
            other = await self._login()
            stream = await other.stream()
            self.readers.append(stream)
            await stream.snapshot().addTimeout(scale.patience, self.reactor)
        stats = ProcessStats(self.web[1].pid)
        await sleep(self.reactor, min(2.0, scale.window))
        before = stats.cpu_seconds()
        await sleep(self.reactor, scale.window)
        r["cpu_idle_pct"] = 100.0 * (stats.cpu_seconds() - before) / scale.window
        self.progress(f"  usherweb CPU, {scale.sessions} streams idle: {r['cpu_idle_pct']:.1f} %")

        before = stats.cpu_seconds()
        deadline = time.monotonic() + scale.window
        changes, i = 0, 0
        while time.monotonic() < deadline:
            name = full_name(f"{i % scale.vms + 1}.web")
            operation = "pause" if self.client.vms[name]["state"] == states.RUN else "resume"
            tick = time.monotonic()
            try:
                await self.client.op_on(operation, [name])
                changes += 1
            except Exception:
                pass
            i += 1
            await sleep(self.reactor, max(0.0, 1.0 / scale.change_rate
                                          - (time.monotonic() - tick)))
        r["cpu_busy_pct"] = 100.0 * (stats.cpu_seconds() - before) / scale.window
        r["changes_in_window"] = changes
        r["rss_mb"] = stats.rss_mb()
        self.progress(f"  usherweb CPU, {scale.sessions} streams, {changes} changes in "
                      f"{scale.window:g} s: {r['cpu_busy_pct']:.1f} %; RSS {r['rss_mb']:.0f} MB")

    def summary(self):
        r = self.results
        if "cpu_busy_pct" not in r:
            return f"not measured: {self.errors}"
        return (f"usherweb with {r['vms']:,} VMs of one user:\n"
                f"  GET /api/v1/vms?limit=5000:      {r['list_5000_s_1']:.3f} s, then "
                f"{r['list_5000_s_2']:.3f} s\n"
                f"  stream snapshot ({r['vms']:,} records, {r['snapshot_bytes'] / 1e6:.1f} MB): "
                f"{r['snapshot_s']:.3f} s\n"
                f"  change by another client -> SSE: median {r['change_latency_median_s']:.3f} s, "
                f"worst {r['change_latency_max_s']:.3f} s\n"
                f"  CPU with {r['sessions']} open streams: {r['cpu_idle_pct']:.1f} % idle, "
                f"{r['cpu_busy_pct']:.1f} % with {r['changes_in_window']} changes; "
                f"RSS {r['rss_mb']:.0f} MB")


def main(argv=None):
    options = bench_cli.parser("python -m bench.web", __doc__, "VMs (default 10000)").parse_args(argv)
    scale = QUICK if options.quick else FULL
    if options.vms:
        scale = dataclasses.replace(scale, vms=options.vms)
    return bench_cli.run(options, lambda reactor, directory, progress: WebBench(reactor, scale, directory, progress), "usher-bench-web-")

if __name__ == "__main__":
    sys.exit(main())
