"""The per-name coalescing queue of DNS changes, drained one message at a
time off the reactor, retried with exponential backoff.

What is queued is the *desired state* of records: per (zone, name), a map
(rdtype, value) -> wanted. A change to a record already waiting replaces
the earlier one (an address added then removed before the server answered
is one deletion), so nothing is lost however long the server is away, and
the queue holds at most one entry per record Usher manages.

``send(zone, changes)`` -> Deferred (normally ``api.run_blocking`` of
``DnsServer.update``); changes are (name, rdtype, value, wanted). Up to
``max_batch`` names of one zone go in one message. A failure puts the batch
back (behind nothing: it is retried first, and changes made meanwhile win)
and the next attempt waits ``retry_initial`` seconds, doubling up to
``retry_max``; the first failure is logged and so is the recovery. Time is
the injected ``clock``'s (``task.Clock`` in tests).
"""

from collections import OrderedDict

from twisted.internet import defer
from twisted.logger import Logger

from usher.plugins.dns.updates import DnsUnavailable

log = Logger()


class UpdateQueue:
    def __init__(self, send, clock, *, retry_initial=1.0, retry_max=60.0, max_batch=64,
                 server="the DNS server"):
        self._send = send
        self.clock = clock
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.max_batch = max_batch
        self.server = server
        self._pending = OrderedDict()   # (zone, name) -> {(rdtype, value): wanted}
        self._inflight = {}             # the batch being sent: same shape
        self._retry_call = None
        self._waiters = []              # (keys, Deferred)
        self._stopped = False
        self.failures = 0               # consecutive failed attempts
        self.failing_since = None
        self.last_error = None
        self.last_success = None
        self.applied = 0                # names applied

    # -- what callers see ------------------------------------------------------------

    @property
    def pending(self):
        """Names waiting or being sent."""
        return len(set(self._pending) | set(self._inflight))

    @property
    def healthy(self):
        return self.failures == 0

    def pending_change(self, zone, name, rdtype, value):
        """The change waiting (or being sent) for one record: True, False
        or None (nothing pending)."""
        key, record = (zone, name), (rdtype, value)
        for entries in (self._pending, self._inflight):
            if record in entries.get(key, {}):
                return entries[key][record]
        return None

    def put(self, zone, name, rdtype, value, wanted):
        """Want the record (``wanted``) or want it gone; returns at once."""
        if self._stopped:
            return
        self._pending.setdefault((zone, name), {})[(rdtype, value)] = bool(wanted)
        self._kick()

    def wait_clean(self, keys, timeout=None):
        """-> Deferred firing True once none of ``keys`` ((zone, name)) has
        a change waiting or in flight; with ``timeout`` (seconds), False if
        they are still pending then."""
        keys = set(keys)
        if self._clean(keys):
            return defer.succeed(True)

        def cancelled(d):
            self._waiters[:] = [(k, w) for k, w in self._waiters if w is not d]
        waiter = defer.Deferred(cancelled)
        self._waiters.append((keys, waiter))
        if timeout is None:
            return waiter
        waiter.addTimeout(timeout, self.clock)
        waiter.addErrback(lambda f: f.trap(defer.TimeoutError) and False)
        return waiter

    def flushed(self):
        """-> Deferred firing once nothing is waiting or in flight (tests,
        and a plugin that wants the zones up to date)."""
        return self.wait_clean(set(self._pending) | set(self._inflight))

    def status(self):
        return {"pending": self.pending, "failures": self.failures,
                "failing_since": self.failing_since, "last_error": self.last_error,
                "last_success": self.last_success, "applied": self.applied}

    def stop(self):
        """Drop everything (the plugin goes; reconciliation at its next
        start puts the zones right)."""
        self._stopped = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        self._pending.clear()
        for _keys, waiter in self._waiters[:]:
            waiter.cancel()

    # -- draining --------------------------------------------------------------------

    def _clean(self, keys):
        return not any(key in self._pending or key in self._inflight for key in keys)

    def _kick(self):
        if self._stopped or self._inflight or not self._pending:
            return
        if self._retry_call is not None and self._retry_call.active():
            return
        self._retry_call = None
        zone = next(iter(self._pending))[0]
        batch = [key for key in self._pending if key[0] == zone][: self.max_batch]
        self._inflight = {key: self._pending.pop(key) for key in batch}
        changes = [(name, rdtype, value, wanted)
                   for (_zone, name), records in self._inflight.items()
                   for (rdtype, value), wanted in sorted(records.items())]
        try:
            d = self._send(zone, changes)
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._sent, self._failed)
        d.addErrback(lambda f: log.failure("DNS queue: handling an update's outcome failed",
                                           f))

    def _sent(self, _result):
        if self._stopped:
            return
        done, self._inflight = self._inflight, {}
        self.applied += len(done)
        self.last_success = self.clock.seconds()
        if self.failures:
            log.info("DNS server {server} answers again after {failures} failed attempts "
                     "(failing since {since:.0f}); {pending} names still to update",
                     server=self.server, failures=self.failures, since=self.failing_since,
                     pending=self.pending)
        self.failures = 0
        self.failing_since = None
        self._wake_waiters()
        self._kick()

    def _failed(self, failure):
        if self._stopped:
            return
        failed, self._inflight = self._inflight, {}
        # Put the batch back in front; changes made since it left win.
        for key in reversed(list(failed)):
            records = dict(failed[key])
            records.update(self._pending.get(key, {}))
            self._pending[key] = records
            self._pending.move_to_end(key, last=False)
        expected = failure.check(DnsUnavailable) is not None
        self.last_error = (str(failure.value) if expected
                           else f"internal error: {failure.value.__class__.__name__}")
        self.failures += 1
        delay = min(self.retry_max, self.retry_initial * 2 ** (self.failures - 1))
        if self.failures == 1:
            self.failing_since = self.clock.seconds()
            log.warn("DNS updates failing: {error}; {pending} names wait, retrying with "
                     "backoff ({initial:g} s .. {max:g} s)", error=self.last_error,
                     pending=self.pending, initial=self.retry_initial, max=self.retry_max)
        if not expected:
            log.failure("DNS queue: unexpected error sending an update (retried)", failure)
        self._retry_call = self.clock.callLater(delay, self._retry)

    def _retry(self):
        self._retry_call = None
        self._kick()

    def _wake_waiters(self):
        for keys, waiter in self._waiters[:]:
            if self._clean(keys):
                self._waiters.remove((keys, waiter))
                waiter.callback(True)
