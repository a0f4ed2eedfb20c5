"""What scripts rely on (issue 17, items 5 and 10), through the real ush
against a real sandbox (controller and LNMs as processes over TLS): one
table of exit statuses, a stable code in every --json error and every
failed VM, idempotent operations reported as "already", and the
configuration, the CA file and the command line checked before any password
is asked for, on a terminal only (a pty here), never on standard input."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest_twisted
from twisted.internet import threads

from usher import errors
from usher.clients.ush import help_text

from tests.e2e import parse_json

DOMAIN = "usher.test"
USH = [sys.executable, "-m", "usher.clients.ush"]


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def config_without_password(system, path, **changes):
    """The sandbox's ush.config without its password (and ``changes``:
    option -> new value, None to drop it)."""
    changes = {"password": None, **changes}
    lines = []
    for line in open(system.description["configs"]["ush"]).read().splitlines():
        key = line.split("=", 1)[0].strip()
        if key in changes:
            if changes[key] is not None:
                lines.append(f"{key} = {changes.pop(key)}")
            continue
        lines.append(line)
    lines += [f"{key} = {value}" for key, value in changes.items() if value is not None]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_without_terminal(*args, env=None):
    """ush in a new session (no controlling terminal), stdin closed -> a
    Deferred CompletedProcess."""
    def run():
        return subprocess.run([*USH, *args], capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, start_new_session=True,
                              env=env)
    return threads.deferToThread(run)


def run_on_pty(argv, answers=(), timeout=60.0):
    """Run ``argv`` with a pty as its controlling terminal; when the output
    so far ends with the next ``answers`` prompt, type its answer. ->
    (exit status, everything it wrote)."""
    pid, fd = pty.fork()
    if pid == 0:                                    # the child: ush
        try:
            # Signals as a shell leaves them to a command (see
            # test_ush_output._as_a_login_shell_would).
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    answers = list(answers)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:                         # EIO: the child closed the pty
                break
            if not chunk:
                break
            output += chunk
            if answers and output.rstrip().endswith(answers[0][0].encode()):
                os.write(fd, answers.pop(0)[1].encode() + b"\n")
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode("utf-8", "replace")


def on_pty(*args, answers=()):
    return threads.deferToThread(run_on_pty, [*USH, *args], answers)


# --- item 5: exit statuses, codes, idempotence ---------------------------------------

def test_the_readme_shows_the_tables_of_the_code():
    """One table, in usher/errors.py; the README shows it as rendered."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert help_text.markdown_tables() in readme



