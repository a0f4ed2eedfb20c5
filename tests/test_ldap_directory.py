"""The directory client (usher.plugins.ldap.directory) on the real test slapd:
users, passwords, the admin group, cluster branches, configuration errors
and a server that goes away."""

import os
import socket
import threading

import ldap3
import pytest

from usher.config import load_plugin_config, parse_spec
from usher.controller.plugins import COMMON_OPTIONS
from usher.errors import ConfigError, InvalidRequest
from usher.plugins.ldap.config import CONFIG_SPEC
from usher.plugins.ldap.directory import (
    Directory, DirectoryConfig, DirectoryError, DirectoryUnavailable, load_config,
    load_directory)

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "etc", "plugins", "ldap.config")


@pytest.fixture(scope="module")
def config_file(slapd, tmp_path_factory):
    return slapd.plugin_config(tmp_path_factory.mktemp("dir") / "ldap.config", uid_min=42000,
                               default_gid=4242, home_template="/net/home/{user}")


@pytest.fixture(scope="module")
def directory(config_file):
    return load_directory(config_file)


def entry(slapd, dn, *attributes):
    connection = slapd.connect()
    connection.search(dn, "(objectClass=*)", ldap3.BASE, attributes=list(attributes) or ["*"],
                      dereference_aliases=ldap3.DEREF_NEVER)
    return connection.response[0]["attributes"] if connection.response else None


# -- users ------------------------------------------------------------------------------

def test_add_user_makes_a_posix_account_with_a_salted_hash(slapd, directory):
    uid = directory.add_user("dirann", "ann-secret")
    assert uid >= 42000
    attributes = entry(slapd, f"uid=dirann,ou=people,{slapd.base_dn}")
    assert attributes["uidNumber"] == [str(uid)] and attributes["gidNumber"] == ["4242"]
    assert attributes["homeDirectory"] == ["/net/home/dirann"]
    assert attributes["loginShell"] == ["/bin/bash"]
    assert {"inetOrgPerson", "posixAccount"} <= set(attributes["objectClass"])
    stored = attributes["userPassword"][0]
    assert stored.startswith("{SSHA}") and "ann-secret" not in stored
    assert directory.user_ids("dirann") == (uid, 4242)
    assert directory.authenticate("dirann", "ann-secret") is True


def test_uid_numbers_are_the_next_free_ones(directory):
    first = directory.add_user("dirben", "pw")
    second = directory.add_user("dircat", "pw")
    assert second == first + 1
    assert directory.add_user("dirdan", "pw", uid_number=first + 50) == first + 50
    assert directory.add_user("direve", "pw") == first + 51


def test_wrong_password_and_unknown_user_are_answers(directory):
    directory.add_user("dirfay", "fay-pw")
    assert directory.authenticate("dirfay", "wrong") is False
    assert directory.authenticate("nosuchuser", "fay-pw") is False
    assert directory.authenticate("dirfay", "") is False     # never an unauthenticated bind
    assert directory.user_ids("nosuchuser") is None
    assert directory.is_admin("nosuchuser") is False


@pytest.mark.parametrize("name", ["a*", "x)(uid=*", "uid=dirfay,ou=people", "Dirfay", "",
                                  "a\\b", "x,ou=groups", None])
def test_hostile_names_never_reach_the_directory(directory, name):
    assert directory.authenticate(name, "fay-pw") is False
    with pytest.raises(InvalidRequest):
        directory.user_ids(name)
    with pytest.raises(InvalidRequest):
        directory.add_user(name, "pw")
    with pytest.raises(InvalidRequest):
        directory.ensure_cluster_branch("dirfay", name)


def test_values_are_escaped_in_filters_and_dns(directory):
    # A valid name may still hold characters an LDAP filter gives meaning to
    # ('-' is fine, but the escaping is what keeps "*" etc. out anyway).
    assert directory.user_dn("a-b_c") == "uid=a-b_c,ou=people,dc=usher,dc=local"
    from ldap3.utils.conv import escape_filter_chars
    assert escape_filter_chars("x)(uid=*") == "x\\29\\28uid=\\2a"


def test_set_password_delete_and_list(directory):
    directory.add_user("dirgus", "old", admin=True)
    directory.set_password("dirgus", "new")
    assert directory.authenticate("dirgus", "old") is False
    assert directory.authenticate("dirgus", "new") is True
    listed = dict(directory.list_users())
    assert listed["dirgus"] == "admin" and listed["dirann"] is None
    assert directory.is_admin("dirgus") is True
    directory.delete_user("dirgus")
    assert "dirgus" not in dict(directory.list_users())
    assert directory.is_admin("dirgus") is False      # the membership went with the user
    assert directory.authenticate("dirgus", "new") is False
    with pytest.raises(InvalidRequest, match="no user 'dirgus'"):
        directory.delete_user("dirgus")
    with pytest.raises(InvalidRequest, match="no user 'dirgus'"):
        directory.set_password("dirgus", "x")


