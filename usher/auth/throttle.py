"""Back-off for failed logins: per source address and per user name.

The policy (README, "Security"):

- **Per source: a lockout.** A source address (the peer of the connection, or
  the address a trusted gateway such as plusher vouches for) that fails
  ``source_failures`` logins within ``forget_after`` seconds is locked out
  for ``source_lockout`` seconds: its logins are refused at once, for every
  user, without asking the authentication chain. Each failure after a
  lockout has ended locks it out again for twice as long, up to
  ``source_lockout_max``. A success does not clear a source's record (an
  attacker with an account of their own could otherwise reset it between
  guesses); it is forgotten ``forget_after`` seconds after its last failure
  or lockout.
- **Per user: a growing delay, never a lockout.** After
  ``user_free_failures`` failures for one user name (from any source), each
  further login for that name waits until ``user_delay`` seconds (doubling
  with every failure, at most ``user_delay_max``) have passed since the last
  failure, and is then checked as usual. An attacker spreading guesses over
  many sources can slow a user's login down by at most ``user_delay_max``
  seconds, never stop it: the delay is not a refusal, and the real user's
  correct password succeeds once it is checked, which clears the record.
- Unknown user names are counted exactly like known ones, so the throttle
  says nothing about which users exist (and costs nothing to look up).
- Memory is bounded: each table holds at most ``max_entries`` records (the
  least recently failed is dropped first) and records expire.

Every threshold crossed is an audit log entry (``audit`` field): a source
locked out, a user's logins delayed.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

from twisted.logger import Logger

from usher.errors import ConfigError

log = Logger()

# Records kept per table (sources, users): ~200 bytes each.
MAX_ENTRIES = 10_000
# User names longer than this are kept as a digest (they cannot be Usher
# user names anyway; see usher.passwdfile.USERNAME_PATTERN).
MAX_KEY = 64


@dataclasses.dataclass(frozen=True)
class ThrottlePolicy:
    source_failures: int = 10
    source_lockout: float = 60.0
    source_lockout_max: float = 3600.0
    user_free_failures: int = 3
    user_delay: float = 1.0
    user_delay_max: float = 16.0
    forget_after: float = 3600.0
    max_entries: int = MAX_ENTRIES

    def __post_init__(self):
        if self.source_failures < 1 or self.user_free_failures < 1 or self.max_entries < 1:
            raise ConfigError("login throttle: failure counts and table size must be at "
                              "least 1")
        if min(self.source_lockout, self.user_delay, self.forget_after) <= 0:
            raise ConfigError("login throttle: durations must be positive")
        if self.source_lockout_max < self.source_lockout:
            raise ConfigError("login throttle: login_source_lockout_max must be at least "
                              "login_source_lockout")
        if self.user_delay_max < self.user_delay:
            raise ConfigError("login throttle: login_user_delay_max must be at least "
                              f"{self.user_delay:g} s")

    @classmethod
    def from_settings(cls, ctrl):
        """From the controller's [ctrl] section (usher.settings.CTRL_SPEC)."""
        return cls(source_failures=ctrl["login_source_failures"],
                   source_lockout=ctrl["login_source_lockout"],
                   source_lockout_max=ctrl["login_source_lockout_max"],
                   user_free_failures=ctrl["login_user_failures"],
                   user_delay_max=ctrl["login_user_delay_max"],
                   forget_after=ctrl["login_failure_memory"])


class SourceLockedOut(Exception):
    """Logins from this source are refused for ``retry_after`` more seconds."""

    def __init__(self, source, retry_after):
        super().__init__(f"source {source} is locked out for {retry_after:.0f} s")
        self.source = source
        self.retry_after = retry_after


@dataclasses.dataclass
class _Record:
    failures: int = 0
    last: float = 0.0            # time of the last failure (or lockout)
    locked_until: float = 0.0    # sources only
    lockouts: int = 0            # sources only: lockouts so far

    def expires(self, forget_after):
        return max(self.last, self.locked_until) + forget_after


