"""``make bench-failover`` (``python -m bench.failover``): failover of a standby pair.

The issue's figure: the active controller killed (``kill -9``) -> the standby
serving with every VM known, at 10,000 VMs. Every part is real: a private
PostgreSQL server started here (``tests.pgserver``), two ``usherctrl``
processes of a standby pair on it (the same certificate and configuration
except their ports, state directory and ``ha_name``; default HA settings), a
fleet of 100 real LNMs in this process (``usher.lnm.fleet``) configured with
both controllers, 10,000 VMs started through the active one.

A kill is timed from the SIGKILL until a client configured with both
controllers (a fresh login each try, as ``ush`` would) lists (``remote``:
the controller's own records) all 10,000 VMs running on the new active
controller; beside it, the time until the standby became active (polled:
its login no longer refused as a standby) and the new term (the database's
``usher_leadership``). The killed controller is started again as the
standby and the next kill hits the other one: the figure is the median of
``kills`` kills, alternating. ``--quick``: the same at toy scale (the test
suite runs it); its numbers mean nothing.
"""

import dataclasses
import os
import re
import statistics
import sys
import time
import traceback

from bench import cli as bench_cli
from bench.report import describe_machine
from bench.system import USER, BenchSystem, _kill_quietly, sleep
from usher import states
from usher.client import UsherClient
from usher.errors import Standby
from usher.sandbox import LoggedProcess, free_port

TARGET_S = 10.0
NAMES = ("ctrl-a", "ctrl-b")


@dataclasses.dataclass(frozen=True)
class Scale:
    lnms: int = 100
    vms: int = 10000
    kills: int = 3
    patience: float = 300.0         # a bound on any one wait, never a measurement
    ctrl_settings: dict = dataclasses.field(default_factory=dict)
    lnm_settings: dict = dataclasses.field(default_factory=dict)


FULL = Scale()
QUICK = Scale(lnms=3, vms=30, kills=2, patience=60.0,
              ctrl_settings={"ha_check_interval": 0.2, "ha_lost_after": 2.0},
              lnm_settings={"reconnect_initial_delay": 0.2, "reconnect_max_delay": 1})


