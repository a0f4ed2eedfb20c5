"""The PAM authentication module against a real local UNIX account that the
test creates (useradd, chpasswd) and removes, through the module and through
the client API with the controller's authentication chain.

Needs root (CI runs as root). A failed PAM login costs about two seconds
(pam_unix's failure delay), so the tests try a wrong password only once.
"""

import os
import secrets
import shutil
import subprocess

import pytest
import pytest_twisted
from twisted.internet import reactor

from usher.auth.chain import AUTH_MODULES, build_auth_chain
from usher.auth.pam import PAMModule, PAMUnavailable
from usher.errors import AuthenticationFailed, ConfigError


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("useradd", "chpasswd",
                                                                  "userdel", "groupadd")),
    reason="creating a local UNIX account for PAM needs root and useradd/chpasswd")


def run(*argv, stdin=None):
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)


@pytest.fixture(scope="module")
def unix_account():
    suffix = secrets.token_hex(3)
    user, group, other_group = f"ushpam{suffix}", f"ushadm{suffix}", f"ushoth{suffix}"
    password = secrets.token_urlsafe(12)
    run("groupadd", group)
    run("groupadd", other_group)
    try:
        run("useradd", "--no-create-home", "--no-user-group", "--shell", "/usr/sbin/nologin",
            "--groups", group, user)
        try:
            run("chpasswd", stdin=f"{user}:{password}\n")
            yield {"user": user, "password": password, "group": group,
                   "other_group": other_group}
        finally:
            run("userdel", user)
    finally:
        run("groupdel", group)
        run("groupdel", other_group)


@pytest_twisted.ensureDeferred
async def test_pam_accepts_the_unix_password_and_knows_admins(unix_account, pool):
    module = PAMModule(pool, reactor, admin_group=unix_account["group"])
    assert await module.authenticate(unix_account["user"], unix_account["password"]) is True
    assert await module.role(unix_account["user"]) == "admin"
    assert await PAMModule(pool, reactor, admin_group=unix_account["other_group"]).role(
        unix_account["user"]) is None
    assert await PAMModule(pool, reactor).role(unix_account["user"]) is None
    # root and system accounts never log in through PAM, whatever their password
    assert await module.authenticate("root", "anything") is False


@pytest_twisted.ensureDeferred
async def test_pam_failures_other_than_credentials_are_errors(pool, monkeypatch):
    import pamela

    def broken(*args, **kwargs):
        raise pamela.PAMError(errno=28)   # PAM_MODULE_UNKNOWN: a misconfigured stack
    monkeypatch.setattr(pamela, "authenticate", broken)
    with pytest.raises(PAMUnavailable, match="PAM service 'usher'.*28"):
        await PAMModule(pool, reactor).authenticate("nobody-here", "x")

    def refused(*args, **kwargs):
        raise pamela.PAMError(errno=13)   # PAM_ACCT_EXPIRED
    monkeypatch.setattr(pamela, "authenticate", refused)
    assert await PAMModule(pool, reactor).authenticate("nobody-here", "x") is False


def test_the_pam_module_is_built_from_the_configuration(pool):
    chain = build_auth_chain(["pam"], {"pam_service": "login", "pam_admin_group": "wheel",
                                       "pam_min_uid": 500}, pool, reactor)
    module = chain.modules[0]
    assert (module.name, module.service, module.admin_group, module.min_uid) == (
        "pam", "login", "wheel", 500)
    assert "pam" in AUTH_MODULES
    with pytest.raises(ConfigError, match="listed twice: pam"):
        build_auth_chain(["pam", "pam"], {}, pool, reactor)


@pytest_twisted.ensureDeferred
async def test_a_unix_account_logs_in_through_the_client_api(unix_account, client_grids):
    grid = await client_grids(auth_modules=["local", "pam"],
                              ctrl_extra={"pam_admin_group": unix_account["group"]})
    unix_user = await grid.connected(unix_account["user"], unix_account["password"])
    assert unix_user.user == unix_account["user"] and unix_user.admin is True
    result = await unix_user.start(["pamvm"])
    assert len(result["started"]) == 1
    # the local password file still works behind PAM in the chain
    alice = await grid.connected("alice")
    assert alice.admin is False
    with pytest.raises(AuthenticationFailed):
        await grid.connected(unix_account["user"], "not-the-password")


def test_a_pam_login_the_chain_gave_up_on_keeps_its_thread_slot():
    """The chain's module timeout cancels a login stuck in PAM: its slot stays
    taken until PAM returns (usher.auth.slots), so stuck logins never take
    more than max_concurrent threads."""
    from twisted.internet import task

    from tests.fakes import FakeAuthModule
    from tests.test_ldap_auth import HandRunPool, ImmediateReactor, credentials
    from usher.auth.chain import AuthChain

    clock = task.Clock()
    pool = HandRunPool()
    pam = PAMModule(pool, ImmediateReactor(), max_concurrent=1)
    chain = AuthChain([pam, FakeAuthModule("local", True)], clock=clock, module_timeout=30)
    first, second = [], []
    chain.requestAvatarId(credentials("ann", "pw")).addCallback(first.append)
    clock.advance(30)
    assert first == ["ann"]                 # through 'local' once PAM timed out
    chain.requestAvatarId(credentials("bob", "pw")).addCallback(second.append)
    assert len(pool.queued) == 1            # ann's PAM call still holds the only slot
    clock.advance(30)
    assert second == ["bob"] and len(pool.queued) == 1
