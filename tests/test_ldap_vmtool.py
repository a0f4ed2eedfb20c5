"""The in-VM tool ``usher-cluster-ldap`` (usher.plugins.ldap.vmtool) against
the private slapd with the shipped access rules: the owner adds, changes and
deletes users and groups in their cluster's branch (checked with ldap3 as
root); aimed at another user's branch, the access rules refuse; a wrong
password is refused; clear errors for names, missing and existing entries.
The branches are made by the plugin's own directory client."""

import io
import os
import subprocess
import sys

import ldap3
import pytest

from usher.plugins.ldap import vmtool
from usher.plugins.ldap.directory import load_directory

ALICE = "alice-vt"
BOB = "bob-vt"
PASSWORDS = {ALICE: "alice-vt-secret", BOB: "bob-vt-secret"}
CLUSTER = "sneetch"


@pytest.fixture(scope="module")
def branches(slapd, tmp_path_factory):
    """alice-vt and bob-vt with a branch each (as the plugin makes them)."""
    directory = load_directory(slapd.plugin_config(tmp_path_factory.mktemp("vt") / "ldap.config"))
    for number, user in enumerate((ALICE, BOB)):
        slapd.add_user(user, PASSWORDS[user], uid_number=30100 + number)
        directory.ensure_cluster_branch(user, CLUSTER)
    yield directory
    for user in (ALICE, BOB):
        directory.remove_cluster_branch(user, CLUSTER)
        directory.delete_user(user)


def tool_config(tmp_path, slapd, owner=ALICE, cluster=CLUSTER, **extra):
    path = tmp_path / f"cluster-ldap-{owner}-{cluster}.conf"
    lines = [f"url = {slapd.url}", f"base_dn = {slapd.base_dn}", f"owner = {owner}",
             f"cluster = {cluster}   # the cluster's name"]
    lines += [f"{key} = {value}" for key, value in extra.items()]
    path.write_text("# usher-cluster-ldap test configuration\n" + "\n".join(lines) + "\n")
    return str(path)


class Run:
    def __init__(self, status, out, err):
        self.status, self.out, self.err = status, out, err


def run(config, *argv, password=PASSWORDS[ALICE], more=(), bind_user=None):
    """The tool as ``password`` (+ ``more`` lines on stdin) -> Run."""
    stdin = io.StringIO("".join(f"{line}\n" for line in (password,) + tuple(more)))
    out, err = io.StringIO(), io.StringIO()
    args = ["--config", config, "--bind-password-stdin"]
    if bind_user:
        args += ["--bind-user", bind_user]

    def no_prompt(prompt):
        raise AssertionError(f"prompted: {prompt}")
    status = vmtool.main(args + list(argv), stdin=stdin, stdout=out, stderr=err,
                         getpass=no_prompt)
    return Run(status, out.getvalue(), err.getvalue())


def entry(slapd, dn, attributes=("*",)):
    conn = slapd.connect()
    try:
        conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=list(attributes),
                    dereference_aliases=ldap3.DEREF_NEVER)
        return conn.entries[0] if conn.entries else None
    finally:
        conn.unbind()


def branch_dn(owner=ALICE):
    return f"ou={CLUSTER},ou={owner},ou=clusters,dc=usher,dc=local"


def binds(slapd, dn, password):
    server = ldap3.Server(slapd.url, get_info=ldap3.NONE)
    conn = ldap3.Connection(server, user=dn, password=password, raise_exceptions=False)
    try:
        return conn.bind()
    finally:
        conn.unbind()


