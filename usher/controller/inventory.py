"""The controller's inventory of LNMs: which are attached (attach, detach,
forget), what each reports of its host (reconcile, reports, and each
domain's ``observe``: adopted, quarantined or complained of), and the
settling of what a failure left unknown (resynchronize, locate, kept
exports).

Failures (paper, "Failures"; README "Failures and recovery"): an LNM that
goes away leaves its VMs ``lost``; a command whose answer never came drops
the connection (``resynchronize``), so that the LNM reattaches and its
inventory settles every VM; a migration whose outcome is unknown keeps the
source's export until the VM is found (``resolve_soon``), so no VM ever
runs twice or vanishes. LNM watchers (``watch``) hear of every attach and
detach: the liveness monitor and the recovery tracker.

A compromised LNM must not reach other hosts' VMs or other users'
namespaces (README "Security"): a VM changes host only by a migration the
controller drove (a migration whose outcome is unknown may still land on
its target), and a managed name nobody started there is quarantined, except
in the first inventory an LNM known before a restart hands over (trusted,
recovery). What one domain's report may do is ``usher.controller.observation``.
"""

from twisted.internet import defer
from twisted.logger import Logger

from usher import states
from usher.controller.commands import lnm_view
from usher.controller.events import Event
from usher.controller.observation import Observation
from usher.controller.state import LNMInfo
from usher.errors import InvalidRequest, NoSuchLNM, NoSuchVM, UsherError

log = Logger()


