"""A site set up as the README's "Installing on real hosts" says, with the
real programs (``usher``, ``usherctrl``, ``usherlnm``, ``ush``) as commands:
a CA, the controller's certificate and configuration, an LNM from ``usher
cert bundle``, each daemon a separate process over real TLS on 127.0.0.1.

``programs`` maps a program name to the argv that runs it: the source
tree's (``SOURCE_PROGRAMS``) or an installed virtualenv's (``venv_programs``).
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from usher.sandbox import free_port

SOURCE_PROGRAMS = {
    "usher": [sys.executable, "-m", "usher.admin"],
    "usherctrl": [sys.executable, "-m", "usher.controller.main"],
    "usherlnm": [sys.executable, "-m", "usher.lnm.main"],
    "ush": [sys.executable, "-m", "usher.clients.ush"],
}
# Bounds a hang (a daemon that never comes up), never a measurement.
HANG = 60


def venv_programs(bindir):
    return {name: [str(Path(bindir) / name)] for name in SOURCE_PROGRAMS}


def run(programs, name, *args, stdin=None, check=True):
    result = subprocess.run(programs[name] + list(args), capture_output=True, text=True,
                            input=stdin, timeout=HANG,
                            stdin=None if stdin is not None else subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}{result.stderr}")
    return result


class Site:
    """The controller's side in ``etc`` (its /etc/usher), state in ``var``."""

    def __init__(self, directory, programs, *, lnm_names="vmm47"):
        self.dir = Path(directory)
        self.programs = programs
        self.etc = self.dir / "etc"
        self.etc.mkdir(parents=True, exist_ok=True)
        self.client_port = free_port()
        self.lnm_port = free_port()
        self.processes = []
        run(programs, "usher", "ca", "init", "--dir", str(self.etc))
        run(programs, "usher", "cert", "issue", "--controller", "usherctrl", "--hostname",
            "localhost", "--dir", str(self.etc))
        run(programs, "usher", "user", "add", "alice", "--admin", "--password-stdin",
            "--passwd-file", str(self.etc / "passwd"), stdin="secret-pw\n")
        self.ctrl_config = self.etc / "ctrl.config"
        self.ctrl_config.write_text(textwrap.dedent(f"""\
            [ctrl]
            client_interface = 127.0.0.1
            client_port = {self.client_port}
            lnm_interface = 127.0.0.1
            lnm_port = {self.lnm_port}
            lnm_names = {lnm_names}
            ssl_key_file = {self.etc}/usherctrl_key.pem
            ssl_cert_file = {self.etc}/usherctrl_cert.pem
            ssl_ca_file = {self.etc}/ca_cert.pem
            passwd_file = {self.etc}/passwd
            state_dir = {self.dir}/var/ctrl
            """))
        self.ush_config = self.dir / "ush.config"
        fd = os.open(self.ush_config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(textwrap.dedent(f"""\
                [ush]
                controller_host = localhost
                controller_port = {self.client_port}
                ssl_ca_file = {self.etc}/ca_cert.pem
                username = alice
                password = secret-pw
                history_file = {self.dir}/ush_history
                """))

    def start(self, name, *configs):
        """Start daemon ``name`` with ``configs`` -> its Popen, once it is up
        (its --ready-file written); fails with its output if it exits."""
        ready = self.dir / f"{name}-{len(self.processes)}.ready"
        log = open(self.dir / f"{name}-{len(self.processes)}.log", "w")
        argv = self.programs[name] + ["--isolated", "--ready-file", str(ready)]
        for config in configs:
            argv += ["--config", str(config)]
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT)
        process.log_path = log.name
        self.processes.append(process)
        deadline = time.monotonic() + HANG
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} did not come up (exit {process.poll()}):\n"
                                     + Path(log.name).read_text())
            time.sleep(0.1)
        return process

    def start_controller(self):
        return self.start("usherctrl", self.ctrl_config)

    def bundle(self, name, out, *extra):
        """``usher cert bundle`` for LNM ``name`` into directory ``out``, its
        lnm.config naming the files there (``--host-dir``)."""
        return run(self.programs, "usher", "cert", "bundle", "--lnm", name, "--dir",
                   str(self.etc), "--controller-host", "localhost", "--controller-port",
                   str(self.lnm_port), "--host-dir", str(out), "--out", str(out), *extra)

    def local_settings(self, name):
        """What a test host changes besides the bundle: state and recovery
        port of its own (a second --config file)."""
        path = self.dir / f"{name}-local.config"
        path.write_text(f"[lnm]\nstate_dir = {self.dir}/var/{name}\n"
                        f"recovery_port = {free_port()}\n")
        return path

    def ush(self, *args, check=True):
        return run(self.programs, "ush", "--config", str(self.ush_config), *args, check=check)

    def wait_attached(self, name):
        """-> the list_lnm record of LNM ``name`` once it is connected."""
        deadline = time.monotonic() + HANG
        while True:
            lnms = json.loads(self.ush("--json", "list_lnm").stdout)
            mine = [lnm for lnm in lnms if lnm["name"] == name and lnm["connected"]]
            if mine:
                return mine[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"LNM {name} never attached: {lnms}")
            time.sleep(0.2)

    def stop(self):
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