def test_adding_a_user_twice_is_refused(directory):
    directory.add_user("dirhal", "pw")
    with pytest.raises(InvalidRequest, match="already exists"):
        directory.add_user("dirhal", "pw")
    with pytest.raises(InvalidRequest, match="password is empty"):
        directory.add_user("dirhal2", "")


def test_set_admin(directory):
    directory.add_user("dirivy", "pw")
    directory.set_admin("dirivy", True)
    directory.set_admin("dirivy", True)          # idempotent
    assert directory.is_admin("dirivy")
    directory.set_admin("dirivy", False)
    directory.set_admin("dirivy", False)
    assert not directory.is_admin("dirivy")


# -- cluster branches ------------------------------------------------------------------------

def test_ensure_cluster_branch_makes_the_layout(slapd, directory):
    directory.add_user("dirjo", "pw")
    assert directory.ensure_cluster_branch("dirjo", "sneetch") is True
    assert directory.ensure_cluster_branch("dirjo", "sneetch") is False   # idempotent
    branch = f"ou=sneetch,ou=dirjo,ou=clusters,{slapd.base_dn}"
    alias = entry(slapd, f"uid=dirjo,ou=people,{branch}")
    assert set(alias["objectClass"]) >= {"alias", "extensibleObject"}
    assert alias["aliasedObjectName"] == [f"uid=dirjo,ou=people,{slapd.base_dn}"]
    group = entry(slapd, f"cn=admin,ou=groups,{branch}")
    assert group["gidNumber"] == ["10000"] and group["memberUid"] == ["dirjo"]
    assert directory.cluster_admins("dirjo", "sneetch") == ["dirjo"]
    assert ("dirjo", "sneetch") in directory.cluster_branches()


def test_the_alias_logs_the_owner_in_with_their_one_password(slapd, directory):
    """A VM's nslcd searching the branch with deref finds the global entry."""
    directory.add_user("dirkim", "kim-pw")
    directory.ensure_cluster_branch("dirkim", "web")
    connection = slapd.connect(f"uid=dirkim,ou=people,{slapd.base_dn}", "kim-pw")
    connection.search(f"ou=people,ou=web,ou=dirkim,ou=clusters,{slapd.base_dn}",
                      "(uid=dirkim)", attributes=["uidNumber"],
                      dereference_aliases=ldap3.DEREF_ALWAYS)
    assert [e.entry_dn for e in connection.entries] == [f"uid=dirkim,ou=people,{slapd.base_dn}"]


def test_ensure_puts_a_removed_owner_back_in_the_admin_group(slapd, directory):
    directory.add_user("dirlee", "pw")
    directory.ensure_cluster_branch("dirlee", "c1")
    root = slapd.connect()
    group = f"cn=admin,ou=groups,ou=c1,ou=dirlee,ou=clusters,{slapd.base_dn}"
    assert root.modify(group, {"memberUid": [(ldap3.MODIFY_ADD, ["guest"])]})
    assert root.modify(group, {"memberUid": [(ldap3.MODIFY_DELETE, ["dirlee"])]})
    assert directory.ensure_cluster_branch("dirlee", "c1") is True
    assert directory.cluster_admins("dirlee", "c1") == ["dirlee", "guest"]


def test_remove_cluster_branch_removes_the_whole_subtree(slapd, directory):
    directory.add_user("dirmo", "pw")
    directory.ensure_cluster_branch("dirmo", "a")
    directory.ensure_cluster_branch("dirmo", "b")
    # What the in-VM tool might have added, deep in the branch.
    root = slapd.connect()
    deep = f"ou=sub,ou=people,ou=a,ou=dirmo,ou=clusters,{slapd.base_dn}"
    assert root.add(deep, ["organizationalUnit"], {"ou": "sub"})
    assert root.add(f"uid=guest,{deep}", ["account"], {"uid": "guest"})
    assert directory.remove_cluster_branch("dirmo", "a") is True
    assert directory.remove_cluster_branch("dirmo", "a") is False
    branches = directory.cluster_branches()
    assert ("dirmo", "a") not in branches and ("dirmo", "b") in branches
    assert directory.cluster_admins("dirmo", "a") == []
    # The owner's global entry is untouched (the alias pointed at it).
    assert directory.user_ids("dirmo") is not None
    # The last branch takes the owner's container with it.
    directory.remove_cluster_branch("dirmo", "b")
    assert entry(slapd, f"ou=dirmo,ou=clusters,{slapd.base_dn}") is None


def test_cluster_branches_leaves_out_names_that_are_not_usher_names(slapd, directory):
    root = slapd.connect()
    assert root.add(f"ou=Not_A_User!,ou=clusters,{slapd.base_dn}", ["organizationalUnit"],
                    {"ou": "Not_A_User!"})
    directory.ensure_cluster_branch("dirned", "ok")
    assert root.add(f"ou=UPPER_case,ou=dirned,ou=clusters,{slapd.base_dn}",
                    ["organizationalUnit"], {"ou": "UPPER_case"})
    branches = directory.cluster_branches()
    assert ("dirned", "ok") in branches
    assert not any(owner == "not_a_user!" or cluster == "upper_case"
                   for owner, cluster in branches)


