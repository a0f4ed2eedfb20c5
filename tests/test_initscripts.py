"""initscripts/: the SysV init scripts run for real with sh against a stand-in
daemon, the systemd units, and install.sh under a temporary prefix."""

import configparser
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INITSCRIPTS = REPO / "initscripts"
SAMPLES = REPO / "etc"
DAEMONS = ("usherctrl", "usherlnm", "plusher")
# Each program's install.sh component, which is also its configuration's name.
COMPONENT = {"usherctrl": "ctrl", "usherlnm": "lnm", "plusher": "plusher"}
SCRIPT_TIMEOUT = 20  # seconds before a hung script fails the test

# Behaves like the daemons' contract: foreground, --isolated --config FILE
# (which must exist), --ready-file FILE written once up and removed at exit,
# stops cleanly on SIGTERM. Extra flags misbehave on purpose. "ready" is
# printed once the SIGTERM handler is in place.
FAKE_DAEMON = f"""#!{sys.executable}
import argparse, os, signal, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("--config", action="append", default=[])
parser.add_argument("--isolated", action="store_true")
parser.add_argument("--ready-file")
parser.add_argument("--ignore-term", action="store_true")
parser.add_argument("--exit-now", type=int, default=None)
parser.add_argument("--exit-later", type=int, default=None)
parser.add_argument("--never-ready", action="store_true")
options = parser.parse_args()
print("argv", " ".join(sys.argv[1:]), flush=True)
if options.exit_now is not None:
    print("exiting at once with", options.exit_now, flush=True)
    sys.exit(options.exit_now)
for path in options.config:
    if not os.path.exists(path):
        print("configuration error:", path, "is missing", flush=True)
        sys.exit(2)
if options.exit_later is not None:
    time.sleep(1.5)
    print("could not start, exiting with", options.exit_later, flush=True)
    sys.exit(options.exit_later)
def on_term(signum, frame):
    if options.ignore_term:
        print("ignoring SIGTERM", flush=True)
        return
    print("stopping on SIGTERM", flush=True)
    if options.ready_file and os.path.exists(options.ready_file):
        os.unlink(options.ready_file)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready pid", os.getpid(), flush=True)
if options.ready_file and not options.never_ready:
    with open(options.ready_file + ".tmp", "w") as f:
        f.write(f"{{os.getpid()}}\\n")
    os.replace(options.ready_file + ".tmp", options.ready_file)
while True:
    time.sleep(60)
"""

START_METHODS = ["nohup"] + (["start-stop-daemon"] if shutil.which("start-stop-daemon") else [])


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (nothing here may reap it)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