class LNMInventory:
    """The attached LNMs and what they report."""

    def __init__(self, *, domain, clock, state, chains, api, monitoring, ledger,
                 lnm_limits, known_lnms=None):
        self.clock = clock
        self.state = state
        self.chains = chains
        self.api = api
        self.monitoring = monitoring
        self.ledger = ledger
        self.lnm_limits = lnm_limits
        self.known_lnms = known_lnms
        self.recovery = None         # a usher.controller.recovery.Recovery, if recovering
        self.observation = Observation(domain=domain, state=state, chains=chains, api=api,
                                       ledger=ledger, lnm_limits=lnm_limits,
                                       recovering=lambda: self.recovering,
                                       resolve_soon=self.resolve_soon)
        self._watchers = []
        self._first_attached = set() # LNMs whose first inventory has been taken
        self._resolve_scheduled = None

    # -- which LNMs --------------------------------------------------------------

    def connected(self, lnm):
        lnm_info = self.state.lnms.get(lnm)
        return lnm_info is not None and lnm_info.connected

    def current(self, lnm, handle):
        """Is ``handle`` still the connection of ``lnm``? An LNM that
        reattached meanwhile is another connection, which knows nothing of
        commands sent on the old one."""
        lnm_info = self.state.lnms.get(lnm)
        return handle is not None and lnm_info is not None and lnm_info.handle is handle

    def destroy_keeps(self, lnm):
        """Does ``lnm``'s destroy keep the VM (its hello said so: issue 17)?"""
        lnm_info = self.state.lnms.get(lnm)
        return lnm_info is not None and lnm_info.destroy_keeps

    def handle_of(self, lnm):
        lnm_info = self.state.lnms.get(lnm)
        return lnm_info.handle if lnm_info is not None else None

    def watch(self, watcher):
        """``watcher.lnm_attached(name, handle)`` once an LNM has attached (its
        inventory taken), ``watcher.lnm_detached(name, handle)`` when it goes."""
        self._watchers.append(watcher)

    def _tell_watchers(self, what, name, handle):
        for watcher in list(self._watchers):
            try:
                getattr(watcher, what)(name, handle)
            except Exception:
                log.failure("LNM watcher {watcher!r} failed on {what} {lnm}",
                            watcher=watcher, what=what, lnm=name)

    @property
    def recovering(self):
        return self.recovery is not None and not self.recovery.done

    async def settled(self):
        """Wait until the global state is rebuilt after a restart: every LNM
        known before is back, or the recovery window is over."""
        if self.recovering:
            await self.recovery.wait()

    # -- attach, detach, forget ------------------------------------------------------

    async def attach(self, name, handle, hello=None):
        hello = hello or {}
        lnm_info = self.state.lnms.get(name)
        if lnm_info is not None and lnm_info.connected and lnm_info.handle is not handle:
            log.warn("LNM {lnm} connected again; dropping its previous connection", lnm=name)
            old = lnm_info.handle
            self.detach(name, old)
            # Abort: the old connection may lead nowhere (a cut link).
            (getattr(old, "abort", None) or old.disconnect)()
        info = await handle.get_node_info()
        lnm_info = self.state.lnms.setdefault(name, LNMInfo(name))
        lnm_info.info = info
        lnm_info.handle = handle
        lnm_info.connected = True
        lnm_info.destroy_keeps = bool(hello.get("destroy_keeps"))
        if self.known_lnms is not None:
            self.known_lnms.remember(name, hostname=info.get("hostname"),
                                     recovery_host=hello.get("recovery_host"),
                                     recovery_port=hello.get("recovery_port"))
        domains = await handle.list_vms()
        if not self.current(name, handle):
            return       # replaced while we waited
        self.reconcile(name, domains, trusting=self._trusts_inventory(name))
        self._first_attached.add(name)
        mine = [lnm_view(self.state.vms[n]) for n in sorted(lnm_info.vms)
                if self.state.vms[n]["state"] not in (states.MISSING,)]
        if mine:
            await handle.receive(mine)
        log.info("LNM {lnm} attached: {vms} VMs, {cpus} CPUs, {memory} MiB",
                 lnm=name, vms=len(domains), cpus=info.get("cpus"),
                 memory=info.get("memory_mib"))
        self.chains.notify(Event("lnm_connected", self.api, lnm=name, info=dict(info)))
        if self.current(name, handle):
            self._tell_watchers("lnm_attached", name, handle)
            self.resolve_soon()

    def detach(self, name, handle):
        if not self.current(name, handle):
            return
        lnm_info = self.state.lnms[name]
        lnm_info.connected = False
        lnm_info.handle = None
        self.monitoring.lnm_detached(name)
        self._tell_watchers("lnm_detached", name, handle)
        self.ledger.lnm_gone(name)
        lost = []
        for vm_name in sorted(lnm_info.vms):
            rec = self.state.vms[vm_name]
            if rec["state"] not in (states.MISSING, states.LOST):
                self.state.update(vm_name, state=states.LOST)
                lost.append(vm_name)
        self.state.drop_unmanaged_on(name)
        log.error("LNM {lnm} disconnected; {count} VMs are lost", lnm=name, count=len(lost))
        for vm_name in lost:
            self.chains.notify(Event("vm_lost", self.api, vm=dict(self.state.vms[vm_name])))
        self.chains.notify(Event("lnm_disconnected", self.api, lnm=name, lost=lost))

    def forget(self, name):
        """Retire a disconnected LNM: forget it (also in the persisted list)
        and the VMs Usher last knew on it. -> the names of those VMs."""
        lnm_info = self.state.lnms.get(name)
        if lnm_info is None:
            raise NoSuchLNM(f"no LNM {name} is known")
        if lnm_info.connected:
            raise InvalidRequest(f"LNM {name} is connected; stop it before forgetting it")
        busy = [n for n in lnm_info.vms if self.ledger.is_busy(n)]
        if busy:
            raise InvalidRequest(f"LNM {name} has commands in flight ({busy[0]} …)")
        forgotten = sorted(lnm_info.vms)
        for vm_name in forgotten:
            self.ledger.start_settled(vm_name)
            self.state.remove(vm_name)
        self.state.drop_unmanaged_on(name)
        del self.state.lnms[name]
        self.observation.forget(name)
        self._first_attached.discard(name)
        if self.known_lnms is not None:
            self.known_lnms.forget(name)
        if self.state.holds is not None:
            self.state.holds.forget(name)
        log.warn("LNM {lnm} forgotten with {count} VMs", lnm=name, count=len(forgotten))
        return forgotten

    # -- what LNMs report --------------------------------------------------------------

    def reconcile(self, lnm, domains, trusting=False):
        """Take an LNM's full inventory as the truth about its host (about
        the VMs the controller has there, and its strangers). ``trusting``:
        the first inventory, after a restart, of an LNM known before it
        (``_trusts_inventory``)."""
        observation = self.observation
        complaints = {}
        if trusting:
            # (issue 15, part B) A fenced LNM's copies of the VMs restarted
            # elsewhere are stale: its inventory never vouches for them.
            fenced = (self.state.holds.get(lnm, "fenced")
                      if self.state.holds is not None else None) or {}
            stale = set(fenced.get("restarted", ()))
            observation.trust(lnm, [d for d in domains if d["name"] not in stale])
        seen = set()
        for dom in domains:
            observation.observe(lnm, dom, complaints)
            seen.add(dom["name"])
        if trusting:
            observation.keep_trusting_unsettled(lnm)
        observation.complained(lnm, complaints)
        for vm_name in sorted(self.state.lnms[lnm].vms - seen):
            rec = self.state.vms[vm_name]
            if not self.ledger.is_busy(vm_name) and rec["state"] not in (states.STARTING,
                                                                         states.MIGRATING):
                observation.absent(lnm, rec)

    def _trusts_inventory(self, lnm):
        """Recovery: the controller persists nothing about VMs, so after a
        restart every VM comes back by its LNM's inventory. The first
        inventory of an LNM known before the restart (``recovery.expected``,
        from state_dir/lnms.json) vouches for the managed VMs on it whose
        Usher metadata (written from the records the controller sent) names
        the owner their name does. Any other managed name the controller has
        no record of is quarantined."""
        return (self.recovery is not None and lnm in self.recovery.expected
                and lnm not in self._first_attached)

    def report(self, lnm, changes):
        """An LNM's observed changes -> the updated records of its own VMs
        (the paper's ack), as LNMs are sent them (``lnm_view``)."""
        if not self.connected(lnm):
            raise NoSuchLNM(f"LNM {lnm} is not attached")
        if len(changes) > self.lnm_limits.max_report_changes:
            raise InvalidRequest(f"a report may have at most "
                                 f"{self.lnm_limits.max_report_changes} changes")
        observation = self.observation
        complaints = {}
        acks = []
        for change in changes:
            if not isinstance(change, dict) or not isinstance(change.get("name"), str):
                raise InvalidRequest("malformed change report")
            if change.get("busy") or change.get("retained"):
                # Inventory-only flags (list_vms): a report carries neither.
                change = dict(change, busy=False, retained=False)
            rec = observation.observe(lnm, change, complaints)
            if rec is not None and rec.get("state") is not None and observation.on_lnm(
                    lnm, rec):
                acks.append(lnm_view(rec))
        observation.complained(lnm, complaints)
        return acks

    def status_report(self, lnm, node, vms, kept=()):
        """An LNM's monitoring figures (usher.protocol, Monitoring and
        report_status) -> the names it should send in full next time."""
        if not self.connected(lnm):
            raise NoSuchLNM(f"LNM {lnm} is not attached")
        resend = []
        self.monitoring.report(lnm, node, vms, kept, resend)
        return resend

    def refused(self, lnm, what, error):
        """The PB boundary refused what ``lnm`` sent (usher.controller.lnm_input)."""
        log.warn("LNM {lnm}: {what} refused: {error}", lnm=lnm, what=what,
                 error=str(error)[:300])
        self.chains.notify(Event("error", self.api, kind="lnm_input_refused", lnm=lnm,
                                 what=what, error=str(error)[:300]))

    # -- settling what failures left unknown ---------------------------------------------

    def resynchronize(self, lnm, handle, why):
        """A command on an attached LNM went unanswered: the controller no
        longer knows what that LNM did. Drop the connection, so that the LNM
        reattaches and its inventory settles every VM."""
        if not self.current(lnm, handle):
            return
        log.error("LNM {lnm}: {why}; dropping its connection so that it reattaches and "
                  "reports its VMs afresh", lnm=lnm, why=why)
        self.detach(lnm, handle)
        (getattr(handle, "abort", None) or handle.disconnect)()

    async def locate(self, name, lnm, handle):
        """Is ``name`` on LNM ``lnm`` (through ``handle``, the connection a
        command went to)? -> ("there", details), ("absent", None) or
        ("unknown", None)."""
        if not self.current(lnm, handle):
            return "unknown", None
        try:
            details = await handle.get_details(name)
        except NoSuchVM:
            return "absent", None
        except UsherError:
            return "unknown", None
        if details.get("state") is None:
            return "absent", None
        return "there", details

    async def send_record(self, lnm, name):
        """Give an LNM the current record of a VM, which replaces (or, when it
        names another LNM and the VM is not there, drops) its cached copy.
        Best effort: a failure is logged, the LNM's next report corrects it."""
        rec = self.state.vms.get(name)
        if not self.connected(lnm) or rec is None:
            return
        try:
            await self.state.lnms[lnm].handle.receive([lnm_view(rec)])
        except UsherError as e:
            log.warn("could not send the record of {vm} to LNM {lnm}: {error}",
                     vm=name, lnm=lnm, error=str(e))

    def resolve_soon(self):
        """Settle, on the next reactor turn, the migrations cut short whose
        VMs can now be found (``_resolve_kept_exports``)."""
        if not self.ledger.has_kept_exports() or self._resolve_scheduled is not None:
            return

        def run():
            self._resolve_scheduled = None
            defer.Deferred.fromCoroutine(self._resolve_kept_exports())

        self._resolve_scheduled = self.clock.callLater(0, run)

    async def _resolve_kept_exports(self):
        """For each export an LNM keeps (a migration cut short): if the VM
        runs elsewhere, the LNM forgets it; if it is nowhere, and every LNM
        that could hold it has reported, the LNM puts it back. While in
        doubt, wait: never two copies, never none."""
        live = (states.RUN, states.PAUSED, states.SHUTOFF, states.HIBERNATED,
                states.UNKNOWN)
        ledger = self.ledger
        for name in ledger.kept_exports():
            entry = ledger.kept_export(name)
            if entry is None or not ledger.may_settle(name):
                continue
            source, target = entry["source"], entry.get("target")
            handle = self.handle_of(source)
            if handle is None:
                continue
            rec = self.state.vms.get(name)
            other = rec["lnm"] if rec is not None and rec["lnm"] != source else None
            elsewhere = (other is not None and self.connected(other)
                         and rec["state"] in live)
            if not elsewhere:
                if other is not None and not self.connected(other):
                    continue     # where it may run cannot answer yet
                if target not in (None, source) and not self.connected(target):
                    continue
                if self.recovering:
                    continue     # an LNM not back yet may hold it
            with ledger.settling(name):
                try:
                    if elsewhere:
                        await handle.release_export(name)
                        log.info("VM {vm} runs on {other}: LNM {lnm} forgets its export",
                                 vm=name, other=other, lnm=source)
                    else:
                        info = await handle.restore_export(name)
                        log.warn("VM {vm} was found on no LNM after an interrupted "
                                 "migration: LNM {lnm} put it back from the export it kept",
                                 vm=name, lnm=source)
                        if info:
                            self.observation.observe(source, dict(info, name=name))
                            await self.send_record(source, name)
                    ledger.export_settled(name)
                except NoSuchVM:
                    ledger.export_settled(name)
                except UsherError as e:
                    log.warn("could not settle the interrupted migration of {vm} on LNM "
                             "{lnm}: {error}; trying again when an LNM attaches", vm=name,
                             lnm=source, error=str(e))
