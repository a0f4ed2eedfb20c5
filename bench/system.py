"""The system under test: a real controller process (``usherctrl``) and a
fleet of real LNMs (``usher.lnm.fleet``) in the benchmark's own process,
all on 127.0.0.1 over mutual TLS, with the default settings except where
the benchmark has to say (ports, files, the size of the test hosts, and the
limits one user's 10,000 VMs would break: VMs per request and the default
per-user quotas, raised explicitly in ``BENCH_LIMITS``).
"""

import json
import os
import secrets
import signal
import sys
import time

from twisted.internet import defer, error, task

from usher import passwdfile, pki, settings
from usher.client import UsherClient
from usher.config import load_config
from usher.lnm.fleet import Fleet
from usher.sandbox import LoggedProcess, free_port

USER = "bench"
DOMAIN = "usher.bench"
# bcrypt cost of the benchmark user: logins are not what is measured, and a
# hundred clients log in at once.
BCRYPT_ROUNDS = 4
# The benchmark's one ordinary user starts every VM: no per-user quota
# (limits.config) and whole-system starts in one request.
BENCH_LIMITS = {"max_vms_per_user": 0, "max_memory_per_user": 0, "max_vcpus_per_user": 0}
MAX_REQUEST_VMS = 10000


def sleep(reactor, seconds):
    return task.deferLater(reactor, seconds, lambda: None)


