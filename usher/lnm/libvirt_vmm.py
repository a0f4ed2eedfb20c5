"""``IVMM`` over libvirt: any libvirt URI, the test driver included.

Every libvirt call runs in an injected Twisted thread pool (one shared,
thread-safe libvirt connection); results and errors come back as Deferreds on
the reactor thread. libvirt errors become Usher errors: ``NoSuchVM`` for a
missing domain, ``OperationFailed`` carrying libvirt's message otherwise,
``MigrationUnsupported`` where the driver cannot migrate.

Files under ``state_dir``:

- ``images/<name>.save``: a hibernated VM's memory image. A shut-off domain
  that has one is reported ``hibernated``; ``restore`` boots from it and
  deletes it.
- ``consoles/<name>.log``: serial console of VMs built from the QEMU template.

Lifecycle events (when the driver has them) are mapped straight from the
event to an Usher state on libvirt's event-loop thread and handed to
subscribers on the reactor thread. Events the test driver never sends (reboot)
are left to the LNM's periodic scan.
"""

import os
import random
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from contextlib import contextmanager, suppress

import libvirt
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from usher import states
from usher.errors import (ConfigError, InvalidRequest, MigrationUnsupported,
                          NoSuchVM, OperationFailed, Unavailable)
from usher.interfaces import IVMM
from usher.lnm import domain_xml, received_xml, testhost

MIB = 1024 * 1024
DEFAULT_SHUTDOWN_TIMEOUT = 60.0
SHUTDOWN_POLL_INTERVAL = 0.25

_STATE_MAP = {
    libvirt.VIR_DOMAIN_NOSTATE: states.RUN,
    libvirt.VIR_DOMAIN_RUNNING: states.RUN,
    libvirt.VIR_DOMAIN_BLOCKED: states.RUN,
    libvirt.VIR_DOMAIN_PAUSED: states.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: states.PAUSED,
    libvirt.VIR_DOMAIN_SHUTOFF: states.SHUTOFF,
    libvirt.VIR_DOMAIN_SHUTDOWN: states.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: states.SHUTOFF,
}

# The states a VMM itself can report (the others are the controller's).
_VMM_STATES = (states.RUN, states.PAUSED, states.HIBERNATED, states.SHUTOFF)

_MIGRATE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                  | libvirt.VIR_MIGRATE_PERSIST_DEST
                  | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)

# Tried in order: drivers reject flags they do not know (the test driver
# refuses NVRAM), and a plain undefine is the last resort.
_UNDEFINE_FLAG_SETS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM,
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA,
    0,
)

# Error codes a driver answers with when it does not know a flag or call.
_UNSUPPORTED = frozenset((libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT,
                          libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED))

_DRIVERS_WITHOUT_MIGRATION = frozenset(("test",))

# Marks a lifecycle event that says nothing certain about the run state.
_NO_STATE_CHANGE = object()

# Errors that say something about a domain or a request, never about the
# connection: no need to ask whether the connection is still alive.
_REQUEST_ERRORS = frozenset((libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID,
                             libvirt.VIR_ERR_NO_DOMAIN_METADATA)) | _UNSUPPORTED

_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "I/O error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "the hypervisor closed the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by the client",
}

# Drivers whose statistics calls answer fixed values (the test driver: CPU
# time, block and node CPU figures never move, memoryStats is {}): passing
# them on would be making numbers up, so their statistics count as missing.
_DRIVERS_WITH_FIXED_STATS = frozenset(("test",))

_BULK_STATS_GROUPS = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
                      | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_VCPU
                      | libvirt.VIR_DOMAIN_STATS_INTERFACE | libvirt.VIR_DOMAIN_STATS_BLOCK)

# The counters of a raw domain sample (``LibvirtVMM.domain_stats``).
DOMAIN_COUNTERS = ("cpu_time_ns", "net_rx_bytes", "net_tx_bytes", "disk_read_bytes",
                   "disk_write_bytes")


def _summed(stats, group, field):
    """Sum ``<group>.<i>.<field>`` over ``<group>.count`` devices of a bulk
    stats record; None when the driver did not report the group or the field
    (a domain without devices has a true 0)."""
    count = stats.get(f"{group}.count")
    if count is None:
        return None
    total = 0
    for index in range(count):
        value = stats.get(f"{group}.{index}.{field}")
        if value is None:
            return None
        total += value
    return total


def memory_used_kib(balloon):
    """A VM's memory in use from balloon/memoryStats figures (KiB): its
    resident set on the host, else the guest's own view (available minus
    unused), else None."""
    rss = balloon.get("rss")
    if rss:
        return rss
    available, unused = balloon.get("available"), balloon.get("unused")
    if available is not None and unused is not None:
        return max(available - unused, 0)
    return None


def sample_from_bulk_stats(name, uuid, stats):
    """One ``getAllDomainStats`` record -> a raw domain sample (see
    ``LibvirtVMM.domain_stats``); None where the driver reported nothing."""
    code = stats.get("state.state")
    balloon = {key: stats.get(f"balloon.{key}") for key in ("rss", "available", "unused")}
    return {
        "name": name,
        "uuid": uuid,
        "state": _STATE_MAP.get(code, states.UNKNOWN) if code is not None else None,
        "vcpus": stats.get("vcpu.current"),
        "memory_kib": stats.get("balloon.current"),
        "cpu_time_ns": stats.get("cpu.time"),
        "net_rx_bytes": _summed(stats, "net", "rx.bytes"),
        "net_tx_bytes": _summed(stats, "net", "tx.bytes"),
        "disk_read_bytes": _summed(stats, "block", "rd.bytes"),
        "disk_write_bytes": _summed(stats, "block", "wr.bytes"),
        "memory_used_kib": memory_used_kib(balloon),
    }