@pytest_twisted.ensureDeferred
async def test_every_exit_status_and_code_through_real_ush(system, tmp_path):
    ush = system.ush
    started = await ush("start", "-n", "scr", "-c", "2")
    assert started.returncode == errors.EXIT_OK, started.stdout + started.stderr

    # 4, nothing matched: unknown VM, empty selection, unknown LNM; the same
    # for list as for operations (list still prints what it found: nothing).
    for argv, code in [(("pause", "nosuch"), "no_such_vm"),
                       (("pause", "-n", "nosuch"), "no_such_vm"),
                       (("list", "nosuch"), "no_such_vm"),
                       (("pause", "--lnm", "lnm9"), "no_such_lnm"),
                       (("list_lnm", "lnm9"), "no_such_lnm")]:
        completed = await ush(*argv)
        assert completed.returncode == errors.EXIT_NO_MATCH, (argv, completed)
        assert parse_json(completed)["code"] == code, argv
    listed = await ush("list", "-n", "nosuch")
    assert (listed.returncode, parse_json(listed)) == (errors.EXIT_NO_MATCH, [])
    listed = await ush("list", "-r", "^nothing-like-this", json_output=False)
    assert (listed.returncode, listed.stdout) == (errors.EXIT_NO_MATCH, "0 VMs.\n")
    assert (await ush("list")).returncode == errors.EXIT_OK

    # 0, idempotent: pause a paused VM, start a running one, shutdown a
    # shut-off one: done, "already".
    assert (await ush("pause", "1.scr")).returncode == errors.EXIT_OK
    again = await ush("pause", "-n", "scr")
    assert again.returncode == errors.EXIT_OK, again.stdout
    assert parse_json(again)["done"] == [
        {"name": full("1.scr"), "state": "paused", "already": True},
        {"name": full("2.scr"), "state": "paused"}]
    text = await ush("pause", "1.scr", json_output=False)
    assert text.returncode == errors.EXIT_OK
    assert f"{full('1.scr')} already paused" in text.stdout
    assert (await ush("resume", "-n", "scr")).returncode == errors.EXIT_OK
    running = await ush("start", "1.scr")
    assert running.returncode == errors.EXIT_OK, running.stdout
    assert parse_json(running) == [{"name": full("1.scr"), "lnm": parse_json(
        await ush("list", "1.scr"))[0]["lnm"], "already": True}]
    assert (await ush("shutdown", "2.scr")).returncode == errors.EXIT_OK
    off = await ush("shutdown", "2.scr", json_output=False)
    assert off.returncode == errors.EXIT_OK and "already shut off" in off.stdout
    host = parse_json(await ush("list", "1.scr"))[0]["lnm"]
    there = await ush("migrate", "1.scr", host)
    assert there.returncode == errors.EXIT_OK, there.stdout
    assert parse_json(there)["migrated"] == [{"name": full("1.scr"), "from": host, "to": host,
                                              "already": True}]
    both = await ush("start", "1.scr", "3.scr")
    assert both.returncode == errors.EXIT_OK, both.stdout
    assert [(vm["name"], vm.get("already", False)) for vm in parse_json(both)] == [
        (full("1.scr"), True), (full("3.scr"), False)]

    # 1, refused for some VM: its entry has the code; the others go on.
    mixed = await ush("resume", "-n", "scr")
    assert mixed.returncode == errors.EXIT_FAILED
    result = parse_json(mixed)
    assert result["failed"] == [{"name": full("2.scr"), "code": "wrong_state",
                                 "error": "cannot resume a VM that is shutoff"}]
    assert result["done"] == [{"name": full(f"{i}.scr"), "state": "run", "already": True}
                              for i in (1, 3)]

    # 2, usage and bad input; configuration.
    usage = await ush("pause", "-r", "(bad")
    assert (usage.returncode, parse_json(usage)["code"]) == (errors.EXIT_USAGE, "usage")
    unknown_option = await ush("list", "--frobnicate")
    assert unknown_option.returncode == errors.EXIT_USAGE
    broken = tmp_path / "broken.config"
    broken.write_text("[ush]\ncontroller_port = many\n")
    config = await ush("list", config=str(broken))
    assert config.returncode == errors.EXIT_USAGE
    assert parse_json(config)["code"] == "config_error"

    # 3, connection: a wrong password.
    wrong = config_without_password(system, tmp_path / "wrong.config", password="wrong")
    denied = await ush("list", config=wrong)
    assert denied.returncode == errors.EXIT_CONNECTION
    assert parse_json(denied)["code"] == "authentication_failed"

    # The table, as ush shows it: every status and every code.
    shown = await ush("help", "exit-codes", json_output=False)
    assert shown.returncode == errors.EXIT_OK
    assert shown.stdout.strip() == help_text.render("exit-codes")
    for status, _, _ in errors.EXIT_STATUSES:
        assert f"\n  {status} " in shown.stdout
    for code in errors.ERROR_CODES:
        assert f"\n  {code} " in shown.stdout


