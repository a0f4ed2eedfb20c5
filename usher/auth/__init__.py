"""Authentication for the controller's client port.

``build_auth_chain`` turns the configured module names into an ``AuthChain``
(a ``twisted.cred`` checker for ``IUsernamePassword``) to register on the
controller's Portal. Shipped modules: ``local`` (``usher.auth.local``) and
``pam`` (``usher.auth.pam``); see ``usher.auth.chain`` for adding others (LDAP).
"""

from usher.auth.chain import (
    AUTH_MODULES,
    DEFAULT_MODULE_TIMEOUT,
    AuthChain,
    AuthModuleFactory,
    build_auth_chain,
)
from usher.auth.local import LocalPasswordModule

__all__ = [
    "AUTH_MODULES", "DEFAULT_MODULE_TIMEOUT", "AuthChain", "AuthModuleFactory",
    "LocalPasswordModule", "build_auth_chain",
]
