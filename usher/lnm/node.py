"""The local node manager's core: cached VM objects, Table 2, change detection
and reporting. Plain Python and Deferreds; the PB boundary is ``api.py``.

Who knows what
--------------
- ``NodeManager._vms``: the cached VM objects, one per VM the controller
  manages here (``receive``). A ``CachedVM`` holds the controller's record and
  carries the operations on that VM (the paper: "the cached copy of a VM at its
  LNM contains methods for manipulating the VM it represents").
- ``NodeManager._domains``: every domain last observed on the host (events,
  scans, operation results).
- What the controller was last told of each domain: the cached record's
  ``state`` for a cached VM, ``_unadopted`` for the others.

A domain whose observed state differs from what the controller was told is a
*change*: it is queued (the latest one per VM) and sent in batches through the
reporter. The controller's acknowledgment is its updated records, which
replace the cached ones. Operations are the exception: their result carries
the new state, so their own events are not reported.
"""

from twisted.internet import defer
from twisted.logger import Logger

from usher import states
from usher.errors import InvalidRequest, NoSuchVM, OperationFailed, Unavailable, UsherError
from usher.loops import every, unfailing
from usher.lnm.received_xml import DEFAULT_IMPORT_OVERHEAD_MIB, image_limit
from usher.naming import is_host_vm_name
from usher.protocol import FIGURES, MAX_FIELD, REPORT_BATCH

# States the controller sets while one of its commands is in flight (a record
# received before ``start``, or before a migration lands here): the command's
# result, not a comparison with the host, settles them.
TRANSITIONAL = frozenset({states.STARTING, states.MIGRATING})
# What a controller may believe of a VM that is not on this host.
ABSENT = frozenset({None, states.MISSING})
_NEVER_TOLD = object()

# Operations whose result is a state: replayed on a VM already there, they
# answer with the VM as it is instead of failing (idempotent commands).
_IDEMPOTENT_OPERATIONS = frozenset({"pause", "resume", "shutdown", "hibernate", "restore"})

_RECORD_STR_FIELDS = ("uuid", "owner", "cluster", "vmm")
_RECORD_COUNT_FIELDS = ("memory_mib", "vcpus", "version")


def check_record(record):
    """Validate one VM record from the controller; -> a copy of it.

    Raises InvalidRequest naming the record and the field that is wrong."""
    if not isinstance(record, dict):
        raise InvalidRequest(f"VM record must be a dict, not {type(record).__name__}")
    name = record.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_FIELD:
        raise InvalidRequest("VM record without a valid name")
    state = record.get("state")
    if state is not None and state not in states.ALL_STATES:
        raise InvalidRequest(f"VM record {name}: unknown state {state!r}")
    for field in _RECORD_STR_FIELDS:
        value = record.get(field)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_FIELD):
            raise InvalidRequest(f"VM record {name}: {field} must be a string")
    for field in _RECORD_COUNT_FIELDS:
        value = record.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise InvalidRequest(f"VM record {name}: {field} must be a non-negative integer")
    args = record.get("args")
    if args is not None and not isinstance(args, dict):
        raise InvalidRequest(f"VM record {name}: args must be a dict")
    plugin_args = record.get("plugin_args")
    if plugin_args is not None and (not isinstance(plugin_args, list) or not all(
            isinstance(key, str) for key in plugin_args)):
        raise InvalidRequest(f"VM record {name}: plugin_args must be a list of names")
    return dict(record)


def _check_domain(info):
    """Domain info from the VMM is trusted, but a malformed entry must not
    break the scan: -> True if usable. A name the controller would refuse
    (usher.naming.is_host_vm_name; libvirt allows more) is left out."""
    return isinstance(info, dict) and is_host_vm_name(info.get("name"))


def _change(name, state, source):
    """A reported change; ``source`` is the domain info (or, for a VM that
    vanished before it was ever observed, the cached record)."""
    metadata = source.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {key: source[key] for key in ("owner", "cluster")
                    if source.get(key) is not None}
    return {"name": name, "state": state, "uuid": source.get("uuid"),
            "memory_mib": source.get("memory_mib"), "vcpus": source.get("vcpus"),
            "metadata": dict(metadata)}


