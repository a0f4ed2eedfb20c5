"""``make bench-batch`` (``python -m bench.batch``): the RRC-KI batch policy
daemon on a synthetic job trace.

A real controller process (``usherctrl``) and a fleet of real LNMs
(``usher.lnm.fleet``, in this process) over mutual TLS, and a real
``usherbatchd`` process logged in as an administrator account. The trace
(seeded, so every run submits the same jobs): ``jobs`` jobs arriving at
random (exponential gaps), each asking for 1-8 vCPUs and 1-4 GiB per vCPU,
with a run time of a few seconds (accelerated) and a walltime above it. The
jobs go into the spool exactly as ``usher-batch submit`` writes them; the
benchmark plays the guests: a job's VM shuts itself off once it has run its
run time (a client shuts it down, as the job's last command would). The
power hooks are real commands recording their calls (the hosts stay
attached: in maintenance while "off").

Prints the daemon's report: vCPU and memory utilisation, mean hosts in use
and powered on, host-hours, mean wait, against one job per host for the
same jobs on the same hosts. Figures, not timed assertions; ``--quick``
(20 jobs on 3 LNMs) is what the test suite runs.
"""

import dataclasses
import os
import random
import shlex
import sys
import time
import traceback

from twisted.internet import task

from bench import cli as bench_cli
from bench.system import BenchSystem, sleep
from usher import passwdfile
from usher.client import Selection, UsherClient
from usher.clients.batchd.accounting import format_report
from usher.clients.batchd.jobs import ENDED
from usher.clients.batchd.spool import Spool
from usher.sandbox import LoggedProcess

BATCH_USER = "batchd"


@dataclasses.dataclass(frozen=True)
class Scale:
    jobs: int
    lnms: int
    mean_gap: float          # seconds between arrivals, on average
    runtime: tuple           # (shortest, longest) run time, seconds
    host_cpus: int = 16
    host_memory: int = 65536
    poll_interval: float = 0.5
    timeout: float = 900.0
    seed: int = 15


FULL = Scale(jobs=200, lnms=10, mean_gap=0.3, runtime=(4.0, 20.0))
QUICK = Scale(jobs=20, lnms=3, mean_gap=0.2, runtime=(1.0, 4.0), timeout=240.0)


def trace(scale):
    """-> [(arrival offset, vcpus, memory MiB, runtime, walltime)], seeded."""
    rng = random.Random(scale.seed)
    at, jobs = 0.0, []
    for _ in range(scale.jobs):
        at += rng.expovariate(1.0 / scale.mean_gap)
        vcpus = rng.choice((1, 1, 2, 2, 4, 4, 8))
        memory = vcpus * rng.choice((1024, 2048, 4096))
        runtime = rng.uniform(*scale.runtime)
        jobs.append((at, vcpus, memory, runtime, max(runtime * 1.5, runtime + 2)))
    return jobs


