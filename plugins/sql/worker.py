"""The SQL plugin's database thread: every query runs there, never on the
reactor, one at a time (allocation stays serial in one controller).

- ``await worker.call(fn, *args)``: ``fn(tx, *args)`` in a transaction
  (``Store.run``) -> its result. Fails with ``DatabaseUnavailable`` when the
  database is down, or has not answered in ``call_timeout`` seconds; a call
  that timed out is abandoned (its transaction rolled back if it had not
  committed yet, else ``on_late(result)`` is called so that the caller can
  undo it).
- ``worker.enqueue_log(fn, *args)``: a write that may wait (the request
  and event log, the mirror, marking or releasing addresses). The queue is
  bounded (``max_queue``; the oldest entry is dropped, counted and logged,
  when it is full); while the database is down it is retried with
  exponential back-off (``retry_initial`` up to ``retry_max`` seconds) and
  drained in order when it is back. A call first writes what is queued, so
  that the database sees every change in the order the controller made it.
- ``worker.healthy``: whether the last contact with the database worked.

A Store is opened (``open_store()``) in the worker's thread at first use
and again after it failed.
"""

import collections
import itertools

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from usher.plugins.sql.store import DatabaseUnavailable

log = Logger()

MAX_QUEUE = 10000
LOG_BATCH = 200
CALL_TIMEOUT = 5.0
RETRY_INITIAL = 1.0
RETRY_MAX = 60.0


class _Abandoned(Exception):
    """The caller gave up on this call: roll it back."""


class _Partial(Exception):
    """The database failed after ``done`` entries of a batch were written."""

    def __init__(self, done, error):
        super().__init__(str(error))
        self.done = done
        self.error = error


class _Ticket:
    __slots__ = ("abandoned",)

    def __init__(self):
        self.abandoned = False