class CachedVM:
    """The LNM's cached copy of a VM the controller manages.

    ``record`` is the controller's record (its view, updated by ``receive``,
    acknowledgments and the results of operations); ``observed`` is the
    domain last observed on the host (None if it is not here). The methods
    carry out operations on the VM through the VMM; bookkeeping around them
    (serialising, settling the cache) is the NodeManager's.
    """

    def __init__(self, manager, record):
        self._manager = manager
        self.record = record
        # One operation at a time per VM; a second waits for the first.
        self.lock = defer.DeferredLock()
        self.busy = False
        # The controller session (NodeManager.begin_session) whose controller
        # sent this record.
        self.session = manager._session

    @property
    def name(self):
        return self.record["name"]

    @property
    def observed(self):
        return self._manager._domains.get(self.name)

    @property
    def _vmm(self):
        return self._manager.vmm

    def spec(self):
        """The creation spec of IVMM.create/import_image."""
        record = self.record
        for field in ("memory_mib", "vcpus"):
            if not record.get(field):
                raise InvalidRequest(f"cannot start {self.name}: its record has no {field}")
        return {"name": self.name, "uuid": record.get("uuid"),
                "memory_mib": record["memory_mib"], "vcpus": record["vcpus"],
                "owner": record.get("owner"), "cluster": record.get("cluster"),
                "args": dict(record.get("args") or {}),
                # The args the controller's plugins set (the site's values).
                "plugin_args": list(record.get("plugin_args") or ())}

    def start(self):
        return self._vmm.create(self.spec())

    async def operate(self, operation):
        try:
            return await self._vmm.operate(operation, self.name)
        except NoSuchVM:
            if operation == "destroy":
                return None  # already gone: destroy's goal is met
            raise
        except (InvalidRequest, OperationFailed):
            # A retried or replayed command finds its work done: the VM as it
            # is now is its answer.
            if operation in _IDEMPOTENT_OPERATIONS:
                info = await self._vmm.domain_info(self.name)
                if info.get("state") == states.OPERATION_RESULT[operation]:
                    return info
            raise

    def migrate(self, target_uri):
        return self._vmm.migrate(self.name, target_uri)

    def export_image(self):
        return self._vmm.export_image(self.name)

    async def import_image(self, exported):
        try:
            return await self._vmm.import_image(self.spec(), exported)
        except InvalidRequest as refused:
            # Imported already (a replayed import): the same VM is its answer.
            uuid = self.record.get("uuid")
            try:
                info = await self._vmm.domain_info(self.name)
            except NoSuchVM:
                raise refused from None      # the refusal says why, not "no such VM"
            if uuid is not None and info.get("uuid") == uuid:
                return info
            raise