def test_the_owner_adds_changes_and_deletes_a_user_and_a_group(slapd, branches, tmp_path):
    config = tool_config(tmp_path, slapd)
    user_dn = f"uid=worker,ou=people,{branch_dn()}"
    group_dn = f"cn=builders,ou=groups,{branch_dn()}"

    made = run(config, "useradd", "worker", "--shell", "/bin/sh", "--name", "Build Worker",
               "--password-stdin", more=["worker-pass"])
    assert made.status == 0, made.err
    assert "user worker added (uid 20000, gid 100)" in made.out
    worker = entry(slapd, user_dn)
    assert worker.uidNumber.value == "20000" and worker.loginShell.value == "/bin/sh"
    assert worker.homeDirectory.value == "/home/worker" and worker.cn.value == "Build Worker"
    assert str(worker.userPassword.value).lstrip("b'").startswith("{SSHA}")      # hashed, not the password
    assert binds(slapd, user_dn, "worker-pass")                  # it logs in

    assert run(config, "usermod", "worker", "--uid", "20042", "--home", "/srv/worker").status == 0
    worker = entry(slapd, user_dn)
    assert worker.uidNumber.value == "20042" and worker.homeDirectory.value == "/srv/worker"
    assert run(config, "passwd", "worker", "--password-stdin", more=["changed"]).status == 0
    assert binds(slapd, user_dn, "changed") and not binds(slapd, user_dn, "worker-pass")

    assert run(config, "groupadd", "builders").status == 0
    assert entry(slapd, group_dn).gidNumber.value == "20000"
    assert run(config, "groupmod", "builders", "--add-member", "worker",
               "--add-member", ALICE).status == 0
    assert sorted(entry(slapd, group_dn).memberUid.values) == [ALICE, "worker"]
    assert run(config, "groupmod", "admin", "--add-member", "worker").status == 0
    listed = run(config, "list")
    assert listed.status == 0
    assert f"  {ALICE}  (owner: uid={ALICE},ou=people,dc=usher,dc=local)" in listed.out
    assert "  worker  20042  100  /srv/worker  /bin/sh" in listed.out
    assert f"  builders  20000  {ALICE},worker" in listed.out
    assert f"  admin  10000  {ALICE},worker" in listed.out

    assert run(config, "groupmod", "builders", "--remove-member", "worker").status == 0
    assert entry(slapd, group_dn).memberUid.values == [ALICE]
    deleted = run(config, "userdel", "worker")
    assert deleted.status == 0, deleted.err
    assert entry(slapd, user_dn) is None
    admin = entry(slapd, f"cn=admin,ou=groups,{branch_dn()}")
    assert admin.memberUid.values == [ALICE]                    # membership went with it
    assert run(config, "groupdel", "builders").status == 0
    assert entry(slapd, group_dn) is None


def test_another_users_branch_is_refused_by_the_access_rules(slapd, branches, tmp_path):
    """alice-vt's credentials, bob-vt's branch: every change refused by the
    shipped rules (the tool adds no check of its own for this)."""
    config = tool_config(tmp_path, slapd, owner=BOB)
    # An account of bob-vt's (made by bob-vt's own tool run).
    assert run(config, "useradd", "helper", password=PASSWORDS[BOB],
               bind_user=BOB).status == 0
    assert run(config, "groupadd", "crew", password=PASSWORDS[BOB], bind_user=BOB).status == 0
    for argv in (["useradd", "intruder"], ["groupadd", "intruders"],
                 ["groupmod", "admin", "--add-member", "helper"],
                 ["groupmod", "crew", "--add-member", "helper"],
                 ["usermod", "helper", "--shell", "/bin/false"],
                 ["passwd", "helper", "--password-stdin"],
                 ["userdel", "helper"], ["groupdel", "crew"]):
        refused = run(config, *argv, bind_user=ALICE, more=["stolen"])
        assert refused.status == 1, (argv, refused.out)
        assert f"{ALICE} may not change {branch_dn(BOB)} (insufficient access)" \
            in refused.err, (argv, refused.err)
    helper = entry(slapd, f"uid=helper,ou=people,{branch_dn(BOB)}")
    assert helper.loginShell.value == "/bin/bash"
    assert entry(slapd, f"cn=crew,ou=groups,{branch_dn(BOB)}") is not None
    # Straight through ldap3 too (no tool in the way): refused.
    server = ldap3.Server(slapd.url, get_info=ldap3.NONE)
    conn = ldap3.Connection(server, user=f"uid={ALICE},ou=people,dc=usher,dc=local",
                            password=PASSWORDS[ALICE], raise_exceptions=False)
    assert conn.bind()
    try:
        assert not conn.modify(f"cn=admin,ou=groups,{branch_dn(BOB)}",
                               {"memberUid": [(ldap3.MODIFY_ADD, [ALICE])]})
        assert conn.result["result"] == 50
        assert not conn.delete(f"cn=admin,ou=groups,{branch_dn(BOB)}")
    finally:
        conn.unbind()
    assert entry(slapd, f"uid=intruder,ou=people,{branch_dn(BOB)}") is None
    assert entry(slapd, f"cn=admin,ou=groups,{branch_dn(BOB)}").memberUid.values == [BOB]
    assert run(config, "userdel", "helper", password=PASSWORDS[BOB], bind_user=BOB).status == 0


