"""Who sees which VMs: selections resolved to records, and the listings of
Table 4 (``list``, ``list_lnm``, ``top``).

An ordinary user's queries show their own VMs (``user_visibility`` "own"),
or every VM, other users' without their args, and the hosts' unmanaged
domains ("all"); administrators see everything; ``list_request`` plugins
may hide more. A selection naming a VM one may not see is refused. A
selection's ``lnms`` keeps only the VMs on those LNMs (alone: every VM one
may see on them); an LNM named that the controller does not know is refused.
"""

import collections
import heapq
import itertools
from collections.abc import Mapping

from twisted.internet import defer

from usher.controller.capacity import committed
from usher.controller.events import Event, Request
from usher.errors import InvalidRequest, NoSuchVM, PermissionDenied
from usher.naming import qualify, split
from usher.records import encode_chunks
from usher.vmset import Budget, Selection, match_names

# What an ordinary user's queries show (user_visibility): "own", their own
# VMs only; "all", every VM, other users' without their args, and the hosts'
# unmanaged domains. Administrators see everything.
VISIBILITY = ("own", "all")


class Visibility:
    """Selections and listings over the global state."""

    def __init__(self, *, domain, state, chains, api, monitoring, clock, limits,
                 user_visibility, settled):
        if user_visibility not in VISIBILITY:
            raise ValueError(f"user_visibility must be one of {', '.join(VISIBILITY)}")
        self.domain = domain
        self.state = state
        self.chains = chains
        self.api = api
        self.monitoring = monitoring
        self.clock = clock
        self.limits = limits
        self.user_visibility = user_visibility
        self._settled = settled

    def qualifier(self, user, admin):
        def qualify_name(name):
            if admin and isinstance(name, str) and split(name.strip().lower(), self.domain):
                return name.strip().lower()
            return qualify(name, user, self.domain)
        return qualify_name

    def budget(self):
        """A fresh count of what one request may name (``limits``)."""
        return Budget(self.limits)

    def selection(self, selection, budget=None):
        """A selection from the wire (or a Selection already made, checked
        against this controller's limits) -> Selection."""
        budget = self.budget() if budget is None else budget
        if isinstance(selection, Selection):
            budget.take_names(len(selection.names) + len(selection.clusters)
                              + len(selection.lnms))
            if selection.regex is not None:
                budget.take_pattern()
        else:
            selection = Selection.from_wire(selection, budget=budget)
        if selection.lnms:
            # An explicit LNM nobody knows is an error, not an empty answer.
            selection.matching_lnms(sorted(self.state.lnms))
        return selection

    def _on_lnms(self, selection, unmanaged=False):
        """The names of the VMs on the LNMs of ``selection`` (and of the
        hosts' unmanaged domains with ``unmanaged``)."""
        names = set()
        for lnm in selection.matching_lnms(sorted(self.state.lnms)):
            names.update(self.state.lnms[lnm].vms)
            if unmanaged:
                names.update(self.state.lnms[lnm].unmanaged)
        return names

    def check_lnm_list(self, lnms, budget=None):
        """A request's LNM suggestion -> the names of known LNMs it matches."""
        if lnms is None:
            return []
        if not isinstance(lnms, (list, tuple)):
            raise InvalidRequest("lnms must be a list")
        if not lnms:
            return []
        return match_names(sorted(self.state.lnms), list(lnms),
                           self.budget() if budget is None else budget)

    def sees_all(self, admin):
        """Does this user see other users' VMs (user_visibility)?"""
        return admin or self.user_visibility == "all"

    @staticmethod
    def shown(record, user, admin):
        """A copy of ``record`` as it may leave the controller for ``user``:
        other users' args never reach an ordinary user."""
        record = dict(record)
        if not admin and record.get("owner") != user:
            record.pop("args", None)
        return record

    def _next_turn(self):
        d = defer.Deferred()
        self.clock.callLater(0, d.callback, None)
        return d

    async def _pick(self, selection, pool, qualify_name):
        """``selection.pick`` over ``pool``; a regex scan lets the reactor run
        between slices (usher.vmset.SCAN_SLICE), and what was removed
        meanwhile is left out."""
        steps = selection.picking(pool, qualify_name)
        paused = False
        while True:
            try:
                next(steps)
            except StopIteration as done:
                chosen, unknown = done.value
                break
            paused = True
            await self._next_turn()
        if paused:
            chosen = [rec for rec in chosen if rec.get("state") is not None]
        return chosen, unknown

    async def select(self, user, admin, selection, *, own=True, budget=None):
        """Resolve a selection to records; unknown or foreign names are errors."""
        return await self._resolve(user, admin, self.selection(selection, budget), own)

    async def _resolve(self, user, admin, selection, own):
        owner = None if (admin or not own) else user
        if admin and selection.everything and not selection.lnms:
            owner = user
        # Views, not copies: a request naming one VM among 10,000 costs the
        # lookup of one VM.
        pool = self.state.vms if owner is None else self.state.owned_view(owner)
        if selection.clusters and not (selection.regex is not None or selection.everything):
            pool = _ScanOnly(pool, self.state.cluster_members(selection.clusters, owner))
        elif selection.lnms_only:
            pool = _ScanOnly(pool, self._on_lnms(selection))
        # Who may see others' VMs may name them in full.
        chosen, unknown = await self._pick(selection, pool,
                                           self.qualifier(user, admin or not own))
        if unknown:
            foreign = [n for n in unknown if n in self.state.vms]
            if foreign:
                raise PermissionDenied(f"not your VM: {', '.join(foreign[:5])}")
            raise NoSuchVM(f"no such VM: {', '.join(unknown[:5])}"
                           + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""))
        return chosen

    def _everything(self):
        """Every record, managed or not, for lookups (a live view)."""
        return collections.ChainMap(self.state.vms, self.state.unmanaged)

    def _seen(self, user, admin):
        """The records ``user`` may see, for lookups (a live view)."""
        return self._everything() if self.sees_all(admin) else self.state.owned_view(user)

    # -- Table 4: list, list_lnm, top ---------------------------------------------

    async def list(self, user, admin, selection, status=False):
        """The VMs of ``selection`` that ``user`` may see: an ordinary user
        sees only their own unless user_visibility is "all" (then other
        users' without args, and unmanaged VMs); list_request plugins may
        hide more. -> copies of their records (with figures if ``status``)."""
        return await self._visible(user, admin, await self._listed(user, admin, selection),
                                   status)

    async def list_chunks(self, user, admin, selection, status=False):
        """``list`` as it leaves the controller: its records JSON-encoded in
        chunks (usher.records), straight from the state's records (a copy
        only of those that differ from them: another user's, without args;
        with figures)."""
        records = await self._listed(user, admin, selection)
        visible = await self._passed(user, admin, records)
        return encode_chunks(self._leaving(user, admin, records, visible, status, copy=False))

    async def _listed(self, user, admin, selection):
        """The records (the state's own) of ``selection`` that ``user`` may
        see, before the list_request chain."""
        selection = self.selection(selection)       # (None: everything)
        # Right after a restart the state is still being rebuilt from the LNMs.
        await self._settled()
        everyone = self.sees_all(admin)
        if selection.names or not everyone:
            return await self._resolve(user, admin, selection, own=not everyone)
        if selection.clusters and not (selection.regex is not None or selection.everything):
            wanted = set(selection.clusters)
            members = self.state.cluster_members(wanted)
            members.update(name for name, rec in self.state.unmanaged.items()
                           if rec.get("cluster") in wanted)
            pool = _ScanOnly(self._everything(), members)
        elif selection.lnms_only:
            pool = _ScanOnly(self._everything(), self._on_lnms(selection, unmanaged=True))
        else:
            # A copy: a regex scan lets the reactor run meanwhile.
            pool = dict(self.state.vms)
            pool.update(self.state.unmanaged)
        records, _ = await self._pick(selection, pool, self.qualifier(user, admin))
        return records

    async def _passed(self, user, admin, records):
        """``records`` through the list_request chain -> the names it left
        (a set)."""
        names = [r["name"] for r in records]
        request = Request("list", user, admin=admin, vms=names,
                          records=dict(zip(names, records)))
        await self.chains.fire_request(Event("list_request", self.api, request=request))
        return set(request.vms)

    def _leaving(self, user, admin, records, visible, status, count=None, copy=True):
        """The records of ``records`` still ``visible`` and not removed
        meanwhile (at most ``count``) as they may leave the controller for
        ``user`` (``shown``; with figures if ``status``): copies, or with
        ``copy`` False the state's records themselves where they leave
        unchanged (not to be changed by the caller)."""
        kept = (rec for rec in records if rec["name"] in visible and rec.get("state") is not None)
        if count is not None:
            kept = itertools.islice(kept, count)
        if not (copy or status):
            if admin:
                return list(kept)
            return [rec if rec.get("owner") == user else self.shown(rec, user, admin)
                    for rec in kept]
        shown = [self.shown(rec, user, admin) for rec in kept]
        if status:
            for rec in shown:
                rec["status"] = self.monitoring.vm_status(rec["name"])
        return shown

    async def _visible(self, user, admin, records, status, count=None):
        """``records`` through the list_request chain -> the copies that may
        leave the controller (at most ``count``; with figures if ``status``)."""
        visible = await self._passed(user, admin, records)
        return self._leaving(user, admin, records, visible, status, count)

    def list_lnm(self, user, admin, patterns=(), status=False, budget=None):
        names = sorted(self.state.lnms)
        if patterns:
            names = match_names(names, patterns, self.budget() if budget is None else budget)
        lnms = []
        for name in names:
            data = self.state.lnms[name].to_wire()
            # What placement counts (VMs' configured sizes), beside the
            # free memory the host measures (status: free_memory_mib).
            data["committed_memory_mib"], data["committed_vcpus"] = committed(self.state, name)
            if self.state.holds is not None:
                data["holds"] = self.state.holds.to_wire(name)
            if status:
                data["status"] = self.monitoring.lnm_status(name)
            lnms.append(data)
        return lnms

    async def top(self, user, admin, patterns=(), count=10):
        """The LNMs matching ``patterns`` (all if empty) with their figures,
        and the ``count`` busiest VMs on them by 1-minute CPU average, as
        ``list`` would show them (an ordinary user's own, unless
        user_visibility is "all"; list_request plugins filter them)."""
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 1000:
            raise InvalidRequest("count must be a whole number from 0 to 1000")
        lnms = self.list_lnm(user, admin, patterns, status=True)
        names = [lnm["name"] for lnm in lnms]
        # Ask for more than needed: list_request plugins may hide some.
        wanted = count * 2 + 10
        seen = self._seen(user, admin)
        if self.sees_all(admin):
            busiest = self.monitoring.busiest_vms(names, wanted)
        else:
            on = set(names)
            figures = ((name, self.monitoring.vm_figure(name, "cpu", 1))
                       for name, rec in seen.items() if rec["lnm"] in on)
            busiest = heapq.nlargest(wanted, ((n, v) for n, v in figures if v is not None),
                                     key=lambda item: item[1])
        records = [seen[n] for n, _ in busiest if n in seen]
        return {"lnms": lnms, "vms": await self._visible(user, admin, records, True, count)}


class _ScanOnly(Mapping):
    """``pool`` (a mapping name -> record) for lookups, but only ``names`` are
    iterated: what a selection of virtual clusters scans, instead of every
    VM."""

    def __init__(self, pool, names):
        self._pool = pool
        self._names = names

    def __getitem__(self, name):
        return self._pool[name]

    def __iter__(self):
        return (name for name in sorted(self._names) if name in self._pool)

    def __len__(self):
        return sum(1 for name in self._names if name in self._pool)