class DatabaseWorker:
    def __init__(self, open_store, *, reactor, clock=None, run_in_thread=None,
                 max_queue=MAX_QUEUE, call_timeout=CALL_TIMEOUT, retry_initial=RETRY_INITIAL,
                 retry_max=RETRY_MAX, batch=LOG_BATCH):
        self._open_store = open_store
        self.clock = clock or reactor
        self._pool = None
        if run_in_thread is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="usher-sql")
            self._pool.start()
            run_in_thread = lambda f, *a: threads.deferToThreadPool(reactor, self._pool, f, *a)  # noqa: E731
        self._run_in_thread = run_in_thread
        self.max_queue = max_queue
        self.call_timeout = call_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.batch = batch
        self.healthy = None          # None: not tried yet
        self.last_error = None
        self.dropped = 0
        self._store = None
        self._queue = collections.deque()
        self._seq = itertools.count()
        self._draining = False
        self._retry_call = None
        self._delay = retry_initial
        self._stopped = False
        self._waiters = []

    # -- in the thread ----------------------------------------------------------------

    def _opened(self):
        if self._store is None:
            self._store = self._open_store()
        return self._store

    def _write(self, entries):
        """Write queued entries: together in one transaction, or one by one
        when one of them fails (that one is dropped and reported). ->
        [(entry, Failure)] of those dropped."""
        try:
            store = self._opened()
        except Exception as e:
            raise _Partial(0, e) from None

        def write_all(tx):
            for _seq, fn, (args, kwargs) in entries:
                fn(tx, *args, **kwargs)
        try:
            store.run(write_all)
            return []
        except DatabaseUnavailable as e:
            raise _Partial(0, e) from None
        except Exception:
            pass
        dropped = []
        for done, entry in enumerate(entries):
            _seq, fn, (args, kwargs) = entry
            try:
                store.run(fn, *args, **kwargs)
            except DatabaseUnavailable as e:
                raise _Partial(done, e) from None
            except Exception:
                dropped.append((entry, Failure()))
        return dropped

    def _job(self, backlog, ticket, fn, args, kwargs):
        dropped = self._write(backlog) if backlog else []

        def guarded(tx):
            if ticket.abandoned:
                raise _Abandoned()
            result = fn(tx, *args, **kwargs)
            if ticket.abandoned:
                raise _Abandoned()
            return result
        try:
            result = self._opened().run(guarded)
        except DatabaseUnavailable:
            self._store_failed()
            raise
        return result, dropped

    def _store_failed(self):
        store, self._store = self._store, None
        if store is not None:
            store.close()

    # -- on the reactor -----------------------------------------------------------------

    def call(self, fn, *args, on_late=None, **kwargs):
        """-> Deferred of ``fn(tx, *args, **kwargs)``'s result (see the module
        docstring)."""
        if self._stopped:
            return defer.fail(DatabaseUnavailable("the SQL plugin is stopped"))
        backlog = list(self._queue)
        self._queue.clear()
        ticket = _Ticket()
        result = defer.Deferred()
        timer = self.clock.callLater(self.call_timeout, self._call_timed_out, result, ticket)

        def answered(outcome):
            job_result, dropped = outcome
            self._report_dropped(dropped)
            self._up()
            self._tell_waiters()
            if timer.active():
                timer.cancel()
            if result.called:
                if on_late is not None:
                    try:
                        on_late(job_result)
                    except Exception:
                        log.failure("SQL plugin: undoing a call that came too late failed")
                return
            result.callback(job_result)

        def failed(failure):
            if timer.active():
                timer.cancel()
            if failure.check(_Abandoned):
                return
            if failure.check(_Partial):
                self._requeue(backlog[failure.value.done:])
                failure = Failure(DatabaseUnavailable(str(failure.value.error)))
            if failure.check(DatabaseUnavailable):
                self._down(failure.value)
            if not result.called:
                result.errback(failure)
            elif not failure.check(DatabaseUnavailable):
                log.failure("SQL plugin: a call that came too late failed", failure)

        d = self._run_in_thread(self._job, backlog, ticket, fn, args, kwargs)
        d.addCallbacks(answered, failed)
        return result

    def _call_timed_out(self, result, ticket):
        ticket.abandoned = True
        if not result.called:
            error = DatabaseUnavailable(f"no answer in {self.call_timeout:g} s")
            self.last_error = str(error)
            result.errback(error)

    def enqueue_log(self, fn, *args, **kwargs):
        """Queue a write ``fn(tx, *args, **kwargs)`` (see the module
        docstring); never fails, never waits."""
        if self._stopped:
            return
        self._queue.append((next(self._seq), fn, (args, kwargs)))
        self._trim()
        self._kick()

    @property
    def queued(self):
        return len(self._queue)

    def flushed(self):
        """-> Deferred fired once every queued write is written (tests, shutdown)."""
        if not self._queue and not self._draining:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def _tell_waiters(self):
        if not self._queue and not self._draining:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def _trim(self):
        while len(self._queue) > self.max_queue:
            self._queue.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warn("SQL plugin: the log queue is full ({max} entries, the database is "
                         "unavailable: {error}); {dropped} oldest entries dropped so far",
                         max=self.max_queue, error=self.last_error, dropped=self.dropped)

    def _requeue(self, entries):
        if entries:
            self._queue = collections.deque(sorted(itertools.chain(entries, self._queue),
                                                   key=lambda entry: entry[0]))
            self._trim()

    def _kick(self):
        if (self._draining or self._retry_call is not None or not self._queue
                or self._stopped):
            return
        self._draining = True
        entries = [self._queue.popleft() for _ in range(min(self.batch, len(self._queue)))]
        d = self._run_in_thread(self._write, entries)
        d.addCallbacks(self._drained, self._drain_failed, errbackArgs=(entries,))

    def _drained(self, dropped):
        self._draining = False
        self._report_dropped(dropped)
        self._up()
        self._kick()
        self._tell_waiters()

    def _drain_failed(self, failure, entries):
        self._draining = False
        if failure.check(_Partial):
            self._requeue(entries[failure.value.done:])
            self._down(failure.value.error)
            return
        # Not the database's fault (a bug): those entries cannot be written.
        log.failure("SQL plugin: {count} log entries could not be written", failure,
                    count=len(entries))
        self._kick()
        self._tell_waiters()

    def _report_dropped(self, dropped):
        for (_seq, fn, _args), failure in dropped:
            log.failure("SQL plugin: a log entry ({what}) could not be written; dropped",
                        failure, what=getattr(fn, "__name__", repr(fn)))

    def _up(self):
        if self.healthy is False:
            log.info("SQL plugin: the database is back; {count} queued log entries are "
                     "written now", count=len(self._queue))
        self.healthy = True
        self.last_error = None
        self._delay = self.retry_initial
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        self._kick()

    def _down(self, error):
        if self.healthy is not False:
            log.error("SQL plugin: the database is unavailable ({error}); log entries are "
                      "queued (at most {max}) and written when it is back",
                      error=str(error), max=self.max_queue)
        self.healthy = False
        self.last_error = str(error)
        if self._retry_call is None and self._queue and not self._stopped:
            self._retry_call = self.clock.callLater(self._delay, self._retry)
            self._delay = min(self.retry_max, self._delay * 2)

    def _retry(self):
        self._retry_call = None
        self._kick()

    def stop(self):
        """Stop: queued entries not written yet are lost (logged)."""
        if self._stopped:
            return
        self._stopped = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        if self._queue:
            log.warn("SQL plugin stopped with {count} log entries not written",
                     count=len(self._queue))
        if self._pool is not None:
            self._pool.stop()
        if self._store is not None:
            self._store.close()
            self._store = None
