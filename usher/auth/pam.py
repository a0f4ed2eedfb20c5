"""Authentication through PAM: local UNIX accounts (the paper's "authentication
backed by local UNIX passwords"), or whatever the host's PAM stack is set up
for (NIS, SSSD, Kerberos …).

Uses ``pamela`` (PAM through ctypes, maintained by the Jupyter project). PAM
is blocking and may sleep seconds after a wrong password (``pam_faildelay``),
so every call runs in the thread pool, and at most ``max_concurrent`` at once
so that a burst of failing logins cannot take every thread from the rest of
the controller (libvirt-free, but bcrypt and file access share the pool).

The PAM service is ``pam_service`` (default ``usher``: with no
``/etc/pam.d/usher``, Linux-PAM uses the ``other`` policy, which on Debian is
the common-auth/common-account stack, i.e. the UNIX accounts). Both
``pam_authenticate`` and ``pam_acct_mgmt`` must succeed, so locked and expired
accounts are refused. Accounts whose uid is below ``pam_min_uid`` (root,
system accounts) are refused without asking PAM. Members of
``pam_admin_group`` get the ``admin`` role.
"""

from __future__ import annotations

import grp
import pwd

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from usher.auth.slots import BoundedPool
from usher.interfaces import IAuthModule

# PAM's answers that mean "these credentials are not good" (the chain asks
# the next module); anything else means PAM itself is broken or misconfigured.
PAM_PERM_DENIED = 6
PAM_AUTH_ERR = 7
PAM_CRED_INSUFFICIENT = 8
PAM_USER_UNKNOWN = 10
PAM_MAXTRIES = 11
PAM_NEW_AUTHTOK_REQD = 12
PAM_ACCT_EXPIRED = 13
REFUSALS = frozenset({PAM_PERM_DENIED, PAM_AUTH_ERR, PAM_CRED_INSUFFICIENT, PAM_USER_UNKNOWN,
                      PAM_MAXTRIES, PAM_NEW_AUTHTOK_REQD, PAM_ACCT_EXPIRED})

DEFAULT_SERVICE = "usher"
DEFAULT_MIN_UID = 1000


class PAMUnavailable(Exception):
    """PAM failed for a reason other than the credentials (the chain logs it)."""


def _pam_check(service, username, password, min_uid):
    """Blocking: -> True, False, or raises PAMUnavailable."""
    try:
        entry = pwd.getpwnam(username)
    except KeyError:
        entry = None
    if entry is not None and entry.pw_uid < min_uid:
        return False
    import pamela   # loads libpam; only when PAM is configured
    try:
        pamela.authenticate(username, password, service=service, resetcred=0, check=True)
    except pamela.PAMError as error:
        if error.errno in REFUSALS:
            return False
        raise PAMUnavailable(f"PAM service {service!r}: {error}") from None
    # PAM may know users NSS does not list (and the other way round); the
    # uid rule applies to those NSS knows.
    return True


def _in_group(username, group):
    try:
        info = grp.getgrnam(group)
    except KeyError:
        return False
    if username in info.gr_mem:
        return True
    try:
        return pwd.getpwnam(username).pw_gid == info.gr_gid
    except KeyError:
        return False


@implementer(IAuthModule)
class PAMModule:
    name = "pam"
    log = Logger()

    def __init__(self, pool, reactor, *, service=DEFAULT_SERVICE, admin_group=None,
                 min_uid=DEFAULT_MIN_UID, max_concurrent=2):
        self.service = service
        self.admin_group = admin_group
        self.min_uid = min_uid
        self._pool = pool
        self._reactor = reactor
        # A login the chain gave up on keeps its slot until PAM returns.
        self._bounded = BoundedPool(reactor, pool, max_concurrent)

    def _in_pool(self, function, *args):
        return deferToThreadPool(self._reactor, self._pool, function, *args)

    def authenticate(self, username, password):
        """-> Deferred[bool]; fails with PAMUnavailable when PAM is broken."""
        return self._bounded.run(_pam_check, self.service, username, password, self.min_uid)

    def role(self, username):
        """-> Deferred["admin" | None]: admin for members of ``admin_group``."""
        return Deferred.fromCoroutine(self._role(username))

    async def _role(self, username):
        if not self.admin_group:
            return None
        member = await self._in_pool(_in_group, username, self.admin_group)
        return "admin" if member else None

    def __repr__(self):
        return f"<PAMModule service={self.service!r}>"
