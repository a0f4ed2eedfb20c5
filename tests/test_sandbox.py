"""``usher sandbox`` as a user runs it: a subprocess that prints ``ready``,
serves ush and the blocking client library, and stops everything on SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest


def _children(pid):
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if "usher" in line and f"{pid}" in line]


def _wait_ready(proc, timeout=60):
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "ready" in line:
            return line
    raise AssertionError("sandbox never became ready: " + "".join(lines))


@pytest.fixture
def sandbox_process(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "usher.admin", "sandbox", "--dir",
                             str(tmp_path / "box"), "--lnms", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        yield proc, tmp_path / "box"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ush(box, *args):
    return subprocess.run([sys.executable, "-m", "usher.clients.ush", "--config",
                           str(box / "ush.config"), "--json", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_sandbox_ready_serves_and_stops_on_sigterm(sandbox_process):
    proc, box = sandbox_process
    ready = _wait_ready(proc)
    assert "ush --config" in ready
    started = json.loads(_ush(box, "start", "-n", "demo", "-c", "4").stdout)
    assert len(started) == 4 and {s["lnm"] for s in started} == {"lnm1", "lnm2"}
    listed = json.loads(_ush(box, "list").stdout)
    assert sorted(r["state"] for r in listed) == ["run"] * 4
    # The README's bare `ush`, in a new shell that has no virtualenv on PATH.
    bare = subprocess.run(["sh", "-c", f". {box}/env.sh && ush --json list -n demo"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(box)})
    assert bare.returncode == 0, bare.stderr
    assert len(json.loads(bare.stdout)) == 4
    assert f". {box}/env.sh then ush" in ready

    # The blocking client library, from a plain script.
    description = json.loads((box / "sandbox.json").read_text())
    script = textwrap.dedent(f"""
        from usher.client.blocking import BlockingClient
        with BlockingClient("127.0.0.1", {description['client_port']},
                            ca_file={description['ca_file']!r}, tls_name="localhost",
                            username={description['user']!r},
                            password={description['password']!r}) as usher:
            result = usher.pause(["1.demo"])
            print(result["done"][0]["state"], len(usher.list()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["paused", "4"], out.stderr

    pids = [int(line.split()[0]) for line in subprocess.run(
        ["pgrep", "-f", str(box)], capture_output=True, text=True).stdout.split()]
    assert len(pids) >= 3        # controller and two LNMs
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    for pid in pids:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"process {pid} outlived the sandbox")


def _files(box):
    return {path.relative_to(box): (path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(box.rglob("*"))
            if path.is_file() and path.parent.name != "logs" and "state" not in str(path)}


def test_a_second_sandbox_in_the_same_directory_refuses_and_changes_nothing(sandbox_process):
    proc, box = sandbox_process
    _wait_ready(proc)
    assert json.loads(_ush(box, "start", "-n", "keep", "-c", "2").stdout)
    before = _files(box)
    assert "ush.config" in {str(path) for path in before}
    second = subprocess.run([sys.executable, "-m", "usher.admin", "sandbox", "--dir", str(box),
                             "--lnms", "1"], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert second.returncode == 1
    assert (f"usher sandbox: a sandbox is already running in {box} (pid {proc.pid}); nothing "
            f"was changed.") in second.stderr
    assert f"kill {proc.pid}" in second.stderr and "--dir OTHER" in second.stderr
    assert _files(box) == before          # ush.config, certificates, passwd untouched
    # The first system is intact: same credentials, its VMs still listed.
    assert len(json.loads(_ush(box, "list", "-n", "keep").stdout)) == 2

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    from usher import sandbox
    sandbox.lock(box).close()             # released with its holder


def _processes_of(box):
    """-> the pids of the daemons a sandbox in ``box`` started."""
    return [int(pid) for pid in subprocess.run(
        ["pgrep", "-f", "--", f"--config {box}/"], capture_output=True, text=True).stdout.split()]


def test_the_lock_outlives_a_sandbox_killed_hard_while_its_processes_run(tmp_path):
    """kill -9 of the sandbox leaves its controller and LNM running: they
    hold the lock, so a second sandbox refuses instead of clobbering them."""
    box = tmp_path / "box"
    command = [sys.executable, "-m", "usher.admin", "sandbox", "--dir", str(box), "--lnms", "1",
               "--no-web"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, stdin=subprocess.DEVNULL)
    try:
        _wait_ready(first)
        orphans = _processes_of(box)
        assert len(orphans) == 2, orphans            # the controller and the LNM
        first.kill()
        first.wait()
        before = _files(box)
        second = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
        assert second.returncode == 1, second.stderr
        assert (f"usher sandbox: a sandbox is already running in {box} (fuser -v "
                f"{box}/sandbox.lock shows its processes' pids); nothing was changed."
                ) in second.stderr
        assert _files(box) == before
        assert _processes_of(box) == orphans         # still running, untouched
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        for pid in _processes_of(box):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    from usher import sandbox
    deadline = time.monotonic() + 30
    while True:                                      # released once they are gone
        try:
            sandbox.lock(box).close()
            break
        except sandbox.SandboxRunning:
            assert time.monotonic() < deadline, "the lock outlived the sandbox's processes"
            time.sleep(0.1)
