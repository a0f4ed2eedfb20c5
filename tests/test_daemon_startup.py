"""usher.daemon: a daemon that cannot start exits at once, non-zero, saying
why; one that can says it is up (--ready-file, systemd's NOTIFY_SOCKET) and
stops on SIGTERM. The real usherctrl, usherlnm and plusher processes."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from twisted.application import internet, service
from twisted.internet import defer
from twisted.python.threadpool import ThreadPool

from usher import daemon, sandbox

# Time allowed for a process to do what it should at once: only a bound on
# a hang (the bug was a process that never exited), never a measurement.
HANG = 60

MODULES = {"usherctrl": "usher.controller.main", "usherlnm": "usher.lnm.main",
           "plusher": "usher.clients.plusher"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A sandbox's generated configurations and certificates (nothing runs)."""
    directory = tmp_path_factory.mktemp("site")
    return sandbox.prepare(str(directory), lnms=1, domain="usher.test", user="alice",
                           rounds=4)


def variant(site, component, name, replace=(), append=""):
    """A copy of the sandbox's ``component`` configuration file, edited."""
    with open(site["configs"][component], encoding="utf-8") as f:
        text = f.read()
    for old, new in replace:
        assert old in text, old
        text = text.replace(old, new)
    path = os.path.join(site["dir"], f"{name}.config")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + append)
    return path


def plusher_config(site, name, text):
    path = os.path.join(site["dir"], f"{name}.config")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"[plusher]\nssl_ca_file = {site['ca_file']}\ncontroller_tls_name = localhost\n"
                + text)
    return path


