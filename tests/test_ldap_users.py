"""``usher user ... --ldap-config FILE``: the password-file commands on the
real test slapd (same output and errors as the file back end)."""

import io
import os
import subprocess
import sys

import pytest

from usher import admin
from usher.plugins.ldap.directory import load_directory


@pytest.fixture(scope="module")
def config(slapd, tmp_path_factory):
    return slapd.plugin_config(tmp_path_factory.mktemp("users") / "ldap.config", uid_min=51000)


def usher(config, *argv, password=None):
    stdin = io.StringIO(f"{password}\n" if password is not None else "")
    extra = ["--password-stdin"] if password is not None else []
    return admin.main(["user", *argv, *extra, "--ldap-config", config], stdin=stdin)


def test_add_list_passwd_del(slapd, config, capsys, tmp_path):
    directory = load_directory(config)
    assert usher(config, "add", "usrann", password="ann-pw") == 0
    first = directory.user_ids("usrann")[0]
    assert first >= 51000        # uid_min; above other tests' users in this slapd
    assert capsys.readouterr().out == \
        f"Added user usrann to {slapd.url} (uidNumber {first})\n"
    assert usher(config, "add", "usrbob", "--admin", password="bob-pw") == 0
    assert capsys.readouterr().out == \
        f"Added user usrbob (admin) to {slapd.url} (uidNumber {first + 1})\n"
    assert directory.authenticate("usrann", "ann-pw") and directory.is_admin("usrbob")

    assert usher(config, "list") == 0
    listed = capsys.readouterr().out.splitlines()
    assert "usrann" in listed and "usrbob\tadmin" in listed

    assert usher(config, "passwd", "usrann", password="new-pw") == 0
    assert capsys.readouterr().out == "Changed the password of usrann\n"
    assert directory.authenticate("usrann", "new-pw")
    assert not directory.authenticate("usrann", "ann-pw")

    assert usher(config, "del", "usrbob") == 0
    assert capsys.readouterr().out == f"Deleted user usrbob from {slapd.url}\n"
    assert not directory.is_admin("usrbob")
    assert usher(config, "list") == 0
    assert "usrbob" not in capsys.readouterr().out
    # The password file was never touched.
    assert not os.path.exists(tmp_path / "passwd")


def test_errors_like_the_file_back_end(slapd, config, capsys):
    assert usher(config, "add", "usrcat", password="pw") == 0
    capsys.readouterr()
    assert usher(config, "add", "usrcat", password="pw") == 1
    assert capsys.readouterr().err == \
        f"usher: error: user 'usrcat' already exists in {slapd.url}\n"
    assert usher(config, "passwd", "nosuch", password="pw") == 1
    assert capsys.readouterr().err == f"usher: error: no user 'nosuch' in {slapd.url}\n"
    assert usher(config, "del", "nosuch") == 1
    assert capsys.readouterr().err == f"usher: error: no user 'nosuch' in {slapd.url}\n"
    assert usher(config, "add", "Bad*Name", password="pw") == 1
    assert "invalid user name 'Bad*Name'" in capsys.readouterr().err
    assert usher(config, "add", "usrdee", password="") == 1
    assert capsys.readouterr().err == "usher: error: the password is empty\n"


def test_the_password_is_asked_twice_without_stdin(config, capsys):
    answers = iter(["one", "two"])
    status = admin.main(["user", "add", "usreve", "--ldap-config", config],
                        getpass=lambda prompt: next(answers))
    assert status == 1
    assert "do not match" in capsys.readouterr().err
    assert "usreve" not in dict(load_directory(config).list_users())


def test_a_stopped_directory_is_a_clear_error(slapd, config, capsys):
    slapd.stop()
    try:
        assert usher(config, "add", "usrfay", password="fay-pw") == 1
        err = capsys.readouterr().err
        assert err.startswith(f"usher: error: the LDAP server {slapd.url} is unavailable")
        assert "fay-pw" not in err and "Traceback" not in err
        assert usher(config, "list") == 1
    finally:
        slapd.start()


def test_a_bad_configuration_names_the_file_and_key(slapd, tmp_path, capsys):
    path = slapd.plugin_config(tmp_path / "bad.config", uid_min="many")
    assert admin.main(["user", "list", "--ldap-config", path]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"usher: error: {path}:") and "uid_min" in err
    assert admin.main(["user", "list", "--ldap-config", str(tmp_path / "none")]) == 1
    assert "no such LDAP configuration file" in capsys.readouterr().err


def test_the_command_as_a_program(config):
    done = subprocess.run([sys.executable, "-m", "usher.admin", "user", "add", "usrgil",
                           "--password-stdin", "--ldap-config", config], input="gil-pw\n",
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "gil-pw" not in done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "usher.admin", "user", "list",
                           "--ldap-config", config], capture_output=True, text=True, timeout=60)
    assert "usrgil" in done.stdout.splitlines()
