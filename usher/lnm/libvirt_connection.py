"""The libvirt connection of a ``LibvirtVMM``: opening it, calls on it,
lifecycle events from it, and coming back after it is lost.

``HypervisorConnection.run`` is how every libvirt call is made: in the
injected thread pool, on the one shared (thread-safe) connection, with
libvirt's errors said in Usher's terms (``NoSuchVM``, ``OperationFailed``,
``Unavailable`` once the connection is gone).

Lifecycle events (when the driver has them) are mapped straight from the
event to an Usher state on libvirt's event-loop thread and handed to
subscribers on the reactor thread. Events the test driver never sends (reboot)
are left to the LNM's periodic scan. When the connection is lost (libvirtd
restarted), it is opened again with backoff, and watchers hear of the loss
and of the return.
"""

import random
import threading
import time
from contextlib import suppress

import libvirt
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from usher import states
from usher.errors import NoSuchVM, OperationFailed, Unavailable

# Error codes a driver answers with when it does not know a flag or call.
UNSUPPORTED = frozenset((libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT,
                         libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED))

# Errors that say something about a domain or a request, never about the
# connection: no need to ask whether the connection is still alive.
_REQUEST_ERRORS = frozenset((libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID,
                             libvirt.VIR_ERR_NO_DOMAIN_METADATA)) | UNSUPPORTED

_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "I/O error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "the hypervisor closed the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by the client",
}

# Marks a lifecycle event that says nothing certain about the run state.
_NO_STATE_CHANGE = object()


def error_code(error):
    """A libvirtError's code (``libvirt.VIR_ERR_*``)."""
    return error.get_error_code()


# --- process-wide libvirt set-up ---------------------------------------------
# libvirt keeps its error handler and its event-loop implementation per
# process, so these are guarded module state rather than per-VMM state.

_process_guard = threading.Lock()
_quieted = False
_event_loop_thread = None


def _discard_libvirt_error(_context, _error):
    # Every error is raised as libvirtError and reported from there; libvirt's
    # default handler would also print each one to stderr.
    pass


def quiet_libvirt():
    """Stop libvirt printing every error to stderr (once per process)."""
    global _quieted
    with _process_guard:
        if not _quieted:
            libvirt.registerErrorHandler(_discard_libvirt_error, None)
            _quieted = True


def _run_event_loop():
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError:
            time.sleep(0.1)  # don't spin if the loop keeps failing


def _ensure_event_loop():
    """Register libvirt's default event loop and run it in a daemon thread,
    once per process; must happen before the connection is opened."""
    global _event_loop_thread
    with _process_guard:
        if _event_loop_thread is None:
            libvirt.virEventRegisterDefaultImpl()
            thread = threading.Thread(target=_run_event_loop,
                                      name="libvirt-event-loop", daemon=True)
            thread.start()
            _event_loop_thread = thread


def state_for_event(event, detail):
    """A lifecycle event -> the Usher state it shows (None: the domain is
    gone), or ``_NO_STATE_CHANGE``."""
    if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
        return None
    if event in (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_RESUMED):
        return states.RUN
    if event in (libvirt.VIR_DOMAIN_EVENT_SUSPENDED,
                 libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED):
        return states.PAUSED
    if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
        if detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED:
            return states.HIBERNATED
        return states.SHUTOFF
    if event == libvirt.VIR_DOMAIN_EVENT_CRASHED:
        return states.SHUTOFF
    # DEFINED (a definition says nothing certain about the run state) and
    # SHUTDOWN (the guest is still stopping; STOPPED follows).
    return _NO_STATE_CHANGE


def _answer_each(results, calls):
    for call, (ok, value) in zip(calls, results):
        if ok:
            call[-1].callback(value)
        else:
            call[-1].errback(value)


def _fail_each(failure, calls):
    for call in calls:
        call[-1].errback(failure)


