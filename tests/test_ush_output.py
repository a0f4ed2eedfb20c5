"""What ush prints, through the real ush against a real sandbox (controller
and LNM processes over TLS): top's views and Ctrl-C (issue 17, item 7),
results that group identical reasons and progress (item 6), and numbers
that say what they are and fit the terminal (item 9)."""

import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import termios
import time

import pytest_twisted
from twisted.internet import threads

# One small host: a 1,000-VM start partly fits.
SANDBOX_LNMS = 1


def ush_argv(system, *args):
    return [sys.executable, "-m", "usher.clients.ush", "--config",
            system.description["configs"]["ush"], *args]


def _as_a_login_shell_would():
    """In the child: the terminal as controlling terminal, and signals as a
    shell leaves them to a command it runs (nothing blocked, SIGINT default),
    whatever this test process's threads have (a thread pool's worker, say,
    started by a thread that blocks SIGINT)."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class PtyProcess:
    """ush on a pseudo-terminal (stdin, stdout and stderr), as a user runs it."""

    def __init__(self, argv, env=None):
        self.master, slave = os.openpty()
        # Its own session with the terminal as controlling terminal, so that
        # Ctrl-C typed there (\x03) is the terminal's SIGINT to ush.
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True, env=env,
            preexec_fn=_as_a_login_shell_would)
        os.close(slave)
        self.output = b""

    def read_until(self, needle, timeout=60.0, count=1):
        """Read until ``needle`` (bytes) has appeared (``count`` times);
        AssertionError if the process ends or ``timeout`` passes first (a
        bound, not a measure)."""
        deadline = time.monotonic() + timeout
        while self.output.count(needle) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {needle!r} in {self.output[-2000:]!r}"
            if not self._read(remaining):
                raise AssertionError(f"ended before {needle!r}: {self.output[-2000:]!r}")
        return self.output

    def _read(self, timeout):
        ready, _, _ = select.select([self.master], [], [], min(timeout, 1.0))
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:          # EIO: the other side is closed
            return False
        self.output += data
        return bool(data)

    def write(self, data):
        os.write(self.master, data)

    def finish(self, timeout=60.0):
        """Read to the end; -> the exit status."""
        deadline = time.monotonic() + timeout
        while self._read(max(deadline - time.monotonic(), 0.01)):
            assert time.monotonic() < deadline, self.output[-2000:]
        code = self.proc.wait(timeout=max(deadline - time.monotonic(), 1))
        os.close(self.master)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


CLEAR = b"\x1b[H\x1b[2J"


def _interrupt_top_repeatedly(argv, rounds):
    """``ush top`` on a terminal, SIGINT at a different moment of each round
    -> [(exit status, output)]."""
    results = []
    for i in range(rounds):
        term = PtyProcess(argv)
        try:
            term.read_until(CLEAR)
            # Somewhere in the refresh cycle: just after a view, while the
            # next is asked for, while it is drawn.
            time.sleep((i % 5) * 0.03)
            if i % 2:
                term.write(b"\x03")                 # Ctrl-C typed on the terminal
            else:
                term.proc.send_signal(signal.SIGINT)
            code = term.finish()
        finally:
            term.kill()
        results.append((code, term.output.decode(errors="replace")))
    return results


@pytest_twisted.ensureDeferred
async def test_ctrl_c_on_top_always_exits_130_quietly(system):
    argv = ush_argv(system, "top", "-i", "0.1")
    results = await threads.deferToThread(_interrupt_top_repeatedly, argv, 20)
    for code, output in results:
        assert code == 130, output[-1500:]
        for wrong in ("Traceback", "ReactorNotRunning", "connection lost", "outcome unknown",
                      "Error"):
            assert wrong not in output, output[-1500:]
        assert "Ctrl-C stops" in output


@pytest_twisted.ensureDeferred
async def test_json_top_with_iterations_prints_one_view_per_line(system):
    done = await system.ush("top", "-i", "0.1", "--iterations", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        view = json.loads(line)
        assert [lnm["name"] for lnm in view["lnms"]] == ["lnm1"] and "vms" in view


def _interactive(argv, script):
    """The interactive ush on a terminal: for each step of ``script`` type
    its first item (None: nothing) and wait for the others (bytes, or
    (bytes, count)) to appear after it, counting nothing printed before;
    then quit. -> (exit status, output)."""
    term = PtyProcess(argv)
    try:
        term.read_until(b"ush> ")
        for send, *expected in script:
            before = term.output
            if send is not None:
                term.write(send)
            for needle in expected:
                needle, count = needle if isinstance(needle, tuple) else (needle, 1)
                term.read_until(needle, count=before.count(needle) + count)
        term.write(b"quit\r")
        return term.finish(), term.output.decode(errors="replace")
    finally:
        term.kill()


CONNECT = (b"connect\r", b"Connected")
TOP_AT_THE_PROMPT = [
    CONNECT,
    # It refreshes on its own while the prompt waits (three views) ...
    (b"top -i 0.1\r", b"Enter or Ctrl-C gives the prompt back", (CLEAR, 3)),
    # ... until Enter gives the prompt back,
    (b"\r", b"top stopped after"),
    # or Ctrl-C at the prompt (the terminal's SIGINT).
    (b"top -i 0.1\r", b"Command 2 result pending", b"Enter or Ctrl-C"),
    (b"\x03", b"Command 2 result:"),
]


@pytest_twisted.ensureDeferred
async def test_top_is_live_at_the_prompt_until_enter_or_ctrl_c(system):
    code, output = await threads.deferToThread(_interactive, ush_argv(system),
                                               TOP_AT_THE_PROMPT)
    assert code == 0, output[-2000:]
    assert "top stopped after" in output and "Traceback" not in output


# --- item 6: results that sum up, -v, progress ----------------------------------------------

def _start_on_a_terminal(argv):
    term = PtyProcess(argv)
    try:
        code = term.finish()
    finally:
        term.kill()
    return code, term.output.decode(errors="replace")


@pytest_twisted.ensureDeferred
async def test_a_1000_vm_start_that_partly_fits_prints_a_handful_of_lines(system):
    # One host of 32768 MiB: 128 VMs of 256 MiB fit (before any other test's).
    before = len(json.loads((await system.ush("list")).stdout))
    fit = 128 - before
    code, output = await threads.deferToThread(
        _start_on_a_terminal, ush_argv(system, "start", "-n", "big", "-c", "1000"))
    assert code == 1, output
    result = output.index(f"Controller started {fit} VMs")
    # Progress (when changes came before the result) was one line, redrawn
    # in place and erased before the result: nothing of it after.
    assert "\x1b[K" not in output[result:]
    for line in output[:result].split("\r\x1b[K"):
        assert line == "" or line.startswith("start: "), output[:result]
    lines = output[result:].splitlines()
    assert len(lines) == 3, output
    assert lines[0].endswith(f": [1-{fit}].big ({fit} on lnm1)")
    assert lines[1].startswith(f"Could not start {1000 - fit} VMs ([{fit + 1}-1000].big): no "
                               "LNM can start it (256 MiB and 1 vCPU): lnm1: memory: needs "
                               "256 MiB")
    assert lines[2] == "(-v lists each VM)"


@pytest_twisted.ensureDeferred
async def test_results_sum_up_off_a_terminal_and_verbose_lists_each_vm(system):
    done = await system.ush("start", "-n", "more", "-c", "1000", json_output=False)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) <= 3 and lines[-1] == "(-v lists each VM)", done.stdout
    assert "VMs ([" in done.stdout and "-1000].more): no LNM can start it" in done.stdout
    assert "\r" not in done.stdout and done.stderr == ""       # no progress off a terminal
    # The first test's VMs (whatever runs of them).
    mine = json.loads((await system.ush("list", "-n", "big")).stdout)
    # -v lists each VM; --json has every VM, whatever the text does.
    done = await system.ush("start", "-v", "-n", "more", "-c", "20", json_output=False)
    assert len(done.stdout.splitlines()) == 21 and "Could not start 20 VMs:" in done.stdout
    done = await system.ush("start", "-n", "more", "-c", "20")
    assert len(json.loads(done.stdout)) == 20 and done.returncode == 1
    if len(mine) > 10:
        done = await system.ush("pause", "-v", "-n", "big", json_output=False)
        assert done.returncode == 0 and len(done.stdout.splitlines()) == len(mine) + 1
        done = await system.ush("resume", "-n", "big", json_output=False)
        assert done.stdout.splitlines()[-1] == "(-v lists each VM)"
        assert len(done.stdout.splitlines()) == 2


OWN_OPERATIONS_AT_THE_PROMPT = [
    CONNECT,
    (b"pause '[1-3].big'\r", b"Command 1 result:", b"3.big.alice.usher.test -> paused"),
    (b"resume '[1-3].big'\r", b"Command 2 result:", b"3.big.alice.usher.test -> run"),
    (b"notices off\r", b"Notices are off."),
]


@pytest_twisted.ensureDeferred
async def test_own_operations_at_the_prompt_are_reported_once(system):
    code, output = await threads.deferToThread(_interactive, ush_argv(system),
                                               OWN_OPERATIONS_AT_THE_PROMPT)
    assert code == 0, output
    assert "[notice]" not in output, output        # the results say it, once


# --- item 9: numbers that say what they are, and fit the terminal ---------------------------

def _run(system, *args, columns=None):
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(ush_argv(system, *args), capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=120)


@pytest_twisted.ensureDeferred
async def test_committed_and_measured_memory_are_named_apart_and_fit_80_columns(system):
    vms = json.loads((await system.ush("list", "-a")).stdout)
    committed = sum(vm["memory_mib"] for vm in vms
                    if vm["lnm"] == "lnm1" and vm["state"] in ("run", "paused"))
    [lnm] = json.loads((await system.ush("list_lnm", "-s")).stdout)
    assert lnm["committed_memory_mib"] == committed
    measured = lnm["status"]["free_memory_mib"]
    assert isinstance(measured, int) and isinstance(lnm["status"]["age"], float)

    done = await threads.deferToThread(_run, system, "list_lnm", "-s", columns=80)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, done.stdout
    header = lines[2]
    for title in ("LNM", "memory", "committed", "measured free", "cpu% 1m", "stats age"):
        assert title in header, header
    row = lines[4]
    assert f"{committed} MiB" in row and f"{measured} MiB" in row
    assert "left out to fit 80 columns: CPUs, test, 5m, 15m" in done.stdout.replace("\n", " ")
    # Not a terminal and no COLUMNS: every column, as before.
    done = await threads.deferToThread(_run, system, "list_lnm", "-s")
    assert "left out" not in done.stdout and "unmanaged" in done.stdout.splitlines()[2]
    # The refusal counts what is committed, and says so.
    done = await system.ush("start", "one-more", json_output=False)
    assert "MiB uncommitted (VMs' configured memory commits" in done.stdout, done.stdout


@pytest_twisted.ensureDeferred
async def test_figures_of_an_lnm_that_is_gone_show_their_age_as_stale(system):
    await system.kill("lnm1")
    try:
        while True:
            [lnm] = json.loads((await system.ush("list_lnm")).stdout)
            if not lnm["connected"]:
                break
        done = await threads.deferToThread(_run, system, "list_lnm", "-s", columns=80)
        lines = done.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80, done.stdout
        assert "stale" in lines[4] and " no " in lines[4], done.stdout
        assert "(stale: figures older than 60 s or from an LNM that is not" in done.stdout
    finally:
        system.restart("lnm1")


@pytest_twisted.ensureDeferred
async def test_no_notices_starts_the_shell_with_notices_off(system):
    argv = ush_argv(system)
    argv.insert(argv.index("--config"), "--no-notices")
    code, output = await threads.deferToThread(_interactive, argv, [
        (b"notices\r", b"Notices are off."), (b"notices on\r", b"Notices are on.")])
    assert code == 0, output
