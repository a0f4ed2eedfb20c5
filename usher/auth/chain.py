"""The controller's authentication chain.

"An administrator can register multiple authentication modules, and Usher
will query each in turn ... If one succeeds before reaching the end of the
chain, the user is authenticated." (LISA 2007 paper, Controller section.)

``AuthChain`` is a ``twisted.cred`` checker for ``IUsernamePassword`` whose
avatar id is the user name (``str``). Modules are ``IAuthModule`` providers,
built from configuration names by ``build_auth_chain`` through a registry of
factories: ``local`` (the bcrypt password file), ``pam``
(``usher.auth.pam``: local UNIX accounts) and ``ldap``
(``usher.plugins.ldap.auth``: a bind to the directory of ``[ctrl]
ldap_config``) ship with Usher; other modules are added by passing a
registry that extends ``AUTH_MODULES``::

    registry = {**AUTH_MODULES, "radius": make_radius_module}
    checker = build_auth_chain(["radius", "local"], ctrl_config, pool, reactor,
                               registry=registry)

A factory is called as ``factory(ctrl_config, pool, reactor)`` and returns an
``IAuthModule``; it raises ``usher.errors.ConfigError`` for bad settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from usher import passwdfile
from usher.auth.local import LocalPasswordModule
from usher.errors import ConfigError
from usher.interfaces import IAuthModule

# Generous: an LDAP server may be slow, but a login must not hang forever.
DEFAULT_MODULE_TIMEOUT = 30.0

AuthModuleFactory = Callable[[Mapping[str, Any], Any, Any], IAuthModule]


def _as_text(value) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


@implementer(ICredentialsChecker)
class AuthChain:
    """Asks each module in turn; the first that accepts authenticates the user.

    A module answering False passes the question on. A module that raises,
    times out (when ``module_timeout`` is set) or answers anything but a bool
    is logged as broken and skipped. When no module accepts, the login fails
    with ``UnauthorizedLogin`` whose message does not say why.

    Names that cannot be Usher user names and empty passwords are refused
    before any module is asked (an empty password is an anonymous bind to
    many LDAP servers, i.e. a success).
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(self, modules: Iterable, *, clock=None, module_timeout: float | None = None):
        self.modules = tuple(modules)
        if not self.modules:
            raise ConfigError("the authentication chain has no modules")
        for module in self.modules:
            if not IAuthModule.providedBy(module):
                raise TypeError(f"{module!r} does not provide IAuthModule")
        if module_timeout is not None and clock is None:
            raise TypeError("module_timeout needs a clock")
        self._clock = clock
        self._module_timeout = module_timeout

    def requestAvatarId(self, credentials):
        """-> Deferred[str] firing with the user name, or failing with UnauthorizedLogin."""
        return Deferred.fromCoroutine(self._authenticate(credentials))

    async def _authenticate(self, credentials) -> str:
        username = _as_text(credentials.username)
        password = _as_text(credentials.password)
        if username is None or not passwdfile.USERNAME_PATTERN.fullmatch(username):
            self.log.info("Login refused: {username!r} is not a valid user name",
                          username=credentials.username)
            raise UnauthorizedLogin("Authentication failed")
        if not password:
            self.log.info("Login refused for {username}: empty or undecodable password",
                          username=username)
            raise UnauthorizedLogin("Authentication failed")

        for module in self.modules:
            try:
                accepted = await self._ask(module, username, password)
            except CancelledError:
                # Our caller gave up on the login (not a module timeout, which
                # arrives as TimeoutError): stop asking.
                raise
            except Exception:
                self.log.failure(
                    "Authentication module {module} failed while checking {username}; "
                    "asking the next one", module=module.name, username=username)
                continue
            if accepted is True:
                self.log.info("User {username} authenticated by module {module}",
                              username=username, module=module.name)
                return username
            if accepted is not False:
                self.log.error(
                    "Authentication module {module} answered {answer!r} (not True/False) "
                    "for {username}; treating it as broken",
                    module=module.name, answer=accepted, username=username)
        self.log.info("Login refused for {username}: no module accepted the credentials",
                      username=username)
        raise UnauthorizedLogin("Authentication failed")

    def _ask(self, module, username, password) -> Deferred:
        answer = maybeDeferred(module.authenticate, username, password)
        if self._module_timeout is not None:
            answer.addTimeout(self._module_timeout, self._clock)
        return answer


# -- building the chain from configuration -------------------------------------

def _make_local_module(ctrl_config, pool, reactor) -> LocalPasswordModule:
    path = os.fspath(ctrl_config.get("passwd_file") or passwdfile.DEFAULT_PASSWD_FILE)
    try:
        # Fail at start-up, not at the first login, when the file is unusable.
        passwdfile.load(path)
    except ConfigError as exc:
        raise ConfigError(f"auth module 'local': {exc} (create it with `usher user add`)") from None
    return LocalPasswordModule(path, pool, reactor)


def _make_pam_module(ctrl_config, pool, reactor):
    try:
        from usher.auth.pam import DEFAULT_MIN_UID, DEFAULT_SERVICE, PAMModule
        import pamela  # noqa: F401 - fail at start-up when libpam is missing
    except (ImportError, OSError) as exc:
        raise ConfigError(f"auth module 'pam': PAM is not available here ({exc}); "
                          "install the pamela package and libpam") from None
    service = ctrl_config.get("pam_service") or DEFAULT_SERVICE
    if not os.path.exists(os.path.join("/etc/pam.d", service)):
        AuthChain.log.info("auth module 'pam': no /etc/pam.d/{service}; PAM applies its "
                           "'other' policy", service=service)
    min_uid = ctrl_config.get("pam_min_uid")
    return PAMModule(pool, reactor, service=service,
                     admin_group=ctrl_config.get("pam_admin_group"),
                     min_uid=DEFAULT_MIN_UID if min_uid is None else min_uid)


def _make_ldap_module(ctrl_config, pool, reactor):
    # Imported only when configured: the LDAP plugin's package and ldap3.
    from usher.plugins.ldap.auth import make_module
    return make_module(ctrl_config, pool, reactor)


# The modules shipped with Usher. Read-only: extend it by passing your own
# registry to build_auth_chain.
AUTH_MODULES: Mapping[str, AuthModuleFactory] = MappingProxyType({
    "local": _make_local_module,
    "pam": _make_pam_module,
    "ldap": _make_ldap_module,
})


def _module_names(names) -> list[str]:
    if isinstance(names, str):
        names = names.split(",")
    return [name.strip() for name in names if name.strip()]


def build_auth_chain(names, ctrl_config, pool, reactor, *,
                     registry: Mapping[str, AuthModuleFactory] = AUTH_MODULES,
                     module_timeout: float | None = DEFAULT_MODULE_TIMEOUT) -> AuthChain:
    """Build the chain for the configured module ``names`` (a list, or a comma-separated string).

    ``ctrl_config`` is the controller's ``[ctrl]`` section (a mapping; the
    local module reads ``passwd_file``). Raises ConfigError for unknown,
    repeated or no names, and whatever ConfigError a factory raises.
    """
    module_names = _module_names(names)
    if not module_names:
        raise ConfigError("no authentication modules configured")
    unknown = [name for name in module_names if name not in registry]
    if unknown:
        raise ConfigError(
            f"unknown authentication module(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(registry))}")
    repeated = sorted({name for name in module_names if module_names.count(name) > 1})
    if repeated:
        raise ConfigError(f"authentication module(s) listed twice: {', '.join(repeated)}")
    modules = [registry[name](ctrl_config, pool, reactor) for name in module_names]
    return AuthChain(modules, clock=reactor, module_timeout=module_timeout)
