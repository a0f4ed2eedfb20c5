"""The guest side of the filesystem plugin: usher-net-rc run with sh against
trees in tmp_path (NET_ROOT), and the files installed as package data."""

import os
import subprocess
from pathlib import Path

import pytest

import usher.plugins.filesystem as filesystem

GUEST = Path(filesystem.__file__).resolve().parent / "guest"
RC = GUEST / "usher-net-rc"
TREES = ("global", "cluster", "local")


def script(path, body, executable=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    os.chmod(path, 0o755 if executable else 0o644)


def logging_script(net, tree, level, name, log, status=0):
    """A script that writes 'tree/name ARG' to ``log`` and exits ``status``."""
    script(net / tree / "etc" / f"rc{level}.d" / name,
           f'echo "{tree}/{name} $1" >> "{log}"\nexit {status}\n')


def run(net, *args, shell="sh"):
    env = dict(os.environ, NET_ROOT=str(net), PATH="/usr/bin:/bin")
    return subprocess.run([shell, str(RC), *args], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def net(tmp_path):
    root = tmp_path / "net"
    for tree in TREES:
        for level in range(7):
            (root / tree / "etc" / f"rc{level}.d").mkdir(parents=True)
    return root


def lines(log):
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("shell", ["sh", "dash"])
def test_start_runs_the_s_scripts_of_global_cluster_local_in_order_each_sorted(
        net, tmp_path, shell):
    log = tmp_path / "log"
    for tree in reversed(TREES):
        for name in ("S20web", "S10db", "K10db", "README"):
            logging_script(net, tree, 3, name, log)
    logging_script(net, "global", 5, "S01other-level", log)
    result = run(net, "start", "3", shell=shell)
    assert result.returncode == 0, result.stderr
    assert lines(log) == ["global/S10db start", "global/S20web start",
                          "cluster/S10db start", "cluster/S20web start",
                          "local/S10db start", "local/S20web start"]


def test_stop_runs_the_k_scripts_in_reverse_tree_order(net, tmp_path):
    log = tmp_path / "log"
    for tree in TREES:
        for name in ("K20web", "K10db", "S10db"):
            logging_script(net, tree, 0, name, log)
    result = run(net, "stop", "0")
    assert result.returncode == 0, result.stderr
    assert lines(log) == ["local/K10db stop", "local/K20web stop",
                          "cluster/K10db stop", "cluster/K20web stop",
                          "global/K10db stop", "global/K20web stop"]


def test_a_failing_script_is_reported_and_the_others_still_run(net, tmp_path):
    log = tmp_path / "log"
    logging_script(net, "global", 2, "S10broken", log, status=3)
    logging_script(net, "cluster", 2, "S20fine", log)
    logging_script(net, "local", 2, "S30fine", log)
    result = run(net, "start", "2")
    assert result.returncode == 1
    assert f"{net}/global/etc/rc2.d/S10broken start failed (exit status 3)" in result.stderr
    assert lines(log) == ["global/S10broken start", "cluster/S20fine start",
                          "local/S30fine start"]


def test_missing_trees_non_executables_and_odd_names_are_handled(tmp_path):
    net = tmp_path / "net"
    log = tmp_path / "log"
    logging_script(net, "local", 4, "S10 with space", log)
    logging_script(net, "local", 4, "S20plain-file", log)
    os.chmod(net / "local/etc/rc4.d/S20plain-file", 0o644)
    (net / "local/etc/rc4.d/S30dir").mkdir()
    result = run(net, "start", "4")                 # no global, no cluster tree
    assert result.returncode == 0, result.stderr
    assert lines(log) == ["local/S10 with space start"]
    assert "S20plain-file: not an executable file, skipped" in result.stderr
    assert run(tmp_path / "nothing", "start", "3").returncode == 0


@pytest.mark.parametrize("answer, level", [("N 5", 5), ("unknown", 3), ("3 2", 2)])
def test_without_a_run_level_start_uses_the_current_one_or_3(net, tmp_path, answer, level):
    log = tmp_path / "log"
    for n in (2, 3, 5):
        logging_script(net, "global", n, f"S10level{n}", log)
    fake_bin = tmp_path / "bin"
    script(fake_bin / "runlevel", f'echo "{answer}"\n')
    env = dict(os.environ, NET_ROOT=str(net), PATH=f"{fake_bin}:/usr/bin:/bin")
    result = subprocess.run(["sh", str(RC), "start"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert lines(log) == [f"global/S10level{level} start"]


@pytest.mark.parametrize("args", [[], ["restart"], ["start", "9"], ["start", "3", "x"]])
def test_bad_arguments_are_refused(net, args):
    result = run(net, *args)
    assert result.returncode == 2
    assert "usage" in result.stderr or "run level" in result.stderr


def test_the_guest_files_ship_with_the_package():
    for name in ("usher-net-rc", "usher-net", "usher-net.service", "README.guest"):
        assert (GUEST / name).is_file(), name
    assert os.access(RC, os.X_OK)
    unit = (GUEST / "usher-net.service").read_text()
    assert "After=multi-user.target remote-fs.target" in unit
    assert "ExecStart=/usr/local/sbin/usher-net-rc start" in unit
    assert "ExecStop=/usr/local/sbin/usher-net-rc stop" in unit
    readme = (GUEST / "README.guest").read_text()
    assert "NAS:EXPORT_ROOT/global/$owner /net/global" in readme
    for shell_script in ("usher-net-rc", "usher-net"):
        assert subprocess.run(["sh", "-n", str(GUEST / shell_script)]).returncode == 0
    setup = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    assert '"usher.plugins.filesystem": ["guest/*"]' in setup


def test_the_readme_recipe_derives_the_trees_from_the_host_name(tmp_path):
    recipe = ('rest=$FQDN; rest=${rest%.usher.local}; owner=${rest##*.}; short=${rest%.*}\n'
              'case $short in *.*) cluster=${short#*.} ;; *) cluster=default ;; esac\n'
              'echo "$owner $cluster $short"\n')
    for fqdn, expected in [("1.sneetch.alice.usher.local", "alice sneetch 1.sneetch"),
                           ("web.1.sneetch.bob.usher.local", "bob 1.sneetch web.1.sneetch"),
                           ("solo.carol.usher.local", "carol default solo")]:
        out = subprocess.run(["sh", "-c", recipe], env={"FQDN": fqdn}, capture_output=True,
                             text=True).stdout.strip()
        assert out == expected
    readme = (GUEST / "README.guest").read_text()
    assert "owner=${rest##*.}" in readme and "short=${rest%.*}" in readme
