"""plusher's up-calls to Plush: delivered with a doubling delay between
attempts, every delay and timeout on an injected clock."""

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web import xmlrpc

from usher.clients.plusher.checks import safe_url
from usher.clients.plusher.wire import (UPCALL_CANCELLED, UPCALL_DELIVERED, UPCALL_GAVE_UP,
                                        UPCALL_REFUSED)
from usher.protocol import MAX_FIELD

log = Logger()


def _describe(error):
    if isinstance(error, ValueError) and len(error.args) == 2 and all(
            isinstance(a, bytes) for a in error.args):
        # twisted.web.xmlrpc reports an HTTP error status this way.
        return "HTTP " + " ".join(a.decode("latin-1") for a in error.args)
    if isinstance(error, defer.TimeoutError):
        return "no answer in time"
    return f"{type(error).__name__}: {error}"


class UpcallSender:
    """Delivers up-calls to Plush, trying again with a doubling delay.

    ``proxy_factory(url)`` gives an object with ``callRemote(method, *args)``
    (``twisted.web.xmlrpc.Proxy`` in production); every delay and timeout
    runs on ``clock``.
    """

    def __init__(self, clock, proxy_factory, *, attempts, initial_delay, max_delay, timeout):
        self.clock = clock
        self.proxy_factory = proxy_factory
        self.attempts = attempts
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.timeout = timeout

    async def deliver(self, url, method, *args):
        """-> "delivered", "refused" (Plush answered with a fault: not
        repeated), "gave_up" or "cancelled"."""
        delay = self.initial_delay
        request_id = args[0] if args else None
        for attempt in range(1, self.attempts + 1):
            try:
                call = self.proxy_factory(url).callRemote(method, *args)
                call.addTimeout(self.timeout, self.clock)
                await call
                log.info("up-call {method} for request {request_id} delivered to {url}",
                         method=method, request_id=request_id, url=safe_url(url))
                return UPCALL_DELIVERED
            except xmlrpc.Fault as fault:
                log.warn("Plush refused up-call {method} for request {request_id}: fault "
                         "{code}: {message}", method=method, request_id=request_id,
                         code=fault.faultCode, message=str(fault.faultString)[:MAX_FIELD])
                return UPCALL_REFUSED
            except defer.CancelledError:
                return UPCALL_CANCELLED
            except Exception as e:
                reason = _describe(e)
            if attempt == self.attempts:
                break
            log.warn("up-call {method} for request {request_id} to {url} failed (attempt "
                     "{attempt} of {attempts}): {reason}; trying again in {delay:g} s",
                     method=method, request_id=request_id, url=safe_url(url), attempt=attempt,
                     attempts=self.attempts, reason=reason, delay=delay)
            try:
                await task.deferLater(self.clock, delay, lambda: None)
            except defer.CancelledError:
                return UPCALL_CANCELLED
            delay = min(delay * 2, self.max_delay)
        log.error("giving up up-call {method} for request {request_id} to {url} after "
                  "{attempts} attempts: {reason}", method=method, request_id=request_id,
                  url=safe_url(url), attempts=self.attempts, reason=reason)
        return UPCALL_GAVE_UP

