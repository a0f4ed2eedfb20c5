"""Blocking authentication work in a thread pool, a bounded number at once.

A login the chain gives up on (its module timeout cancels the Deferred) must
not free its slot while its thread still runs: a directory or PAM stack that
hangs would otherwise take every thread of the pool, one timed-out login at
a time. ``BoundedPool.run`` frees a slot when the thread returns, and a
cancellation only while the call is still waiting for one.
"""

from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure


class BoundedPool:
    def __init__(self, reactor, pool, max_concurrent):
        self._reactor = reactor
        self._pool = pool
        self._slots = DeferredSemaphore(max_concurrent)

    def run(self, function, *args) -> Deferred:
        """``function(*args)`` in the pool once a slot is free -> Deferred of
        its result (a late result of a cancelled call is dropped)."""
        acquiring = self._slots.acquire()
        answer = Deferred(canceller=lambda _: acquiring.cancel())

        def start(_):
            running = deferToThreadPool(self._reactor, self._pool, function, *args)
            running.addBoth(finished)

        def finished(result):
            self._slots.release()
            if answer.called:
                return None
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)
            return None

        acquiring.addCallbacks(start, lambda failure: failure.trap(CancelledError))
        return answer
