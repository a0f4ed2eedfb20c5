"""Helpers for end-to-end tests: a real sandbox (controller and LNMs as
separate processes over real TLS on 127.0.0.1) and real clients."""

import json
import os
import subprocess
import sys

from twisted.internet import defer, reactor, task

from usher import passwdfile, sandbox
from usher.client import UsherClient


MODULES = {"usherctrl": "usher.controller.main"}


def override_settings(path, options):
    """Set ``key = value`` options in a generated (one-section) configuration
    file: replace the line of a key that is there, append the others."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    remaining = dict(options)
    if remaining.get("libvirt_uri") and "test_host" not in remaining:
        # A real hypervisor instead of the sandbox's test host.
        remaining["test_host"] = "no"
    for i, line in enumerate(lines):
        key = line.split("=", 1)[0].strip()
        if "=" in line and key in remaining:
            lines[i] = f"{key} = {remaining.pop(key)}"
    lines.extend(f"{key} = {value}" for key, value in remaining.items())
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


class RunningSandbox:
    """``settings``: {"ctrl": {option: value}, "lnm": {... for every LNM},
    "lnm2": {... for that one}} written into the generated files."""

    def __init__(self, directory, lnms=3, settings=None, **host):
        self.description = sandbox.prepare(directory, lnms=lnms, domain="usher.test",
                                           user="alice", rounds=4, **host)
        configs = self.description["configs"]
        for component, options in (settings or {}).items():
            if component == "lnm":
                for name in self.description["lnms"]:
                    override_settings(configs[name], options)
            else:
                override_settings(configs[component], options)
        self.box = sandbox.Sandbox(reactor, self.description, out=open(os.devnull, "w"))
        self.clients = []

    @property
    def dir(self):
        return self.description["dir"]

    async def start(self):
        await self.box.start(timeout=60)
        return self

    async def stop(self):
        for client in self.clients:
            await client.disconnect()
        await self.box.stop()

    def kill(self, name, signal="KILL"):
        """Signal a process of the sandbox (``usherctrl``, ``lnm1`` …) ->
        Deferred firing with its exit code once it has ended."""
        child, transport = self.box.children[name]
        transport.signalProcess(signal)
        return child.ended

    def restart(self, name):
        """Start a process of the sandbox again (after ``kill``)."""
        module = MODULES.get(name, "usher.lnm.main")
        self.box.spawn(name, module, self.description["configs"]["ctrl" if name == "usherctrl"
                                                               else name])

    def running(self, name):
        return name in self.box.children

    def add_user(self, user, password, role=None):
        passwdfile.add_user(os.path.join(self.dir, "passwd"), user, password, role=role,
                            rounds=4)

    def client(self, user=None, password=None, **kwargs):
        d = self.description
        client = UsherClient(reactor, "127.0.0.1", d["client_port"], ca_file=d["ca_file"],
                             tls_name="localhost", username=user or d["user"],
                             password=d["password"] if password is None else password,
                             timeout=30, **kwargs)
        self.clients.append(client)
        return client

    async def connected_client(self, *args, **kwargs):
        client = self.client(*args, **kwargs)
        await client.connect()
        return client

    def ush(self, *args, json_output=True, config=None, check=False):
        """Run ush one-shot in a subprocess (in a thread: the reactor keeps
        serving callbacks meanwhile) -> Deferred of CompletedProcess."""
        argv = [sys.executable, "-m", "usher.clients.ush", "--config",
                config or self.description["configs"]["ush"]]
        if json_output:
            argv.append("--json")
        argv.extend(args)

        def run():
            return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                  stdin=subprocess.DEVNULL, check=check)
        from twisted.internet import threads
        return threads.deferToThread(run)


def parse_json(completed):
    assert completed.stdout, completed.stderr
    return json.loads(completed.stdout)


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


async def wait_for(predicate, timeout=10.0, interval=0.05):
    """Poll until predicate() is true; real processes need real time."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not met within %s s" % timeout)
        await sleep(interval)


__all__ = ["RunningSandbox", "parse_json", "sleep", "wait_for", "defer"]