def spawn(program, config, *args, env=None):
    return subprocess.Popen([sys.executable, "-m", MODULES[program], "--isolated", "--config",
                             config, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def outcome(process, *, separate=False):
    """-> (exit code, standard output and error) once ``process`` has
    exited, which must be within HANG seconds (``separate``: the two apart)."""
    try:
        out, err = process.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the daemon hung instead of exiting; its output:\n{out}{err}")
    return (process.returncode, out, err) if separate else (process.returncode, out + err)


@pytest.fixture
def busy_port():
    """A port something else listens on."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    yield holder.getsockname()[1]
    holder.close()


def unknown_plugin(site):
    return variant(site, "ctrl", "unknown-plugin",
                   append="[[plugins]]\n[[[nosuchplugin]]]\nevents = start_request\n")


# --- start-up failures, for real ----------------------------------------------------

def test_controller_with_an_unknown_plugin_exits(site):
    code, output = outcome(spawn("usherctrl", unknown_plugin(site)))
    assert code == daemon.EXIT_CONFIG       # the configuration's fault: no restart loop
    assert ("usherctrl could not start: [plugins] [[nosuchplugin]]: "
            "no such plugin: 'nosuchplugin'") in output


def test_controller_with_an_unknown_plugin_event_exits(site):
    config = variant(site, "ctrl", "unknown-event",
                     append="[[plugins]]\n[[[roundrobin]]]\nevents = no_such_event\n")
    code, output = outcome(spawn("usherctrl", config))
    assert code == daemon.EXIT_CONFIG
    assert "usherctrl could not start: [plugins] [[roundrobin]]: " in output
    assert "no_such_event" in output


def test_controller_with_a_bad_plugin_option_exits_as_a_configuration_error(site):
    plugin_config = os.path.join(site["dir"], "bad-limits.config")
    with open(plugin_config, "w", encoding="utf-8") as f:
        f.write("max_vms_per_user = many\n")
    config = variant(site, "ctrl", "bad-plugin-value",
                     append=f"[[plugins]]\n[[[limits]]]\nevents = start_request\n"
                            f"config = {plugin_config}\n")
    code, output = outcome(spawn("usherctrl", config))
    assert code == daemon.EXIT_CONFIG
    assert "usherctrl could not start: " in output and "max_vms_per_user" in output


def test_controller_on_a_busy_port_exits(site, busy_port):
    config = variant(site, "ctrl", "busy-port", replace=[
        (f"client_port = {site['client_port']}", f"client_port = {busy_port}")])
    code, output = outcome(spawn("usherctrl", config))
    assert code == daemon.EXIT_CANNOT_START
    assert f"usherctrl could not start: Couldn't listen on 127.0.0.1:{busy_port}" in output


def test_controller_with_an_unreadable_certificate_exits(site):
    config = variant(site, "ctrl", "no-cert", replace=[
        ("pki/usherctrl_cert.pem", "pki")])    # a directory, which even root cannot read
    code, output = outcome(spawn("usherctrl", config))
    assert code == daemon.EXIT_CONFIG
    assert "usherctrl: configuration error: " in output and "expected a certificate" in output


def test_a_start_failure_goes_to_standard_error_too_when_the_log_is_a_file(site, tmp_path):
    log_file = tmp_path / "ctrl.log"
    config = variant(site, "ctrl", "log-file", append=f"log_file = {log_file}\n"
                     "[[plugins]]\n[[[nosuchplugin]]]\nevents = start_request\n")
    code, _out, err = outcome(spawn("usherctrl", config), separate=True)
    assert code == daemon.EXIT_CONFIG
    assert "usherctrl: could not start: [plugins] [[nosuchplugin]]: no such plugin" in err
    assert ("usherctrl could not start: [plugins] [[nosuchplugin]]: no such plugin"
            in log_file.read_text())


def test_lnm_with_an_unreachable_hypervisor_exits(site):
    config = variant(site, "lnm1", "no-hypervisor", replace=[("test_host = yes", "")],
                     append="libvirt_uri = qemu+tcp://127.0.0.1:1/system\n")
    code, output = outcome(spawn("usherlnm", config))
    assert code == daemon.EXIT_CANNOT_START
    assert "usherlnm lnm1 could not start: cannot connect to qemu+tcp://127.0.0.1:1" in output


def test_lnm_without_a_hypervisor_refuses_to_start_naming_file_and_key(site):
    # No libvirt_uri and no test_host = yes: never a fake host in production.
    config = variant(site, "lnm1", "lnm-no-uri", replace=[("test_host = yes", "")])
    code, output = outcome(spawn("usherlnm", config))
    assert code == daemon.EXIT_CONFIG
    assert f"usherlnm: configuration error: {config}: libvirt_uri is not set" in output
    assert "libvirt_uri = qemu:///system" in output and "test_host = yes" in output
    assert "attached" not in output


def test_lnm_with_test_host_and_a_libvirt_uri_refuses_to_start(site):
    config = variant(site, "lnm1", "lnm-both", append="libvirt_uri = qemu:///system\n")
    code, output = outcome(spawn("usherlnm", config))
    assert code == daemon.EXIT_CONFIG
    assert "test_host = yes and libvirt_uri = qemu:///system exclude each other" in output


def _first_lines_up_to(config, text):
    """Start usherlnm on ``config`` -> its output lines up to the first that
    has ``text`` (at most 50); then stop it."""
    process = subprocess.Popen([sys.executable, "-m", MODULES["usherlnm"], "--isolated",
                                "--config", config],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if text in line or len(lines) > 50:
                break
    finally:
        process.terminate()
        process.communicate(timeout=HANG)
    return lines


def test_lnm_on_a_test_host_warns_at_start(site):
    # test_host = yes (the sandbox's): the daemon says so in its first lines.
    lines = _first_lines_up_to(site["configs"]["lnm1"], "TEST host")
    assert "test_host = yes: running an embedded libvirt TEST host" in lines[-1], lines


def test_lnm_on_a_test_uri_warns_at_start(site):
    # An explicit test: libvirt_uri is as simulated as test_host = yes.
    config = variant(site, "lnm1", "lnm-test-uri", replace=[("test_host = yes", "")],
                     append="libvirt_uri = test:///default\n")
    lines = _first_lines_up_to(config, "TEST driver")
    assert ("libvirt_uri = test:///default: libvirt's TEST driver (simulated: its VMs run "
            "nothing)") in lines[-1], lines


def test_lnm_with_an_unreadable_certificate_exits(site):
    config = variant(site, "lnm1", "lnm-no-cert", replace=[("pki/lnm1_cert.pem", "pki")])
    code, output = outcome(spawn("usherlnm", config))
    assert code == daemon.EXIT_CONFIG
    assert "usherlnm: configuration error: " in output


def test_plusher_on_a_busy_port_exits(site, busy_port):
    code, output = outcome(spawn("plusher", plusher_config(site, "plusher-busy",
                                                           f"port = {busy_port}\n")))
    assert code == daemon.EXIT_CANNOT_START
    assert f"plusher could not start: Couldn't listen on 127.0.0.1:{busy_port}" in output


def test_plusher_with_an_unreadable_certificate_exits(site):
    pki_dir = os.path.join(site["dir"], "pki")     # a directory, which even root cannot read
    config = plusher_config(site, "plusher-no-cert", f"port = {sandbox.free_port()}\n"
                            f"ssl_cert_file = {pki_dir}\nssl_key_file = {pki_dir}\n")
    code, output = outcome(spawn("plusher", config))
    assert code == daemon.EXIT_CONFIG
    assert "plusher: configuration error: " in output


# --- saying it is up, and stopping -----------------------------------------------------

def wait_for_file(path, process):
    deadline = time.monotonic() + HANG
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the daemon never said it was up"
        time.sleep(0.05)


@pytest.mark.parametrize("program", ["usherctrl", "plusher"])
def test_ready_file_once_up_removed_after_sigterm(site, tmp_path, program):
    ready = tmp_path / "ready"
    config = site["configs"]["ctrl"] if program == "usherctrl" else plusher_config(
        site, "plusher-good", f"port = {sandbox.free_port()}\n")
    process = spawn(program, config, "--ready-file", str(ready))
    wait_for_file(ready, process)
    assert ready.read_text() == f"{process.pid}\n"
    process.send_signal(signal.SIGTERM)
    code, _output = outcome(process)
    assert code == daemon.EXIT_STOPPED
    assert not ready.exists()


@pytest.fixture
def notify_socket():
    """systemd's side of sd_notify: an abstract datagram socket, as
    $NOTIFY_SOCKET names it."""
    name = f"@usher-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name[1:])
    listener.settimeout(HANG)
    yield name, listener
    listener.close()


def test_systemd_is_told_ready_once_up_and_stopping_at_sigterm(site, notify_socket):
    name, listener = notify_socket
    process = spawn("usherctrl", site["configs"]["ctrl"], env={"NOTIFY_SOCKET": name})
    try:
        assert listener.recv(4096) == b"READY=1"
        process.send_signal(signal.SIGTERM)
        assert listener.recv(4096) == b"STOPPING=1"
    finally:
        code, _output = outcome(process)
    assert code == daemon.EXIT_STOPPED


def test_systemd_is_never_told_ready_by_a_daemon_that_cannot_start(site, notify_socket):
    name, listener = notify_socket
    code, _output = outcome(spawn("usherctrl", unknown_plugin(site),
                                  env={"NOTIFY_SOCKET": name}))
    assert code == daemon.EXIT_CONFIG
    listener.setblocking(False)
    messages = []
    while True:
        try:
            messages.append(listener.recv(4096))
        except BlockingIOError:
            break
    assert b"READY=1" not in messages


# --- in the process ---------------------------------------------------------------------

class Refusing(service.Service):
    def startService(self):
        super().startService()
        raise RuntimeError("refused")


def test_a_half_started_root_stops_what_started_only():
    root = service.MultiService()
    pool = ThreadPool(minthreads=1, maxthreads=1, name="test-half-started")
    daemon.ThreadPoolService(pool).setServiceParent(root)
    Refusing().setServiceParent(root)
    # Never started: stopping it would fail (it has no port to stop).
    never = internet.StreamServerEndpointService(None, None)
    never.setServiceParent(root)
    with pytest.raises(RuntimeError):
        root.startService()
    assert pool.started and pool.threads
    stopped = daemon.stop_half_started(root)
    assert isinstance(stopped, defer.Deferred)
    results = []
    stopped.addCallback(results.append)
    assert results and all(ok for ok, _ in results[0])
    assert not pool.started and not any(thread.is_alive() for thread in pool.threads)
    assert not root.running and not never.running
