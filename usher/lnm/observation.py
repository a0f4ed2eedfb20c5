"""How an LNM watches its host: the periodic scan, the VMM's lifecycle
events, fresh reads of one domain, and the hypervisor connection coming and
going. What it sees goes into the ``HostLedger``, which decides what is a
change for the controller.

An event is only a hint: the domain it names is read afresh, and reads are
ordered against events and operations (``HostLedger.touch``/``is_stale``) so
that a late event or a slow listing never reports a state that is over.
"""

from twisted.internet import defer
from twisted.logger import Logger

from usher import states
from usher.errors import NoSuchVM
from usher.lnm.cached_vm import check_domain


class HostObserver:
    """Observes the host through ``vmm`` into ``ledger``; ``activity``
    counts its reads. Events are heeded only while ``running``."""

    log = Logger()

    def __init__(self, *, name, vmm, ledger, activity):
        self.name = name
        self._vmm = vmm
        self._ledger = ledger
        self._activity = activity
        self.running = False
        # The hypervisor connection (see hypervisor_changed).
        self.hypervisor_connected = True
        self._refreshing = {}   # name -> another event came during the read
        self._baselined = False

    async def observing(self, fetch, apply):
        """Fetch from the VMM and apply the answer, minding what events and
        operations said in the meantime (see ``HostLedger.is_stale``)."""
        seq = self._ledger.begin_listing()
        self._activity.enter()
        try:
            answer = await fetch()
            apply(answer, seq)
            return answer
        finally:
            self._ledger.end_listing(seq)
            self._activity.leave()

    def apply_inventory(self, domains, seq):
        self._ledger.apply_listing(domains, seq, baseline=not self._baselined)
        self._baselined = True

    async def scan(self):
        """Compare the host's domains with what was last observed (the
        periodic scan; may be called at any time). Errors are logged."""
        if not self.hypervisor_connected:
            return  # nothing to compare with until the VMM reconnects
        try:
            await self.observing(self._vmm.list_domains, self.apply_inventory)
        except Exception as e:
            self.log.warn("LNM {lnm}: scan failed: {error}", lnm=self.name,
                          error=str(e) or e.__class__.__name__)

    async def refresh(self, name):
        """Observe one domain afresh (after an unfamiliar event or a failed
        operation); errors are logged, never raised."""
        async def fetch():
            try:
                return await self._vmm.domain_info(name)
            except NoSuchVM:
                return None

        def apply(info, seq):
            if self._ledger.is_stale(name, seq):
                return
            if info is not None and check_domain(info):
                old = self._ledger.domains.get(name)
                self._ledger.domains[name] = dict(info)
                if old is None or old.get("state") != info.get("state"):
                    self._ledger.reconcile(name)
            elif name in self._ledger.domains:
                self._ledger.reconcile(name, self._ledger.domains.pop(name))

        try:
            await self.observing(fetch, apply)
        except Exception as e:
            self.log.warn("LNM {lnm}: cannot read the state of {vm}: {error}",
                          lnm=self.name, vm=name, error=str(e) or e.__class__.__name__)

    def on_event(self, name, state):
        """IVMM lifecycle callback (reactor thread).

        An event is only a hint that ``name`` changed: the domain is read
        afresh. Events arrive late (a "suspended" may come after the resume
        that followed it has returned) and in bursts, and the fresh read,
        ordered by ``HostLedger.touch``, cannot report a state that is already over."""
        if not self.running or not isinstance(name, str):
            return
        vm = self._ledger.vms.get(name)
        if vm is not None and vm.busy:
            return  # the operation's own result will carry the new state
        if state is None and vm is None and name not in self._ledger.domains:
            return
        self._ledger.touch(name)
        observed = self._ledger.domains.get(name)
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
                await self.refresh(name)
                if not self._refreshing.get(name):
                    return
                self._refreshing[name] = False
        finally:
            self._refreshing.pop(name, None)

    def hypervisor_changed(self, connected):
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
                           uri=getattr(self._vmm, "uri", None),
                           count=len(self._ledger.domains))
            for name, info in list(self._ledger.domains.items()):
                if info.get("state") != states.UNKNOWN:
                    self._ledger.domains[name] = dict(info, state=states.UNKNOWN)
                    self._ledger.touch(name)
                    self._ledger.reconcile(name)
            return
        if self.hypervisor_connected:
            return
        self.hypervisor_connected = True
        self.log.info("LNM {lnm}: the hypervisor connection to {uri} is back; scanning",
                      lnm=self.name, uri=getattr(self._vmm, "uri", None))
        if self.running:
            defer.Deferred.fromCoroutine(self.scan())