class HypervisorConnection:
    """The connection to one hypervisor URI, shared by every pool thread.

    ``prepare(conn, driver)`` runs in the pool each time a connection is
    opened, before its events are registered: it raises to refuse the
    connection, and what it returns is ``prepared`` while connected.
    ``events``: register lifecycle and metadata events when the driver has
    them. ``reconnect_initial_delay``/``reconnect_max_delay``: after a loss,
    reconnect after this delay, doubling (with jitter) up to the maximum, on
    ``clock``.

    ``metadata`` (name -> (UUID, Usher metadata)) is a cache for the VMM
    that the connection empties where events say a definition or its
    metadata changed, and on every (re)connection; it is only kept while
    ``metadata_events``.
    """

    log = Logger()

    def __init__(self, uri, *, reactor, pool, clock, prepare, events=True,
                 reconnect_initial_delay=1.0, reconnect_max_delay=30.0):
        self.uri = uri
        self._reactor = reactor
        self._pool = pool
        self._clock = clock
        self._prepare = prepare
        self._events_wanted = events
        self.reconnect_initial_delay = reconnect_initial_delay
        self.reconnect_max_delay = reconnect_max_delay
        self.conn = None
        self.driver = None
        self.prepared = None
        self.metadata = {}
        self._lifecycle_id = None
        self._metadata_id = None
        self._subscribers = []
        self._watchers = []
        self._lock = DeferredLock()
        self._reconnect_call = None
        self.reconnect_attempt = 0
        self._closed = False
        # Calls asked for in one reactor turn, made by a few pool jobs (see
        # run_soon): [(what, name, fn, args, Deferred)].
        self._soon = []
        self._soon_call = None

    @property
    def events_supported(self):
        """True once connected with a lifecycle event stream."""
        return self._lifecycle_id is not None

    @property
    def metadata_events(self):
        """True while metadata-change events keep ``metadata`` true."""
        return self._metadata_id is not None

    # --- calls ----------------------------------------------------------------

    def run(self, what, name, fn, *args):
        """Deferred: fn(conn, *args) in the pool, libvirt errors translated
        (``what`` names the call in messages; ``name`` the VM whose absence is
        ``NoSuchVM``, or None). Unavailable at once while disconnected."""
        conn = self.conn
        if conn is None:
            raise Unavailable(f"the hypervisor at {self.uri} is not connected")
        return deferToThreadPool(self._reactor, self._pool, self.translated,
                                 what, name, conn, fn, *args)

    def translated(self, what, name, conn, fn, *args):
        """fn(conn, *args) here (a pool thread), libvirt errors translated."""
        try:
            return fn(conn, *args)
        except libvirt.libvirtError as e:
            if self.conn is not conn:
                raise Unavailable(f"{what}: the connection to {self.uri} was closed") from None
            if error_code(e) not in _REQUEST_ERRORS and not self._alive(conn):
                self._reactor.callFromThread(self._connection_lost, conn,
                                             e.get_error_message())
                raise Unavailable(f"{what}: lost the connection to {self.uri}: "
                                  f"{e.get_error_message()}") from None
            if error_code(e) == libvirt.VIR_ERR_NO_DOMAIN and name is not None:
                raise NoSuchVM(f"no VM named {name!r} on {self.uri}") from None
            raise OperationFailed(f"{what} failed on {self.uri}: "
                                  f"{e.get_error_message()}") from None
        except OSError as e:  # image and state files
            raise OperationFailed(f"{what} failed on {self.uri}: {e}") from None

    def run_soon(self, what, name, fn, *args):
        """``run`` on the next reactor turn, with every other call asked for
        in this one: many calls (a start of many VMs) cost a few pool jobs (one
        per pool thread, so a slow hypervisor still serves that many at once),
        not one job, thread hand-over and reactor wake-up each."""
        if self.conn is None:
            raise Unavailable(f"the hypervisor at {self.uri} is not connected")
        waiter = Deferred()
        self._soon.append((what, name, fn, args, waiter))
        if self._soon_call is None:
            self._soon_call = self._reactor.callLater(0, self._run_soon_calls)
        return waiter

    def _run_soon_calls(self):
        self._soon_call = None
        calls, self._soon = self._soon, []
        conn = self.conn
        if conn is None:
            for *_call, waiter in calls:
                waiter.errback(Unavailable(f"the hypervisor at {self.uri} is not connected"))
            return
        jobs = max(1, min(len(calls), getattr(self._pool, "max", 1)))
        for index in range(jobs):
            part = calls[index::jobs]
            d = deferToThreadPool(self._reactor, self._pool, self._run_each, conn,
                                  [call[:4] for call in part])
            d.addCallbacks(_answer_each, _fail_each, callbackArgs=(part,),
                           errbackArgs=(part,))

    def _run_each(self, conn, calls):
        """Pool thread: each call on its own -> [(ok, result or Failure)]."""
        results = []
        for what, name, fn, args in calls:
            try:
                results.append((True, self.translated(what, name, conn, fn, *args)))
            except Exception:
                results.append((False, Failure()))
        return results

    @staticmethod
    def _alive(conn):
        try:
            return conn.isAlive() == 1
        except libvirt.libvirtError:
            return False

    # --- connecting -----------------------------------------------------------

    def connect(self):
        self._closed = False
        return Deferred.fromCoroutine(self._connect())

    async def _connect(self):
        async with self._lock:
            if self.conn is not None:
                return
            conn, driver, prepared, lifecycle_id, metadata_id = await deferToThreadPool(
                self._reactor, self._pool, self._open)
            self.conn, self.driver, self.prepared = conn, driver, prepared
            # Redefinitions while disconnected went unseen.
            self.metadata.clear()
            self._lifecycle_id, self._metadata_id = lifecycle_id, metadata_id
            self.log.info("connected to {uri} (driver {driver}, events {events})",
                          uri=self.uri, driver=driver,
                          events="on" if lifecycle_id is not None else "off")

    def _open(self):
        quiet_libvirt()
        if self._events_wanted:
            _ensure_event_loop()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise Unavailable(f"cannot connect to {self.uri}: {e.get_error_message()}") from None
        try:
            driver = conn.getType().lower()
            prepared = self._prepare(conn, driver)
            lifecycle_id = metadata_id = None
            if self._events_wanted:
                try:
                    lifecycle_id = conn.domainEventRegisterAny(
                        None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                        self._on_lifecycle, None)
                    metadata_id = conn.domainEventRegisterAny(
                        None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
                        self._on_metadata_change, None)
                except libvirt.libvirtError as e:
                    if error_code(e) not in UNSUPPORTED:
                        raise
                # Remote connections notice a dead peer only with keepalive,
                # which needs the event loop; local drivers refuse it.
                with suppress(libvirt.libvirtError):
                    conn.setKeepAlive(5, 3)
                # A daemon that goes away (libvirtd restarted) closes remote
                # connections: reconnect. Embedded drivers never close.
                with suppress(libvirt.libvirtError):
                    conn.registerCloseCallback(self._on_close, None)
        except BaseException:
            with suppress(libvirt.libvirtError):
                conn.close()
            raise
        return conn, driver, prepared, lifecycle_id, metadata_id

    def close(self):
        return Deferred.fromCoroutine(self._close())

    async def _close(self):
        self._closed = True
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        self._reconnect_call = None
        async with self._lock:
            conn, self.conn = self.conn, None
            lifecycle_id, self._lifecycle_id = self._lifecycle_id, None
            metadata_id, self._metadata_id = self._metadata_id, None
            if conn is None:
                return
            await deferToThreadPool(self._reactor, self._pool, self._close_sync,
                                    conn, lifecycle_id, metadata_id)
            self.log.info("disconnected from {uri}", uri=self.uri)

    @staticmethod
    def _close_sync(conn, *callback_ids):
        for callback_id in callback_ids:
            if callback_id is None:
                continue
            with suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        with suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with suppress(libvirt.libvirtError):
            conn.close()

    # --- losing it and coming back ----------------------------------------------

    def watch(self, callback):
        """callback(connected: bool) on the reactor thread when the
        connection is lost (False) and when it is back (True)."""
        self._watchers.append(callback)

    def _tell_watchers(self, connected):
        for callback in tuple(self._watchers):
            try:
                callback(connected)
            except Exception:
                self.log.failure("hypervisor connection watcher {watcher!r} failed",
                                 watcher=callback)

    def _on_close(self, conn, reason, _opaque):
        # libvirt's event-loop thread.
        self._reactor.callFromThread(self._connection_lost, conn,
                                     _CLOSE_REASONS.get(reason, f"reason {reason}"))

    def _connection_lost(self, conn, why):
        """The connection ``conn`` is dead (reactor thread): drop it, tell the
        watchers, reconnect with backoff."""
        if self.conn is not conn or self._closed:
            return
        self.conn = None
        lifecycle_id, self._lifecycle_id = self._lifecycle_id, None
        metadata_id, self._metadata_id = self._metadata_id, None
        self.log.error("lost the connection to {uri} ({why}); reconnecting", uri=self.uri,
                       why=why)
        deferToThreadPool(self._reactor, self._pool, self._close_sync, conn,
                          lifecycle_id, metadata_id).addErrback(lambda _failure: None)
        self.reconnect_attempt = 0
        self._schedule_reconnect()
        self._tell_watchers(False)

    def _schedule_reconnect(self):
        delay = min(self.reconnect_initial_delay * 2 ** self.reconnect_attempt,
                    self.reconnect_max_delay)
        # Jitter: LNMs that lost one shared daemon do not all come back at once.
        delay *= 1 + random.random() / 4
        self._reconnect_call = self._clock.callLater(delay, self._try_reconnect)

    def _try_reconnect(self):
        self._reconnect_call = None
        if self._closed:
            return

        def back(_):
            self.reconnect_attempt = 0
            self.log.info("reconnected to {uri}", uri=self.uri)
            self._tell_watchers(True)

        def failed(failure):
            if self._closed:
                return
            self.reconnect_attempt += 1
            self.log.warn("reconnecting to {uri} failed (attempt {attempt}): {error}",
                          uri=self.uri, attempt=self.reconnect_attempt,
                          error=failure.getErrorMessage())
            self._schedule_reconnect()

        Deferred.fromCoroutine(self._connect()).addCallbacks(back, failed)

    # --- events ---------------------------------------------------------------

    def subscribe(self, callback):
        """callback(name, state) on the reactor thread for each lifecycle
        event that shows a state (``state_for_event``)."""
        self._subscribers.append(callback)

    def unsubscribe(self, callback):
        with suppress(ValueError):
            self._subscribers.remove(callback)

    def _on_lifecycle(self, _conn, dom, event, detail, _opaque):
        # libvirt's event-loop thread. Events are dispatched after the fact,
        # so asking libvirt for the state here could report a later one:
        # map the event itself, and never call back into libvirt.
        name = dom.name()
        if event in (libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED):
            self.metadata.pop(name, None)
        state = state_for_event(event, detail)
        if state is not _NO_STATE_CHANGE:
            self._reactor.callFromThread(self._deliver, name, state)

    def _on_metadata_change(self, _conn, dom, _kind, _namespace, _opaque):
        # libvirt's event-loop thread ("virsh metadata" behind Usher's back).
        self.metadata.pop(dom.name(), None)

    def _deliver(self, name, state):
        for callback in tuple(self._subscribers):
            try:
                callback(name, state)
            except Exception:
                self.log.failure("VM event subscriber {subscriber!r} failed on "
                                 "{vm} -> {state}", subscriber=callback, vm=name,
                                 state=state)