def test_wrong_password_is_refused(slapd, branches, tmp_path):
    config = tool_config(tmp_path, slapd)
    refused = run(config, "list", password="not-the-password")
    assert refused.status == 1
    assert f"wrong credentials for {ALICE}" in refused.err
    assert "not-the-password" not in refused.err + refused.out


def test_clear_errors(slapd, branches, tmp_path):
    config = tool_config(tmp_path, slapd)
    assert run(config, "useradd", "dup").status == 0
    exists = run(config, "useradd", "dup")
    assert exists.status == 1 and "user dup already exists in cluster sneetch" in exists.err
    missing = run(config, "userdel", "nobody")
    assert missing.status == 1 and "no such user nobody in cluster sneetch" in missing.err
    assert "no such group" in run(config, "groupdel", "nogroup").err
    bad = run(config, "useradd", "Bad,Name")
    assert bad.status == 2 and "invalid user name 'Bad,Name'" in bad.err
    assert run(config, "useradd", "x1", "--shell", "/bin/sh;rm").status == 2
    owner = run(config, "userdel", ALICE)
    assert owner.status == 1 and "cluster owner" in owner.err
    assert "stays in its admin group" in run(config, "groupmod", "admin", "--remove-member",
                                             ALICE).err
    assert "Usher's" in run(config, "groupdel", "admin").err
    assert run(config, "userdel", "dup").status == 0
    # No branch for that cluster (not started yet).
    none = run(tool_config(tmp_path, slapd, cluster="never"), "list")
    assert none.status == 1 and "has no LDAP branch" in none.err


def test_configuration_errors_name_the_file_and_key(tmp_path, slapd):
    path = tmp_path / "bad.conf"
    path.write_text(f"url = {slapd.url}\nowner = alice\ncluster = web\n")
    result = run(str(path), "list")
    assert result.status == 2 and f"{path}: key 'base_dn' is missing" in result.err
    path.write_text("url = ldap://ldap.example.org\nbase_dn = dc=x\nowner = alice\n"
                    "cluster = web\n")
    result = run(str(path), "list")
    assert result.status == 2 and "would send the password in clear" in result.err
    path.write_text(f"url = {slapd.url}\nbase_dn = dc=x\nowner = alice\ncluster = web\n"
                    "colour = blue\n")
    assert "unknown key 'colour'" in run(str(path), "list").err
    result = run(str(tmp_path / "absent.conf"), "list")
    assert result.status == 2 and "cannot be read" in result.err


def test_the_tool_is_one_file_needing_only_ldap3_and_the_standard_library(tmp_path):
    """Copied alone into a VM, it runs (here: from a directory of its own,
    with Usher not importable)."""
    source = os.path.join(os.path.dirname(vmtool.__file__), "vmtool.py")
    copied = tmp_path / "usher-cluster-ldap"
    copied.write_text(open(source).read())
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "usher").mkdir()
    (blocker / "usher" / "__init__.py").write_text("raise ImportError('not in a VM')\n")
    (blocker / "twisted").mkdir()
    (blocker / "twisted" / "__init__.py").write_text("raise ImportError('not in a VM')\n")
    env = dict(os.environ, PYTHONPATH=str(blocker))
    done = subprocess.run([sys.executable, str(copied), "--help"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "useradd" in done.stdout and "groupmod" in done.stdout