class _Table:
    """Records by key, least recently updated first; bounded and expiring."""

    def __init__(self, clock, policy):
        self._clock = clock
        self._policy = policy
        self._records = collections.OrderedDict()

    def __len__(self):
        return len(self._records)

    def get(self, key):
        record = self._records.get(key)
        if record is not None and record.expires(self._policy.forget_after) \
                <= self._clock.seconds():
            del self._records[key]
            return None
        return record

    def touch(self, key):
        """The record of ``key`` (a new one if none), as the most recent."""
        self._sweep()
        record = self.get(key)
        if record is None:
            while len(self._records) >= self._policy.max_entries:
                self._records.popitem(last=False)
            record = self._records[key] = _Record()
        else:
            self._records.move_to_end(key)
        return record

    def forget(self, key):
        self._records.pop(key, None)

    def _sweep(self):
        now = self._clock.seconds()
        while self._records:
            key, record = next(iter(self._records.items()))
            if record.expires(self._policy.forget_after) > now:
                return
            del self._records[key]


def _user_key(user):
    if len(user) <= MAX_KEY:
        return user
    return "#" + hashlib.sha256(user.encode("utf-8", "replace")).hexdigest()


def _shown(text, limit=MAX_KEY):
    """A peer-chosen string as it may appear in the log: bounded, its repr
    unless it is printable."""
    shown = text if text.isprintable() else repr(text)
    return shown if len(shown) <= limit else shown[:limit] + f"… ({len(shown)} characters)"


class LoginThrottle:
    """The back-off of failed logins (see the module's docstring) on ``clock``.

    For each login: ``admit(user, source)`` raises ``SourceLockedOut`` or
    returns the seconds to wait before checking it (0: at once); then
    ``failed(user, source)`` or ``succeeded(user, source)``.
    """

    def __init__(self, clock, policy: ThrottlePolicy | None = None):
        self.clock = clock
        self.policy = policy or ThrottlePolicy()
        self.sources = _Table(clock, self.policy)
        self.users = _Table(clock, self.policy)

    def admit(self, user, source):
        now = self.clock.seconds()
        record = self.sources.get(source)
        if record is not None and record.locked_until > now:
            raise SourceLockedOut(source, record.locked_until - now)
        return self.user_delay(user)

    def user_delay(self, user):
        """Seconds a login for ``user`` has to wait now (0: none)."""
        record = self.users.get(_user_key(user))
        if record is None:
            return 0.0
        delay = self._delay_after(record.failures)
        return max(0.0, record.last + delay - self.clock.seconds())

    def _delay_after(self, failures):
        p = self.policy
        over = failures - p.user_free_failures
        if over < 0:
            return 0.0
        return min(p.user_delay * 2 ** min(over, 64), p.user_delay_max)

    def failed(self, user, source):
        now = self.clock.seconds()
        p = self.policy
        record = self.sources.touch(source)
        record.failures += 1
        record.last = now
        if record.failures >= p.source_failures:
            duration = min(p.source_lockout * 2 ** min(record.lockouts, 64),
                           p.source_lockout_max)
            record.lockouts += 1
            record.locked_until = now + duration
            # One more failure after the lockout locks it out again.
            record.failures = p.source_failures - 1
            log.warn("audit: logins from {source} refused for {seconds:g} s after "
                     "{count} failed logins (lockout {lockouts})", audit="source_locked_out",
                     source=source, seconds=duration, count=p.source_failures,
                     lockouts=record.lockouts)
        user_record = self.users.touch(_user_key(user))
        user_record.failures += 1
        user_record.last = now
        delay = self._delay_after(user_record.failures)
        if delay:
            log.warn("audit: logins for user {user} delayed {seconds:g} s after {count} "
                     "failed logins (last from {source})", audit="user_delayed",
                     user=_shown(user), seconds=delay, count=user_record.failures,
                     source=source)

    def succeeded(self, user, source):
        """The user proved their password: their delay ends (the source's
        record stays; see the module's docstring)."""
        self.users.forget(_user_key(user))