def write_fake_daemon(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(FAKE_DAEMON)
    path.chmod(0o755)
    return path


class InitScript:
    """One init script run with sh, its settings in a USHER_DEFAULTS_FILE."""

    def __init__(self, tmp_path: Path, name: str, start_method: str):
        self.name = name
        self.daemon = write_fake_daemon(tmp_path / "bin", name)
        self.config = tmp_path / "etc" / f"{name}.config"
        self.pidfile = tmp_path / "run" / "usher" / f"{name}.pid"
        self.logfile = tmp_path / "log" / "usher" / f"{name}.log"
        self.ready_file = Path(f"{self.pidfile}.ready")
        self.defaults_file = tmp_path / f"defaults.{name}"
        self.settings = {
            "DAEMON": str(self.daemon), "CONFIG": str(self.config),
            "PIDFILE": str(self.pidfile), "LOGFILE": str(self.logfile),
            "START_WAIT": "0.2", "START_METHOD": start_method,
        }
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(f"[{COMPONENT[name]}]\n")
        self.pids_seen: set[int] = set()

    def run(self, action: str, **settings) -> subprocess.CompletedProcess:
        merged = {**self.settings, **settings}
        self.defaults_file.write_text(
            "".join(f"{key}='{value}'\n" for key, value in merged.items()))
        env = {**os.environ, "USHER_DEFAULTS_FILE": str(self.defaults_file)}
        result = subprocess.run(["sh", str(INITSCRIPTS / self.name), action], env=env,
                                capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)
        if self.pidfile.exists() and self.pidfile.read_text().strip().isdigit():
            self.pids_seen.add(self.pid())
        return result

    def pid(self) -> int:
        return int(self.pidfile.read_text().strip())

    def log(self) -> str:
        return self.logfile.read_text() if self.logfile.exists() else ""

    def wait_ready(self, pid: int) -> None:
        """Wait until the daemon ``pid`` has installed its SIGTERM handler."""
        deadline = time.monotonic() + SCRIPT_TIMEOUT
        while f"ready pid {pid}\n" not in self.log():
            assert alive(pid), f"daemon {pid} died; log:\n{self.log()}"
            assert time.monotonic() < deadline, f"daemon {pid} never got ready"
            time.sleep(0.01)

    def start(self, **settings) -> int:
        result = self.run("start", **settings)
        assert result.returncode == 0, result.stderr
        pid = self.pid()
        # Once the daemon said it is up (its ready file), not before.
        assert f"started (pid {pid})" in result.stdout, result.stdout
        self.wait_ready(pid)
        return pid

    def kill_leftovers(self) -> None:
        for pid in self.pids_seen:
            if alive(pid) and str(self.daemon) in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(params=START_METHODS)
def ctrl_script(request, tmp_path):
    script = InitScript(tmp_path, "usherctrl", request.param)
    yield script
    script.kill_leftovers()


# The controller's script under every start method, and plusher's once.
@pytest.fixture(params=[*(("usherctrl", method) for method in START_METHODS),
                        ("plusher", "auto")], ids="-".join)
def daemon_script(request, tmp_path):
    script = InitScript(tmp_path, *request.param)
    yield script
    script.kill_leftovers()


@pytest.fixture
def lnm_script(tmp_path):
    script = InitScript(tmp_path, "usherlnm", "auto")
    yield script
    script.kill_leftovers()


# --- static checks ------------------------------------------------------------

@pytest.mark.parametrize("name", [*DAEMONS, "install.sh"])
def test_shell_syntax(name):
    result = subprocess.run(["sh", "-n", str(INITSCRIPTS / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _lsb_header(text: str) -> dict[str, str]:
    block = re.search(r"^### BEGIN INIT INFO\n(.*?)^### END INIT INFO$", text, re.M | re.S)
    assert block, "no LSB header"
    fields = {}
    for line in block.group(1).splitlines():
        match = re.match(r"# ([A-Za-z-]+):\s*(.*)$", line)
        if match:
            fields[match.group(1)] = match.group(2).strip()
    return fields


@pytest.mark.parametrize("name", DAEMONS)
def test_lsb_and_chkconfig_headers(name):
    text = (INITSCRIPTS / name).read_text()
    header = _lsb_header(text)
    assert header["Provides"] == name
    assert {"$network", "$remote_fs"} <= set(header["Required-Start"].split())
    assert header["Default-Start"] == "2 3 4 5"
    assert header["Default-Stop"] == "0 1 6"
    assert header["Short-Description"]
    assert name not in header.get("Should-Start", "").split()
    chkconfig = re.search(r"^# chkconfig: (\d+) (\d+) (\d+)$", text, re.M)
    assert chkconfig and chkconfig.group(1) == "345"
    start, stop = int(chkconfig.group(2)), int(chkconfig.group(3))
    assert start + stop == 100  # stops in the reverse order of starting
    assert re.search(r"^# description: \S", text, re.M)
    assert os.access(INITSCRIPTS / name, os.X_OK)


def test_lnm_starts_after_the_controller_and_libvirtd():
    ctrl, lnm = ((INITSCRIPTS / name).read_text() for name in ("usherctrl", "usherlnm"))
    ctrl_start = int(re.search(r"^# chkconfig: 345 (\d+)", ctrl, re.M).group(1))
    lnm_start = int(re.search(r"^# chkconfig: 345 (\d+)", lnm, re.M).group(1))
    assert ctrl_start == 85
    assert lnm_start > 97  # Red Hat's libvirtd starts at 97
    assert {"libvirtd", "usherctrl"} <= set(_lsb_header(lnm)["Should-Start"].split())


def test_plusher_starts_after_the_controller_and_stops_before_it():
    ctrl, plusher = ((INITSCRIPTS / name).read_text() for name in ("usherctrl", "plusher"))

    def start_and_stop(text):
        return map(int, re.search(r"^# chkconfig: 345 (\d+) (\d+)$", text, re.M).groups())
    ctrl_start, ctrl_stop = start_and_stop(ctrl)
    start, stop = start_and_stop(plusher)
    assert start > ctrl_start and stop < ctrl_stop
    header = _lsb_header(plusher)
    assert "usherctrl" in header["Should-Start"].split()
    assert "usherctrl" in header["Should-Stop"].split()
    # Should-, not Required-: the controller may run on another host.
    assert "usherctrl" not in header["Required-Start"].split()


def test_every_script_shares_the_code_below_its_settings():
    marker = "# ---- Everything below this line is identical in every Usher init script. ----\n"
    texts = {name: (INITSCRIPTS / name).read_text() for name in DAEMONS}
    for name, text in texts.items():
        assert text.count(marker) == 1, name
    bodies = {name: text.split(marker)[1] for name, text in texts.items()}
    assert bodies["usherlnm"] == bodies["usherctrl"]
    assert bodies["plusher"] == bodies["usherctrl"]
    # Above the marker only settings differ: each script names its own program.
    for name, text in texts.items():
        settings = text.split(marker)[0]
        assert re.findall(r"^NAME=(.*)$", settings, re.M) == [name]
        assert re.findall(r"^DAEMON=(.*)$", settings, re.M) == [f"/opt/usher/bin/{name}"]
        assert re.findall(r"^CONFIG=(.*)$", settings, re.M) == [
            f"/etc/usher/{COMPONENT[name]}.config"]


# --- the SysV scripts, run ----------------------------------------------------

def test_start_status_stop(daemon_script):
    status = daemon_script.run("status")
    assert status.returncode == 3, status.stdout

    pid = daemon_script.start()
    assert alive(pid)
    assert (f"argv --isolated --config {daemon_script.config} --ready-file "
            f"{daemon_script.ready_file}\n") in daemon_script.log()
    assert daemon_script.ready_file.read_text() == f"{pid}\n"
    status = daemon_script.run("status")
    assert status.returncode == 0
    assert f"({daemon_script.name}) is running (pid {pid})" in status.stdout

    again = daemon_script.run("start")
    assert again.returncode == 0
    assert "already running" in again.stdout
    assert daemon_script.pid() == pid
    assert daemon_script.log().count("argv ") == 1

    stop = daemon_script.run("stop")
    assert stop.returncode == 0, stop.stderr
    assert not alive(pid)
    assert "stopping on SIGTERM" in daemon_script.log()
    assert not daemon_script.pidfile.exists()
    assert not daemon_script.ready_file.exists()
    assert daemon_script.run("status").returncode == 3


def test_restart_replaces_the_daemon(ctrl_script):
    first = ctrl_script.start()
    restart = ctrl_script.run("restart")
    assert restart.returncode == 0, restart.stderr
    second = ctrl_script.pid()
    assert second != first
    assert not alive(first)
    assert alive(second)
    assert ctrl_script.run("status").returncode == 0


@pytest.mark.parametrize("action", ["force-reload", "try-restart"])
def test_conditional_restarts_leave_a_stopped_daemon_stopped(lnm_script, action):
    result = lnm_script.run(action)
    assert result.returncode == 0
    assert "not running" in result.stdout
    assert not lnm_script.pidfile.exists()
    assert lnm_script.log() == ""


def test_force_reload_restarts_a_running_daemon(lnm_script):
    first = lnm_script.start()
    result = lnm_script.run("force-reload")
    assert result.returncode == 0, result.stderr
    assert lnm_script.pid() != first
    assert not alive(first)


def test_stop_when_not_running_succeeds(lnm_script):
    result = lnm_script.run("stop")
    assert result.returncode == 0
    assert "not running" in result.stdout


def test_stale_pid_file_naming_another_process(lnm_script):
    # A recycled pid must not be signalled: this process is not the daemon.
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        lnm_script.pidfile.parent.mkdir(parents=True)
        lnm_script.pidfile.write_text(f"{bystander.pid}\n")

        status = lnm_script.run("status")
        assert status.returncode == 1
        assert "dead but pid file" in status.stdout

        stop = lnm_script.run("stop")
        assert stop.returncode == 0
        assert "stale pid file" in stop.stdout
        assert bystander.poll() is None
        assert not lnm_script.pidfile.exists()
        assert lnm_script.run("status").returncode == 3
    finally:
        bystander.kill()
        bystander.wait()


def _dead_pid() -> str:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return str(finished.pid)


@pytest.mark.parametrize("stale", [_dead_pid, lambda: "not a pid"])
def test_start_replaces_a_stale_pid_file(lnm_script, stale):
    lnm_script.pidfile.parent.mkdir(parents=True)
    lnm_script.pidfile.write_text(f"{stale()}\n")
    status = lnm_script.run("status")
    assert status.returncode == 1
    assert "dead but pid file" in status.stdout
    pid = lnm_script.start()
    assert alive(pid)
    assert lnm_script.run("status").returncode == 0


def test_missing_config_exits_6_without_starting(lnm_script):
    lnm_script.config.unlink()
    result = lnm_script.run("start")
    assert result.returncode == 6
    assert str(lnm_script.config) in result.stderr
    assert f"{lnm_script.config}.orig" in result.stderr
    assert not lnm_script.pidfile.exists()
    assert lnm_script.log() == ""


def test_missing_daemon_exits_5(lnm_script):
    result = lnm_script.run("start", DAEMON=str(lnm_script.daemon) + "-absent")
    assert result.returncode == 5
    assert "not installed" in result.stderr


def test_daemon_dying_at_start_up_fails_the_start(lnm_script):
    result = lnm_script.run("start", DAEMON_ARGS="--exit-now 3", START_WAIT="1")
    assert result.returncode == 1
    assert "exited during start-up" in result.stderr
    assert "exiting at once with 3" in result.stderr  # the end of the log is shown
    assert not lnm_script.pidfile.exists()
    assert lnm_script.run("status").returncode == 3


def test_start_waits_for_a_daemon_that_fails_after_a_while(lnm_script):
    # Longer than the old fixed wait: start waits for "up" or the exit.
    result = lnm_script.run("start", DAEMON_ARGS="--exit-later 1", START_WAIT="30")
    assert result.returncode == 1
    assert "exited during start-up" in result.stderr
    assert "could not start, exiting with 1" in result.stderr
    assert not lnm_script.pidfile.exists() and not lnm_script.ready_file.exists()
    assert lnm_script.run("status").returncode == 3


def test_start_reports_a_daemon_still_starting(lnm_script):
    result = lnm_script.run("start", DAEMON_ARGS="--never-ready", START_WAIT="0.2")
    assert result.returncode == 0, result.stderr
    assert "is still starting" in result.stdout
    pid = lnm_script.pid()
    lnm_script.wait_ready(pid)
    assert lnm_script.run("status").returncode == 0
    assert lnm_script.run("stop", DAEMON_ARGS="--never-ready").returncode == 0
    assert not alive(pid)


REAL_USHERCTRL = Path(sys.executable).parent / "usherctrl"


@pytest.fixture
def real_ctrl_script(tmp_path):
    """The controller's init script running the real usherctrl on a
    sandbox's configuration."""
    if not REAL_USHERCTRL.exists():
        pytest.skip(f"{REAL_USHERCTRL} is not installed")
    from usher import sandbox
    site = sandbox.prepare(str(tmp_path / "site"), lnms=1, domain="usher.test", user="alice",
                           rounds=4)
    script = InitScript(tmp_path, "usherctrl", "auto")
    script.daemon = REAL_USHERCTRL
    script.config.write_text(Path(site["configs"]["ctrl"]).read_text())
    script.settings.update(DAEMON=str(REAL_USHERCTRL), START_WAIT="60")
    yield script
    script.kill_leftovers()


def test_real_controller_starts_and_stops(real_ctrl_script):
    start = real_ctrl_script.run("start")
    assert start.returncode == 0, start.stderr + real_ctrl_script.log()
    pid = real_ctrl_script.pid()
    assert f"started (pid {pid})" in start.stdout
    assert real_ctrl_script.ready_file.read_text() == f"{pid}\n"
    stop = real_ctrl_script.run("stop")
    assert stop.returncode == 0, stop.stderr
    assert "SIGKILL" not in stop.stderr
    assert not alive(pid) and not real_ctrl_script.ready_file.exists()


def test_real_controller_that_cannot_start_fails_the_start(real_ctrl_script):
    with real_ctrl_script.config.open("a") as f:
        f.write("[[plugins]]\n[[[nosuchplugin]]]\nevents = start_request\n")
    start = real_ctrl_script.run("start")
    assert start.returncode == 1, start.stdout
    assert "exited during start-up" in start.stderr
    assert ("usherctrl could not start: [plugins] [[nosuchplugin]]: no such plugin: "
            "'nosuchplugin'") in start.stderr
    assert "started" not in start.stdout
    assert real_ctrl_script.run("status").returncode == 3
    assert not any(alive(pid) for pid in real_ctrl_script.pids_seen)


def test_stop_escalates_to_sigkill(lnm_script):
    pid = lnm_script.start(DAEMON_ARGS="--ignore-term")
    result = lnm_script.run("stop", DAEMON_ARGS="--ignore-term", STOP_TIMEOUT="0")
    assert result.returncode == 0, result.stderr
    assert "sending SIGKILL" in result.stderr
    assert "ignoring SIGTERM" in lnm_script.log()
    assert not alive(pid)
    assert not lnm_script.pidfile.exists()


@pytest.mark.parametrize("action, code", [("reload", 3), ("bogus", 2), ("", 2)])
def test_unsupported_actions(lnm_script, action, code):
    result = lnm_script.run(action)
    assert result.returncode == code
    assert result.stderr


@pytest.mark.parametrize("setting, value", [
    ("STOP_TIMEOUT", "soon"), ("START_WAIT", "1.2.3"), ("START_METHOD", "systemd"),
    ("DAEMON", "bin/usherlnm")])
def test_bad_settings_are_refused(lnm_script, setting, value):
    start = lnm_script.run("start", **{setting: value})
    assert start.returncode == 6
    assert setting in start.stderr
    assert not lnm_script.pidfile.exists()
    assert lnm_script.run("status", **{setting: value}).returncode == 4


def test_missing_defaults_file_is_refused(lnm_script, tmp_path):
    env = {**os.environ, "USHER_DEFAULTS_FILE": str(tmp_path / "absent")}
    result = subprocess.run(["sh", str(INITSCRIPTS / "usherlnm"), "start"], env=env,
                            capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)
    assert result.returncode == 6
    assert "USHER_DEFAULTS_FILE" in result.stderr


# --- systemd units ------------------------------------------------------------

def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str
    parser.read_string((INITSCRIPTS / f"{name}.service").read_text())
    return parser


@pytest.mark.parametrize("name", DAEMONS)
def test_unit_essentials(name):
    unit = _unit(name)
    service = unit["Service"]
    # The daemon says when it is up (usher.daemon.notify_service_manager), so
    # a start that fails fails `systemctl start`.
    assert service["Type"] == "notify"
    assert service["ExecStart"].split() == [
        f"/opt/usher/bin/{name}", "--isolated", "--config",
        f"/etc/usher/{COMPONENT[name]}.config"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # a configuration error
    assert service["KillSignal"] == "SIGTERM"
    assert service["TimeoutStopSec"] == "30"
    assert "network-online.target" in unit["Unit"]["After"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_lnm_unit_follows_libvirtd_and_keeps_the_host_view():
    unit = _unit("usherlnm")
    assert "libvirtd.service" in unit["Unit"]["After"].split()
    assert "libvirtd.service" in unit["Unit"]["Wants"].split()
    service = unit["Service"]
    # libvirtd writes saved images where the LNM reads them, and qemu+ssh://
    # needs root's ~/.ssh: these would break that.
    for setting in ("PrivateTmp", "ProtectHome", "PrivateDevices", "RestrictAddressFamilies",
                    "SystemCallFilter", "PrivateNetwork", "DynamicUser"):
        assert setting not in service, setting
    assert service.get("ProtectSystem", "no") in ("no", "true", "yes", "full")


def test_plusher_unit_follows_the_controller_and_is_hardened_like_it():
    unit, ctrl = _unit("plusher"), _unit("usherctrl")
    assert {"network-online.target", "usherctrl.service"} <= set(unit["Unit"]["After"].split())
    assert "network-online.target" in unit["Unit"]["Wants"].split()
    # Ordered after a controller on the same host, but never needing one there.
    for setting in ("Requires", "Requisite", "BindsTo", "PartOf", "Wants"):
        assert "usherctrl.service" not in unit["Unit"].get(setting, "").split(), setting
    service, ctrl_service = unit["Service"], ctrl["Service"]
    hardening = set(ctrl_service) - {"Type", "ExecStart", "Restart", "RestartSec",
                                     "RestartPreventExitStatus", "KillSignal", "TimeoutStopSec"}
    assert hardening <= set(service), hardening - set(service)
    for setting in hardening - {"ProtectSystem", "RestrictAddressFamilies"}:
        assert service[setting] == ctrl_service[setting], setting
    # plusher writes nothing and only needs TCP (and name lookups).
    assert service["ProtectSystem"] == "strict"
    families = set(service["RestrictAddressFamilies"].split())
    assert {"AF_INET", "AF_INET6"} <= families <= {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    for setting in ("ReadWritePaths", "StateDirectory", "LogsDirectory"):
        assert setting not in service, setting


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    # verify insists that ExecStart exists: install the units pointing at stand-ins.
    bindir = tmp_path / "bin"
    for name in DAEMONS:
        write_fake_daemon(bindir, name)
    units = []
    for name in DAEMONS:
        unit = tmp_path / f"{name}.service"
        unit.write_text((INITSCRIPTS / f"{name}.service").read_text().replace(
            f"ExecStart=/opt/usher/bin/{name} ", f"ExecStart={bindir}/{name} "))
        units.append(str(unit))
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True,
                            text=True, timeout=SCRIPT_TIMEOUT)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if any(name in line for name in DAEMONS)]
    assert result.returncode == 0, result.stderr
    assert complaints == []


# --- setup.py ---------------------------------------------------------------
# (install.sh: tests/test_install.py)

def test_setup_py_installs_every_file_in_initscripts():
    setup_py = (REPO / "setup.py").read_text()
    for path in INITSCRIPTS.iterdir():
        assert f'"initscripts/{path.name}"' in setup_py, path.name
