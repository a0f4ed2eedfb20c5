"""The shipped slapd access rules, tried with ldap3 as the users themselves on
the real test slapd (which loads etc/ldap/usher-acl.conf)."""

import os
import subprocess
import sys

import ldap3
import pytest

from usher import admin
from usher.plugins.ldap import acl
from usher.plugins.ldap.directory import load_directory

HERE = os.path.dirname(os.path.abspath(__file__))
ETC_LDAP = os.path.join(os.path.dirname(HERE), "etc", "ldap")
INSUFFICIENT_ACCESS = 50

ALICE, BOB = "aclalice", "aclbob"


@pytest.fixture(scope="module")
def directory(slapd, tmp_path_factory):
    path = slapd.plugin_config(tmp_path_factory.mktemp("acl") / "ldap.config")
    directory = load_directory(path)
    for user in (ALICE, BOB):
        directory.add_user(user, f"{user}-pw")
        directory.ensure_cluster_branch(user, "sneetch")
    return directory


def bound(slapd, user):
    return slapd.connect(f"uid={user},ou=people,{slapd.base_dn}", f"{user}-pw")


def branch(slapd, owner, cluster="sneetch"):
    return f"ou={cluster},ou={owner},ou=clusters,{slapd.base_dn}"


def refused(connection):
    return connection.result["result"] == INSUFFICIENT_ACCESS


def account(name, uid_number=30000):
    return (["inetOrgPerson", "posixAccount"],
            {"uid": name, "cn": name, "sn": name, "uidNumber": uid_number, "gidNumber": 100,
             "homeDirectory": f"/home/{name}", "userPassword": "{SSHA}not-a-real-hash"})


# -- the shipped files ----------------------------------------------------------------

def test_shipped_files_are_the_generators_output():
    with open(os.path.join(ETC_LDAP, "usher-acl.conf"), encoding="utf-8") as f:
        assert f.read() == acl.slapd_conf("dc=usher,dc=local")
    with open(os.path.join(ETC_LDAP, "usher-acl.ldif"), encoding="utf-8") as f:
        assert f.read() == acl.olc_ldif("dc=usher,dc=local")


def test_usher_ldap_acl_prints_them(capsys):
    assert admin.main(["ldap", "acl", "--base", "dc=example,dc=org"]) == 0
    assert capsys.readouterr().out == acl.slapd_conf("dc=example,dc=org")
    assert admin.main(["ldap", "acl", "--base", "dc=example,dc=org", "--ldif"]) == 0
    out = capsys.readouterr().out
    assert out == acl.olc_ldif("dc=example,dc=org")
    assert "olcAccess: {0}to dn.regex=" in out and "dc=example,dc=org" in out


def test_a_base_that_does_not_fit_in_a_regex_is_refused(capsys):
    assert admin.main(["ldap", "acl", "--base", "dc=a.*,dc=org"]) == 1
    assert "plain attribute=value" in capsys.readouterr().err
    with pytest.raises(ValueError):
        acl.rules("dc=x,dc=y)(")


def test_the_ldif_loads_into_a_cn_config_parser():
    """ldif continuation lines: each rule is one olcAccess value."""
    text = acl.olc_ldif("dc=usher,dc=local")
    values = ldap3_ldif_values(text, "olcAccess")
    assert len(values) == len(acl.rules())
    assert values[1].startswith("{1}to attrs=userPassword by self =w ")


