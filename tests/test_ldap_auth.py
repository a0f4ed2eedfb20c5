"""The controller's 'ldap' authentication module: its thread and timeout
behaviour with doubles (a hand-run pool, task.Clock), then logins through the
real chain and client port against the real test slapd — including the
fall-through to the local password file while slapd is stopped — and a
whole usherctrl over TLS."""

import threading

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor, task

from tests.fakes import FakeAuthModule
from usher.auth.chain import AUTH_MODULES, AuthChain, build_auth_chain
from usher.errors import AuthenticationFailed, ConfigError
from usher.plugins.ldap.auth import LDAPAuthModule
from usher.plugins.ldap.directory import DirectoryUnavailable, load_directory


# -- doubles ----------------------------------------------------------------------------

class HandRunPool:
    """A thread pool whose calls run only when the test says (``run_next``)."""

    def __init__(self):
        self.queued = []

    def callInThreadWithCallback(self, on_result, function, *args, **kwargs):
        self.queued.append((on_result, function, args, kwargs))

    def run_next(self):
        on_result, function, args, kwargs = self.queued.pop(0)
        try:
            result = function(*args, **kwargs)
        except Exception as error:
            from twisted.python.failure import Failure
            on_result(False, Failure(error))
        else:
            on_result(True, result)


class ImmediateReactor:
    """What deferToThreadPool needs of a reactor: callFromThread."""

    def callFromThread(self, function, *args, **kwargs):
        function(*args, **kwargs)


class FakeDirectory:
    def __init__(self, passwords=None, admins=(), down=False):
        self.passwords = dict(passwords or {})
        self.admins = set(admins)
        self.down = down
        self.asked = []

    def authenticate(self, user, password):
        self.asked.append(user)
        if self.down:
            raise DirectoryUnavailable("the LDAP server ldap://x is unavailable: test")
        return self.passwords.get(user) == password

    def is_admin(self, user):
        if self.down:
            raise DirectoryUnavailable("the LDAP server ldap://x is unavailable: test")
        return user in self.admins


def credentials(user, password):
    return UsernamePassword(user.encode(), password.encode())


# -- the module with doubles --------------------------------------------------------------

def test_calls_run_in_the_pool_at_most_max_concurrent_at_once():
    pool = HandRunPool()
    module = LDAPAuthModule(FakeDirectory({"ann": "pw"}), pool, ImmediateReactor(),
                            max_concurrent=2)
    answers = [module.authenticate("ann", "pw") for _ in range(5)]
    assert len(pool.queued) == 2           # nothing ran on the caller's thread
    results = []
    for answer in answers:
        answer.addCallback(results.append)
    while pool.queued:
        pool.run_next()
    assert results == [True] * 5


def test_a_directory_that_is_down_fails_the_call():
    pool = HandRunPool()
    module = LDAPAuthModule(FakeDirectory(down=True), pool, ImmediateReactor())
    answer = module.authenticate("ann", "pw")
    failures = []
    answer.addErrback(failures.append)
    pool.run_next()
    assert failures[0].check(DirectoryUnavailable)


def test_roles_and_a_directory_down_gives_no_role():
    pool = HandRunPool()
    directory = FakeDirectory(admins={"root"})
    module = LDAPAuthModule(directory, pool, ImmediateReactor())
    roles = []
    for user in ("root", "ann"):
        module.role(user).addCallback(roles.append)
        pool.run_next()
    directory.down = True
    module.role("root").addCallback(roles.append)
    pool.run_next()
    assert roles == ["admin", None, None]


def test_the_chain_asks_the_next_module_when_the_directory_is_down():
    pool = HandRunPool()
    ldap = LDAPAuthModule(FakeDirectory(down=True), pool, ImmediateReactor())
    local = FakeAuthModule("local", True)
    chain = AuthChain([ldap, local])
    result = []
    chain.requestAvatarId(credentials("ann", "pw")).addCallback(result.append)
    pool.run_next()
    assert result == ["ann"] and local.asked == [("ann", "pw")]


def test_a_wrong_ldap_password_is_refused_when_local_refuses_too():
    pool = HandRunPool()
    ldap = LDAPAuthModule(FakeDirectory({"ann": "pw"}), pool, ImmediateReactor())
    chain = AuthChain([ldap, FakeAuthModule("local", False)])
    failures = []
    chain.requestAvatarId(credentials("ann", "wrong")).addErrback(failures.append)
    pool.run_next()
    assert failures[0].check(UnauthorizedLogin)


def test_a_directory_that_hangs_times_out_and_keeps_its_slots():
    """The chain gives up after its module timeout (task.Clock) and asks the
    next module; the stuck call keeps its slot until its thread returns, so
    logins meanwhile wait for the slot (and time out in turn) instead of
    taking more of the pool."""
    clock = task.Clock()
    pool = HandRunPool()
    ldap = LDAPAuthModule(FakeDirectory({"ann": "pw", "bob": "pw"}), pool, ImmediateReactor(),
                          max_concurrent=1)
    local = FakeAuthModule("local", True)
    chain = AuthChain([ldap, local], clock=clock, module_timeout=30)
    first, second, third = [], [], []
    chain.requestAvatarId(credentials("ann", "pw")).addCallback(first.append)
    clock.advance(10)
    chain.requestAvatarId(credentials("bob", "pw")).addCallback(second.append)
    assert len(pool.queued) == 1            # bob waits for the slot
    clock.advance(20)
    assert first == ["ann"]                 # through 'local', after 30 s
    assert len(pool.queued) == 1            # ann's bind still holds the slot
    clock.advance(10)
    assert second == ["bob"] and len(pool.queued) == 1    # bob gave up waiting
    pool.run_next()                         # ann's stuck bind ends at last: dropped
    chain.requestAvatarId(credentials("bob", "pw")).addCallback(third.append)
    assert len(pool.queued) == 1
    local.answer = False
    pool.run_next()
    assert third == ["bob"]                 # this time LDAP answered
    assert [user for user, _ in local.asked] == ["ann", "bob"]


