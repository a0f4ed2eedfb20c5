"""usher.passwdfile, usher.auth.local and usher.auth.chain."""

import os
import stat

import pytest
import pytest_twisted
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, reactor, task
from twisted.logger import Logger
from zope.interface import implementer

from usher import passwdfile
from usher.auth import AUTH_MODULES, AuthChain, LocalPasswordModule, build_auth_chain
from usher.auth import local as local_module
from usher.errors import ConfigError, InvalidRequest
from usher.interfaces import IAuthModule

from tests.fakes import FakeAuthModule

ROUNDS = 4  # bcrypt's minimum: keeps the tests fast


@pytest.fixture
def passwd(tmp_path):
    path = tmp_path / "passwd"
    passwdfile.add_user(path, "alice", "wonderland", "admin", rounds=ROUNDS)
    passwdfile.add_user(path, "bob", "builder", rounds=ROUNDS)
    return path


# -- the password file ---------------------------------------------------------------

def test_added_users_are_stored_as_bcrypt_hashes_with_roles(passwd):
    users = passwdfile.load(passwd)

    assert list(users) == ["alice", "bob"]
    assert users["alice"].role == "admin" and users["bob"].role is None
    assert users["alice"].password_hash.startswith("$2b$04$")
    assert "wonderland" not in passwd.read_text()
    assert passwdfile.check_password("wonderland", users["alice"].password_hash)
    assert not passwdfile.check_password("Wonderland", users["alice"].password_hash)
    assert stat.S_IMODE(os.stat(passwd).st_mode) == 0o600


def test_edits_keep_comments_and_roles(passwd):
    passwd.write_text("# Usher users\n\n" + passwd.read_text())

    passwdfile.set_password(passwd, "alice", "looking-glass", rounds=ROUNDS)
    passwdfile.delete_user(passwd, "bob")

    lines = passwd.read_text().splitlines()
    assert lines[:2] == ["# Usher users", ""]
    assert len(lines) == 3 and lines[2].startswith("alice:$2b$04$") and lines[2].endswith(":admin")
    alice = passwdfile.load(passwd)["alice"]
    assert passwdfile.check_password("looking-glass", alice.password_hash)


def test_rewrites_never_widen_the_file_mode(passwd):
    os.chmod(passwd, 0o644)
    passwdfile.set_password(passwd, "bob", "digger", rounds=ROUNDS)
    assert stat.S_IMODE(os.stat(passwd).st_mode) == 0o640


@pytest.mark.parametrize("change, complaint", [
    (lambda p: passwdfile.add_user(p, "alice", "x", rounds=ROUNDS), "already exists"),
    (lambda p: passwdfile.add_user(p, "Carol", "x", rounds=ROUNDS), "invalid user name"),
    (lambda p: passwdfile.add_user(p, "carol.smith", "x", rounds=ROUNDS), "invalid user name"),
    (lambda p: passwdfile.add_user(p, "c" * 33, "x", rounds=ROUNDS), "invalid user name"),
    (lambda p: passwdfile.add_user(p, "carol", "", rounds=ROUNDS), "must not be empty"),
    (lambda p: passwdfile.add_user(p, "carol", "x" * 73, rounds=ROUNDS), "at most 72"),
    (lambda p: passwdfile.add_user(p, "carol", "x", "Boss", rounds=ROUNDS), "invalid role"),
    (lambda p: passwdfile.set_password(p, "carol", "x", rounds=ROUNDS), "no user 'carol'"),
    (lambda p: passwdfile.set_password(p, "bob", "", rounds=ROUNDS), "must not be empty"),
    (lambda p: passwdfile.delete_user(p, "carol"), "no user 'carol'"),
])
def test_bad_edits_are_refused_and_change_nothing(passwd, change, complaint):
    before = passwd.read_bytes()
    with pytest.raises(InvalidRequest, match=complaint):
        change(passwd)
    assert passwd.read_bytes() == before


def test_usernames_may_start_with_underscore_and_hold_digits_and_dashes(tmp_path):
    path = tmp_path / "passwd"
    for name in ("_svc", "a", "lab-07_x", "z" * 32):
        passwdfile.add_user(path, name, "pw", rounds=ROUNDS)
    assert list(passwdfile.load(path)) == ["_svc", "a", "lab-07_x", "z" * 32]


@pytest.mark.parametrize("content, complaint", [
    ("alice\n", "line 1: expected 'username:bcrypt-hash"),
    ("# ok\nalice:secret\n", "line 2: the password of 'alice' is not a bcrypt hash"),
    ("Alice:$2b$04$" + "a" * 53 + "\n", "line 1: invalid user name"),
    ("a:$2b$04$" + "a" * 53 + "\na:$2b$04$" + "b" * 53 + "\n", "line 2: user 'a' already defined"),
])
def test_malformed_files_name_the_file_and_line(tmp_path, content, complaint):
    path = tmp_path / "passwd"
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"{path}, {complaint}"):
        passwdfile.load(path)