def test_the_shipped_ldif_loads_into_a_cn_config_slapd(tmp_path):
    """ldapmodify with etc/ldap/usher-acl.ldif on a cn=config server that has
    no rules yet: afterwards the users are held to them."""
    from tests.slapd import SlapdServer
    server = SlapdServer(cn_config=True).start()
    try:
        with open(os.path.join(ETC_LDAP, "usher-acl.ldif"), encoding="utf-8") as f:
            server.ldapmodify(f.read())
        config = server.plugin_config(tmp_path / "ldap.config")
        directory = load_directory(config)
        for user in ("cfgann", "cfgbob"):
            directory.add_user(user, "pw")
            directory.ensure_cluster_branch(user, "c")
        ann = server.connect(f"uid=cfgann,ou=people,{server.base_dn}", "pw")
        assert ann.add(f"cn=g,ou=groups,{branch(server, 'cfgann', 'c')}", ["posixGroup"],
                       {"cn": "g", "gidNumber": 5}), ann.result
        assert not ann.add(f"cn=g,ou=groups,{branch(server, 'cfgbob', 'c')}", ["posixGroup"],
                           {"cn": "g", "gidNumber": 5})
        assert refused(ann)
        ann.search(f"ou=people,{server.base_dn}", "(uid=cfgbob)", attributes=["userPassword"])
        assert not ann.response[0]["raw_attributes"].get("userPassword")
    finally:
        server.destroy()


def ldap3_ldif_values(text, attribute):
    values, current = [], None
    for line in text.splitlines():
        if line.startswith(" "):
            current += line[1:]
            continue
        if current is not None:
            values.append(current)
            current = None
        if line.startswith(f"{attribute}: "):
            current = line[len(attribute) + 2:]
    if current is not None:
        values.append(current)
    return values


# -- a user's own cluster branches -----------------------------------------------------

def test_alice_writes_inside_her_branches(slapd, directory):
    connection = bound(slapd, ALICE)
    dn = f"uid=guest1,ou=people,{branch(slapd, ALICE)}"
    assert connection.add(dn, *account("guest1")), connection.result
    assert connection.modify(dn, {"cn": [(ldap3.MODIFY_REPLACE, ["Guest One"])]})
    group = f"cn=admin,ou=groups,{branch(slapd, ALICE)}"
    assert connection.modify(group, {"memberUid": [(ldap3.MODIFY_ADD, ["guest1"])]})
    assert connection.delete(dn), connection.result
    # A branch of her own, under her container (the in-VM tool's groups too).
    new = branch(slapd, ALICE, "extra")
    assert connection.add(new, ["organizationalUnit"], {"ou": "extra"}), connection.result
    assert connection.delete(new)


def test_alice_sets_passwords_in_her_branch_but_cannot_read_them(slapd, directory):
    connection = bound(slapd, ALICE)
    dn = f"uid=guest2,ou=people,{branch(slapd, ALICE)}"
    assert connection.add(dn, *account("guest2", 30002)), connection.result
    assert connection.modify(dn, {"userPassword": [(ldap3.MODIFY_REPLACE, ["{SSHA}other"])]})
    assert connection.search(dn, "(objectClass=*)", attributes=["userPassword", "uid"])
    assert not connection.response[0]["raw_attributes"].get("userPassword")
    assert connection.response[0]["raw_attributes"]["uid"] == [b"guest2"]
    assert connection.delete(dn)


# -- what she may not touch ---------------------------------------------------------------

def test_alice_cannot_write_in_bobs_branch(slapd, directory):
    connection = bound(slapd, ALICE)
    assert not connection.add(f"uid=intruder,ou=people,{branch(slapd, BOB)}",
                              *account("intruder"))
    assert refused(connection)
    group = f"cn=admin,ou=groups,{branch(slapd, BOB)}"
    assert not connection.modify(group, {"memberUid": [(ldap3.MODIFY_ADD, [ALICE])]})
    assert refused(connection)
    assert not connection.delete(f"uid={BOB},ou=people,{branch(slapd, BOB)}")
    assert refused(connection)
    assert not connection.add(branch(slapd, BOB, "stolen"), ["organizationalUnit"],
                              {"ou": "stolen"})
    assert refused(connection)
    assert directory.cluster_admins(BOB, "sneetch") == [BOB]


