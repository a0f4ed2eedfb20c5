"""The local node manager (LNM): Table 2 as coroutine methods, the front of
the rooms that do the work. Plain Python and Deferreds; the PB boundary is
``api.py``.

- ``usher.lnm.cached_vm``: the controller's records, checked, and the cached
  VM objects.
- ``usher.lnm.ledger``: what is known of each VM, what the controller was
  told, and the changes between them.
- ``usher.lnm.observation``: the scan, lifecycle events and the hypervisor
  connection.
- ``usher.lnm.reports``: the queue of changes and its delivery.
- ``usher.lnm.commands``: start, operations, migration and the kept exports.

``NodeManager`` wires them, runs the loops and answers the queries
(details, status, the inventory ``list_vms``).
"""

from twisted.logger import Logger

from usher import states
from usher.errors import NoSuchVM
from usher.lnm.cached_vm import check_domain, check_record, report_entry
from usher.lnm.commands import Commands
from usher.lnm.ledger import HostLedger
from usher.lnm.observation import HostObserver
from usher.lnm.received_xml import DEFAULT_IMPORT_OVERHEAD_MIB
from usher.lnm.reports import Activity, ReportQueue
from usher.loops import every, unfailing
from usher.protocol import FIGURES

class NodeManager:
    """The LNM: Table 2 as coroutine methods, over the rooms above.

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
        self._reporter = None
        self._activity = Activity()
        self._reports = ReportQueue(
            name=name, clock=clock, report_interval=report_interval,
            reporter_of=lambda: self._reporter,
            acknowledge=lambda batch, acks: self._ledger.acknowledge(batch, acks),
            activity=self._activity)
        self._ledger = HostLedger(name=name, queue=self._reports, vmm=vmm)
        self._observer = HostObserver(name=name, vmm=vmm, ledger=self._ledger,
                                      activity=self._activity)
        # An imported VM's memory image: at most its memory and
        # import_overhead_mib (MiB).
        self._commands = Commands(name=name, vmm=vmm, clock=clock, ledger=self._ledger,
                                  observer=self._observer, activity=self._activity,
                                  migration_uri=migration_uri,
                                  import_overhead_mib=import_overhead_mib)
        self._subscribed = False
        self._running = False
        self._scan_loop = None
        # What the node looked like while the hypervisor was connected.
        self._node_info = None
        # The resource monitor (usher.lnm.monitor.Monitor), if any.
        self.monitor = None

    @property
    def migration_uri(self):
        return self._commands.migration_uri

    @property
    def import_overhead_mib(self):
        return self._commands.import_overhead_mib

    @property
    def hypervisor_connected(self):
        """False while the VMM has lost its hypervisor connection."""
        return self._observer.hypervisor_connected

    # -- lifecycle -----------------------------------------------------------

    async def startup(self):
        """Subscribe to VMM events, take the first inventory (the baseline:
        nothing on it is a change) and start the scan and report loops."""
        if self._running:
            return
        self._set_running(True)
        self._commands.stopped = False
        if not self._subscribed:
            self.vmm.subscribe(self._observer.on_event)
            watch_connection = getattr(self.vmm, "watch_connection", None)
            if watch_connection is not None:
                watch_connection(self._observer.hypervisor_changed)
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
        self._reports.flush_soon()
        self.log.info("LNM {lnm} managing {count} domains on {uri}", lnm=self.name,
                      count=len(self._ledger.domains), uri=getattr(self.vmm, "uri", None))

    def _set_running(self, running):
        self._running = self._reports.running = self._observer.running = running

    def _loop(self, function, interval, now=False):
        call = unfailing(function, log=self.log, message="LNM {lnm}: periodic {what} failed",
                         lnm=self.name, what=function.__name__)
        return every(interval, call, clock=self.clock, now=now)

    async def shutdown(self):
        """Stop the loops, refuse new operations and wait for in-flight work."""
        self._set_running(False)
        self._commands.stopped = True
        if self._scan_loop is not None and self._scan_loop.running:
            self._scan_loop.stop()
        self._scan_loop = None
        if self._scan_start is not None and self._scan_start.active():
            self._scan_start.cancel()
        self._scan_start = None
        self._reports.cancel()
        await self._activity.idle()

    # -- controller sessions ---------------------------------------------------

    def begin_session(self):
        """A connection to a controller came or went. Commands asked before
        now answer into a connection that is gone: their results are reported
        as observations, and an export among them is put back at once (its
        image reached no one). The next inventory (``list_vms``) is what the
        new controller knows."""
        self._ledger.session += 1

    @property
    def session(self):
        return self._ledger.session

    # -- reporting -----------------------------------------------------------

    def set_reporter(self, reporter):
        """Attach (a reporter) or detach (None). Changes queued while detached
        go out at once after attaching."""
        self._reporter = reporter
        self._reports.flush_soon()

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
        vm = self._ledger.vms.get(name)
        args = vm.record.get("args") if vm is not None else None
        return args if isinstance(args, dict) else {}

    @property
    def pending_changes(self):
        """The changes waiting to be reported, by VM name (a copy)."""
        return {name: dict(change) for name, change in self._reports.pending.items()}

    def drain(self, rounds=10):
        """``ReportQueue.drain``: wait until the controller is told of
        everything observed so far -> whether nothing is left queued."""
        return self._reports.drain(rounds)

    def flush(self):
        """Send the queued changes now (``ReportQueue.flush``)."""
        return self._reports.flush()

    def scan(self):
        """Compare the host's domains with what was last observed (the
        periodic scan; may be called at any time). Errors are logged."""
        return self._observer.scan()

    # -- the cache -----------------------------------------------------------

    def cached_vm(self, name):
        """The CachedVM for ``name``, or None."""
        return self._ledger.vms.get(name)

    def cached_names(self):
        return sorted(self._ledger.vms)

    # -- Table 2 -------------------------------------------------------------

    async def receive(self, records):
        """Cache the controller's records (all or none); -> how many."""
        checked = [check_record(record) for record in records]
        for record in checked:
            self._ledger.cache(record)
        for record in checked:
            self._ledger.reconcile(record["name"])
        self.log.debug("LNM {lnm}: received {count} VM records", lnm=self.name,
                       count=len(checked))
        return len(checked)

    def start(self, name):
        """Boot a cached VM (idempotent) -> domain info."""
        return self._commands.start(name)

    def start_many(self, names):
        """Boot several cached VMs -> [(name, domain info or the UsherError
        that VM failed with)], in the order given (``Commands.start_many``)."""
        return self._commands.start_many(names)

    def op_on(self, operation, name):
        """Apply a Table 3 operation -> domain info, or None after delete."""
        return self._commands.op_on(operation, name)

    def migrate(self, name, target):
        """Live-migrate to ``target["migration_uri"]`` -> None."""
        return self._commands.migrate(name, target)

    def export_image(self, name):
        """Save the VM and take it off this host, keeping the export until
        the controller decides (``Commands.export_image``)."""
        return self._commands.export_image(name)

    def retained_exports(self):
        """Names of the exported VMs kept for the controller's decision."""
        return self._commands.retained_exports()

    def release_export(self, name):
        """The migrated VM lives elsewhere now: forget its kept export.
        Idempotent -> True if one was kept."""
        return self._commands.release_export(name)

    def restore_export(self, name):
        """Put an exported VM back on this host from its kept export ->
        domain info. Idempotent."""
        return self._commands.restore_export(name)

    def import_limit(self, name):
        """The largest memory image (bytes) an import of the cached VM
        ``name`` may bring (``Commands.import_limit``)."""
        return self._commands.import_limit(name)

    def import_image(self, name, exported):
        """Restore what another LNM's export_image gave (the VM's record
        received first) -> domain info (``Commands.import_image``)."""
        return self._commands.import_image(name, exported)

    async def get_details(self, name):
        """The cached record merged with fresh domain info; ``state`` is
        None when the VM is not on this host."""
        vm = self._ledger.vms.get(name)
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
        if name not in self._ledger.vms and name not in self._ledger.domains:
            raise NoSuchVM(f"no VM {name} on LNM {self.name}")
        status = self.monitor.vm_status(name) if self.monitor is not None else None
        if status is None:
            status = dict.fromkeys(FIGURES)
            status.update(name=name, state=self._ledger.actual_state(name), sampled_at=None,
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
        session = self._ledger.session
        if not self.hypervisor_connected:
            domains = [dict(info, state=states.UNKNOWN)
                       for info in self._ledger.domains.values()]
        else:
            async def fetch():
                return [dict(d) for d in await self.vmm.list_domains() if check_domain(d)]

            domains = await self._observer.observing(fetch, self._observer.apply_inventory)
        listed = {info["name"]: info for info in domains}
        for name, vm in list(self._ledger.vms.items()):
            if vm.session >= session:
                continue
            # Sent by a controller of an earlier session: this one knows the
            # VM by the inventory, and sends its own record if it manages it.
            info = listed.get(name)
            if info is None and not vm.busy and name not in self._commands.exports:
                del self._ledger.vms[name]
            else:
                vm.record["state"] = info.get("state") if info else None
                vm.session = session
        self._ledger.unadopted = {}
        for name, info in listed.items():
            if name not in self._ledger.vms:
                self._ledger.unadopted[name] = info.get("state")
        for name in set(listed) | set(self._reports.pending):
            self._ledger.reconcile(name)
        # A command in progress may still change a VM: the controller is told
        # (busy) and hears how it ended (_report_if_awaited).
        self._ledger.listed_busy = set()
        for name, vm in self._ledger.vms.items():
            if vm.busy:
                entry = listed.get(name)
                if entry is None:
                    entry = report_entry(name, None, vm.record)
                    domains.append(entry)
                entry["busy"] = True
                self._ledger.listed_busy.add(name)
        for name in self._commands.exports:
            if name not in listed and name not in self._ledger.listed_busy:
                domains.append(self._commands.retained_entry(name))
        return domains