def device_targets(xml):
    """A live domain definition -> (interface target devices, disk target
    devices): the names interfaceStats and blockStats take."""
    root = ET.fromstring(xml)
    interfaces = [t.get("dev") for t in root.findall("./devices/interface/target")
                  if t.get("dev")]
    disks = [t.get("dev") for t in root.findall("./devices/disk/target") if t.get("dev")]
    return interfaces, disks


def node_cpu_counters(cpu_stats):
    """``conn.getCPUStats(ALL_CPUS)`` -> (busy ns, total ns), or (None, None)
    when the driver's answer lacks the fields."""
    try:
        busy = cpu_stats["kernel"] + cpu_stats["user"]
        total = busy + cpu_stats["idle"] + cpu_stats.get("iowait", 0)
    except (KeyError, TypeError):
        return None, None
    return busy, total


def node_memory_used_kib(memory_stats):
    """``conn.getMemoryStats(ALL_CELLS)`` -> KiB in use (total less free,
    buffers and cache, as free(1) counts it), or None."""
    try:
        return max(memory_stats["total"] - memory_stats["free"]
                   - memory_stats.get("buffers", 0) - memory_stats.get("cached", 0), 0)
    except (KeyError, TypeError):
        return None


def _code(error):
    return error.get_error_code()


def host_memory_kib(conn):
    """A real host's memory -> (total KiB, free KiB or None). Blocking.

    From the whole host's memory statistics (``/proc/meminfo`` on Linux)
    where the driver has them. ``getInfo`` and ``getFreeMemory`` add up the
    NUMA cells instead, which on some machines cover only part of the memory
    (measured: 4.7 GiB of cells on a 24 GiB host), so they are the fallback.
    """
    try:
        stats = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
    except libvirt.libvirtError as e:
        if _code(e) not in _UNSUPPORTED:
            raise
        stats = {}
    total, free = stats.get("total"), stats.get("free")
    if not total:
        total = conn.getInfo()[1] * 1024
    if free is None:
        free_bytes = conn.getFreeMemory()
        free = free_bytes // 1024 if free_bytes > 0 else None
    return total, free


def wait_until(predicate, timeout, *, interval=SHUTDOWN_POLL_INTERVAL,
               clock=time.monotonic, sleep=time.sleep):
    """Poll predicate until it is true (-> True) or timeout seconds pass
    (-> False). Blocking: for pool threads only."""
    deadline = clock() + timeout
    while not predicate():
        remaining = deadline - clock()
        if remaining <= 0:
            return False
        sleep(min(interval, remaining))
    return True


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


def _quiet_libvirt():
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