def test_alice_cannot_change_global_entries(slapd, directory):
    connection = bound(slapd, ALICE)
    bob = f"uid={BOB},ou=people,{slapd.base_dn}"
    assert not connection.modify(bob, {"cn": [(ldap3.MODIFY_REPLACE, ["owned"])]})
    assert refused(connection)
    assert not connection.modify(bob, {"userPassword": [(ldap3.MODIFY_REPLACE, ["{SSHA}x"])]})
    assert refused(connection)
    # Her own entry: only her password, not her uidNumber.
    own = f"uid={ALICE},ou=people,{slapd.base_dn}"
    assert not connection.modify(own, {"uidNumber": [(ldap3.MODIFY_REPLACE, ["0"])]})
    assert refused(connection)
    assert not connection.add(f"uid=mallory,ou=people,{slapd.base_dn}", *account("mallory"))
    assert refused(connection)
    assert not connection.modify(f"cn={slapd.admin_group},ou=groups,{slapd.base_dn}",
                                 {"memberUid": [(ldap3.MODIFY_ADD, [ALICE])]})
    assert refused(connection)
    assert not connection.add(f"ou=carol,ou=clusters,{slapd.base_dn}", ["organizationalUnit"],
                              {"ou": "carol"})
    assert refused(connection)
    assert not connection.delete(f"ou={ALICE},ou=clusters,{slapd.base_dn}")
    assert refused(connection)
    assert not directory.is_admin(ALICE)


def test_a_user_changes_only_their_own_password(slapd, directory, tmp_path):
    connection = bound(slapd, BOB)
    own = f"uid={BOB},ou=people,{slapd.base_dn}"
    new_hash = "{SSHA}" + "A" * 32
    assert connection.modify(own, {"userPassword": [(ldap3.MODIFY_REPLACE, [new_hash])]}), \
        connection.result
    directory.set_password(BOB, f"{BOB}-pw")      # back, for the other tests
    assert directory.authenticate(BOB, f"{BOB}-pw")


# -- reading --------------------------------------------------------------------------------

def test_nobody_reads_passwords(slapd, directory):
    for connection in (bound(slapd, ALICE), slapd.connect(slapd.service_dn,
                                                          slapd.service_password)):
        assert connection.search(f"ou=people,{slapd.base_dn}", "(objectClass=posixAccount)",
                                 attributes=["userPassword", "uid", "uidNumber"])
        names = {entry.uid.value for entry in connection.entries}
        assert {ALICE, BOB} <= names
        for entry in connection.response:
            assert not entry["raw_attributes"].get("userPassword")
        # Not even by filtering on it (a way to guess hashes).
        connection.search(f"ou=people,{slapd.base_dn}", "(userPassword=*)", attributes=["uid"])
        assert connection.result["result"] == 0
        assert connection.entries == []


def test_anonymous_reads_nothing(slapd, directory):
    server = ldap3.Server(slapd.url, get_info=ldap3.NONE)
    connection = ldap3.Connection(server, raise_exceptions=False)
    assert connection.bind()
    connection.search(slapd.base_dn, "(objectClass=*)", attributes=["uid"])
    assert connection.entries == []


def test_a_read_only_proxy_account_reads_the_branches(slapd, directory):
    """What VMs' nslcd/sssd would bind as: any authenticated account."""
    root = slapd.connect()
    proxy = f"cn=reader,{slapd.base_dn}"
    assert root.add(proxy, ["organizationalRole", "simpleSecurityObject"],
                    {"cn": "reader", "userPassword": "reader-pw"})
    reader = slapd.connect(proxy, "reader-pw")
    assert reader.search(branch(slapd, ALICE), "(objectClass=posixGroup)",
                         attributes=["memberUid"])
    assert ALICE in reader.entries[0].memberUid.values
    assert not reader.add(f"uid=x,ou=people,{branch(slapd, ALICE)}", *account("x"))
    assert refused(reader)


def test_the_cli_runs_as_a_program():
    done = subprocess.run([sys.executable, "-m", "usher.admin", "ldap", "acl"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == acl.slapd_conf()