@pytest_twisted.ensureDeferred
async def test_ctrl_c_on_a_pending_command_exits_130(system):
    """SIGINT (Ctrl-C) while top refreshes: 130, no traceback."""
    def interrupt():
        child = subprocess.Popen(
            [*USH, "--config", system.description["configs"]["ush"], "top",
             "--iterations", "1000", "-i", "0.2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True)
        first = child.stdout.readline()             # one view: it runs
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
        return first, child.returncode, err
    first, code, err = await threads.deferToThread(interrupt)
    assert first and code == errors.EXIT_INTERRUPTED, (code, err)
    assert "Traceback" not in err


def test_some_vms_failed_is_1_and_an_unknown_outcome_3():
    from usher.clients.ush.outcome import results_exit_code
    assert results_exit_code([]) == errors.EXIT_OK
    assert results_exit_code([{"name": "a", "code": "wrong_state"}]) == errors.EXIT_FAILED
    assert results_exit_code([{"name": "a", "code": "wrong_state"},
                              {"name": "b", "code": "outcome_unknown"}]) == errors.EXIT_CONNECTION


def test_vms_whose_lnm_is_unavailable_exit_3_like_the_table_says():
    from usher.clients.ush.outcome import results_exit_code
    assert errors.exit_status_of_code("unavailable") == errors.EXIT_CONNECTION
    assert results_exit_code([{"name": "a", "code": "unavailable"}]) == errors.EXIT_CONNECTION
    assert results_exit_code([{"name": "a", "code": "busy"},
                              {"name": "b", "code": "unavailable"}]) == errors.EXIT_CONNECTION
    assert results_exit_code([{"name": "a", "code": "no_such_vm"}]) == errors.EXIT_FAILED


# --- item 10: checks before the password; no terminal; --isolated --------------------

@pytest_twisted.ensureDeferred
async def test_configuration_and_ca_are_checked_before_the_password_prompt(system, tmp_path):
    missing_ca = config_without_password(system, tmp_path / "noca.config",
                                         ssl_ca_file=str(tmp_path / "nosuch_ca.pem"))
    code, output = await on_pty("--isolated", "--config", missing_ca, "list")
    assert code == errors.EXIT_USAGE, output
    assert "Password" not in output
    assert f"ssl_ca_file {tmp_path / 'nosuch_ca.pem'}: No such file or directory" in output
    nopass = config_without_password(system, tmp_path / "nopass.config")
    # A bad command line: no prompt either.
    code, output = await on_pty("--isolated", "--config", nopass, "pause", "-r", "(bad")
    assert code == errors.EXIT_USAGE and "Password" not in output, output
    # Everything fine: ush asks, on the terminal, and goes on.
    code, output = await on_pty("--isolated", "--config", nopass, "list",
                                answers=[("Password:", system.description["password"])])
    assert code == errors.EXIT_OK, output
    assert output.startswith("Password:") and "VM" in output
    # Ctrl-C at the prompt: interrupted, 130, no traceback.
    code, output = await on_pty("--isolated", "--config", nopass, "list",
                                answers=[("Password:", "\x03")])
    assert code == errors.EXIT_INTERRUPTED and "Traceback" not in output, output


@pytest_twisted.ensureDeferred
async def test_without_a_terminal_no_password_fails_clearly_and_password_file_works(
        system, tmp_path):
    nopass = config_without_password(system, tmp_path / "nopass.config")
    completed = await run_without_terminal("--isolated", "--config", nopass, "--json", "list")
    assert completed.returncode == errors.EXIT_CONNECTION, completed
    assert "GetPassWarning" not in completed.stderr and "Password" not in completed.stderr
    error = json.loads(completed.stdout)
    assert error["code"] == "no_password" and "password_file" in error["error"]
    text = await run_without_terminal("--isolated", "--config", nopass, "list")
    assert text.returncode == errors.EXIT_CONNECTION
    assert "password_file" in text.stderr and "GetPassWarning" not in text.stderr

    secret = tmp_path / "secret"
    secret.write_text(system.description["password"] + "\n")
    secret.chmod(0o600)
    with_file = config_without_password(system, tmp_path / "file.config",
                                        password_file=str(secret))
    listed = await run_without_terminal("--isolated", "--config", with_file, "list")
    assert listed.returncode == errors.EXIT_OK, listed.stderr
    secret.chmod(0o644)                 # others may read it: refused, before connecting
    shared = await run_without_terminal("--isolated", "--config", with_file, "--json", "list")
    assert shared.returncode == errors.EXIT_USAGE
    assert json.loads(shared.stdout)["code"] == "config_error"
    assert "chmod 600" in json.loads(shared.stdout)["error"]


@pytest_twisted.ensureDeferred
async def test_isolated_reads_only_the_config_files_given(system, tmp_path):
    broken = tmp_path / "broken.config"
    broken.write_text("[ush]\ncall_timeout = soon\n")     # an option --config leaves alone
    env = dict(os.environ, USHER_USH_CONFIG=str(broken))
    config = system.description["configs"]["ush"]
    leaked = await run_without_terminal("--config", config, "list", env=env)
    assert leaked.returncode == errors.EXIT_USAGE and "call_timeout" in leaked.stderr
    isolated = await run_without_terminal("--isolated", "--config", config, "list", env=env)
    assert isolated.returncode == errors.EXIT_OK, isolated.stderr
