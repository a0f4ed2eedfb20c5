"""The `usher` admin command (usher.admin.main), called in-process."""

import io
import ipaddress

import pytest
from cryptography import x509

from usher import admin, passwdfile, pki

ROUNDS = 4


def _fail_if_prompted(prompt):
    raise AssertionError(f"unexpected prompt {prompt!r}")


def _answers(*replies):
    """A getpass stand-in that gives ``replies`` in turn and records the prompts."""
    queue = list(replies)

    def fake_getpass(prompt):
        fake_getpass.prompts.append(prompt)
        return queue.pop(0)

    fake_getpass.prompts = []
    return fake_getpass


def run(*argv, stdin="", getpass=_fail_if_prompted):
    return admin.main(list(argv), stdin=io.StringIO(stdin), getpass=getpass,
                      bcrypt_rounds=ROUNDS)


@pytest.fixture
def passwd(tmp_path):
    return tmp_path / "passwd"


def _password_ok(path, user, password):
    return passwdfile.check_password(password, passwdfile.load(path)[user].password_hash)


# -- usher user ---------------------------------------------------------------------

def test_user_add_prompts_twice(passwd, capsys):
    getpass = _answers("s3cret", "s3cret")

    assert run("user", "add", "alice", "--admin", "--passwd-file", str(passwd),
               getpass=getpass) == 0

    assert len(getpass.prompts) == 2
    assert passwdfile.load(passwd)["alice"].role == "admin"
    assert _password_ok(passwd, "alice", "s3cret")
    assert "Added user alice (admin)" in capsys.readouterr().out


def test_user_add_reads_one_line_from_stdin(passwd):
    assert run("user", "add", "bob", "--password-stdin", "--passwd-file", str(passwd),
               stdin="pass word\nignored\n") == 0
    assert passwdfile.load(passwd)["bob"].role is None
    assert _password_ok(passwd, "bob", "pass word")


@pytest.mark.parametrize("argv, stdin, getpass, complaint", [
    (["user", "add", "carol"], "", _answers("one", "two"), "passwords do not match"),
    (["user", "add", "carol"], "", _answers("", ""), "must not be empty"),
    (["user", "add", "carol", "--password-stdin"], "", _fail_if_prompted, "no password"),
    (["user", "add", "carol", "--password-stdin"], "\n", _fail_if_prompted, "must not be empty"),
    (["user", "add", "Carol"], "", _fail_if_prompted, "invalid user name 'Carol'"),
])
def test_user_add_failures_exit_1_and_create_nothing(passwd, capsys, argv, stdin, getpass,
                                                      complaint):
    assert run(*argv, "--passwd-file", str(passwd), stdin=stdin, getpass=getpass) == 1
    assert not passwd.exists()
    err = capsys.readouterr().err
    assert err.startswith("usher: error: ") and complaint in err


def test_user_add_refuses_an_existing_user_before_prompting(passwd, capsys):
    passwdfile.add_user(passwd, "alice", "first", rounds=ROUNDS)
    assert run("user", "add", "alice", "--passwd-file", str(passwd)) == 1
    assert "user 'alice' already exists" in capsys.readouterr().err
    assert _password_ok(passwd, "alice", "first")


def test_user_passwd_changes_the_password_and_keeps_the_role(passwd):
    passwdfile.add_user(passwd, "alice", "first", "admin", rounds=ROUNDS)

    assert run("user", "passwd", "alice", "--passwd-file", str(passwd),
               getpass=_answers("second", "second")) == 0

    assert _password_ok(passwd, "alice", "second")
    assert passwdfile.load(passwd)["alice"].role == "admin"


def test_user_passwd_for_an_unknown_user_exits_1_without_prompting(passwd, capsys):
    passwdfile.add_user(passwd, "alice", "first", rounds=ROUNDS)
    assert run("user", "passwd", "bob", "--passwd-file", str(passwd)) == 1
    assert "usher: error: no user 'bob'" in capsys.readouterr().err


def test_user_del(passwd, capsys):
    passwdfile.add_user(passwd, "alice", "first", rounds=ROUNDS)
    passwdfile.add_user(passwd, "bob", "second", rounds=ROUNDS)

    assert run("user", "del", "alice", "--passwd-file", str(passwd)) == 0
    assert list(passwdfile.load(passwd)) == ["bob"]

    assert run("user", "del", "alice", "--passwd-file", str(passwd)) == 1
    assert "usher: error: no user 'alice'" in capsys.readouterr().err


def test_user_list(passwd, capsys):
    passwdfile.add_user(passwd, "alice", "first", "admin", rounds=ROUNDS)
    passwdfile.add_user(passwd, "bob", "second", rounds=ROUNDS)

    assert run("user", "list", "--passwd-file", str(passwd)) == 0
    assert capsys.readouterr().out == "alice\tadmin\nbob\n"


def test_user_list_without_a_file_exits_1(passwd, capsys):
    assert run("user", "list", "--passwd-file", str(passwd)) == 1
    assert capsys.readouterr().err == f"usher: error: {passwd}: password file not found\n"


def test_user_commands_default_to_etc_usher_passwd():
    args = admin.build_parser().parse_args(["user", "list"])
    assert args.passwd_file == "/etc/usher/passwd"