def test_loading_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="password file not found"):
        passwdfile.load(tmp_path / "nope")


def test_load_if_changed_only_rereads_a_changed_file(passwd):
    stamp, users = passwdfile.load_if_changed(passwd)
    assert list(users) == ["alice", "bob"]
    assert passwdfile.load_if_changed(passwd, stamp) == (stamp, None)

    passwdfile.delete_user(passwd, "bob")
    new_stamp, users = passwdfile.load_if_changed(passwd, stamp)
    assert new_stamp != stamp and list(users) == ["alice"]


def test_over_long_passwords_never_match(tmp_path):
    password_hash = passwdfile.hash_password("x" * 72, ROUNDS)
    assert passwdfile.check_password("x" * 72, password_hash)
    assert not passwdfile.check_password("x" * 73, password_hash)


# -- the local module ----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_local_module_checks_passwords(passwd, pool):
    module = LocalPasswordModule(passwd, pool, reactor)

    assert IAuthModule.providedBy(module) and module.name == "local"
    assert await module.authenticate("alice", "wonderland") is True
    assert await module.authenticate("bob", "builder") is True
    assert await module.authenticate("alice", "builder") is False
    assert await module.authenticate("alice", "") is False
    assert await module.role("alice") == "admin"
    assert await module.role("bob") is None


@pytest_twisted.ensureDeferred
async def test_local_module_spends_a_bcrypt_check_on_unknown_users(passwd, pool, monkeypatch):
    dummy_hashes, checked_hashes = [], []
    make_dummy_hash = local_module._make_dummy_hash
    check_password = passwdfile.check_password

    def counting_make_dummy_hash(cost):
        dummy_hashes.append(make_dummy_hash(cost))
        return dummy_hashes[-1]

    def counting_check_password(password, password_hash):
        checked_hashes.append(password_hash)
        return check_password(password, password_hash)

    monkeypatch.setattr(local_module, "_make_dummy_hash", counting_make_dummy_hash)
    monkeypatch.setattr(passwdfile, "check_password", counting_check_password)
    module = LocalPasswordModule(passwd, pool, reactor)

    assert await module.authenticate("mallory", "wonderland") is False
    assert await module.authenticate("mallory", "wonderland") is False
    assert await module.authenticate("zed", "builder") is False

    # One bcrypt operation per attempt, at the cost the file's users have.
    assert len(dummy_hashes) == 1 and dummy_hashes[0].startswith("$2b$04$")
    assert checked_hashes == dummy_hashes * 2


@pytest_twisted.ensureDeferred
async def test_local_module_picks_up_edits_without_restart(passwd, pool):
    module = LocalPasswordModule(passwd, pool, reactor)
    assert await module.authenticate("carol", "secret") is False

    passwdfile.add_user(passwd, "carol", "secret", rounds=ROUNDS)
    assert await module.authenticate("carol", "secret") is True

    passwdfile.set_password(passwd, "carol", "changed", rounds=ROUNDS)
    assert await module.authenticate("carol", "secret") is False
    assert await module.authenticate("carol", "changed") is True

    passwdfile.delete_user(passwd, "carol")
    assert await module.authenticate("carol", "changed") is False


@pytest_twisted.ensureDeferred
async def test_local_module_refuses_everybody_when_the_file_breaks(passwd, pool):
    module = LocalPasswordModule(passwd, pool, reactor)
    assert await module.authenticate("alice", "wonderland") is True

    passwd.write_text(passwd.read_text() + "garbage line\n")
    with pytest.raises(ConfigError, match="line 3"):
        await module.authenticate("alice", "wonderland")

    passwd.unlink()
    with pytest.raises(ConfigError, match="password file not found"):
        await module.authenticate("alice", "wonderland")


# -- the chain -----------------------------------------------------------------------

@pytest.fixture
def log_events(monkeypatch):
    events = []
    monkeypatch.setattr(AuthChain, "log",
                        Logger(namespace="usher.auth.chain", observer=events.append))
    return events


def _login(chain, username, password):
    return chain.requestAvatarId(UsernamePassword(username, password))


@pytest_twisted.ensureDeferred
async def test_chain_asks_modules_in_order_until_one_accepts(log_events):
    first, second, third = FakeAuthModule("a", False), FakeAuthModule("b", True), FakeAuthModule("c", True)
    chain = AuthChain([first, second, third])

    assert ICredentialsChecker.providedBy(chain)
    assert await _login(chain, b"alice", b"pw") == "alice"
    assert first.asked == second.asked == [("alice", "pw")]
    assert third.asked == []
    assert log_events[-1]["module"] == "b" and log_events[-1]["username"] == "alice"


@pytest_twisted.ensureDeferred
async def test_chain_first_success_wins():
    first, second = FakeAuthModule("a", True), FakeAuthModule("b", False)
    assert await _login(AuthChain([first, second]), "bob", "pw") == "bob"
    assert second.asked == []