class PairSystem(BenchSystem):
    """BenchSystem with two controllers of a standby pair on ``dsn``:
    ``controllers[name]`` -> {"config", "client_port", "lnm_port", "proc"}."""

    def __init__(self, reactor, directory, *, dsn, **kwargs):
        super().__init__(reactor, directory, **kwargs)
        self.dsn = dsn
        self.pair = {}

    def prepare(self):
        self.ctrl_settings = dict(self.ctrl_settings, ha_database=self.dsn, ha_name=NAMES[0])
        super().prepare()
        with open(self.ctrl_config, encoding="utf-8") as f:
            text = f.read()
        for name in NAMES:
            if name == NAMES[0]:
                client_port, lnm_port, own = self.client_port, self.lnm_port, text
            else:
                client_port, lnm_port = free_port(), free_port()
                own = text
                for key, value in (("client_port", client_port), ("lnm_port", lnm_port),
                                   ("ha_name", name),
                                   ("state_dir", os.path.join(self.dir, f"{name}-state")),
                                   ("log_file", os.path.join(self.dir, "logs",
                                                             f"{name}.log"))):
                    own = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", own)
            path = os.path.join(self.dir, f"{name}.config")
            with open(path, "w", encoding="utf-8") as f:
                f.write(own)
            self.pair[name] = {"config": path, "client_port": client_port,
                               "lnm_port": lnm_port, "proc": None}
        lnm_entries = ", ".join(f"127.0.0.1:{c['lnm_port']}" for c in self.pair.values())
        with open(self.fleet_config, encoding="utf-8") as f:
            fleet = f.read()
        fleet = re.sub(r"(?m)^controller_host = .*$", f"controller_host = {lnm_entries}", fleet)
        with open(self.fleet_config, "w", encoding="utf-8") as f:
            f.write(fleet)

    @property
    def entries(self):
        return ", ".join(f"127.0.0.1:{c['client_port']}" for c in self.pair.values())

    def start_one(self, name):
        entry = self.pair[name]
        process = LoggedProcess(name, os.path.join(self.dir, "logs", f"{name}.out"))
        argv = [sys.executable, "-m", "usher.controller.main", "--isolated", "--config",
                entry["config"]]
        transport = self.reactor.spawnProcess(process, argv[0], argv,
                                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
        entry["proc"] = (process, transport)

    async def kill_one(self, name):
        process, transport = self.pair[name]["proc"]
        _kill_quietly(transport)
        await process.ended
        self.pair[name]["proc"] = None

    def client(self, **kwargs):
        client = UsherClient(self.reactor, self.entries, self.client_port,
                             ca_file=os.path.join(self.pki_dir, "ca_cert.pem"),
                             tls_name="localhost", username=self.user_name,
                             password=self.password, **kwargs)
        self.clients.append(client)
        return client

    user_name = USER

    async def outcome(self, name, timeout=10.0):
        """-> "active", "standby" or "unreachable" (a login to ``name`` alone)."""
        client = UsherClient(self.reactor, "127.0.0.1", self.pair[name]["client_port"],
                             ca_file=os.path.join(self.pki_dir, "ca_cert.pem"),
                             tls_name="localhost", username=self.user_name,
                             password=self.password, timeout=timeout)
        try:
            await client.connect()
            return "active"
        except Standby:
            return "standby"
        except Exception:
            return "unreachable"
        finally:
            await client.disconnect()

    async def until(self, name, wanted, timeout, interval=0.05):
        """Poll ``name``'s login until ``wanted`` -> seconds waited."""
        started = time.monotonic()
        while True:
            proc = self.pair[name]["proc"]
            if proc is None or proc[0].ended.called:
                raise RuntimeError(f"{name} exited; see {self.dir}/logs/{name}.out")
            if await self.outcome(name) == wanted:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{name} not {wanted} within {timeout:g} s")
            await sleep(self.reactor, interval)

    async def shutdown(self):
        await self.disconnect_clients()
        await self.stop_fleet()
        for name, entry in self.pair.items():
            if entry["proc"] is not None:
                process, transport = entry["proc"]
                try:
                    transport.signalProcess("TERM")
                except Exception:
                    pass
                timer = self.reactor.callLater(15, lambda t=transport: _kill_quietly(t))
                await process.ended
                if timer.active():
                    timer.cancel()
                entry["proc"] = None


class FailoverBench:
    """-> ``results`` (seconds, terms) and ``errors``."""

    def __init__(self, reactor, scale, directory, progress, postgres=None):
        self.reactor = reactor
        self.scale = scale
        self.dir = directory
        self.progress = progress
        self.postgres = postgres        # a started tests.pgserver.PostgresServer, or None
        self.results = {}
        self.errors = {}
        self.kills = []

    async def run(self):
        own_server = system = None
        try:
            server = self.postgres
            if server is None:
                from tests.pgserver import PostgresServer
                self.progress("starting a private PostgreSQL server")
                server = own_server = PostgresServer().start()
            self.database = f"failover_{int(time.time() * 1000) % 10 ** 9}"
            server.create_database(self.database)
            self.server = server
            dsn = f"host=127.0.0.1 port={server.port} dbname={self.database} user=usher"
            scale = self.scale
            system = PairSystem(self.reactor, os.path.join(self.dir, "pair"), dsn=dsn,
                                lnms=scale.lnms, ctrl_settings=scale.ctrl_settings,
                                lnm_settings=scale.lnm_settings, host_cpus=256,
                                host_memory=1048576)
            self._system = system
            await self._measure(system)
        except Exception as e:
            self.errors["failover bench"] = f"{e.__class__.__name__}: {e}"
            self.progress(f"FAILED: {self.errors['failover bench']}")
            traceback.print_exc()
        finally:
            if system is not None:
                await system.shutdown()
            if own_server is not None:
                own_server.destroy()

    def leadership(self):
        out = self.server.psql(self.database,
                               "SELECT term, holder FROM usher_leadership").strip()
        term, holder = out.split("|")
        return int(term), holder

    async def _measure(self, system):
        scale = self.scale
        system.prepare()
        active, standby = NAMES
        system.start_one(active)
        await system.until(active, "active", scale.patience)
        system.start_one(standby)
        await system.until(standby, "standby", scale.patience)
        self.progress(f"{active} active (term {self.leadership()[0]}), {standby} standby")
        system.start_fleet()
        await system.fleet.add(range(1, scale.lnms + 1))
        client = await system.connected_client(timeout=scale.patience)
        started = time.monotonic()
        while sum(1 for lnm in await client.list_lnm() if lnm["connected"]) < scale.lnms:
            if time.monotonic() - started > scale.patience:
                raise TimeoutError("the fleet did not attach")
            await sleep(self.reactor, 0.2)
        self.progress(f"{scale.lnms} LNMs attached; starting {scale.vms:,} VMs")
        result = await client.start(cluster="fail", count=scale.vms)
        if result["failed"]:
            raise RuntimeError(f"{len(result['failed'])} VMs failed to start: "
                               f"{result['failed'][:3]}")
        await self._all_running(timeout=scale.patience)
        self.progress(f"{scale.vms:,} VMs running")
        await system.disconnect_clients()
        for number in range(1, scale.kills + 1):
            term_before = self.leadership()[0]
            killed = time.monotonic()
            await system.kill_one(active)
            await system.until(standby, "active", scale.patience, interval=0.02)
            became_s = time.monotonic() - killed
            serving_s = await self._all_running(since=killed, timeout=scale.patience)
            term, holder = self.leadership()
            if holder != standby or term <= term_before:
                raise RuntimeError(f"after the kill: term {term} held by {holder}")
            self.kills.append({"killed": active, "new_active": standby, "term": term,
                               "active_s": became_s, "serving_s": serving_s})
            self.progress(f"  kill {number}: {active} killed; {standby} active after "
                          f"{became_s:.2f} s (term {term}), every VM listed running after "
                          f"{serving_s:.2f} s")
            if number < scale.kills:
                system.start_one(active)
                await system.until(active, "standby", scale.patience)
                active, standby = standby, active
        serving = [k["serving_s"] for k in self.kills]
        self.results = {"vms": scale.vms, "lnms": scale.lnms, "kills": len(self.kills),
                        "serving_s": statistics.median(serving),
                        "active_s": statistics.median(k["active_s"] for k in self.kills),
                        "term": self.kills[-1]["term"], "each": self.kills,
                        "target_s": TARGET_S, "met": statistics.median(serving) <= TARGET_S}

    async def _all_running(self, since=None, timeout=300.0):
        """Until a fresh client configured with both controllers lists every
        VM running -> seconds since ``since`` (or since called)."""
        started = time.monotonic() if since is None else since
        wanted = self.scale.vms
        while True:
            client = self._system_client()
            try:
                await client.connect()
                records = await client.list(remote=True)
                names = {r["name"] for r in records if r.get("state") == states.RUN}
                if len(names) == wanted and len(records) == wanted:
                    return time.monotonic() - started
            except Exception:
                pass
            finally:
                await client.disconnect()
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"not every VM listed running within {timeout:g} s")
            await sleep(self.reactor, 0.05)

    def _system_client(self):
        system = self._system
        return UsherClient(self.reactor, system.entries, system.client_port,
                           ca_file=os.path.join(system.pki_dir, "ca_cert.pem"),
                           tls_name="localhost", username=system.user_name,
                           password=system.password, timeout=min(60.0, self.scale.patience),
                           initial_delay=0.05, max_delay=0.5)

    def summary(self):
        r = self.results
        if not r:
            return f"not measured: {self.errors}"
        machine = describe_machine()
        rows = [("machine", machine), ("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
                (f"kill -9 of the active -> every VM of {r['vms']:,} listed running "
                 f"(median of {r['kills']})", f"{r['serving_s']:.2f} s"),
                ("target", f"<= {TARGET_S:g} s"), ("met", "yes" if r["met"] else "no"),
                ("  of which: the standby active (median)", f"{r['active_s']:.2f} s"),
                ("  new term (last kill)", str(r["term"]))]
        for number, k in enumerate(r["each"], 1):
            rows.append((f"  kill {number}: {k['killed']} -> {k['new_active']} (term {k['term']})",
                         f"active {k['active_s']:.2f} s, serving {k['serving_s']:.2f} s"))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv=None):
    options = bench_cli.parser("python -m bench.failover", __doc__,
                               "VMs started before the kills (default 10000)").parse_args(argv)
    scale = QUICK if options.quick else FULL
    if options.vms:
        scale = dataclasses.replace(scale, vms=options.vms)
    return bench_cli.run(options, lambda reactor, directory, progress:
                         FailoverBench(reactor, scale, directory, progress),
                         "usher-bench-failover-")


if __name__ == "__main__":
    sys.exit(main())
