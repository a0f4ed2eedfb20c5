"""What an LNM knows of its host's VMs, what its controller was told of
them, and the changes between the two.

- ``vms``: the cached VM objects (``usher.lnm.cached_vm.CachedVM``), one per
  VM the controller manages here.
- ``domains``: every domain last observed on the host (events, scans,
  operation results).
- What the controller was last told of each domain: the cached record's
  ``state`` for a cached VM, ``unadopted`` for the others.

A domain whose observed state differs from what the controller was told is a
*change*: ``reconcile`` queues it (the latest one per VM) on the
``ReportQueue``. The controller's acknowledgment is its updated records,
which replace the cached ones. Operations are the exception: their result
carries the new state (``settle``), so their own events are not reported.

Sequence numbers order observations: a listing requested at seq N must not
overwrite what an event or an operation said about a VM after N
(``touch``, ``is_stale``).
"""

from twisted.logger import Logger

from usher import states
from usher.errors import InvalidRequest, NoSuchVM
from usher.lnm.cached_vm import CachedVM, check_domain, check_record, report_entry

# States the controller sets while one of its commands is in flight (a record
# received before ``start``, or before a migration lands here): the command's
# result, not a comparison with the host, settles them.
TRANSITIONAL = frozenset({states.STARTING, states.MIGRATING})
# What a controller may believe of a VM that is not on this host.
ABSENT = frozenset({None, states.MISSING})
_NEVER_TOLD = object()


