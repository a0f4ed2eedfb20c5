"""How an LNM tells its controller of changes: the queue of changes not yet
delivered, sent in batches, one batch at a time, retried after a failure.

``ReportQueue.pending`` holds the latest change per VM (``usher.lnm.ledger``
puts them there). A change goes out on the next reactor turn; changes that
come while a report is on its way go together in the next one; a failed
report stays queued and is retried after ``report_interval`` seconds. The
controller's answer (its updated records) is handed to ``acknowledge``.

``Activity`` counts the LNM's work under way (reads of the host, commands, a
report in flight), so that shutting down and ``drain`` can wait for it.
"""

from twisted.internet import defer
from twisted.logger import Logger

from usher.protocol import REPORT_BATCH


class Activity:
    """The work under way: ``enter``/``leave`` around each piece;
    ``await idle()`` until none is left."""

    def __init__(self):
        self.count = 0
        self._idle_waiters = []

    def enter(self):
        self.count += 1

    def leave(self):
        self.count -= 1
        if not self.count:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def idle(self):
        """-> a Deferred that fires once no work is under way (at once if
        none is)."""
        if not self.count:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._idle_waiters.append(waiter)
        return waiter


class ReportQueue:
    """The changes waiting for the controller, and their delivery.

    ``reporter_of()`` is the current reporter (any object with ``async
    report(changes) -> acks``), None while detached; ``acknowledge(batch,
    acks)`` takes a delivered batch (name -> change) and the controller's
    answer. Nothing is sent until ``running``.
    """

    log = Logger()

    def __init__(self, *, name, clock, report_interval, reporter_of, acknowledge, activity):
        self.name = name
        self.clock = clock
        self.report_interval = report_interval
        self._reporter_of = reporter_of
        self._acknowledge = acknowledge
        self._activity = activity
        self.pending = {}       # name -> change not yet delivered
        self.running = False
        self._reporting = False
        self._flush_call = None

    def flush_soon(self, delay=0):
        """Report the queued changes on the next reactor turn (or after
        ``delay`` seconds: a retry), unless a report is already due."""
        if (self._flush_call is not None or not self.running or self._reporter_of() is None
                or not self.pending):
            return

        def due():
            self._flush_call = None
            defer.Deferred.fromCoroutine(self._flush_logged())

        self._flush_call = self.clock.callLater(delay, due)

    def cancel(self):
        """Stop a report that is due (shutting down)."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

    async def _flush_logged(self):
        try:
            await self.flush()
        except Exception:
            self.log.failure("LNM {lnm}: reporting changes failed", lnm=self.name)

    async def drain(self, rounds=10):
        """Wait for the work under way (reads, a report in flight) to end and
        for what is queued to be reported, for at most ``rounds`` reports; so
        that a caller sees the controller informed of everything observed so
        far. Returns whether nothing is left queued."""
        for _ in range(rounds):
            if self._activity.count:
                await self._activity.idle()
                continue
            if not self.pending or self._reporter_of() is None:
                break
            await self.flush()
        return not self.pending

    async def flush(self):
        """Send the queued changes in one batch, if attached; one batch at a
        time (what comes meanwhile goes in the next, sent as soon as this one
        is answered). A failed batch stays queued, retried after
        ``report_interval``."""
        reporter = self._reporter_of()
        if reporter is None or not self.pending or self._reporting:
            return
        batch = {}
        for name, change in self.pending.items():
            if len(batch) == REPORT_BATCH:
                break    # the rest goes in the next batch, once this one is answered
            batch[name] = dict(change)
        self._reporting = True
        self._activity.enter()
        try:
            acks = await reporter.report(list(batch.values()))
        except Exception as e:
            self.log.warn("LNM {lnm}: report of {count} changes failed ({error}); "
                          "retrying in {delay:g} s", lnm=self.name, count=len(batch),
                          error=str(e) or e.__class__.__name__, delay=self.report_interval)
            self._reporting = False
            self._activity.leave()
            self.flush_soon(self.report_interval)
            return
        self._reporting = False
        try:
            self._acknowledge(batch, acks)
        finally:
            self._activity.leave()      # idle means acknowledged (see ``drain``)
        self.flush_soon()