@pytest_twisted.ensureDeferred
async def test_chain_logs_and_skips_a_broken_module(log_events):
    broken = FakeAuthModule("ldap", RuntimeError("LDAP server on fire"))
    weird = FakeAuthModule("weird", "yes")
    local = FakeAuthModule("local", True)

    assert await _login(AuthChain([broken, weird, local]), "alice", "pw") == "alice"

    failures = [event for event in log_events if "log_failure" in event]
    assert len(failures) == 1
    assert failures[0]["module"] == "ldap" and failures[0]["username"] == "alice"
    assert failures[0]["log_failure"].check(RuntimeError)
    assert any(event.get("answer") == "yes" for event in log_events)
    assert local.asked == [("alice", "pw")]
    assert not any("pw" in repr(value) for event in log_events for value in event.values()
                   if not isinstance(value, Logger))


@pytest_twisted.ensureDeferred
async def test_chain_refuses_when_no_module_accepts(log_events):
    modules = [FakeAuthModule("a", False), FakeAuthModule("b", RuntimeError("down"))]
    with pytest.raises(UnauthorizedLogin):
        await _login(AuthChain(modules), "alice", "wrong")
    assert all(module.asked == [("alice", "wrong")] for module in modules)


@pytest.mark.parametrize("username, password", [
    (b"alice", b""), ("Alice", "pw"), ("alice@example.org", "pw"), (b"\xff", b"pw"),
])
@pytest_twisted.ensureDeferred
async def test_chain_refuses_impossible_names_and_empty_passwords_without_asking(
        username, password):
    module = FakeAuthModule("anything-goes", True)
    with pytest.raises(UnauthorizedLogin):
        await _login(AuthChain([module]), username, password)
    assert module.asked == []


def test_chain_skips_a_module_that_times_out():
    clock = task.Clock()
    hanging = FakeAuthModule("slow", lambda username, password: defer.Deferred())
    local = FakeAuthModule("local", True)
    chain = AuthChain([hanging, local], clock=clock, module_timeout=5)

    login = _login(chain, "alice", "pw")
    clock.advance(4.9)
    assert not login.called and local.asked == []
    clock.advance(0.1)

    assert login.result == "alice"
    assert local.asked == [("alice", "pw")]


def test_chain_needs_modules_that_provide_the_interface():
    with pytest.raises(ConfigError):
        AuthChain([])
    with pytest.raises(TypeError):
        AuthChain([object()])


@pytest_twisted.ensureDeferred
async def test_chain_with_local_module_through_a_portal(passwd, pool):
    @implementer(IRealm)
    class Realm:
        def requestAvatar(self, avatar_id, mind, *interfaces):
            return interfaces[0], f"avatar of {avatar_id}", lambda: None

    portal = Portal(Realm(), [build_auth_chain(["local"], {"passwd_file": str(passwd)},
                                               pool, reactor)])
    _, avatar, _ = await portal.login(UsernamePassword(b"alice", b"wonderland"), None, IRealm)
    assert avatar == "avatar of alice"
    for username, password in ((b"alice", b"builder"), (b"nobody", b"wonderland")):
        with pytest.raises(UnauthorizedLogin):
            await portal.login(UsernamePassword(username, password), None, IRealm)


# -- building the chain from configuration -------------------------------------------------

def test_build_auth_chain_maps_names_through_the_registry(passwd, pool):
    made = []

    def make_ldap(ctrl_config, thread_pool, the_reactor):
        made.append((ctrl_config, thread_pool, the_reactor))
        return FakeAuthModule("ldap", False)

    config = {"passwd_file": str(passwd), "ldap_uri": "ldap://directory"}
    chain = build_auth_chain("ldap, local", config, pool, reactor,
                             registry={**AUTH_MODULES, "ldap": make_ldap})

    assert [module.name for module in chain.modules] == ["ldap", "local"]
    assert made == [(config, pool, reactor)]
    assert chain.modules[1].path == str(passwd)


@pytest.mark.parametrize("names, complaint", [
    (["local", "radius"], "unknown authentication module.*'radius'.*known: ldap, local"),
    ([], "no authentication modules"),
    (" , ", "no authentication modules"),
    (["local", "local"], "listed twice: local"),
])
def test_build_auth_chain_refuses_bad_names(passwd, pool, names, complaint):
    with pytest.raises(ConfigError, match=complaint):
        build_auth_chain(names, {"passwd_file": str(passwd)}, pool, reactor)


def test_build_auth_chain_checks_the_password_file_at_start_up(tmp_path, pool):
    missing = tmp_path / "passwd"
    complaint = f"auth module 'local': {missing}: password file not found"
    with pytest.raises(ConfigError, match=complaint):
        build_auth_chain(["local"], {"passwd_file": str(missing)}, pool, reactor)


def test_the_builtin_registry_is_read_only():
    with pytest.raises(TypeError):
        AUTH_MODULES["evil"] = lambda *args: None
    assert set(AUTH_MODULES) == {"local", "pam", "ldap"}
