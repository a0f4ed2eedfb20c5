"""Helpers for end-to-end tests: a real sandbox (controller and LNMs as
separate processes over real TLS on 127.0.0.1) and real clients."""

import json
import os
import subprocess
import sys

from twisted.internet import defer, reactor, task

from usher import passwdfile, sandbox
from usher.client import UsherClient


class RunningSandbox:
    def __init__(self, directory, lnms=3, **host):
        self.description = sandbox.prepare(directory, lnms=lnms, domain="usher.test",
                                           user="alice", rounds=4, **host)
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
