"""Issue 17, item 1, through the real ush against a real usherctrl and
usherlnm (separate processes over TLS, ``usher sandbox``): destroy powers a
VM off and keeps it, start boots it again, delete removes it (refusing one
that runs unless --force); one-shot mode never asks, the interactive shell
on a terminal (a pty) asks before a destructive operation on several VMs."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest_twisted
from twisted.internet import threads

from tests.e2e import parse_json, wait_for

SANDBOX_LNMS = 2
DOMAIN = "usher.test"


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


async def states_of(system, cluster):
    listed = parse_json(await system.ush("list", "-n", cluster))
    return {r["name"]: r["state"] for r in listed}


@pytest_twisted.ensureDeferred
async def test_one_shot_destroy_keeps_start_boots_delete_removes(system):
    started = await system.ush("start", "-n", "keep", "-c", "3")
    assert started.returncode == 0, started.stdout + started.stderr
    names = [full(f"{i}.keep") for i in (1, 2, 3)]
    # One-shot mode never asks (stdin is /dev/null): three VMs at once.
    destroyed = await system.ush("destroy", "-n", "keep")
    assert destroyed.returncode == 0, destroyed.stdout + destroyed.stderr
    assert parse_json(destroyed)["done"] == [{"name": n, "state": "shutoff"} for n in names]
    assert await states_of(system, "keep") == dict.fromkeys(names, "shutoff")
    # Still defined on its host: start boots the very same VM again.
    again = await system.ush("start", "1.keep")
    assert again.returncode == 0, again.stdout + again.stderr
    assert [s["name"] for s in parse_json(again)] == [names[0]]
    assert (await states_of(system, "keep"))[names[0]] == "run"
    # delete removes the two that are off and refuses the one that runs.
    deleted = await system.ush("delete", "-n", "keep", json_output=False)
    assert deleted.returncode == 1
    assert f"Controller deleted 2 VMs:\n{names[1]} deleted\n{names[2]} deleted" \
        in deleted.stdout
    assert (f"{names[0]}: cannot delete a VM that is run: shut it down or destroy it "
            "first, or force the delete (ush delete --force)") in deleted.stdout
    assert await states_of(system, "keep") == {names[0]: "run"}
    forced = await system.ush("delete", "--force", "1.keep")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert parse_json(forced)["done"] == [{"name": names[0], "state": None}]
    assert await states_of(system, "keep") == {}


class Terminal:
    """ush's interactive shell on a pseudo-terminal, read and typed like a
    person would (blocking: use it in a thread)."""

    def __init__(self, config):
        self.master, slave = pty.openpty()
        env = dict(os.environ, TERM="dumb", COLUMNS="200")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "usher.clients.ush", "--config", config],
            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.seen = ""

    def expect(self, text, timeout=60):
        """Read until ``text`` has appeared -> everything read up to it."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"never saw {text!r}; got:\n{self.seen}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"ush ended before {text!r}; got:\n{self.seen}")
                self.seen += chunk.decode("utf-8", "replace")
        upto = self.seen.index(text) + len(text)
        before, self.seen = self.seen[:upto], self.seen[upto:]
        return before

    def type(self, line):
        os.write(self.master, line.encode() + b"\r")

    def say(self, line, until):
        """Type ``line`` and read until ``until`` -> what was read."""
        self.type(line)
        return self.expect(until)

    def close(self):
        try:
            self.type("quit")
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            os.close(self.master)


def interactive_session(config):
    term = Terminal(config)
    try:
        term.expect("ush> ")
        term.say("connect", "Connected")
        term.expect("alice:ush> ")
        term.say("start -n ask -c 3", "Controller started 3 VMs")
        term.expect("alice:ush> ")
        # Several VMs: asked first; no (the default) does nothing.
        asked = term.say("destroy -n ask", "? [y/N] ")
        assert "destroy 3 VMs of alice (1.ask, 2.ask, 3.ask)? [y/N] " in asked
        term.say("n", "destroy: cancelled")
        term.expect("alice:ush> ")
        listed = term.say("list -n ask", "alice:ush> ")
        assert "1.ask" in listed and "shutoff" not in listed
        # Yes goes ahead.
        term.say("destroy -n ask", "? [y/N] ")
        done = term.say("y", "Controller destroyed 3 VMs:")
        assert "cancelled" not in done
        term.expect("alice:ush> ")
        # One VM, or -y: no question.
        term.say("delete 1.ask", "Controller deleted 1 VM:")
        after = term.say("delete -y -n ask", "Controller deleted 2 VMs:")
        assert "[y/N]" not in after
        term.expect("alice:ush> ")
    finally:
        term.close()
    return term


@pytest_twisted.ensureDeferred
async def test_interactive_shell_asks_before_destroying_several_vms(system):
    alice = await system.connected_client()
    await threads.deferToThread(interactive_session, system.description["configs"]["ush"])
    await wait_for(lambda: not any(name.endswith(f".ask.alice.{DOMAIN}")
                                   for name in alice.vms))


def administrator_by_lnm_session(config):
    """alice, an administrator, has none of bob's VMs in her cache; by LNM
    the controller picks his: she is asked, with his VMs counted."""
    term = Terminal(config)
    try:
        term.expect("ush> ")
        term.say("connect", "Connected")
        term.expect("alice:ush> ")
        for line in ("destroy --lnm lnm1", "delete --force --lnm lnm1"):
            operation = line.split()[0]
            asked = term.say(line, "? [y/N] ")
            assert f"{operation} 3 VMs of bob (1.web, 2.web, 3.web)? [y/N] " in asked
            term.say("n", f"{operation}: cancelled")
            term.expect("alice:ush> ")
        term.say("destroy --lnm lnm1", "? [y/N] ")
        term.say("y", "Controller destroyed 3 VMs:")
        term.expect("alice:ush> ")
    finally:
        term.close()


@pytest_twisted.ensureDeferred
async def test_an_administrator_is_asked_before_destroying_others_vms_by_lnm(system):
    bob = await system.connected_client("bob", "bob-secret")
    started = await bob.start(cluster="web", count=3, lnms=["lnm1"])
    web = [full(f"{i}.web", "bob") for i in (1, 2, 3)]
    assert [s["name"] for s in started["started"]] == web, started
    await threads.deferToThread(administrator_by_lnm_session,
                                system.description["configs"]["ush"])
    # Answered no twice (nothing happened), then yes: off, and kept.
    await wait_for(lambda: all(bob.vms[n]["state"] == "shutoff" for n in web))
    assert sorted(bob.vms) == web