class HostLedger:
    """The LNM's books on its VMs (see the module docstring). ``name`` is the
    LNM's; ``queue`` the ``ReportQueue`` changes go to; ``vmm`` is what the
    cached VMs act through."""

    log = Logger()

    def __init__(self, *, name, queue, vmm):
        self.name = name
        self._queue = queue
        self._vmm = vmm
        self.vms = {}           # name -> CachedVM
        self.domains = {}       # name -> domain info last observed
        self.unadopted = {}     # name -> state last told, for uncached domains
        # Controller sessions: bumped when a connection to a controller comes
        # or goes (NodeManager.begin_session). The answer to a command asked
        # in an older session never reaches a controller, so it is reported
        # instead.
        self.session = 0
        # VMs the last inventory listed as busy (a command in progress): the
        # controller waits to hear how that command ended.
        self.listed_busy = set()
        self._seq = 0
        self._touched = {}      # name -> seq of the latest event/operation
        self._listings = []     # seqs of listings in progress

    # -- change detection ----------------------------------------------------

    def actual_state(self, name):
        info = self.domains.get(name)
        return info.get("state") if info else None

    def told_state(self, name):
        vm = self.vms.get(name)
        if vm is not None:
            return vm.record.get("state")
        return self.unadopted.get(name, _NEVER_TOLD)

    def reconcile(self, name, previous=None):
        """Queue, replace or drop the change for ``name`` by comparing what the
        host shows with what the controller was told. ``previous`` is the
        domain info of a VM that just vanished."""
        vm = self.vms.get(name)
        if vm is not None and vm.busy:
            return
        info = self.domains.get(name)
        actual = info.get("state") if info else None
        told = self.told_state(name)
        if (told in TRANSITIONAL or actual == told
                or (actual is None and (told is _NEVER_TOLD or told in ABSENT))):
            self._queue.pending.pop(name, None)
            return
        source = info or previous or self._queue.pending.get(name) or (vm.record if vm else {})
        change = report_entry(name, actual, source)
        if self._queue.pending.get(name) != change:
            self.log.info("LNM {lnm}: {vm} is {actual} (controller has {told})",
                          lnm=self.name, vm=name, actual=actual,
                          told=None if told is _NEVER_TOLD else told)
        self._queue.pending[name] = change
        self._queue.flush_soon()

    def touch(self, name):
        self._seq += 1
        self._touched[name] = self._seq

    def begin_listing(self):
        self._listings.append(self._seq)
        return self._seq

    def end_listing(self, seq):
        self._listings.remove(seq)
        floor = min(self._listings) if self._listings else self._seq
        self._touched = {n: s for n, s in self._touched.items() if s > floor}

    def is_stale(self, name, seq):
        """Has an event or operation told us about ``name`` since ``seq``?"""
        if self._touched.get(name, 0) > seq:
            return True
        vm = self.vms.get(name)
        return vm is not None and vm.busy

    def apply_listing(self, domains, seq, *, baseline=False):
        seen = {}
        for info in domains:
            if check_domain(info):
                seen[info["name"]] = dict(info)
        for name, info in seen.items():
            if self.is_stale(name, seq):
                continue
            old = self.domains.get(name)
            self.domains[name] = info
            if not baseline and (old is None or old.get("state") != info.get("state")):
                self.reconcile(name)
        for name in [n for n in self.domains if n not in seen]:
            if self.is_stale(name, seq):
                continue
            previous = self.domains.pop(name)
            if not baseline:
                self.reconcile(name, previous)
        return seen

    # -- the cache -----------------------------------------------------------

    def cache(self, record):
        name = record["name"]
        vm = self.vms.get(name)
        if vm is not None and not vm.busy and self._placed_elsewhere(vm.record, record):
            # E.g. the record a migration target was sent, once the migration
            # failed: the VM stays where it was, and is not ours to report.
            del self.vms[name]
            self._queue.pending.pop(name, None)
            self.unadopted.pop(name, None)
            return
        if vm is None:
            self.vms[name] = CachedVM(self, self._vmm, record)
        else:
            vm.record = record
            vm.session = self.session
        self.unadopted.pop(name, None)

    def _placed_elsewhere(self, old, new):
        """Does ``new`` move a VM this LNM was told it holds to another LNM,
        while the VM is not on this host? (Compared with the LNM the old
        record named, the controller's name for this one.)"""
        old_lnm, new_lnm = old.get("lnm"), new.get("lnm")
        return (old_lnm is not None and new_lnm is not None and old_lnm != new_lnm
                and new["name"] not in self.domains)

    def cached(self, name):
        vm = self.vms.get(name)
        if vm is None:
            raise NoSuchVM(f"{name} is not cached on LNM {self.name}: the controller "
                           "must send its record (receive) first")
        return vm

    # -- the controller's answers and commands' results ----------------------

    def acknowledge(self, batch, acks):
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
            vm = self.vms.get(name)
            if vm is not None:
                if change["state"] is None and not vm.busy:
                    # Gone from here and no longer the controller's to manage.
                    del self.vms[name]
                else:
                    vm.record["state"] = change["state"]
            elif change["state"] is None:
                self.unadopted.pop(name, None)
            else:
                self.unadopted[name] = change["state"]
        for name, record in acked.items():
            self.cache(record)
        self.log.debug("LNM {lnm}: {count} changes acknowledged", lnm=self.name,
                       count=len(batch))
        for name, change in batch.items():
            if self.actual_state(name) == change["state"]:
                # Delivered and still true. If the controller's record says
                # otherwise, that is its answer: reporting again would loop.
                self._queue.pending.pop(name, None)
            else:
                self.reconcile(name)
        for name in acked.keys() - batch.keys():
            self.reconcile(name)

    def report_if_awaited(self, name, session, record):
        """A command of an earlier session ended on a VM the current
        controller saw listed busy: tell it how the VM is now, even if that
        is what it was told (it waits for this to decide about the VM)."""
        if session == self.session or name not in self.listed_busy:
            return
        self.listed_busy.discard(name)
        self._queue.pending[name] = report_entry(name, self.actual_state(name),
                                                 self.domains.get(name) or record)
        self._queue.flush_soon()

    def settle(self, vm, info, session=None):
        name = vm.name
        self.touch(name)
        if session is not None and session != self.session:
            # Asked on a connection that is gone: no controller will see this
            # result, so it is an observation like any other.
            self.log.info("LNM {lnm}: {vm} is {state} after a command from an earlier "
                          "controller connection; reporting it", lnm=self.name, vm=name,
                          state=info.get("state") if info else None)
            if info is None:
                self.reconcile(name, self.domains.pop(name, None))
            else:
                self.domains[name] = dict(info)
                self.reconcile(name)
            return
        if info is None:
            self.domains.pop(name, None)
            self._queue.pending.pop(name, None)
            self.unadopted.pop(name, None)
            if self.vms.get(name) is vm:
                del self.vms[name]
            return
        info = dict(info)
        self.domains[name] = info
        # The controller learns the new state from the operation's result.
        vm.record["state"] = info.get("state")
        self.reconcile(name)