def test_many_branches_are_listed(directory):
    for i in range(30):
        directory.ensure_cluster_branch("dirpat", f"c{i}")
    assert {c for o, c in directory.cluster_branches() if o == "dirpat"} == \
        {f"c{i}" for i in range(30)}


# -- the server away ------------------------------------------------------------------------

def test_a_stopped_server_is_unavailable_not_a_refusal(slapd, directory):
    directory.add_user("dirquin", "quin-pw")
    slapd.stop()
    try:
        for call in (lambda: directory.authenticate("dirquin", "quin-pw"),
                     lambda: directory.is_admin("dirquin"),
                     lambda: directory.user_ids("dirquin"),
                     lambda: directory.ensure_cluster_branch("dirquin", "x"),
                     lambda: directory.cluster_branches()):
            with pytest.raises(DirectoryUnavailable) as caught:
                call()
            assert slapd.url in str(caught.value)
            assert "quin-pw" not in str(caught.value)
            assert slapd.service_password not in str(caught.value)
    finally:
        slapd.start()
    assert directory.authenticate("dirquin", "quin-pw") is True


def test_a_server_that_never_answers_times_out(tmp_path):
    """A socket that accepts and says nothing: the call ends with
    DirectoryUnavailable within call_timeout, it does not hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        password_file = tmp_path / "pw"
        password_file.write_text("service-secret\n")
        directory = Directory(DirectoryConfig.from_plugin_config(
            {"url": f"ldap://127.0.0.1:{listener.getsockname()[1]}", "base_dn": "dc=x,dc=y",
             "bind_password_file": str(password_file), "call_timeout": 1.0}, source="t.config"))
        with pytest.raises(DirectoryUnavailable):
            directory.authenticate("someone", "pw")
        with pytest.raises(DirectoryUnavailable) as caught:
            directory.user_ids("someone")
        assert "service-secret" not in str(caught.value)
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()


def test_a_wrong_service_password_is_a_clear_error(slapd, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    directory = load_directory(slapd.plugin_config(tmp_path / "ldap.config",
                                                   bind_password_file=str(wrong)))
    with pytest.raises(DirectoryError, match="refused the service account cn=usher") as caught:
        directory.list_users()
    assert not isinstance(caught.value, DirectoryUnavailable)
    assert "not-the-password" not in str(caught.value)
    assert "bind_password_file" in str(caught.value)


# -- configuration ---------------------------------------------------------------------------

def test_the_sample_loads_with_its_defaults(tmp_path):
    spec = {**COMMON_OPTIONS, **parse_spec(CONFIG_SPEC)}
    loaded = load_plugin_config(spec, SAMPLE)
    assert loaded == load_plugin_config(spec, None)
    assert loaded["cluster_branch_policy"] == "delete" and loaded["uid_min"] == 10000
    # The sample as a whole, with a password file where it says.
    password_file = tmp_path / "ldap.password"
    password_file.write_text("pw\n")
    text = open(SAMPLE, encoding="utf-8").read().replace("/etc/usher/ldap.password",
                                                         str(password_file))
    (tmp_path / "ldap.config").write_text(text)
    config = load_config(tmp_path / "ldap.config")
    assert (config.url, config.base_dn, config.bind_dn) == (
        "ldap://127.0.0.1:389", "dc=usher,dc=local", "cn=usher,dc=usher,dc=local")
    assert (config.call_timeout, config.cluster_admin_gid, config.reconcile_interval) == (
        5.0, 10000, 60.0)


def test_the_password_never_shows(config_file):
    config = load_config(config_file)
    assert config.bind_password == "service-secret"
    assert "service-secret" not in repr(config)
    assert "service-secret" not in repr(Directory(config))


@pytest.mark.parametrize("key, value, complaint", [
    ("url", "http://x", "url: 'http://x' is not an ldap://"),
    ("url", "ldap://u:p@host", "url:"),
    ("base_dn", "dc=a(b),dc=c", "base_dn:"),
    ("base_dn", "", "base_dn:"),
    ("bind_dn", "not a dn", "bind_dn:"),
    ("bind_password_file", "/nonexistent/pw", "bind_password_file: cannot read"),
    ("admin_group", "Bad Group", "admin_group:"),
    ("home_template", "home/{user}", "home_template:"),
    ("home_template", "/home/fixed", "home_template:"),
    ("login_shell", "bash", "login_shell:"),
    ("ca_file", "/nonexistent/ca.pem", "ca_file:"),
])
def test_bad_settings_name_the_file_and_key(slapd, tmp_path, key, value, complaint):
    path = slapd.plugin_config(tmp_path / "ldap.config", **{key: value})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(str(path))
    assert complaint in str(caught.value)


def test_an_empty_password_file_and_spec_errors(slapd, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    path = slapd.plugin_config(tmp_path / "a.config", bind_password_file=str(empty))
    with pytest.raises(ConfigError, match="holds no password"):
        load_config(path)
    path = slapd.plugin_config(tmp_path / "b.config", cluster_branch_policy="archive")
    with pytest.raises(ConfigError, match=f"{path}:.*cluster_branch_policy"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such LDAP configuration file"):
        load_config(tmp_path / "missing.config")