class BatchBench:
    def __init__(self, reactor, scale, directory, progress):
        self.reactor = reactor
        self.scale = scale
        self.dir = directory
        self.progress = progress
        self.results = {}
        self.errors = {}
        self.report = None
        self.runtime_of = {}     # job id -> run time
        self.shut = set()
        self.daemon = None

    async def run(self):
        system = BenchSystem(self.reactor, self.dir, lnms=self.scale.lnms,
                             host_cpus=self.scale.host_cpus, host_memory=self.scale.host_memory,
                             lnm_settings={"scan_interval": 1})
        guest = None
        try:
            system.prepare()
            password = "batch-" + os.urandom(8).hex()
            passwdfile.add_user(os.path.join(system.dir, "passwd"), BATCH_USER, password,
                                role="admin", rounds=4)
            system.start_controller()
            await system.wait_controller()
            system.start_fleet()
            await system.fleet.add(range(1, self.scale.lnms + 1))
            settings = self._write_config(system, password)
            self._start_daemon(settings)
            guest = UsherClient(self.reactor, "127.0.0.1", system.client_port,
                                ca_file=os.path.join(system.pki_dir, "ca_cert.pem"),
                                tls_name="localhost", username=BATCH_USER, password=password,
                                timeout=60)
            await guest.connect()
            guest.on_change(lambda changed, removed: self._guests(guest, changed))
            self.progress(f"submitting {self.scale.jobs} jobs")
            await self._submit_trace(settings)
            self.progress("all submitted; waiting for the jobs to end")
            await self._wait_all(settings)
            self.report = Spool(settings.queue_dir, settings.state_dir).read_status()["report"]
            self.results = {"jobs": self.scale.jobs, "lnms": self.scale.lnms,
                            "hooks": self._hook_calls(), **self.report}
        except Exception as e:
            self.errors["run"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            if guest is not None:
                await guest.disconnect()
            await self._stop_daemon()
            await system.shutdown()

    def _write_config(self, system, password):
        os.makedirs(os.path.join(self.dir, "batch"), exist_ok=True)
        password_file = os.path.join(self.dir, "batch", "password")
        with open(os.open(password_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(password + "\n")
        self.hook_log = os.path.join(self.dir, "batch", "hooks.log")

        def hook(verb):
            return shlex.join(["sh", "-c", f'echo "{verb} $0 $1" >> {shlex.quote(self.hook_log)}',
                               "{lnm}", "{hostname}"])
        options = {
            "controller_host": "127.0.0.1", "controller_port": system.client_port,
            "controller_tls_name": "localhost",
            "ssl_ca_file": os.path.join(system.pki_dir, "ca_cert.pem"),
            "username": BATCH_USER, "password_file": password_file,
            "queue_dir": os.path.join(self.dir, "batch", "queue"),
            "state_dir": os.path.join(self.dir, "batch", "state"),
            "poll_interval": self.scale.poll_interval, "idle_before_power_off": 3,
            "consolidate_min_remaining": 1, "max_migrations": 4, "stop_grace": 5,
            "power_off_command": hook("off"), "power_on_command": hook("on"),
            "power_on_after": 2, "log_file": os.path.join(self.dir, "logs", "usherbatchd.log"),
        }
        self.config = os.path.join(self.dir, "batchd.config")
        with open(self.config, "w", encoding="utf-8") as f:
            f.write("[batchd]\n" + "".join(f"{k} = {v}\n" for k, v in options.items()))
        from usher.clients.batchd.cli import load_settings
        return load_settings(self.config)

    def _start_daemon(self, settings):
        process = LoggedProcess("usherbatchd", os.path.join(self.dir, "logs", "usherbatchd.out"))
        argv = [sys.executable, "-m", "usher.clients.batchd", "--isolated", "--config",
                self.config]
        transport = self.reactor.spawnProcess(process, argv[0], argv,
                                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.daemon = (process, transport)

    async def _stop_daemon(self):
        if self.daemon is None:
            return
        process, transport = self.daemon
        if not process.ended.called:
            transport.signalProcess("TERM")
            await process.ended

    async def _submit_trace(self, settings):
        spool = Spool(settings.queue_dir)
        while not os.path.isdir(spool.new_dir):
            await sleep(self.reactor, 0.1)       # the daemon makes the spool
        started = time.monotonic()
        for at, vcpus, memory, runtime, walltime in trace(self.scale):
            delay = started + at - time.monotonic()
            if delay > 0:
                await sleep(self.reactor, delay)
            job_id = spool.submit({"vcpus": vcpus, "memory_mib": memory, "walltime": walltime},
                                  settings)
            self.runtime_of[job_id] = runtime

    def _guests(self, client, changed):
        """A job's VM, once running, shuts itself off after its run time."""
        for rec in changed:
            job_id = rec["name"].split(".", 1)[0]
            runtime = self.runtime_of.get(job_id)
            if runtime is None or rec.get("state") != "run" or job_id in self.shut:
                continue
            self.shut.add(job_id)
            d = task.deferLater(self.reactor, runtime,
                                lambda n=rec["name"]: client.shutdown(Selection(names=[n])))
            d.addErrback(lambda f: None)      # already stopped at its walltime

    async def _wait_all(self, settings):
        spool = Spool(settings.queue_dir, settings.state_dir)
        deadline = time.monotonic() + self.scale.timeout
        while True:
            status = spool.read_status()
            if status is not None:
                states = [j["state"] for j in status["jobs"]]
                done = sum(1 for s in states if s in ENDED)
                if len(states) == self.scale.jobs and done == self.scale.jobs:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs not all ended within {self.scale.timeout:g} s")
            if self.daemon[0].ended.called:
                raise RuntimeError(f"usherbatchd exited; see {self.dir}/logs/usherbatchd.log")
            await sleep(self.reactor, 0.5)

    def _hook_calls(self):
        try:
            with open(self.hook_log, encoding="utf-8") as f:
                lines = f.read().split()
        except FileNotFoundError:
            return {"off": 0, "on": 0}
        return {"off": lines.count("off"), "on": lines.count("on")}

    def summary(self):
        if not self.results:
            return f"not measured: {self.errors}"
        r = self.results
        return (f"usherbatchd: {r['jobs']} jobs on {r['lnms']} LNMs "
                f"(power hooks: {r['hooks']['off']} off, {r['hooks']['on']} on)\n"
                + format_report(self.report))


def main(argv=None):
    options = bench_cli.parser("python -m bench.batch", __doc__,
                               "jobs in the trace (default 200)").parse_args(argv)
    scale = QUICK if options.quick else FULL
    if options.vms:
        scale = dataclasses.replace(scale, jobs=options.vms)
    return bench_cli.run(options, lambda reactor, directory, progress:
                         BatchBench(reactor, scale, directory, progress), "usher-bench-batch-")


if __name__ == "__main__":
    sys.exit(main())