# -- building from [ctrl] ---------------------------------------------------------------------

def test_the_factory_is_registered_and_reads_ldap_config(slapd, tmp_path, pool):
    assert "ldap" in AUTH_MODULES
    path = slapd.plugin_config(tmp_path / "ldap.config")
    chain = build_auth_chain(["ldap"], {"ldap_config": path}, pool, reactor)
    module = chain.modules[0]
    assert module.name == "ldap" and module.directory.config.url == slapd.url


def test_bad_config_is_a_config_error_at_start_up(slapd, tmp_path, pool):
    path = slapd.plugin_config(tmp_path / "ldap.config", url="ftp://nowhere")
    with pytest.raises(ConfigError) as caught:
        build_auth_chain(["ldap"], {"ldap_config": path}, pool, reactor)
    message = str(caught.value)
    assert message.startswith("auth module 'ldap': ") and f"{path}: url:" in message
    with pytest.raises(ConfigError, match="no such LDAP configuration file.*ldap_config"):
        build_auth_chain(["ldap"], {"ldap_config": str(tmp_path / "none")}, pool, reactor)
    with pytest.raises(ConfigError, match="/etc/usher/plugins/ldap.config"):
        build_auth_chain(["ldap"], {}, pool, reactor)


# -- the real directory, through the client port ------------------------------------------------

@pytest.fixture(scope="module")
def ldap_users(slapd, tmp_path_factory):
    path = slapd.plugin_config(tmp_path_factory.mktemp("auth") / "ldap.config",
                               call_timeout=2.0)
    directory = load_directory(path)
    directory.add_user("authann", "ann-ldap-pw")
    directory.add_user("authroot", "root-ldap-pw", admin=True)
    # alice is in the local file (tests.clientgrid) and in LDAP, with
    # another password there.
    directory.add_user("alice", "alice-ldap-pw")
    return path


@pytest_twisted.ensureDeferred
async def test_ldap_users_log_in_through_the_chain(slapd, ldap_users, client_grids):
    grid = await client_grids(auth_modules=["ldap", "local"],
                              ctrl_extra={"ldap_config": ldap_users})
    ann = await grid.connected("authann", "ann-ldap-pw")
    assert ann.user == "authann" and ann.admin is False
    started = await ann.start(["ldapvm"])
    assert len(started["started"]) == 1
    root = await grid.connected("authroot", "root-ldap-pw")
    assert root.admin is True
    with pytest.raises(AuthenticationFailed):
        await grid.connected("authann", "wrong")
    # Either module's password logs alice in (LDAP first, then the file).
    assert (await grid.connected("alice", "alice-ldap-pw")).user == "alice"
    assert (await grid.connected("alice")).user == "alice"


@pytest_twisted.ensureDeferred
async def test_with_slapd_stopped_the_local_file_still_logs_in(slapd, ldap_users, client_grids):
    grid = await client_grids(auth_modules=["ldap", "local"],
                              ctrl_extra={"ldap_config": ldap_users})
    slapd.stop()
    try:
        alice = await grid.connected("alice")           # the local file's password
        assert alice.user == "alice" and alice.admin is False
        with pytest.raises(AuthenticationFailed):
            await grid.connected("authann", "ann-ldap-pw")    # only in LDAP
        with pytest.raises(AuthenticationFailed):
            await grid.connected("alice", "alice-ldap-pw")
    finally:
        slapd.start()
    # Back: LDAP logins work again, on the same controller.
    assert (await grid.connected("authann", "ann-ldap-pw")).user == "authann"


@pytest_twisted.ensureDeferred
async def test_logins_do_not_block_the_reactor(slapd, ldap_users, client_grids):
    """While binds run, the reactor keeps ticking (they are in the pool)."""
    grid = await client_grids(auth_modules=["ldap", "local"],
                              ctrl_extra={"ldap_config": ldap_users})
    module = grid.chain.modules[0]
    threads = []
    real = module.directory.authenticate

    def recording(user, password):
        threads.append(threading.current_thread())
        return real(user, password)
    module.directory.authenticate = recording
    clients = await defer.gatherResults([
        defer.ensureDeferred(grid.connected("authann", "ann-ldap-pw")) for _ in range(4)])
    assert all(c.user == "authann" for c in clients)
    assert threads and threading.main_thread() not in threads


# -- a whole usherctrl over TLS ----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_real_usherctrl_authenticates_against_ldap(slapd, ldap_users, tmp_path):
    from tests.e2e import RunningSandbox
    box = RunningSandbox(tmp_path / "box", lnms=1, settings={
        "ctrl": {"auth_modules": "ldap, local", "ldap_config": ldap_users}})
    await box.start()
    try:
        root = await box.connected_client("authroot", "root-ldap-pw")
        assert root.admin is True
        with pytest.raises(AuthenticationFailed):
            await box.connected_client("authroot", "not-it")
        slapd.stop()
        try:
            # The sandbox's own user is in its local password file.
            local = await box.connected_client()
            assert local.user == box.description["user"]
        finally:
            slapd.start()
    finally:
        await box.stop()