async def wait_for(reactor, predicate, timeout, interval=0.01, what="condition"):
    """Poll ``predicate`` until true -> seconds waited; TimeoutError after
    ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not reached within {timeout:g} s")
        await sleep(reactor, interval)
    return time.monotonic() - started


class ProcessStats:
    """CPU time and resident memory of a process, from /proc."""

    def __init__(self, pid):
        self.pid = pid
        self.ticks = os.sysconf("SC_CLK_TCK")

    def cpu_seconds(self):
        with open(f"/proc/{self.pid}/stat") as f:
            # The command name may hold spaces: fields count from after ')'.
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.ticks   # utime + stime

    def rss_mb(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        raise RuntimeError(f"no VmRSS for process {self.pid}")


class BenchSystem:
    """Files, the controller process, the fleet and clients of one run.

    ``lnm_settings``/``ctrl_settings``: options written into the generated
    configuration files over the defaults (the quick run shortens the
    heartbeats; the full run changes nothing that is measured).
    """

    def __init__(self, reactor, directory, *, lnms, ctrl_settings=None, lnm_settings=None,
                 host_cpus=64, host_memory=262144, fleet_threads=None):
        self.reactor = reactor
        self.dir = os.path.abspath(directory)
        self.lnm_count = lnms
        self.ctrl_settings = dict(ctrl_settings or {})
        self.lnm_settings = dict(lnm_settings or {})
        self.host_cpus = host_cpus
        self.host_memory = host_memory
        self.fleet_threads = fleet_threads
        self.password = secrets.token_urlsafe(12)
        self.controller = None          # (_Process, transport)
        self.fleet = None
        self.fleet_processes = []       # [(LoggedProcess, transport)]
        self.clients = []
        self.pki_dir = os.path.join(self.dir, "pki")
        self.fleet_pki = os.path.join(self.dir, "pki", "fleet")
        self.client_port = self.lnm_port = None

    # -- files -----------------------------------------------------------------

    def prepare(self):
        """CA, certificates (controller and every fleet member), the user,
        configuration files."""
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        os.makedirs(self.fleet_pki, exist_ok=True)
        pki.init_ca(self.pki_dir, common_name="Usher bench CA", force=True)
        pki.issue_cert(self.pki_dir, "usherctrl", self.pki_dir, role=pki.ROLE_CONTROLLER,
                       hostnames=["localhost"], ips=["127.0.0.1"], force=True)
        for number in range(1, self.lnm_count + 1):
            pki.issue_cert(self.pki_dir, f"lnm{number}", self.fleet_pki, role=pki.ROLE_LNM,
                           force=True)
        passwd = os.path.join(self.dir, "passwd")
        if os.path.exists(passwd):
            os.unlink(passwd)
        passwdfile.add_user(passwd, USER, self.password, rounds=BCRYPT_ROUNDS)
        self.client_port, self.lnm_port = free_port(), free_port()
        state = os.path.join(self.dir, "ctrl-state")
        if os.path.exists(os.path.join(state, "lnms.json")):
            os.unlink(os.path.join(state, "lnms.json"))
        ca = os.path.join(self.pki_dir, "ca_cert.pem")
        ctrl = {"domain": DOMAIN, "client_interface": "127.0.0.1",
                "client_port": self.client_port, "lnm_interface": "127.0.0.1",
                "lnm_port": self.lnm_port, "lnm_names": f"lnm[1-{self.lnm_count}]",
                "ssl_key_file": os.path.join(self.pki_dir, "usherctrl_key.pem"),
                "ssl_cert_file": os.path.join(self.pki_dir, "usherctrl_cert.pem"),
                "ssl_ca_file": ca, "state_dir": state, "passwd_file": passwd,
                "log_file": os.path.join(self.dir, "logs", "usherctrl.log"),
                "max_request_vms": MAX_REQUEST_VMS}
        ctrl.update(self.ctrl_settings)
        limits = os.path.join(self.dir, "limits.config")
        _write_config(limits, None, BENCH_LIMITS)
        plugins = settings.default_plugin_registrations()
        plugins["limits"]["config"] = limits
        self.ctrl_config = os.path.join(self.dir, "ctrl.config")
        _write_config(self.ctrl_config, "ctrl", ctrl, plugins=plugins)
        lnm = {"controller_host": "127.0.0.1", "controller_port": self.lnm_port,
               "controller_tls_name": "localhost", "ssl_ca_file": ca,
               "ssl_cert_file": os.path.join(self.fleet_pki, "lnm1_cert.pem"),
               "ssl_key_file": os.path.join(self.fleet_pki, "lnm1_key.pem"),
               "state_dir": os.path.join(self.dir, "fleet-state"),
               "host_cpus": self.host_cpus, "host_memory": self.host_memory,
               "recovery_interface": "127.0.0.1"}
        lnm.update(self.lnm_settings)
        self.fleet_config = os.path.join(self.dir, "fleet.config")
        _write_config(self.fleet_config, "lnm", lnm)

    # -- the controller ------------------------------------------------------------

    def start_controller(self):
        """Spawn usherctrl -> its pid. ``wait_controller`` waits until it serves."""
        log_path = os.path.join(self.dir, "logs", "usherctrl.out")
        process = LoggedProcess("usherctrl", log_path)
        argv = [sys.executable, "-m", "usher.controller.main", "--isolated", "--config",
                self.ctrl_config]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        transport = self.reactor.spawnProcess(process, argv[0], argv, env=env)
        self.controller = (process, transport)
        return transport.pid

    @property
    def controller_pid(self):
        return self.controller[1].pid

    def controller_stats(self):
        return ProcessStats(self.controller_pid)

    async def kill_controller(self, sig=signal.SIGKILL):
        process, transport = self.controller
        try:
            transport.signalProcess("KILL" if sig == signal.SIGKILL else "TERM")
        except error.ProcessExitedAlready:
            pass
        await process.ended
        self.controller = None

    async def stop_controller(self, grace=15.0):
        if self.controller is None:
            return
        process, transport = self.controller
        try:
            transport.signalProcess("TERM")
        except error.ProcessExitedAlready:
            pass
        timer = self.reactor.callLater(grace, lambda: _kill_quietly(transport))
        await process.ended
        if timer.active():
            timer.cancel()
        self.controller = None

    # -- the fleet -----------------------------------------------------------------

    def load_fleet_config(self):
        return load_config(settings.LNM, extra_files=[self.fleet_config], isolated=True)

    def start_fleet(self):
        self.fleet = Fleet(self.load_fleet_config(), self.reactor, cert_dir=self.fleet_pki,
                           prefix="lnm", threads=self.fleet_threads)
        self.fleet.startService()
        return self.fleet

    async def stop_fleet(self):
        await self.stop_fleet_processes()
        if self.fleet is not None and self.fleet.running:
            await self.fleet.stopService()

    async def start_fleet_process(self, first, count, timeout=300.0):
        """``usherlnm --fleet count --fleet-first first`` as a process of its
        own (the large profile spreads its 2,000 LNMs over several, as they
        would be spread over hosts); -> once every member is up (its
        --ready-file written; attaching to the controller follows)."""
        index = len(self.fleet_processes) + 1
        ready = os.path.join(self.dir, f"fleet{index}.ready")
        if os.path.exists(ready):
            os.unlink(ready)
        process = LoggedProcess(f"usherlnm-fleet{index}",
                                os.path.join(self.dir, "logs", f"fleet{index}.out"))
        argv = [sys.executable, "-m", "usher.lnm.main", "--isolated", "--config",
                self.fleet_config, "--fleet", str(count), "--fleet-first", str(first),
                "--fleet-certs", self.fleet_pki, "--ready-file", ready]
        transport = self.reactor.spawnProcess(process, argv[0], argv,
                                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.fleet_processes.append((process, transport))
        started = time.monotonic()
        while not os.path.exists(ready):
            if process.ended.called:
                raise RuntimeError(f"fleet process {index} (lnm{first}..lnm{first + count - 1}) "
                                   f"exited; see {self.dir}/logs/fleet{index}.out")
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"fleet process {index}: not up within {timeout:g} s")
            await sleep(self.reactor, 0.1)
        return transport.pid

    def fleet_pids(self):
        """The fleet processes' pids (not this process's in-process fleet)."""
        return [transport.pid for process, transport in self.fleet_processes
                if not process.ended.called]

    async def stop_fleet_processes(self, grace=30.0):
        processes, self.fleet_processes = self.fleet_processes, []
        for process, transport in processes:
            if not process.ended.called:
                try:
                    transport.signalProcess("TERM")
                except error.ProcessExitedAlready:
                    pass
        for process, transport in processes:
            timer = self.reactor.callLater(grace, lambda t=transport: _kill_quietly(t))
            await process.ended
            if timer.active():
                timer.cancel()

    # -- clients ---------------------------------------------------------------------

    def client(self, **kwargs):
        client = UsherClient(self.reactor, "127.0.0.1", self.client_port,
                             ca_file=os.path.join(self.pki_dir, "ca_cert.pem"),
                             tls_name="localhost", username=USER, password=self.password,
                             **kwargs)
        self.clients.append(client)
        return client

    async def connected_client(self, **kwargs):
        client = self.client(**kwargs)
        await client.connect()
        return client

    async def wait_controller(self, timeout=60.0):
        """Until a client can log in; -> seconds waited."""
        started = time.monotonic()
        while True:
            client = UsherClient(self.reactor, "127.0.0.1", self.client_port,
                                 ca_file=os.path.join(self.pki_dir, "ca_cert.pem"),
                                 tls_name="localhost", username=USER,
                                 password=self.password, timeout=5)
            try:
                await client.connect()
                return time.monotonic() - started
            except Exception:
                if self.controller is None or self.controller[0].ended.called:
                    raise RuntimeError("the controller exited; see "
                                       f"{self.dir}/logs/usherctrl.log") from None
                if time.monotonic() - started > timeout:
                    raise
                await sleep(self.reactor, 0.05)
            finally:
                await client.disconnect()

    async def disconnect_clients(self):
        clients, self.clients = self.clients, []
        await defer.DeferredList([c.disconnect() for c in clients], consumeErrors=True)

    async def shutdown(self):
        await self.disconnect_clients()
        await self.stop_fleet()
        await self.stop_controller()

    def describe(self):
        return {"dir": self.dir, "client_port": self.client_port, "lnm_port": self.lnm_port}


def _kill_quietly(transport):
    try:
        transport.signalProcess("KILL")
    except error.ProcessExitedAlready:
        pass


def _write_config(path, section, options, plugins=None):
    """``section`` None: a plugin's file (no section); ``plugins``: a
    [[plugins]] section shaped like settings.default_plugin_registrations()."""
    lines = [f"[{section}]"] if section else []
    for key, value in options.items():
        lines.append(f"{key} = {value}")
    if plugins is not None:
        lines.append("[[plugins]]")
        for name, registration in plugins.items():
            lines.append(f"[[[{name}]]]")
            lines.extend(f"{key} = {', '.join(value) if isinstance(value, list) else value}"
                         for key, value in registration.items() if value is not None)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def dump(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