# -- usage errors -----------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    [], ["user"], ["user", "add"], ["user", "frobnicate"], ["user", "add", "a", "--bogus"],
    ["ca"], ["cert", "issue"], ["cert", "issue", "--lnm", "x", "--days", "soon"],
    ["cert", "issue", "x"], ["cert", "issue", "--lnm", "--gateway", "x"],
    ["ca", "init", "--key-type", "dsa"], ["sandbox"],
])
def test_usage_errors_exit_2(argv, capsys):
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: usher")
    assert "\nusher: error: " in err


def test_help_exits_0(capsys):
    assert run("--help") == 0
    out = capsys.readouterr().out
    assert "user" in out and "ca" in out and "cert" in out


# -- usher ca / usher cert ----------------------------------------------------------------

def test_ca_init_then_refuse_then_force(tmp_path, capsys):
    ca_dir = tmp_path / "etc-usher"

    assert run("ca", "init", "--dir", str(ca_dir)) == 0
    first = (ca_dir / "ca_cert.pem").read_bytes()
    assert (ca_dir / "ca_key.pem").exists()

    assert run("ca", "init", "--dir", str(ca_dir)) == 1
    assert "without --force" in capsys.readouterr().err
    assert (ca_dir / "ca_cert.pem").read_bytes() == first

    assert run("ca", "init", "--dir", str(ca_dir), "--force", "--cn", "Lab CA") == 0
    certificate = x509.load_pem_x509_certificate((ca_dir / "ca_cert.pem").read_bytes())
    assert certificate.subject.rfc4514_string() == "CN=Lab CA"


def test_cert_issue_with_hostnames_and_ips(tmp_path):
    ca_dir, out = tmp_path / "ca", tmp_path / "out"
    assert run("ca", "init", "--dir", str(ca_dir)) == 0

    assert run("cert", "issue", "--controller", "usherctrl", "--dir", str(ca_dir), "--out",
               str(out), "--hostname", "localhost", "--hostname", "ctrl.example.org",
               "--ip", "127.0.0.1") == 0

    certificate = x509.load_pem_x509_certificate((out / "usherctrl_cert.pem").read_bytes())
    assert pki.certificate_identity(certificate) == pki.PeerIdentity("usherctrl", "controller")
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["usherctrl", "localhost", "ctrl.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert (out / "usherctrl_key.pem").exists()


def test_cert_issue_writes_next_to_the_ca_by_default(tmp_path, capsys):
    assert run("ca", "init", "--dir", str(tmp_path)) == 0
    assert run("cert", "issue", "--lnm", "lnm-01", "--dir", str(tmp_path), "--days", "30") == 0
    assert "lnm_names" in capsys.readouterr().out
    assert (tmp_path / "lnm-01_cert.pem").exists() and (tmp_path / "lnm-01_key.pem").exists()
    assert run("cert", "issue", "--lnm", "lnm-01", "--dir", str(tmp_path)) == 1
    assert run("cert", "issue", "--lnm", "lnm-01", "--dir", str(tmp_path), "--force") == 0


@pytest.mark.parametrize("flag, role", [("--controller", "controller"), ("--lnm", "lnm"),
                                        ("--gateway", "gateway")])
def test_cert_issue_gives_the_certificate_its_role(tmp_path, flag, role):
    assert run("ca", "init", "--dir", str(tmp_path)) == 0
    assert run("cert", "issue", flag, "box", "--dir", str(tmp_path)) == 0
    certificate = x509.load_pem_x509_certificate((tmp_path / "box_cert.pem").read_bytes())
    assert pki.certificate_identity(certificate) == pki.PeerIdentity("box", role)


@pytest.mark.parametrize("extra, complaint", [
    (["--ip", "300.1.1.1"], "invalid IP address '300.1.1.1'"),
    (["--hostname", "no spaces"], "invalid host name"),
    (["--lnm", "--hostname", "localhost"], "an LNM certificate names only the LNM"),
])
def test_cert_issue_bad_names_exit_1(tmp_path, capsys, extra, complaint):
    assert run("ca", "init", "--dir", str(tmp_path)) == 0
    role = [] if "--lnm" in extra else ["--controller"]
    assert run("cert", "issue", *role, "lnm-01", "--dir", str(tmp_path), *extra) == 1
    assert complaint in capsys.readouterr().err
    assert not (tmp_path / "lnm-01_cert.pem").exists()


def test_cert_issue_without_a_ca_exits_1_naming_the_file(tmp_path, capsys):
    assert run("cert", "issue", "--lnm", "lnm-01", "--dir", str(tmp_path)) == 1
    assert f"{tmp_path}/ca_cert.pem: certificate file not found" in capsys.readouterr().err


# -- the extension point for more subcommands ---------------------------------------------------

def test_more_subcommands_plug_in_through_registration_functions(capsys):
    seen = []

    def register_extra_commands(subparsers):
        extra = subparsers.add_parser("extra")
        extra.add_argument("--nodes", type=int, default=1)
        extra.set_defaults(handler=lambda args, context: seen.append((args.nodes, context)) or 0)

    status = admin.main(["extra", "--nodes", "3"], bcrypt_rounds=ROUNDS,
                        subcommands=admin.SUBCOMMANDS + (register_extra_commands,))

    assert status == 0
    assert seen[0][0] == 3 and seen[0][1].bcrypt_rounds == ROUNDS


def test_a_handler_usage_error_exits_2(capsys):
    def register(subparsers):
        subparsers.add_parser("picky").set_defaults(handler=_raise_usage_error)

    assert admin.main(["picky"], subcommands=(register,)) == 2
    assert "usher: error: --nodes must be even" in capsys.readouterr().err


def _raise_usage_error(args, context):
    raise admin.UsageError("--nodes must be even")