class _NameLocks:
    """One lock per VM name, so composite operations (shutdown and wait,
    cycle, hibernate, export) on one VM do not interleave."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks = {}  # name -> [lock, holders and waiters]

    @contextmanager
    def hold(self, name):
        with self._guard:
            entry = self._locks.setdefault(name, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[name]


def _either(allowed):
    return " or ".join(s for s in _VMM_STATES if s in allowed)


@implementer(IVMM)
class LibvirtVMM:
    """One libvirt hypervisor, driven from the LNM.

    ``domain_template``: path of a site domain XML template (see
    ``usher.lnm.domain_xml``); None for the driver's built-in one.
    ``template_defaults``: template variables (kernel, initrd, cmdline, disk,
    network, ...) that request args override where ``arg_policy``
    (``domain_xml.ArgPolicy``; None: args set no template variable) lets them.
    ``events``: use libvirt lifecycle events when the driver has them.
    ``import_overhead_mib``: how much larger than a VM's memory the memory
    image of an imported VM may be (``received_xml.image_limit``).
    ``live_migration``: False: never live-migrate (libvirt hands the target
    the source's definition unchecked); VMs move by export/import, whose
    definitions the target checks.
    ``reconnect_initial_delay``/``reconnect_max_delay``: when the connection
    to the hypervisor is lost (libvirtd restarted), reconnect after this
    delay, doubling (with jitter) up to the maximum; ``watch_connection``
    callbacks hear of the loss and the return. ``clock`` schedules the
    attempts (default: ``reactor``).
    """

    log = Logger()

    def __init__(self, uri, *, reactor, pool, state_dir, domain_template=None,
                 events=True, template_defaults=None, reconnect_initial_delay=1.0,
                 reconnect_max_delay=30.0, clock=None, arg_policy=None,
                 import_overhead_mib=received_xml.DEFAULT_IMPORT_OVERHEAD_MIB,
                 live_migration=True):
        if not isinstance(uri, str) or not uri:
            raise ConfigError(f"the hypervisor URI must be a non-empty string, not {uri!r}")
        defaults = dict(template_defaults or {})
        for key, value in defaults.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ConfigError(f"template default {key!r} must map a name to a "
                                  f"string, not {value!r}")
        self.uri = uri
        self.state_dir = os.path.abspath(state_dir)
        self._reactor = reactor
        self._pool = pool
        self._template_path = domain_template
        self._template_defaults = defaults
        self._arg_policy = (arg_policy if arg_policy is not None
                            else domain_xml.ArgPolicy(state_dir=self.state_dir))
        self.import_overhead_mib = import_overhead_mib
        self.live_migration = bool(live_migration)
        # (connection, emulator paths its capabilities offer), see _host_emulators.
        self._emulators = (None, frozenset())
        self._events_wanted = events
        self._conn = None
        self._driver = None
        self._template = None
        self._event_callback_id = None
        self._subscribers = []
        self._locks = _NameLocks()
        self._connection_lock = DeferredLock()
        # Seam: how a shutdown waits for the guest (tests replace it).
        self._wait_until = wait_until
        self._clock = clock if clock is not None else reactor
        self.reconnect_initial_delay = reconnect_initial_delay
        self.reconnect_max_delay = reconnect_max_delay
        self._connection_watchers = []
        self._reconnect_call = None
        self._reconnect_attempt = 0
        self._closed = False
        # Cleared when the driver refuses getAllDomainStats: per-domain calls then.
        self._bulk_stats = True
        # Creates asked for in one reactor turn, made by a few pool jobs (see
        # _create_soon): [(spec, uuid given, Deferred)].
        self._pending_creates = []
        self._creates_scheduled = None
        # name -> (UUID, Usher metadata) of domains seen, while events tell
        # of redefinitions and metadata changes (see _remembered_metadata).
        self._metadata = {}
        self._metadata_callback_id = None

    # --- plumbing -------------------------------------------------------------

    @property
    def driver(self):
        """The connected driver's name in lower case ("test", "qemu"), or None."""
        return self._driver

    @property
    def events_supported(self):
        """True once connected with a lifecycle event stream."""
        return self._event_callback_id is not None

    def image_path(self, name):
        return os.path.join(self.state_dir, "images", f"{name}.save")

    def _scratch_path(self, name, purpose):
        return os.path.join(self.state_dir, "images",
                            f".{name}.{purpose}-{uuidlib.uuid4().hex}")

    def _log_soon(self, level, fmt, **fields):
        # Log observers expect the reactor thread.
        self._reactor.callFromThread(lambda: getattr(self.log, level)(fmt, **fields))

    def _call(self, what, name, fn, *args):
        """Deferred: fn(conn, *args) in the pool, libvirt errors translated."""
        conn = self._conn
        if conn is None:
            raise Unavailable(f"the hypervisor at {self.uri} is not connected")
        return deferToThreadPool(self._reactor, self._pool, self._translated,
                                 what, name, conn, fn, *args)

    def _translated(self, what, name, conn, fn, *args):
        try:
            return fn(conn, *args)
        except libvirt.libvirtError as e:
            if self._conn is not conn:
                raise Unavailable(f"{what}: the connection to {self.uri} was closed") from None
            if _code(e) not in _REQUEST_ERRORS and not self._alive(conn):
                self._reactor.callFromThread(self._connection_lost, conn,
                                             e.get_error_message())
                raise Unavailable(f"{what}: lost the connection to {self.uri}: "
                                  f"{e.get_error_message()}") from None
            if _code(e) == libvirt.VIR_ERR_NO_DOMAIN and name is not None:
                raise NoSuchVM(f"no VM named {name!r} on {self.uri}") from None
            raise OperationFailed(f"{what} failed on {self.uri}: "
                                  f"{e.get_error_message()}") from None
        except OSError as e:  # image and state files
            raise OperationFailed(f"{what} failed on {self.uri}: {e}") from None

    # --- connection -----------------------------------------------------------

    @staticmethod
    def _alive(conn):
        try:
            return conn.isAlive() == 1
        except libvirt.libvirtError:
            return False

    @property
    def connected(self):
        return self._conn is not None

    @property
    def libvirt_connection(self):
        """The libvirt connection in use (None while disconnected): for
        acting on the hypervisor behind Usher's back, as a benchmark or an
        administrator's virsh would. Blocking: use it from a thread."""
        return self._conn

    def watch_connection(self, callback):
        """callback(connected: bool) on the reactor thread when the
        hypervisor connection is lost (False) and when it is back (True)."""
        self._connection_watchers.append(callback)

    def _tell_watchers(self, connected):
        for callback in tuple(self._connection_watchers):
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
        if self._conn is not conn or self._closed:
            return
        self._conn = None
        callback_id, self._event_callback_id = self._event_callback_id, None
        metadata_id, self._metadata_callback_id = self._metadata_callback_id, None
        self.log.error("lost the connection to {uri} ({why}); reconnecting", uri=self.uri,
                       why=why)
        deferToThreadPool(self._reactor, self._pool, self._close_sync, conn,
                          callback_id, metadata_id).addErrback(lambda _failure: None)
        self._reconnect_attempt = 0
        self._schedule_reconnect()
        self._tell_watchers(False)

    def _schedule_reconnect(self):
        delay = min(self.reconnect_initial_delay * 2 ** self._reconnect_attempt,
                    self.reconnect_max_delay)
        # Jitter: LNMs that lost one shared daemon do not all come back at once.
        delay *= 1 + random.random() / 4
        self._reconnect_call = self._clock.callLater(delay, self._try_reconnect)

    def _try_reconnect(self):
        self._reconnect_call = None
        if self._closed:
            return

        def back(_):
            self._reconnect_attempt = 0
            self.log.info("reconnected to {uri}", uri=self.uri)
            self._tell_watchers(True)

        def failed(failure):
            if self._closed:
                return
            self._reconnect_attempt += 1
            self.log.warn("reconnecting to {uri} failed (attempt {attempt}): {error}",
                          uri=self.uri, attempt=self._reconnect_attempt,
                          error=failure.getErrorMessage())
            self._schedule_reconnect()

        Deferred.fromCoroutine(self._connect()).addCallbacks(back, failed)

    def connect(self):
        self._closed = False
        return Deferred.fromCoroutine(self._connect())

    async def _connect(self):
        async with self._connection_lock:
            if self._conn is not None:
                return
            conn, driver, template, callback_id, metadata_id = await deferToThreadPool(
                self._reactor, self._pool, self._open)
            self._conn, self._driver = conn, driver
            # Redefinitions while disconnected went unseen.
            self._metadata.clear()
            self._template, self._event_callback_id = template, callback_id
            self._metadata_callback_id = metadata_id
            self.log.info("connected to {uri} (driver {driver}, events {events})",
                          uri=self.uri, driver=driver,
                          events="on" if callback_id is not None else "off")

    def _open(self):
        for sub in ("images", "consoles"):
            os.makedirs(os.path.join(self.state_dir, sub), exist_ok=True)
        template = (domain_xml.DomainTemplate.from_file(self._template_path)
                    if self._template_path else None)
        _quiet_libvirt()
        if self._events_wanted:
            _ensure_event_loop()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise Unavailable(f"cannot connect to {self.uri}: {e.get_error_message()}") from None
        try:
            driver = conn.getType().lower()
            if template is None and driver not in domain_xml.BUILTIN_DRIVERS:
                raise ConfigError(f"no built-in domain template for the {driver!r} "
                                  f"driver at {self.uri}: configure a domain template")
            callback_id = metadata_id = None
            if self._events_wanted:
                try:
                    callback_id = conn.domainEventRegisterAny(
                        None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                        self._on_lifecycle, None)
                    metadata_id = conn.domainEventRegisterAny(
                        None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
                        self._on_metadata_change, None)
                except libvirt.libvirtError as e:
                    if _code(e) not in _UNSUPPORTED:
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
        return conn, driver, template, callback_id, metadata_id

    def close(self):
        return Deferred.fromCoroutine(self._close())

    async def _close(self):
        self._closed = True
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        self._reconnect_call = None
        async with self._connection_lock:
            conn, self._conn = self._conn, None
            callback_id, self._event_callback_id = self._event_callback_id, None
            metadata_id, self._metadata_callback_id = self._metadata_callback_id, None
            if conn is None:
                return
            await deferToThreadPool(self._reactor, self._pool, self._close_sync,
                                    conn, callback_id, metadata_id)
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

    # --- events ---------------------------------------------------------------

    def subscribe(self, callback):
        self._subscribers.append(callback)
        return succeed(None)

    def unsubscribe(self, callback):
        with suppress(ValueError):
            self._subscribers.remove(callback)
        return succeed(None)

    def _on_lifecycle(self, _conn, dom, event, detail, _opaque):
        # libvirt's event-loop thread. Events are dispatched after the fact,
        # so asking libvirt for the state here could report a later one:
        # map the event itself, and never call back into libvirt.
        name = dom.name()
        if event in (libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED):
            self._metadata.pop(name, None)
        state = self._state_for_event(event, detail)
        if state is not _NO_STATE_CHANGE:
            self._reactor.callFromThread(self._deliver, name, state)

    def _on_metadata_change(self, _conn, dom, _kind, _namespace, _opaque):
        # libvirt's event-loop thread ("virsh metadata" behind Usher's back).
        self._metadata.pop(dom.name(), None)

    @staticmethod
    def _state_for_event(event, detail):
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

    def _deliver(self, name, state):
        for callback in tuple(self._subscribers):
            try:
                callback(name, state)
            except Exception:
                self.log.failure("VM event subscriber {subscriber!r} failed on "
                                 "{vm} -> {state}", subscriber=callback, vm=name,
                                 state=state)

    # --- domain info (pool threads) -------------------------------------------

    def _state_of(self, dom, code=None):
        if code is None:
            code = dom.state()[0]
        state = _STATE_MAP.get(code, states.UNKNOWN)
        if code == libvirt.VIR_DOMAIN_SHUTOFF and os.path.exists(self.image_path(dom.name())):
            return states.HIBERNATED
        return state

    def _metadata_of(self, dom):
        try:
            fragment = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                    domain_xml.USHER_NS, 0)
        except libvirt.libvirtError as e:
            if _code(e) == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return {}
            if _code(e) not in _UNSUPPORTED:
                raise
            return domain_xml.read_usher_metadata(dom.XMLDesc(0))
        return domain_xml.read_usher_metadata(fragment)

    def _info_of(self, dom):
        code, max_memory_kib, _memory_kib, vcpus, _cpu_time = dom.info()
        name, uuid = dom.name(), dom.UUIDString()
        return {
            "name": name,
            "uuid": uuid,
            "state": self._state_of(dom, code),
            "memory_mib": max_memory_kib // 1024,
            "vcpus": vcpus,
            "metadata": self._remembered_metadata(dom, name, uuid),
        }

    def _remembered_metadata(self, dom, name, uuid):
        """``_metadata_of``, read once per definition where events say when a
        domain is (re)defined or its metadata changes: a scan of a host reads
        no domain's metadata (a libvirt call and an XML parse each) again and
        again."""
        if self._metadata_callback_id is None:
            return self._metadata_of(dom)
        known = self._metadata.get(name)
        if known is not None and known[0] == uuid:
            return dict(known[1])
        metadata = self._metadata_of(dom)
        self._metadata[name] = (uuid, dict(metadata))
        return metadata

    def _created_info(self, dom, name, xml):
        """``_info_of`` a domain just defined from ``xml`` and booted: its
        name, UUID and metadata are what the definition says, so only its
        state and size are asked (each libvirt call hands the interpreter
        lock to other threads and waits to get it back)."""
        code, max_memory_kib, _memory_kib, vcpus, _cpu_time = dom.info()
        root = ET.fromstring(xml)
        uuid = (root.findtext("uuid") or "").strip().lower() or dom.UUIDString()
        element = root.find(f"metadata/{{{domain_xml.USHER_NS}}}vm")
        metadata = ({k: v for k, v in element.attrib.items() if not k.startswith("{")}
                    if element is not None else {})
        if self._metadata_callback_id is not None:
            self._metadata[name] = (uuid, dict(metadata))
        return {"name": name, "uuid": uuid, "state": self._state_of(dom, code),
                "memory_mib": max_memory_kib // 1024, "vcpus": vcpus,
                "metadata": metadata}

    def _info_or_none(self, conn, name):
        try:
            return self._info_of(conn.lookupByName(name))
        except libvirt.libvirtError as e:
            if _code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _remove_image(self, name):
        with suppress(FileNotFoundError):
            os.unlink(self.image_path(name))

    # --- node -----------------------------------------------------------------

    def node_info(self):
        return Deferred.fromCoroutine(self._node_info())

    async def _node_info(self):
        return await self._call("node info", None, self._node_info_sync)

    def _node_info_sync(self, conn):
        model, memory_mib, cpus = conn.getInfo()[:3]
        driver = conn.getType()
        simulated = testhost.read_test_host(self.uri) if driver.lower() == "test" else None
        if not simulated:
            memory_mib = host_memory_kib(conn)[0] // 1024
        return {
            "hostname": simulated["hostname"] if simulated else conn.getHostname(),
            "uri": conn.getURI(),
            "driver": driver,
            "cpus": cpus,
            "memory_mib": memory_mib,
            "model": model,
            "live_migration": (self.live_migration
                               and driver.lower() not in _DRIVERS_WITHOUT_MIGRATION),
        }

    def node_status(self):
        return Deferred.fromCoroutine(self._node_status())

    async def _node_status(self):
        return await self._call("node status", None, self._node_status_sync)

    def _node_status_sync(self, conn):
        free_mib = None
        # The test driver's figure is 0 (custom node files) or KiB mislabelled
        # as bytes (test:///default): never a real free-memory value.
        if conn.getType().lower() != "test":
            free_kib = host_memory_kib(conn)[1]
            free_mib = free_kib // 1024 if free_kib else None
        return {"vms": conn.numOfDomains(), "free_memory_mib": free_mib}

    # --- statistics (monitoring) -----------------------------------------------

    @property
    def fixed_stats(self):
        """True when the connected driver's statistics are fixed values (the
        test driver): every counter of domain_stats/node_stats is then None."""
        return self._driver in _DRIVERS_WITH_FIXED_STATS

    def domain_stats(self):
        """-> Deferred list of raw samples, one per active (running or paused)
        domain: ``name``, ``uuid``, ``state``, ``vcpus``, ``memory_kib`` (its
        current allocation), the cumulative counters ``cpu_time_ns``,
        ``net_rx_bytes``, ``net_tx_bytes``, ``disk_read_bytes``,
        ``disk_write_bytes`` and the gauge ``memory_used_kib``. A counter the
        driver does not report is None. One bulk call
        (``getAllDomainStats``) where the driver has it, else per-domain
        calls."""
        return Deferred.fromCoroutine(self._domain_stats())

    async def _domain_stats(self):
        return await self._call("domain statistics", None, self._domain_stats_sync)

    def _domain_stats_sync(self, conn):
        if self.fixed_stats:
            return [self._bare_sample(dom) for dom in self._active_domains(conn)]
        if self._bulk_stats:
            try:
                records = conn.getAllDomainStats(
                    _BULK_STATS_GROUPS, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE)
            except libvirt.libvirtError as e:
                if _code(e) not in _UNSUPPORTED:
                    raise
                self._bulk_stats = False
            else:
                return [sample_from_bulk_stats(dom.name(), dom.UUIDString(), stats)
                        for dom, stats in records]
        samples = []
        for dom in self._active_domains(conn):
            try:
                samples.append(self._sample_one(dom))
            except libvirt.libvirtError as e:
                if _code(e) != libvirt.VIR_ERR_NO_DOMAIN:  # gone since listed
                    raise
        return samples

    @staticmethod
    def _active_domains(conn):
        return conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)

    @staticmethod
    def _bare_sample(dom, info=None):
        """What every driver tells truly: the domain, its size and state."""
        code, _max_kib, memory_kib, vcpus, _cpu_time = info or dom.info()
        sample = dict.fromkeys(DOMAIN_COUNTERS + ("memory_used_kib",))
        sample.update(name=dom.name(), uuid=dom.UUIDString(),
                      state=_STATE_MAP.get(code, states.UNKNOWN), vcpus=vcpus,
                      memory_kib=memory_kib)
        return sample

    def _sample_one(self, dom):
        info = dom.info()
        sample = self._bare_sample(dom, info)
        sample["cpu_time_ns"] = info[4]
        interfaces, disks = device_targets(dom.XMLDesc(0))

        def summed(devices, call, fields):
            totals = [0] * len(fields)
            for device in devices:
                try:
                    values = call(device)
                except libvirt.libvirtError as e:
                    if _code(e) in _UNSUPPORTED or _code(e) == libvirt.VIR_ERR_OPERATION_INVALID:
                        return [None] * len(fields)
                    raise
                for i, field in enumerate(fields):
                    totals[i] += values[field]
            return totals

        # interfaceStats: rx_bytes, rx_packets, rx_errs, rx_drop, tx_bytes, ...
        sample["net_rx_bytes"], sample["net_tx_bytes"] = summed(
            interfaces, dom.interfaceStats, (0, 4))
        # blockStats: rd_req, rd_bytes, wr_req, wr_bytes, errs
        sample["disk_read_bytes"], sample["disk_write_bytes"] = summed(
            disks, dom.blockStats, (1, 3))
        try:
            sample["memory_used_kib"] = memory_used_kib(dom.memoryStats())
        except libvirt.libvirtError as e:
            if _code(e) not in _UNSUPPORTED:
                raise
        return sample

    def node_stats(self):
        """-> Deferred dict: ``cpus``, ``memory_kib`` (the host's size),
        ``vms`` (active domains), the cumulative counters ``cpu_busy_ns`` and
        ``cpu_total_ns``, and ``memory_used_kib``/``memory_free_kib``; None
        for what the driver does not report."""
        return Deferred.fromCoroutine(self._node_stats())

    async def _node_stats(self):
        return await self._call("node statistics", None, self._node_stats_sync)

    def _node_stats_sync(self, conn):
        _model, memory_mib, cpus = conn.getInfo()[:3]
        stats = {"cpus": cpus, "memory_kib": memory_mib * 1024, "vms": conn.numOfDomains(),
                 "cpu_busy_ns": None, "cpu_total_ns": None, "memory_used_kib": None,
                 "memory_free_kib": None}
        if self.fixed_stats:
            return stats
        try:
            stats["cpu_busy_ns"], stats["cpu_total_ns"] = node_cpu_counters(
                conn.getCPUStats(libvirt.VIR_NODE_CPU_STATS_ALL_CPUS))
        except libvirt.libvirtError as e:
            if _code(e) not in _UNSUPPORTED:
                raise
        try:
            memory = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
        except libvirt.libvirtError as e:
            if _code(e) not in _UNSUPPORTED:
                raise
        else:
            stats["memory_used_kib"] = node_memory_used_kib(memory)
            stats["memory_kib"] = memory.get("total") or stats["memory_kib"]
        free_bytes = conn.getFreeMemory()
        if free_bytes > 0:
            stats["memory_free_kib"] = free_bytes // 1024
        return stats

    # --- domains --------------------------------------------------------------

    def list_domains(self):
        return Deferred.fromCoroutine(self._list_domains())

    async def _list_domains(self):
        return await self._call("listing domains", None, self._list_sync)

    def _list_sync(self, conn):
        found = []
        for dom in conn.listAllDomains(0):
            try:
                found.append(self._info_of(dom))
            except libvirt.libvirtError as e:
                if _code(e) != libvirt.VIR_ERR_NO_DOMAIN:  # gone since listed
                    raise
        return found

    def domain_info(self, name):
        return Deferred.fromCoroutine(self._domain_info(name))

    async def _domain_info(self, name):
        domain_xml.check_name(name)
        return await self._call(f"info of {name!r}", name,
                                lambda conn: self._info_of(conn.lookupByName(name)))

    def create(self, spec):
        return Deferred.fromCoroutine(self._create(spec))

    async def _create(self, spec):
        uuid_given = isinstance(spec, dict) and spec.get("uuid") is not None
        spec = domain_xml.normalize_spec(spec)
        return await self._create_soon(spec, uuid_given)

    def _create_soon(self, spec, uuid_given):
        """Create on the next reactor turn, with every other create asked for
        in this one: a start of many VMs costs a few pool jobs (one per pool
        thread, so a slow hypervisor still creates that many at once), not one
        job, thread hand-over and reactor wake-up per VM."""
        if self._conn is None:
            raise Unavailable(f"the hypervisor at {self.uri} is not connected")
        waiter = Deferred()
        self._pending_creates.append((spec, uuid_given, waiter))
        if self._creates_scheduled is None:
            self._creates_scheduled = self._reactor.callLater(0, self._run_creates)
        return waiter

    def _run_creates(self):
        self._creates_scheduled = None
        batch, self._pending_creates = self._pending_creates, []
        conn = self._conn
        if conn is None:
            for _spec, _uuid_given, waiter in batch:
                waiter.errback(Unavailable(f"the hypervisor at {self.uri} is not connected"))
            return
        jobs = max(1, min(len(batch), getattr(self._pool, "max", 1)))
        for index in range(jobs):
            part = batch[index::jobs]
            d = deferToThreadPool(self._reactor, self._pool, self._create_batch_sync, conn,
                                  [(spec, uuid_given) for spec, uuid_given, _w in part])
            d.addCallbacks(self._created, self._creates_failed, callbackArgs=(part,),
                           errbackArgs=(part,))

    def _create_batch_sync(self, conn, items):
        """Pool thread: each create of a batch on its own -> [(ok, info or
        Failure)]."""
        results = []
        for spec, uuid_given in items:
            try:
                results.append((True, self._translated(
                    f"create {spec['name']!r}", spec["name"], conn, self._create_sync, spec,
                    uuid_given)))
            except Exception:
                results.append((False, Failure()))
        return results

    @staticmethod
    def _created(results, part):
        for (_spec, _uuid_given, waiter), (ok, value) in zip(part, results):
            if ok:
                waiter.callback(value)
            else:
                waiter.errback(value)

    @staticmethod
    def _creates_failed(failure, part):
        for _spec, _uuid_given, waiter in part:
            waiter.errback(failure)

    def _create_sync(self, conn, spec, uuid_given):
        name = spec["name"]
        with self._locks.hold(name):
            existing = self._lookup_or_none(conn, name)
            if existing is not None:
                if uuid_given and existing.UUIDString() != spec["uuid"]:
                    self._log_soon("warn", "create {vm}: a domain of that name already "
                                   "exists with UUID {existing}, not {wanted}; using it",
                                   vm=name, existing=existing.UUIDString(),
                                   wanted=spec["uuid"])
                state = self._state_of(existing)
                if state == states.HIBERNATED:
                    self._restore_sync(conn, name, self.image_path(name), paused=False)
                    self._remove_image(name)
                    return self._info_of(conn.lookupByName(name))
                if state == states.SHUTOFF:
                    existing.create()
                return self._info_of(existing)
            xml = domain_xml.build_domain_xml(
                spec, driver=self._driver, state_dir=self.state_dir,
                template=self._template, defaults=self._template_defaults,
                policy=self._arg_policy)
            # An image left by a VM of this name that no longer exists would
            # make the new one look hibernated once it is shut off.
            self._remove_image(name)
            dom = conn.defineXML(xml)
            try:
                dom.create()
            except libvirt.libvirtError:
                with suppress(libvirt.libvirtError):
                    self._undefine(dom)
                raise
            return self._created_info(dom, name, xml)

    @staticmethod
    def _lookup_or_none(conn, name):
        try:
            return conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if _code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    # --- Table 3 operations -----------------------------------------------------

    def operate(self, operation, name, *, shutdown_timeout=DEFAULT_SHUTDOWN_TIMEOUT):
        return Deferred.fromCoroutine(self._operate(operation, name, shutdown_timeout))

    async def _operate(self, operation, name, shutdown_timeout):
        if operation not in states.OPERATIONS:
            raise InvalidRequest(f"unknown operation {operation!r}; the operations "
                                 f"are {', '.join(states.OPERATIONS)}")
        domain_xml.check_name(name)
        if (isinstance(shutdown_timeout, bool)
                or not isinstance(shutdown_timeout, (int, float))
                or shutdown_timeout < 0):
            raise InvalidRequest(f"shutdown_timeout must be a number of seconds >= 0, "
                                 f"not {shutdown_timeout!r}")
        return await self._call(f"{operation} {name!r}", name, self._operate_sync,
                                operation, name, shutdown_timeout)

    def _operate_sync(self, conn, operation, name, shutdown_timeout):
        with self._locks.hold(name):
            dom = conn.lookupByName(name)
            state = self._state_of(dom)
            allowed = states.OPERATION_PRECONDITIONS[operation]
            if state not in allowed:
                raise InvalidRequest(f"cannot {operation} VM {name!r}: it is {state}, "
                                     f"and {operation} needs it {_either(allowed)}")
            if operation == "pause":
                dom.suspend()
            elif operation == "resume":
                dom.resume()
            elif operation == "shutdown":
                self._shutdown_sync(dom, name, state, shutdown_timeout)
            elif operation == "reboot":
                dom.reboot(0)
            elif operation == "hibernate":
                self._hibernate_sync(dom, name)
            elif operation == "restore":
                self._restore_sync(conn, name, self.image_path(name), paused=False)
                self._remove_image(name)
            elif operation == "destroy":
                self._destroy_sync(dom, name)
                return None
            elif operation == "cycle":
                if not dom.isPersistent():
                    raise InvalidRequest(f"cannot cycle VM {name!r}: it has no "
                                         "persistent definition to boot again")
                if state != states.SHUTOFF:
                    dom.destroy()
                dom.create()
            return self._info_or_none(conn, name)

    def _request_shutdown(self, dom):
        try:
            dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        except libvirt.libvirtError as e:
            if _code(e) not in _UNSUPPORTED:
                raise
            dom.shutdown()  # drivers without the ACPI flag pick their own way

    def _shutdown_sync(self, dom, name, state, timeout):
        def stopped():
            try:
                return not dom.isActive()
            except libvirt.libvirtError as e:
                if _code(e) == libvirt.VIR_ERR_NO_DOMAIN:  # transient: gone
                    return True
                raise

        if state == states.PAUSED:
            dom.resume()  # a paused guest cannot see the power button
        self._request_shutdown(dom)
        if self._wait_until(stopped, timeout):
            return
        if not stopped():
            self._log_soon("warn", "VM {vm} did not shut down within {timeout} s; "
                           "destroying it", vm=name, timeout=timeout)
            dom.destroy()

    def _hibernate_sync(self, dom, name):
        if not dom.isPersistent():
            raise InvalidRequest(f"cannot hibernate VM {name!r}: it has no "
                                 "persistent definition to restore into")
        # Save beside the final name and rename: a failed save must not leave
        # a partial image that would make the VM look hibernated.
        partial = self._scratch_path(name, "saving")
        try:
            dom.save(partial)
            os.replace(partial, self.image_path(name))
        finally:
            with suppress(FileNotFoundError):
                os.unlink(partial)

    def _restore_sync(self, conn, name, path, *, paused):
        flag = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
        try:
            conn.restoreFlags(path, None, flag)
        except libvirt.libvirtError as e:
            if _code(e) not in _UNSUPPORTED:
                raise
            conn.restore(path)  # the test driver takes no flags
        dom = conn.lookupByName(name)
        code = dom.state()[0]
        if paused and code == libvirt.VIR_DOMAIN_RUNNING:
            dom.suspend()
        elif not paused and code == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()
        return dom

    def _undefine(self, dom):
        for flags in _UNDEFINE_FLAG_SETS:
            try:
                if flags:
                    dom.undefineFlags(flags)
                else:
                    dom.undefine()
                return
            except libvirt.libvirtError as e:
                if flags == 0 or _code(e) not in _UNSUPPORTED:
                    raise

    def _destroy_sync(self, dom, name):
        persistent = dom.isPersistent()
        if dom.isActive():
            dom.destroy()
        if persistent:
            self._undefine(dom)
        self._remove_image(name)

    # --- moving VMs -------------------------------------------------------------

    def migrate(self, name, target_uri):
        return Deferred.fromCoroutine(self._migrate(name, target_uri))

    async def _migrate(self, name, target_uri):
        domain_xml.check_name(name)
        if not isinstance(target_uri, str) or not target_uri:
            raise InvalidRequest(f"the migration target must be a libvirt URI, "
                                 f"not {target_uri!r}")
        return await self._call(f"migrate {name!r} to {target_uri}", name,
                                self._migrate_sync, name, target_uri)

    def _migrate_sync(self, conn, name, target_uri):
        with self._locks.hold(name):
            dom = conn.lookupByName(name)
            state = self._state_of(dom)
            if state not in (states.RUN, states.PAUSED):
                raise InvalidRequest(f"cannot live-migrate VM {name!r}: it is {state}")
            if not self.live_migration:
                raise MigrationUnsupported(
                    "live migration is turned off on this LNM (live_migration = False): "
                    "move VMs with export_image/import_image")
            if self._driver in _DRIVERS_WITHOUT_MIGRATION:
                raise MigrationUnsupported(
                    f"the {self._driver} driver at {self.uri} cannot migrate VMs; "
                    "move them with export_image/import_image")
            try:
                dom.migrateToURI3(target_uri, {}, _MIGRATE_FLAGS)
            except libvirt.libvirtError as e:
                if _code(e) == libvirt.VIR_ERR_NO_SUPPORT:
                    raise MigrationUnsupported(
                        f"{self.uri} cannot migrate {name!r}: "
                        f"{e.get_error_message()}") from None
                raise
            return None

    def export_image(self, name):
        """-> {"xml": definition, "image": bytes or None, "state": state}.

        Takes the VM off this host: a running or paused VM is saved, a
        hibernated one gives its image, a shut-off one only its definition.
        """
        return Deferred.fromCoroutine(self._export_image(name))

    async def _export_image(self, name):
        domain_xml.check_name(name)
        return await self._call(f"export {name!r}", name, self._export_sync, name)

    def _export_sync(self, conn, name):
        with self._locks.hold(name):
            dom = conn.lookupByName(name)
            state = self._state_of(dom)
            if not dom.isPersistent():
                raise InvalidRequest(f"cannot export VM {name!r}: it has no "
                                     "persistent definition")
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            image = None
            if state in (states.RUN, states.PAUSED):
                scratch = self._scratch_path(name, "export")
                try:
                    dom.save(scratch)
                    with open(scratch, "rb") as f:
                        image = f.read()
                    self._undefine_or_put_back(conn, dom, name, scratch, state)
                finally:
                    with suppress(FileNotFoundError):
                        os.unlink(scratch)
            elif state == states.HIBERNATED:
                with open(self.image_path(name), "rb") as f:
                    image = f.read()
                self._undefine(dom)
                self._remove_image(name)
            else:
                self._undefine(dom)
            return {"xml": xml, "image": image, "state": state}

    def _undefine_or_put_back(self, conn, dom, name, scratch, state):
        try:
            self._undefine(dom)
        except libvirt.libvirtError:
            # Leave the VM as it was; failing that, hibernated, not lost.
            try:
                self._restore_sync(conn, name, scratch, paused=state == states.PAUSED)
            except libvirt.libvirtError:
                os.replace(scratch, self.image_path(name))
            raise

    def import_image(self, spec, image):
        """Counterpart of export_image: ``image`` is its whole result."""
        return Deferred.fromCoroutine(self._import_image(spec, image))

    async def _import_image(self, spec, payload):
        uuid_given = isinstance(spec, dict) and spec.get("uuid") is not None
        spec = domain_xml.normalize_spec(spec)
        name = spec["name"]
        if not isinstance(payload, dict) or not isinstance(payload.get("xml"), str):
            raise InvalidRequest(f"import of {name!r}: the image must be the dict "
                                 "export_image returned (xml, image, state)")
        state = payload.get("state", states.RUN)
        image = payload.get("image")
        if state not in _VMM_STATES:
            raise InvalidRequest(f"import of {name!r}: unknown exported state {state!r}")
        if state != states.SHUTOFF and not isinstance(image, bytes):
            raise InvalidRequest(f"import of {name!r}: a {state} VM needs its memory "
                                 "image (bytes)")
        limit = received_xml.image_limit(spec["memory_mib"], self.import_overhead_mib)
        if state != states.SHUTOFF and len(image) > limit:
            raise InvalidRequest(
                f"import of {name!r}: its memory image ({len(image)} bytes) is larger than "
                f"a VM of {spec['memory_mib']} MiB may have here ({limit} bytes: its memory "
                "and the LNM's import_overhead_mib)")
        if len(payload["xml"]) > received_xml.MAX_DEFINITION_CHARS:
            raise InvalidRequest(f"import of {name!r}: the definition is longer than "
                                 f"{received_xml.MAX_DEFINITION_CHARS} characters")
        return await self._call(f"import {name!r}", name, self._import_sync, spec,
                                uuid_given, payload["xml"], image, state)

    def _host_emulators(self, conn):
        """The emulator binaries this hypervisor offers (its capabilities),
        asked once per connection. Blocking."""
        cached_conn, emulators = self._emulators
        if cached_conn is not conn:
            root = ET.fromstring(conn.getCapabilities())
            emulators = frozenset(e.text.strip() for e in root.iter("emulator") if e.text)
            self._emulators = (conn, emulators)
        return emulators

    def _host_reach(self, conn, spec):
        """What this host's own definition of the VM ``spec`` may reach
        (``received_xml.HostReach``); InvalidRequest if this host would not
        define the VM at all (its ArgPolicy refuses the record's args)."""
        try:
            reference = domain_xml.build_domain_xml(
                spec, driver=self._driver, state_dir=self.state_dir,
                template=self._template, defaults=self._template_defaults,
                policy=self._arg_policy)
        except InvalidRequest as e:
            raise InvalidRequest(f"import of {spec['name']!r} is refused: this host would "
                                 f"not define the VM itself: {e}") from None
        return received_xml.HostReach(
            reference, policy=self._arg_policy, defaults=self._template_defaults,
            own_paths=[domain_xml.console_path(self.state_dir, spec["name"])],
            emulators=self._host_emulators(conn))

    def _check_image(self, conn, path, spec, reach, uuid_given):
        """The definition a memory image carries (libvirt restores from it)
        must pass the same check as the exported one. Blocking."""
        what = f"import of {spec['name']!r}: the definition in its memory image"
        try:
            embedded = conn.saveImageGetXMLDesc(path, 0)
        except libvirt.libvirtError as e:
            raise InvalidRequest(f"{what} cannot be read, so the image is refused: "
                                 f"{e.get_error_message()}") from None
        received_xml.check(embedded, spec=spec, reach=reach, uuid_given=uuid_given,
                           what=what)

    def _import_sync(self, conn, spec, uuid_given, xml, image, state):
        name = spec["name"]
        with self._locks.hold(name):
            if self._lookup_or_none(conn, name) is not None:
                raise InvalidRequest(f"cannot import VM {name!r}: a VM of that name "
                                     f"already exists on {self.uri}")
            # Another host's definitions: nothing is defined unless they are
            # what this host would define itself (usher.lnm.received_xml).
            reach = self._host_reach(conn, spec)
            received_xml.check(xml, spec=spec, reach=reach, uuid_given=uuid_given,
                               what=f"import of {name!r}: the definition")
            if state == states.SHUTOFF:
                self._remove_image(name)
                return self._info_of(conn.defineXML(xml))
            hibernated = state == states.HIBERNATED
            scratch = self._scratch_path(name, "importing" if hibernated else "import")
            try:
                with open(scratch, "wb") as f:
                    f.write(image)
                self._check_image(conn, scratch, spec, reach, uuid_given)
                dom = conn.defineXML(xml)
                if hibernated:
                    os.replace(scratch, self.image_path(name))
                    return self._info_of(dom)
                try:
                    dom = self._restore_sync(conn, name, scratch,
                                             paused=state == states.PAUSED)
                except BaseException:
                    with suppress(libvirt.libvirtError):
                        self._undefine(dom)
                    raise
                return self._info_of(dom)
            finally:
                with suppress(FileNotFoundError):
                    os.unlink(scratch)
