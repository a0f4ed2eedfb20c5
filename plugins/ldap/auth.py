"""The ``ldap`` authentication module of the controller's chain.

``auth_modules = ldap, local`` in ``[ctrl]``: a login binds to the directory
as ``uid=USER,ou=people,BASE`` with the password given (the directory checks
it; Usher never sees a hash). The answer is True or False; a directory that
is down, unreachable or too slow makes ``authenticate`` fail with
``DirectoryUnavailable``, so the chain logs it and asks the next module (the
paper's "local passwords if LDAP fails"). Members of the directory's
``admin_group`` get the ``admin`` role.

The directory is read from ``[ctrl] ldap_config`` (an ``ldap.config``, the
LDAP plugin's file); a bad file stops the controller at start-up with a
ConfigError naming the file and the key. ldap3 blocks: every call runs in the
pool given in, at most ``max_concurrent`` at once, so a directory that hangs
(each call is bounded by its ``call_timeout``) cannot take every thread of
the pool from the rest of the controller.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from usher.auth.slots import BoundedPool
from usher.errors import ConfigError
from usher.interfaces import IAuthModule
from usher.plugins.ldap.config import DEFAULT_CONFIG_FILE
from usher.plugins.ldap.directory import Directory, DirectoryError, load_config

DEFAULT_MAX_CONCURRENT = 2


@implementer(IAuthModule)
class LDAPAuthModule:
    name = "ldap"
    log = Logger()

    def __init__(self, directory, pool, reactor, *, max_concurrent=DEFAULT_MAX_CONCURRENT):
        self.directory = directory
        self._pool = pool
        self._reactor = reactor
        self._bounded = BoundedPool(reactor, pool, max_concurrent)

    def _in_pool(self, function, *args) -> Deferred:
        """``function`` in the pool, at most ``max_concurrent`` at once; a
        bind the chain gave up on keeps its slot until its thread returns
        (usher.auth.slots)."""
        return self._bounded.run(function, *args)

    def authenticate(self, username, password):
        """-> Deferred[bool]; fails with DirectoryUnavailable when the directory
        cannot answer (the chain then asks the next module)."""
        return self._in_pool(self.directory.authenticate, username, password)

    def role(self, username):
        """-> Deferred["admin" | None]. A directory that cannot answer gives
        None (logged): the user may have logged in through another module."""
        return Deferred.fromCoroutine(self._role(username))

    async def _role(self, username):
        try:
            admin = await self._in_pool(self.directory.is_admin, username)
        except DirectoryError as error:
            self.log.warn("LDAP: cannot read the admin group for {user}: {error}",
                          user=username, error=str(error))
            return None
        except Exception:
            self.log.failure("LDAP: reading the admin group for {user} failed", user=username)
            return None
        return "admin" if admin else None

    def __repr__(self):
        return f"<LDAPAuthModule {self.directory.config.url}>"


def make_module(ctrl_config, pool, reactor) -> LDAPAuthModule:
    """The chain's factory: reads ``[ctrl] ldap_config`` (ConfigError if unusable)."""
    path = ctrl_config.get("ldap_config") or DEFAULT_CONFIG_FILE
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise ConfigError(f"auth module 'ldap': {exc} ([ctrl] ldap_config)") from None
    module = LDAPAuthModule(Directory(config), pool, reactor)
    LDAPAuthModule.log.info("auth module 'ldap': users of {url} under {base}",
                            url=config.url, base=config.base_dn)
    return module