class NodeManager:
    """The LNM: Table 2 as coroutine methods, change detection and reporting.

    ``clock`` drives the scan (every ``scan_interval`` seconds) and the
    reports: a change goes to the controller on the next reactor turn, and
    changes that come while a report is on its way go together in the next
    one; a failed report is retried after ``report_interval`` seconds. The
    reporter (``set_reporter``) is any object with ``async report(changes) ->
    acks``; None while detached.
    """

    log = Logger()

    def __init__(self, vmm, *, name, clock, scan_interval, report_interval,
                 migration_uri=None, scan_phase=None,
                 import_overhead_mib=DEFAULT_IMPORT_OVERHEAD_MIB):
        if scan_interval <= 0 or report_interval <= 0:
            raise ValueError("scan_interval and report_interval must be positive")
        self.vmm = vmm
        self.name = name
        self.clock = clock
        self.scan_interval = scan_interval
        # Seconds to the first periodic scan (default: scan_interval). LNMs
        # started together (a fleet, hosts after a power cut) are given
        # random ones, so that their scans do not all fall together.
        self.scan_phase = scan_interval if scan_phase is None else scan_phase
        self._scan_start = None
        self.report_interval = report_interval
        self.migration_uri = migration_uri
        # An imported VM's memory image: at most its memory and this (MiB).
        self.import_overhead_mib = import_overhead_mib
        self._vms = {}          # name -> CachedVM
        self._domains = {}      # name -> domain info last observed
        self._unadopted = {}    # name -> state last told, for uncached domains
        self._pending = {}      # name -> change not yet delivered
        self._reporter = None
        self._reporting = False
        self._flush_call = None
        # Sequence numbers order observations: a listing requested at seq N
        # must not overwrite what an event or an operation said about a VM
        # after N.
        self._seq = 0
        self._touched = {}      # name -> seq of the latest event/operation
        self._listings = []     # seqs of listings in progress
        self._refreshing = {}   # name -> another event came during the read
        self._baselined = False
        self._subscribed = False
        self._running = False
        self._stopped = False
        self._active = 0
        self._idle_waiters = []
        self._scan_loop = None
        self._report_loop = None
        # Controller sessions: bumped when a connection to a controller comes
        # or goes (begin_session). The answer to a command asked in an older
        # session never reaches a controller, so it is reported instead.
        self._session = 0
        # The hypervisor connection (see _hypervisor_changed) and what the
        # node looked like while it was up.
        self.hypervisor_connected = True
        self._node_info = None
        # Exported VMs kept until the controller says where the VM lives
        # (release_export) or to put it back (restore_export): a migration
        # cut short by a failure must leave neither two copies nor none.
        self._exports = {}      # name -> {"exported", "record", "at"}
        # VMs the last inventory listed as busy (a command in progress): the
        # controller waits to hear how that command ended.
        self._listed_busy = set()
        # The resource monitor (usher.lnm.monitor.Monitor), if any.
        self.monitor = None

    # -- lifecycle -----------------------------------------------------------

    async def startup(self):
        """Subscribe to VMM events, take the first inventory (the baseline:
        nothing on it is a change) and start the scan and report loops."""
        if self._running:
            return
        self._running = True
        self._stopped = False
        if not self._subscribed:
            self.vmm.subscribe(self._on_event)
            watch_connection = getattr(self.vmm, "watch_connection", None)
            if watch_connection is not None:
                watch_connection(self._hypervisor_changed)
            self._subscribed = True
        await self.scan()
        if not self._running:
            return  # shut down while taking the inventory
        if self.scan_phase >= self.scan_interval:
            self._scan_loop = self._loop(self.scan, self.scan_interval)
        else:
            def start_scanning():
                self._scan_start = None
                self._scan_loop = self._loop(self.scan, self.scan_interval, now=True)

            self._scan_start = self.clock.callLater(self.scan_phase, start_scanning)
        self._flush_soon()
        self.log.info("LNM {lnm} managing {count} domains on {uri}", lnm=self.name,
                      count=len(self._domains), uri=getattr(self.vmm, "uri", None))

    def _loop(self, function, interval, now=False):
        call = unfailing(function, log=self.log, message="LNM {lnm}: periodic {what} failed",
                         lnm=self.name, what=function.__name__)
        return every(interval, call, clock=self.clock, now=now)

    async def shutdown(self):
        """Stop the loops, refuse new operations and wait for in-flight work."""
        self._running = False
        self._stopped = True
        for loop in (self._scan_loop, self._report_loop):
            if loop is not None and loop.running:
                loop.stop()
        self._scan_loop = self._report_loop = None
        if self._scan_start is not None and self._scan_start.active():
            self._scan_start.cancel()
        self._scan_start = None
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self._active:
            waiter = defer.Deferred()
            self._idle_waiters.append(waiter)
            await waiter

    def _enter(self):
        self._active += 1

    def _leave(self):
        self._active -= 1
        if not self._active:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _refuse_if_stopped(self):
        if self._stopped:
            raise Unavailable(f"LNM {self.name} is shutting down")

    # -- controller sessions and the hypervisor connection ---------------------

    def begin_session(self):
        """A connection to a controller came or went. Commands asked before
        now answer into a connection that is gone: their results are reported
        as observations, and an export among them is put back at once (its
        image reached no one). The next inventory (``list_vms``) is what the
        new controller knows."""
        self._session += 1

    @property
    def session(self):
        return self._session

    def _hypervisor_changed(self, connected):
        """The VMM lost (False) or regained (True) its hypervisor connection
        (e.g. libvirtd restarted). Lost: every domain's state is unknown, not
        stopped, and is reported so; the VMM reconnects with backoff.
        Regained: a scan reports what the host really shows."""
        if not connected:
            if not self.hypervisor_connected:
                return
            self.hypervisor_connected = False
            self.log.error("LNM {lnm}: lost the hypervisor connection to {uri}; {count} "
                           "VMs are unknown until it is back", lnm=self.name,
                           uri=getattr(self.vmm, "uri", None), count=len(self._domains))
            for name, info in list(self._domains.items()):
                if info.get("state") != states.UNKNOWN:
                    self._domains[name] = dict(info, state=states.UNKNOWN)
                    self._touch(name)
                    self._reconcile(name)
            return
        if self.hypervisor_connected:
            return
        self.hypervisor_connected = True
        self.log.info("LNM {lnm}: the hypervisor connection to {uri} is back; scanning",
                      lnm=self.name, uri=getattr(self.vmm, "uri", None))
        if self._running:
            defer.Deferred.fromCoroutine(self.scan())

    # -- reporting -----------------------------------------------------------

    def set_reporter(self, reporter):
        """Attach (a reporter) or detach (None). Changes queued while detached
        go out at once after attaching."""
        self._reporter = reporter
        self._flush_soon()

    @property
    def reporter(self):
        """The current reporter (None while detached)."""
        return self._reporter

    def set_monitor(self, monitor):
        """Use ``monitor`` (usher.lnm.monitor.Monitor) for get_status and
        get_node_status; its lifecycle is the caller's."""
        self.monitor = monitor

    def vm_args(self, name):
        """The request arguments of a cached VM ({} for others)."""
        vm = self._vms.get(name)
        args = vm.record.get("args") if vm is not None else None
        return args if isinstance(args, dict) else {}

    @property
    def pending_changes(self):
        """The changes waiting to be reported, by VM name (a copy)."""
        return {name: dict(change) for name, change in self._pending.items()}

    def _flush_soon(self, delay=0):
        """Report the queued changes on the next reactor turn (or after
        ``delay`` seconds: a retry), unless a report is already due."""
        if (self._flush_call is not None or not self._running or self._reporter is None
                or not self._pending):
            return

        def due():
            self._flush_call = None
            defer.Deferred.fromCoroutine(self._flush_logged())

        self._flush_call = self.clock.callLater(delay, due)

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
            if self._active:
                waiter = defer.Deferred()
                self._idle_waiters.append(waiter)
                await waiter
                continue
            if not self._pending or self._reporter is None:
                break
            await self.flush()
        return not self._pending

    async def flush(self):
        """Send the queued changes in one batch, if attached; one batch at a
        time (what comes meanwhile goes in the next, sent as soon as this one
        is answered). A failed batch stays queued, retried after
        ``report_interval``."""
        reporter = self._reporter
        if reporter is None or not self._pending or self._reporting:
            return
        batch = {}
        for name, change in self._pending.items():
            if len(batch) == REPORT_BATCH:
                break    # the rest goes in the next batch, once this one is answered
            batch[name] = dict(change)
        self._reporting = True
        self._enter()
        try:
            acks = await reporter.report(list(batch.values()))
        except Exception as e:
            self.log.warn("LNM {lnm}: report of {count} changes failed ({error}); "
                          "retrying in {delay:g} s", lnm=self.name, count=len(batch),
                          error=str(e) or e.__class__.__name__, delay=self.report_interval)
            self._reporting = False
            self._leave()
            self._flush_soon(self.report_interval)
            return
        self._reporting = False
        try:
            self._acknowledge(batch, acks)
        finally:
            self._leave()       # idle means acknowledged (see ``drain``)
        self._flush_soon()

    def _acknowledge(self, batch, acks):
        """The controller received ``batch``; ``acks`` are its updated records
        for the VMs it manages."""
        acked = {}
        for record in acks if isinstance(acks, (list, tuple)) else ():
            try:
                record = check_record(record)
            except InvalidRequest as e:
                self.log.warn("LNM {lnm}: ignoring a malformed acknowledgment: {error}",
                              lnm=self.name, error=str(e))
                continue
            acked[record["name"]] = record
        for name, change in batch.items():
            if name in acked:
                continue
            vm = self._vms.get(name)
            if vm is not None:
                if change["state"] is None and not vm.busy:
                    # Gone from here and no longer the controller's to manage.
                    del self._vms[name]
                else:
                    vm.record["state"] = change["state"]
            elif change["state"] is None:
                self._unadopted.pop(name, None)
            else:
                self._unadopted[name] = change["state"]
        for name, record in acked.items():
            self._cache(record)
        self.log.debug("LNM {lnm}: {count} changes acknowledged", lnm=self.name,
                       count=len(batch))
        for name, change in batch.items():
            if self._actual_state(name) == change["state"]:
                # Delivered and still true. If the controller's record says
                # otherwise, that is its answer: reporting again would loop.
                self._pending.pop(name, None)
            else:
                self._reconcile(name)
        for name in acked.keys() - batch.keys():
            self._reconcile(name)

    # -- change detection ----------------------------------------------------

    def _actual_state(self, name):
        info = self._domains.get(name)
        return info.get("state") if info else None

    def _told_state(self, name):
        vm = self._vms.get(name)
        if vm is not None:
            return vm.record.get("state")
        return self._unadopted.get(name, _NEVER_TOLD)

    def _reconcile(self, name, previous=None):
        """Queue, replace or drop the change for ``name`` by comparing what the
        host shows with what the controller was told. ``previous`` is the
        domain info of a VM that just vanished."""
        vm = self._vms.get(name)
        if vm is not None and vm.busy:
            return
        info = self._domains.get(name)
        actual = info.get("state") if info else None
        told = self._told_state(name)
        if (told in TRANSITIONAL or actual == told
                or (actual is None and (told is _NEVER_TOLD or told in ABSENT))):
            self._pending.pop(name, None)
            return
        source = info or previous or self._pending.get(name) or (vm.record if vm else {})
        change = _change(name, actual, source)
        if self._pending.get(name) != change:
            self.log.info("LNM {lnm}: {vm} is {actual} (controller has {told})",
                          lnm=self.name, vm=name, actual=actual,
                          told=None if told is _NEVER_TOLD else told)
        self._pending[name] = change
        self._flush_soon()

    def _touch(self, name):
        self._seq += 1
        self._touched[name] = self._seq

    def _begin_listing(self):
        self._listings.append(self._seq)
        return self._seq

    def _end_listing(self, seq):
        self._listings.remove(seq)
        floor = min(self._listings) if self._listings else self._seq
        self._touched = {n: s for n, s in self._touched.items() if s > floor}

    def _is_stale(self, name, seq):
        """Has an event or operation told us about ``name`` since ``seq``?"""
        if self._touched.get(name, 0) > seq:
            return True
        vm = self._vms.get(name)
        return vm is not None and vm.busy

    def _apply_listing(self, domains, seq, *, baseline=False):
        seen = {}
        for info in domains:
            if _check_domain(info):
                seen[info["name"]] = dict(info)
        for name, info in seen.items():
            if self._is_stale(name, seq):
                continue
            old = self._domains.get(name)
            self._domains[name] = info
            if not baseline and (old is None or old.get("state") != info.get("state")):
                self._reconcile(name)
        for name in [n for n in self._domains if n not in seen]:
            if self._is_stale(name, seq):
                continue
            previous = self._domains.pop(name)
            if not baseline:
                self._reconcile(name, previous)
        return seen

    async def _observing(self, fetch, apply):
        """Fetch from the VMM and apply the answer, minding what events and
        operations said in the meantime (see ``_is_stale``)."""
        seq = self._begin_listing()
        self._enter()
        try:
            answer = await fetch()
            apply(answer, seq)
            return answer
        finally:
            self._end_listing(seq)
            self._leave()

    def _apply_inventory(self, domains, seq):
        self._apply_listing(domains, seq, baseline=not self._baselined)
        self._baselined = True

    async def scan(self):
        """Compare the host's domains with what was last observed (the
        periodic scan; may be called at any time). Errors are logged."""
        if not self.hypervisor_connected:
            return  # nothing to compare with until the VMM reconnects
        try:
            await self._observing(self.vmm.list_domains, self._apply_inventory)
        except Exception as e:
            self.log.warn("LNM {lnm}: scan failed: {error}", lnm=self.name,
                          error=str(e) or e.__class__.__name__)

    async def _refresh(self, name):
        """Observe one domain afresh (after an unfamiliar event or a failed
        operation); errors are logged, never raised."""
        async def fetch():
            try:
                return await self.vmm.domain_info(name)
            except NoSuchVM:
                return None

        def apply(info, seq):
            if self._is_stale(name, seq):
                return
            if info is not None and _check_domain(info):
                old = self._domains.get(name)
                self._domains[name] = dict(info)
                if old is None or old.get("state") != info.get("state"):
                    self._reconcile(name)
            elif name in self._domains:
                self._reconcile(name, self._domains.pop(name))

        try:
            await self._observing(fetch, apply)
        except Exception as e:
            self.log.warn("LNM {lnm}: cannot read the state of {vm}: {error}",
                          lnm=self.name, vm=name, error=str(e) or e.__class__.__name__)

    def _on_event(self, name, state):
        """IVMM lifecycle callback (reactor thread).

        An event is only a hint that ``name`` changed: the domain is read
        afresh. Events arrive late (a "suspended" may come after the resume
        that followed it has returned) and in bursts, and the fresh read,
        ordered by ``_touch``, cannot report a state that is already over."""
        if not self._running or not isinstance(name, str):
            return
        vm = self._vms.get(name)
        if vm is not None and vm.busy:
            return  # the operation's own result will carry the new state
        if state is None and vm is None and name not in self._domains:
            return
        self._touch(name)
        observed = self._domains.get(name)
        if name not in self._refreshing and observed is not None and (
                observed.get("state") == state):
            # It says what was last observed (typically the late event of an
            # operation whose result came first): nothing to read. A change
            # while a read is under way is read again (below).
            return
        if name in self._refreshing:
            self._refreshing[name] = True   # read again when the current read ends
            return
        self._refreshing[name] = False
        defer.Deferred.fromCoroutine(self._refresh_after_events(name))

    async def _refresh_after_events(self, name):
        try:
            while True:
                await self._refresh(name)
                if not self._refreshing.get(name):
                    return
                self._refreshing[name] = False
        finally:
            self._refreshing.pop(name, None)

    # -- the cache -----------------------------------------------------------

    def _cache(self, record):
        name = record["name"]
        vm = self._vms.get(name)
        if vm is not None and not vm.busy and self._placed_elsewhere(vm.record, record):
            # E.g. the record a migration target was sent, once the migration
            # failed: the VM stays where it was, and is not ours to report.
            del self._vms[name]
            self._pending.pop(name, None)
            self._unadopted.pop(name, None)
            return
        if vm is None:
            self._vms[name] = CachedVM(self, record)
        else:
            vm.record = record
            vm.session = self._session
        self._unadopted.pop(name, None)

    def _placed_elsewhere(self, old, new):
        """Does ``new`` move a VM this LNM was told it holds to another LNM,
        while the VM is not on this host? (Compared with the LNM the old
        record named, the controller's name for this one.)"""
        old_vmm, new_vmm = old.get("vmm"), new.get("vmm")
        return (old_vmm is not None and new_vmm is not None and old_vmm != new_vmm
                and new["name"] not in self._domains)

    def _cached(self, name):
        vm = self._vms.get(name)
        if vm is None:
            raise NoSuchVM(f"{name} is not cached on LNM {self.name}: the controller "
                           "must send its record (receive) first")
        return vm

    def cached_vm(self, name):
        """The CachedVM for ``name``, or None."""
        return self._vms.get(name)

    def cached_names(self):
        return sorted(self._vms)

    async def _run(self, name, action, what, *, session=None):
        """Run ``action(vm)`` on a cached VM, one operation per VM at a time,
        its events unreported meanwhile; then settle the cache from its
        result (domain info, or None when the VM left this host).

        ``session`` is the controller session that asked (default: the
        current one); a result that outlives it is reported instead."""
        self._refuse_if_stopped()
        if session is None:
            session = self._session
        vm = self._cached(name)
        self._enter()
        try:
            await vm.lock.acquire()
            try:
                if self._vms.get(name) is not vm:
                    # The operation we queued behind destroyed or moved it.
                    raise NoSuchVM(f"{name} left LNM {self.name} before {what} could run")
                vm.busy = True
                try:
                    info = await action(vm)
                except BaseException:
                    vm.busy = False
                    self._touch(name)
                    # The attempt may have changed the VM halfway: look, and
                    # report whatever differs from what the controller knows.
                    await self._refresh(name)
                    self._report_if_awaited(name, session, vm.record)
                    raise
                vm.busy = False
                self._settle(vm, info, session)
                self._report_if_awaited(name, session, vm.record)
            finally:
                vm.lock.release()
        except UsherError as e:
            self.log.warn("LNM {lnm}: {what} {vm} failed: {error}", lnm=self.name,
                          what=what, vm=name, error=str(e))
            raise
        finally:
            self._leave()
        # Per VM and routine: debug (a start of thousands would log thousands
        # of lines); failures are warnings above.
        self.log.debug("LNM {lnm}: {what} {vm} -> {state}", lnm=self.name, what=what,
                       vm=name, state=info.get("state") if info else None)
        return info

    def _report_if_awaited(self, name, session, record):
        """A command of an earlier session ended on a VM the current
        controller saw listed busy: tell it how the VM is now, even if that
        is what it was told (it waits for this to decide about the VM)."""
        if session == self._session or name not in self._listed_busy:
            return
        self._listed_busy.discard(name)
        self._pending[name] = _change(name, self._actual_state(name),
                                      self._domains.get(name) or record)
        self._flush_soon()

    def _settle(self, vm, info, session=None):
        name = vm.name
        self._touch(name)
        if session is not None and session != self._session:
            # Asked on a connection that is gone: no controller will see this
            # result, so it is an observation like any other.
            self.log.info("LNM {lnm}: {vm} is {state} after a command from an earlier "
                          "controller connection; reporting it", lnm=self.name, vm=name,
                          state=info.get("state") if info else None)
            if info is None:
                self._reconcile(name, self._domains.pop(name, None))
            else:
                self._domains[name] = dict(info)
                self._reconcile(name)
            return
        if info is None:
            self._domains.pop(name, None)
            self._pending.pop(name, None)
            self._unadopted.pop(name, None)
            if self._vms.get(name) is vm:
                del self._vms[name]
            return
        info = dict(info)
        self._domains[name] = info
        # The controller learns the new state from the operation's result.
        vm.record["state"] = info.get("state")
        self._reconcile(name)

    # -- Table 2 -------------------------------------------------------------

    async def receive(self, records):
        """Cache the controller's records (all or none); -> how many."""
        checked = [check_record(record) for record in records]
        for record in checked:
            self._cache(record)
        for record in checked:
            self._reconcile(record["name"])
        self.log.debug("LNM {lnm}: received {count} VM records", lnm=self.name,
                       count=len(checked))
        return len(checked)

    async def start(self, name):
        """Boot a cached VM (idempotent) -> domain info."""
        return await self._run(name, lambda vm: vm.start(), "start")

    async def start_many(self, names):
        """Boot several cached VMs, each as ``start`` does -> [(name, domain
        info or the UsherError that VM failed with)], in the order given. One
        answer for many, and the VMM creates them in a few batches."""
        async def one(name):
            try:
                return name, await self.start(name)
            except UsherError as e:
                return name, e
            except Exception:
                # One VM's unexpected failure must not hide the others' fate.
                self.log.failure("LNM {lnm}: start {vm} failed", lnm=self.name, vm=name)
                return name, OperationFailed(f"start {name}: internal error on LNM "
                                             f"{self.name} (see its log)")

        return list(await defer.gatherResults(
            [defer.Deferred.fromCoroutine(one(name)) for name in names]))

    async def op_on(self, operation, name):
        """Apply a Table 3 operation -> domain info, or None after destroy."""
        if operation not in states.OPERATIONS:
            raise InvalidRequest(f"unknown operation {operation!r}; expected one of "
                                 + ", ".join(states.OPERATIONS))
        return await self._run(name, lambda vm: vm.operate(operation), operation)

    async def migrate(self, name, target):
        """Live-migrate to ``target["migration_uri"]`` -> None."""
        uri = target.get("migration_uri") if isinstance(target, dict) else None
        if not isinstance(uri, str) or not uri:
            raise InvalidRequest("migration target has no migration_uri")
        if self.migration_uri is not None and uri == self.migration_uri:
            raise InvalidRequest(f"cannot migrate {name} to the LNM it runs on")

        async def migrate(vm):
            await vm.migrate(uri)
            return None

        await self._run(name, migrate, "migrate")
        return None

    async def export_image(self, name):
        """Save the VM and take it off this host -> the VMM's export (for
        libvirt: {"xml", "image": bytes or None, "state"}), opaque here.

        The export is kept until the controller says the VM lives elsewhere
        (``release_export``) or must come back (``restore_export``), and is
        listed meanwhile by ``list_vms`` (state ``migrating``, ``retained``):
        if the answer is lost with the connection, the controller can still
        finish or undo the migration. Asked again, it answers the kept
        export (a replay moves nothing twice). An export finished after its
        connection is gone reached no one, and is put back here at once.
        """
        kept = self._exports.get(name)
        if kept is not None and name not in self._domains:
            return kept["exported"]
        session = self._session
        exported = None
        record = None

        async def export(vm):
            nonlocal exported, record
            record = dict(vm.record)
            exported = await vm.export_image()
            return None

        await self._run(name, export, "export", session=session)
        self._exports[name] = {"exported": exported, "record": record,
                               "at": self.clock.seconds()}
        if session != self._session:
            self.log.warn("LNM {lnm}: the export of {vm} finished after its controller "
                          "connection was gone; putting the VM back", lnm=self.name, vm=name)
            await self._restore_kept(name, session=session)
            raise Unavailable(f"export of {name}: the controller connection was lost; "
                              f"the VM was put back on LNM {self.name}")
        return exported

    def retained_exports(self):
        """Names of the exported VMs kept for the controller's decision."""
        return sorted(self._exports)

    async def release_export(self, name):
        """The migrated VM lives elsewhere now: forget its kept export.
        Idempotent -> True if one was kept."""
        kept = self._exports.pop(name, None)
        if kept is not None:
            self.log.info("LNM {lnm}: released the export of {vm}", lnm=self.name, vm=name)
        return kept is not None

    async def restore_export(self, name):
        """Put an exported VM back on this host from its kept export ->
        domain info. Idempotent: a VM already back is returned as it is."""
        if name not in self._exports:
            try:
                return await self.vmm.domain_info(name)
            except NoSuchVM:
                raise NoSuchVM(f"LNM {self.name} keeps no export of {name} and has no "
                               "such VM") from None
        return await self._restore_kept(name)

    async def _restore_kept(self, name, session=None):
        kept = self._exports[name]
        if name not in self._vms:
            self._cache(dict(kept["record"]))
        info = await self._run(name, lambda vm: vm.import_image(kept["exported"]),
                               "restore", session=session)
        self._exports.pop(name, None)
        return info

    def import_limit(self, name):
        """The largest memory image (bytes) an import of the cached VM
        ``name`` may bring: its record's memory and ``import_overhead_mib``;
        0 without its record (no import happens then)."""
        vm = self._vms.get(name)
        if vm is None:
            return 0
        return image_limit(vm.record.get("memory_mib") or 0, self.import_overhead_mib)

    async def import_image(self, name, exported):
        """Restore what another LNM's export_image gave (the VM's record
        received first) -> domain info.

        An import that finishes after its controller connection is gone is
        undone: the source keeps the export until the controller, told of
        the import, releases it, and no one can tell it now. Otherwise the
        VM could run here and, put back by the controller, there."""
        session = self._session

        async def restore(vm):
            info = await vm.import_image(exported)
            if session != self._session:
                self.log.warn("LNM {lnm}: the import of {vm} finished after its controller "
                              "connection was gone; undoing it (its source keeps the VM)",
                              lnm=self.name, vm=name)
                await vm.operate("destroy")
                return None
            return info

        return await self._run(name, restore, "import", session=session)

    async def get_details(self, name):
        """The cached record merged with fresh domain info; ``state`` is
        None when the VM is not on this host."""
        vm = self._vms.get(name)
        try:
            info = await self.vmm.domain_info(name)
        except NoSuchVM:
            if vm is None:
                raise NoSuchVM(f"no VM {name} on LNM {self.name}") from None
            info = None
        details = dict(vm.record) if vm is not None else {}
        if info is not None:
            details.update(info)
        else:
            details["state"] = None
        details["lnm"] = self.name
        details["cached"] = vm is not None
        return details

    async def get_status(self, name):
        """Resource usage of one VM: its 1/5/15-minute averages
        (usher.protocol, Monitoring); every figure None when it is not
        sampled (shut off, not sampled yet, or no monitor)."""
        if name not in self._vms and name not in self._domains:
            raise NoSuchVM(f"no VM {name} on LNM {self.name}")
        status = self.monitor.vm_status(name) if self.monitor is not None else None
        if status is None:
            status = dict.fromkeys(FIGURES)
            status.update(name=name, state=self._actual_state(name), sampled_at=None,
                          source=None)
        return status

    async def get_node_info(self):
        if not self.hypervisor_connected and self._node_info is not None:
            # What the node was; its VMs are reported unknown meanwhile.
            return dict(self._node_info, hypervisor_connected=False)
        info = dict(await self.vmm.node_info())
        info["name"] = self.name
        info["migration_uri"] = self.migration_uri
        self._node_info = dict(info)
        info["hypervisor_connected"] = True
        return info

    async def get_node_status(self):
        """The number of VMs and free memory (asked now), with the node's
        1/5/15-minute averages when a monitor runs."""
        status = dict(await self.vmm.node_status())
        if self.monitor is not None:
            figures = self.monitor.node_status()
            if status.get("free_memory_mib") is None:
                # Only a simulated figure can fill it; its source says so.
                status["free_memory_mib"] = figures.get("free_memory_mib")
            figures.pop("free_memory_mib", None)
            figures.pop("vms", None)
            status.update(figures)
        return status

    async def list_vms(self):
        """Every domain on the host (the inventory a controller takes when an
        LNM attaches), plus the exports kept for it (state ``migrating``,
        ``retained`` True). The controller sees them all, so what they show
        counts as told. While the hypervisor is unreachable: the domains last
        seen, their state unknown."""
        session = self._session
        if not self.hypervisor_connected:
            domains = [dict(info, state=states.UNKNOWN) for info in self._domains.values()]
        else:
            async def fetch():
                return [dict(d) for d in await self.vmm.list_domains() if _check_domain(d)]

            domains = await self._observing(fetch, self._apply_inventory)
        listed = {info["name"]: info for info in domains}
        for name, vm in list(self._vms.items()):
            if vm.session >= session:
                continue
            # Sent by a controller of an earlier session: this one knows the
            # VM by the inventory, and sends its own record if it manages it.
            info = listed.get(name)
            if info is None and not vm.busy and name not in self._exports:
                del self._vms[name]
            else:
                vm.record["state"] = info.get("state") if info else None
                vm.session = session
        self._unadopted = {}
        for name, info in listed.items():
            if name not in self._vms:
                self._unadopted[name] = info.get("state")
        for name in set(listed) | set(self._pending):
            self._reconcile(name)
        # A command in progress may still change a VM: the controller is told
        # (busy) and hears how it ended (_report_if_awaited).
        self._listed_busy = set()
        for name, vm in self._vms.items():
            if vm.busy:
                entry = listed.get(name)
                if entry is None:
                    entry = _change(name, None, vm.record)
                    domains.append(entry)
                entry["busy"] = True
                self._listed_busy.add(name)
        for name in self._exports:
            if name not in listed and name not in self._listed_busy:
                domains.append(self._retained_entry(name))
        return domains

    def _retained_entry(self, name):
        record = self._exports[name]["record"] or {}
        return {"name": name, "state": states.MIGRATING, "retained": True,
                "uuid": record.get("uuid"), "memory_mib": record.get("memory_mib"),
                "vcpus": record.get("vcpus"),
                "metadata": {key: record[key] for key in ("owner", "cluster")
                             if record.get(key) is not None}}
