"""The commands an LNM carries out on its VMs: start, the Table 3
operations, migration, and the exports kept until the controller decides.

Every command runs through ``Commands.run``: one at a time per VM, its
events unreported meanwhile, the cache settled from its result
(``HostLedger.settle``). A command asked in a controller session that has
ended answers no one, so its result is reported as an observation.

An exported VM is kept (``exports``) until the controller says where it
lives (``release_export``) or to put it back (``restore_export``): a
migration cut short by a failure must leave neither two copies nor none.
"""

from twisted.internet import defer
from twisted.logger import Logger

from usher import states
from usher.errors import InvalidRequest, NoSuchVM, OperationFailed, Unavailable, UsherError
from usher.lnm.received_xml import image_limit


class Commands:
    """The LNM's commands on the VMs of ``ledger``, through ``vmm``;
    ``observer`` reads a VM afresh after a failed command, ``activity``
    counts them. Refused once ``stopped``."""

    log = Logger()

    def __init__(self, *, name, vmm, clock, ledger, observer, activity, migration_uri,
                 import_overhead_mib):
        self.name = name
        self._vmm = vmm
        self.clock = clock
        self._ledger = ledger
        self._observer = observer
        self._activity = activity
        self.migration_uri = migration_uri
        self.import_overhead_mib = import_overhead_mib
        self.stopped = False
        self.exports = {}       # name -> {"exported", "record", "at"}

    async def run(self, name, action, what, *, session=None):
        """Run ``action(vm)`` on a cached VM, one operation per VM at a time,
        its events unreported meanwhile; then settle the cache from its
        result (domain info, or None when the VM left this host).

        ``session`` is the controller session that asked (default: the
        current one); a result that outlives it is reported instead."""
        if self.stopped:
            raise Unavailable(f"LNM {self.name} is shutting down")
        if session is None:
            session = self._ledger.session
        vm = self._ledger.cached(name)
        self._activity.enter()
        try:
            await vm.lock.acquire()
            try:
                if self._ledger.vms.get(name) is not vm:
                    # The operation we queued behind deleted or moved it.
                    raise NoSuchVM(f"{name} left LNM {self.name} before {what} could run")
                vm.busy = True
                try:
                    info = await action(vm)
                except BaseException:
                    vm.busy = False
                    self._ledger.touch(name)
                    # The attempt may have changed the VM halfway: look, and
                    # report whatever differs from what the controller knows.
                    await self._observer.refresh(name)
                    self._ledger.report_if_awaited(name, session, vm.record)
                    raise
                vm.busy = False
                self._ledger.settle(vm, info, session)
                self._ledger.report_if_awaited(name, session, vm.record)
            finally:
                vm.lock.release()
        except UsherError as e:
            self.log.warn("LNM {lnm}: {what} {vm} failed: {error}", lnm=self.name,
                          what=what, vm=name, error=str(e))
            raise
        finally:
            self._activity.leave()
        # Per VM and routine: debug (a start of thousands would log thousands
        # of lines); failures are warnings above.
        self.log.debug("LNM {lnm}: {what} {vm} -> {state}", lnm=self.name, what=what,
                       vm=name, state=info.get("state") if info else None)
        return info

    async def start(self, name):
        """Boot a cached VM (idempotent) -> domain info."""
        return await self.run(name, lambda vm: vm.start(), "start")

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
        """Apply a Table 3 operation -> domain info, or None after delete
        (or a destroy of a transient domain, which leaves nothing)."""
        if operation not in states.OPERATIONS:
            raise InvalidRequest(f"unknown operation {operation!r}; expected one of "
                                 + ", ".join(states.OPERATIONS))
        return await self.run(name, lambda vm: vm.operate(operation), operation)

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

        await self.run(name, migrate, "migrate")
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
        kept = self.exports.get(name)
        if kept is not None and name not in self._ledger.domains:
            return kept["exported"]
        session = self._ledger.session
        exported = None
        record = None

        async def export(vm):
            nonlocal exported, record
            record = dict(vm.record)
            exported = await vm.export_image()
            return None

        await self.run(name, export, "export", session=session)
        self.exports[name] = {"exported": exported, "record": record,
                               "at": self.clock.seconds()}
        if session != self._ledger.session:
            self.log.warn("LNM {lnm}: the export of {vm} finished after its controller "
                          "connection was gone; putting the VM back", lnm=self.name, vm=name)
            await self._restore_kept(name, session=session)
            raise Unavailable(f"export of {name}: the controller connection was lost; "
                              f"the VM was put back on LNM {self.name}")
        return exported

    def retained_exports(self):
        """Names of the exported VMs kept for the controller's decision."""
        return sorted(self.exports)

    async def release_export(self, name):
        """The migrated VM lives elsewhere now: forget its kept export.
        Idempotent -> True if one was kept."""
        kept = self.exports.pop(name, None)
        if kept is not None:
            self.log.info("LNM {lnm}: released the export of {vm}", lnm=self.name, vm=name)
        return kept is not None

    async def restore_export(self, name):
        """Put an exported VM back on this host from its kept export ->
        domain info. Idempotent: a VM already back is returned as it is."""
        if name not in self.exports:
            try:
                return await self._vmm.domain_info(name)
            except NoSuchVM:
                raise NoSuchVM(f"LNM {self.name} keeps no export of {name} and has no "
                               "such VM") from None
        return await self._restore_kept(name)

    async def _restore_kept(self, name, session=None):
        kept = self.exports[name]
        if name not in self._ledger.vms:
            self._ledger.cache(dict(kept["record"]))
        info = await self.run(name, lambda vm: vm.import_image(kept["exported"]),
                               "restore", session=session)
        self.exports.pop(name, None)
        return info

    def import_limit(self, name):
        """The largest memory image (bytes) an import of the cached VM
        ``name`` may bring: its record's memory and ``import_overhead_mib``;
        0 without its record (no import happens then)."""
        vm = self._ledger.vms.get(name)
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
        session = self._ledger.session

        async def restore(vm):
            info = await vm.import_image(exported)
            if session != self._ledger.session:
                self.log.warn("LNM {lnm}: the import of {vm} finished after its controller "
                              "connection was gone; undoing it (its source keeps the VM)",
                              lnm=self.name, vm=name)
                await vm.remove()
                return None
            return info

        return await self.run(name, restore, "import", session=session)

    def retained_entry(self, name):
        record = self.exports[name]["record"] or {}
        return {"name": name, "state": states.MIGRATING, "retained": True,
                "uuid": record.get("uuid"), "memory_mib": record.get("memory_mib"),
                "vcpus": record.get("vcpus"),
                "metadata": {key: record[key] for key in ("owner", "cluster")
                             if record.get(key) is not None}}
