"""Authentication against the controller's local password file (``usher.passwdfile``)."""

from __future__ import annotations

import collections
import os
import secrets

import bcrypt
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from usher import passwdfile
from usher.interfaces import IAuthModule


@implementer(IAuthModule)
class LocalPasswordModule:
    """Checks passwords against a ``username:bcrypt-hash[:role]`` file.

    The file is re-read whenever its inode, mtime or size changes, so
    ``usher user add/passwd/del`` take effect on the next login without a
    restart. File access and bcrypt run in ``pool``, never on the reactor.

    Unknown users cost one bcrypt operation at the file's usual cost factor,
    like a wrong password does, so response time does not tell whether a
    user exists.

    A missing or malformed file makes ``authenticate`` fail with
    ``usher.errors.ConfigError`` (the chain logs it and asks the next module):
    refusing everybody is safer than trusting a stale copy.
    """

    name = "local"
    log = Logger()

    def __init__(self, path, pool, reactor, *, default_rounds: int = passwdfile.DEFAULT_ROUNDS):
        self.path = os.fspath(path)
        self._pool = pool
        self._reactor = reactor
        self._default_rounds = default_rounds
        self._stamp = None
        self._entries: dict[str, passwdfile.PasswdEntry] = {}
        self._reload_lock = DeferredLock()
        self._dummy_hashes: dict[int, str] = {}

    def _in_pool(self, function, *args):
        return deferToThreadPool(self._reactor, self._pool, function, *args)

    def authenticate(self, username, password):
        """-> Deferred[bool]: whether ``password`` is ``username``'s password."""
        return Deferred.fromCoroutine(self._authenticate(username, password))

    def role(self, username):
        """-> Deferred[str | None]: the role column of ``username`` (None if unset or unknown)."""
        return Deferred.fromCoroutine(self._role(username))

    async def _role(self, username):
        entry = (await self._current_entries()).get(username)
        return entry.role if entry else None

    async def _authenticate(self, username, password) -> bool:
        entries = await self._current_entries()
        entry = entries.get(username)
        if entry is not None:
            return await self._in_pool(passwdfile.check_password, password, entry.password_hash)
        await self._spend_like_a_check(password, self._typical_cost(entries))
        return False

    async def _current_entries(self) -> dict[str, passwdfile.PasswdEntry]:
        # Serialised so that two logins racing with an edit cannot install an
        # older reading over a newer one.
        async with self._reload_lock:
            stamp, entries = await self._in_pool(
                passwdfile.load_if_changed, self.path, self._stamp)
            if entries is not None:
                if self._stamp is not None:
                    self.log.info("Reloaded password file {path} ({count} users)",
                                  path=self.path, count=len(entries))
                self._stamp, self._entries = stamp, entries
            return self._entries

    def _typical_cost(self, entries) -> int:
        costs = collections.Counter(entry.cost for entry in entries.values())
        if not costs:
            return self._default_rounds
        return max(costs, key=lambda cost: (costs[cost], cost))

    async def _spend_like_a_check(self, password, cost: int) -> None:
        dummy_hash = self._dummy_hashes.get(cost)
        if dummy_hash is None:
            # Making the dummy hash costs one bcrypt operation, the same as
            # the check it replaces this time.
            self._dummy_hashes[cost] = await self._in_pool(_make_dummy_hash, cost)
        else:
            await self._in_pool(passwdfile.check_password, password, dummy_hash)

    def __repr__(self):
        return f"<LocalPasswordModule {self.path}>"


def _make_dummy_hash(cost: int) -> str:
    unguessable = secrets.token_hex(16).encode("ascii")
    return bcrypt.hashpw(unguessable, bcrypt.gensalt(cost)).decode("ascii")
