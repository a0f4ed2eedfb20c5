"""initscripts/install.sh for real, into a throwaway root: a virtualenv with
Usher pip-installed from this source tree, the programs linked, units and
init scripts naming the virtualenv's programs, sample configurations; then
the installed usherctrl and usherlnm, configured with ``usher cert bundle``,
attach over TLS on 127.0.0.1. One install is shared by the module."""

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from tests.realsite import Site, venv_programs

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "initscripts" / "install.sh"
SAMPLES = REPO / "etc"
# Bounds a hung pip or script, never a measurement.
INSTALL_TIMEOUT = 300


def run_install(*args):
    return subprocess.run(["sh", str(INSTALL), *args], capture_output=True, text=True,
                          timeout=INSTALL_TIMEOUT, stdin=subprocess.DEVNULL)


def _mode(path):
    return stat.S_IMODE(path.lstat().st_mode)


def _outside(root):
    """Files and links under ``root`` apart from the virtualenv."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if (p.is_file() or p.is_symlink()) and not p.is_relative_to(root / "opt/usher")}


# Real paths the default install would write; a --root install must not.
REAL_PATHS = ("/opt/usher", "/etc/usher/ctrl.config.orig", "/usr/local/bin/usherctrl",
              "/etc/systemd/system/usherctrl.service")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    before = {path: os.path.lexists(path) for path in REAL_PATHS}
    result = run_install("--root", str(root), "--venv", f"{root}/opt/usher", "--systemd",
                         "ctrl", "lnm")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {path: os.path.lexists(path) for path in REAL_PATHS} == before
    return root, result


def test_help_explains_roles_options_and_next_steps():
    result = run_install("--help")
    assert result.returncode == 0
    for word in ("ctrl", "lnm", "client", "plusher", "web", "batchd", "--venv DIR",
                 "--bindir DIR", "--root DIR", "--no-apt", "--source SRC", "--systemd",
                 "--sysv", "apt-get", "/opt/usher", "/usr/local/bin", "/etc/usher",
                 "never created", "next steps are printed", "sh initscripts/install.sh lnm"):
        assert word in result.stdout, word


def test_install_into_a_root_writes_only_under_it(installed):
    root, result = installed
    venv_bin = root / "opt/usher/bin"
    assert _outside(root) == {
        "usr/local/bin/usherctrl", "usr/local/bin/usherlnm", "usr/local/bin/usher",
        "usr/local/bin/ush", "etc/systemd/system/usherctrl.service",
        "etc/systemd/system/usherlnm.service", "etc/usher/ctrl.config.orig",
        "etc/usher/ush.config.orig", "etc/usher/lnm.config.orig",
        "etc/usher/lnm-qemu.config.example"}
    for program in ("usherctrl", "usherlnm", "usher", "ush"):
        link = root / "usr/local/bin" / program
        assert link.is_symlink() and os.readlink(link) == str(venv_bin / program)
        assert os.access(link, os.X_OK)
    for name in ("ctrl.config.orig", "ush.config.orig", "lnm.config.orig",
                 "lnm-qemu.config.example"):
        sample = root / "etc/usher" / name
        assert sample.read_bytes() == (SAMPLES / name).read_bytes() and _mode(sample) == 0o644
    for daemon, config in (("usherctrl", "ctrl"), ("usherlnm", "lnm")):
        unit = root / "etc/systemd/system" / f"{daemon}.service"
        assert _mode(unit) == 0o644
        (exec_start,) = re.findall(r"^ExecStart=(.*)$", unit.read_text(), re.M)
        program, *args = exec_start.split()
        assert program == str(venv_bin / daemon) and os.access(program, os.X_OK)
        assert args == ["--isolated", "--config", f"{root}/etc/usher/{config}.config"]
    out = result.stdout
    assert f"Usher {_version()} is installed in {root}/opt/usher" in out
    for step in (f"usher ca init --dir {root}/etc/usher", "usher cert bundle --lnm HOST",
                 f"tar -xf HOST.tar -C {root}/etc/usher", "systemctl enable --now usherlnm",
                 "ush list_lnm"):
        assert step in out, step
    assert "installing Debian packages" not in out      # --root: no apt-get


def _version():
    from usher import __version__
    return __version__


def test_a_second_run_upgrades_in_place_and_keeps_configurations(installed):
    root, _ = installed
    config = root / "etc/usher/ctrl.config"
    config.write_text("[ctrl]\ndomain = example.org\n")
    os.utime(config, (1_000_000_000, 1_000_000_000))
    result = run_install("--root", str(root), "--sysv", "ctrl", "client")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "creating the virtualenv" not in result.stdout
    assert config.read_text() == "[ctrl]\ndomain = example.org\n"
    assert config.stat().st_mtime == 1_000_000_000
    script = root / "etc/init.d/usherctrl"
    assert _mode(script) == 0o755
    text = script.read_text()
    assert re.findall(r"^DAEMON=(.*)$", text, re.M) == [f"{root}/opt/usher/bin/usherctrl"]
    assert re.findall(r"^CONFIG=(.*)$", text, re.M) == [f"{root}/etc/usher/ctrl.config"]
    assert "update-rc.d NAME defaults" in result.stdout


@pytest.mark.parametrize("args, complaint", [
    (["--sysv", "--systemd", "ctrl"], "choose one"),
    (["everything"], "unknown role 'everything'"),
    ([], "name at least one role"),
    (["--bindir", "relative/bin", "ctrl"], "absolute"),
    (["--venv", "/opt/my venv", "ctrl"], "characters"),
    (["--venv", "/opt/usher", "ctrl"], "is outside --root"),
    (["--frobnicate", "ctrl"], "unknown option"),
    (["--venv"], "needs a value"),
])
def test_install_refuses_bad_arguments_and_changes_nothing(tmp_path, args, complaint):
    result = run_install("--root", str(tmp_path), *args)
    assert result.returncode == 2
    assert complaint in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, path", [
    ("--bindir", "{root}/../elsewhere/bin"),
    ("--venv", "{root}/opt/../../elsewhere/usher"),
    ("--bindir", "{root}/./usr/local/bin"),
])
def test_install_refuses_dot_segments_that_could_leave_the_root(tmp_path, option, path):
    root = tmp_path / "root"
    root.mkdir()
    result = run_install("--root", str(root), option, path.format(root=root), "ctrl")
    assert result.returncode == 2
    assert f"{option} '{path.format(root=root)}' has a . or .. segment" in result.stderr
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")] == ["root"]


def test_install_refuses_a_missing_root(tmp_path):
    result = run_install("--root", str(tmp_path / "absent"), "ctrl")
    assert result.returncode == 2 and "not an existing directory" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_installed_controller_and_lnm_attach_over_tls(installed, tmp_path):
    root, _ = installed
    # Every program from the root's links: usher (CA, certificates, user,
    # bundle), usherctrl, usherlnm, ush.
    site = Site(tmp_path / "site", venv_programs(root / "usr/local/bin"))
    try:
        site.start_controller()
        host = tmp_path / "host-etc"
        site.bundle("vmm47", host, "--libvirt-uri", "test:///default")
        lnm = site.start("usherlnm", host / "lnm.config", site.local_settings("vmm47"))
        record = site.wait_attached("vmm47")
        assert record["connected"] and record["test_host"]
        assert "vmm47" in site.ush("list_lnm").stdout
        log = Path(lnm.log_path).read_text()
        assert "attached to the controller" in log
    finally:
        site.stop()
