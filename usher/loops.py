"""Periodic work that outlives its own failures.

A ``task.LoopingCall`` stops for good the first time its function fails, so a
scan or a sample that hits one bad answer would never run again. ``unfailing``
wraps such a function so that a failure is logged with its traceback and the
next call comes as planned; ``every`` starts a loop of one.
"""

from twisted.internet import defer, task


def unfailing(function, *, log, message, **fields):
    """``function()`` (returning an awaitable) as a call -> a Deferred that
    never fails: an exception is logged with its traceback (``log.failure``
    with ``message`` and ``fields``) and the Deferred fires None."""
    async def guarded():
        try:
            await function()
        except Exception:
            log.failure(message, **fields)

    return lambda: defer.Deferred.fromCoroutine(guarded())


def every(interval, call, *, clock, now):
    """Start calling ``call()`` every ``interval`` seconds of ``clock`` (at
    once too when ``now``) -> the running ``task.LoopingCall``. ``call``
    must never fail (see ``unfailing``), or the loop stops."""
    loop = task.LoopingCall(call)
    loop.clock = clock
    loop.start(interval, now=now)
    return loop
