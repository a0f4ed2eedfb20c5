"""The controller's logic: requests, the global state and the LNMs.

Plain Python with async methods; no Perspective Broker here. LNMs are
reached through *handles* (``usher.controller.lnm_link.RemoteLNM`` over PB,
or an in-process handle in tests) with these coroutine methods::

    get_node_info() get_node_status() list_vms() get_details(name)
    get_status(name) receive(records) start(name) op_on(operation, name)
    migrate(name, target) export_image(name) import_image(name, payload)
    release_export(name) restore_export(name) ping() disconnect() [abort()]

Failures (paper, "Failures"; README "Failures and recovery"): an LNM that
goes away leaves its VMs ``lost``; a command whose answer never came leaves
its VM ``lost`` too (its outcome is unknown) and the LNM's next inventory
settles it; a start never sent is undone; a migration whose outcome is
unknown keeps the source's export until the VM is found (``_retained``), so
no VM ever runs twice or vanishes. LNM watchers (``watch_lnms``) hear of
every attach and detach: the liveness monitor and the recovery tracker.
"""

import collections
import heapq
import uuid
from collections.abc import Mapping

from twisted.internet import defer
from twisted.logger import Logger

from usher import states
from usher.controller.events import Event, EventChains, Request
from usher.controller.lnm_input import LNMLimits
from usher.controller.monitoring import Monitoring, NoInstruments
from usher.controller.plugin_api import PluginAPI
from usher.controller.state import GlobalState, VMMInfo
from usher.controller.subscriptions import SubscriptionHub
from usher.errors import (InvalidRequest, LinkFailure, NoSuchLNM, NoSuchVM,
                          OperationFailed, PermissionDenied, Unavailable,
                          UsherError)
from usher.naming import check_label, qualify, split
from usher.vmset import (MAX_NAMES, MAX_PATTERNS, Budget, Limits, Selection, expand_ranges,
                         match_names)

log = Logger()

# VMs per start_many sent to one LNM.
START_BATCH = 32

# What an ordinary user's queries show (user_visibility): "own", their own
# VMs only; "all", every VM, other users' without their args, and the hosts'
# unmanaged domains. Administrators see everything.
VISIBILITY = ("own", "all")

# What an LNM is sent of a VM record (receive, acknowledgments): what it needs
# to run the VM, nothing else.
LNM_FIELDS = ("name", "owner", "cluster", "state", "vmm", "memory_mib", "vcpus", "uuid",
              "version", "args", "plugin_args")


def lnm_view(record):
    """The copy of a record an LNM is sent."""
    return {key: record[key] for key in LNM_FIELDS if key in record}

# Keys a request's extra arguments may not shadow.
RESERVED_ARGS = {"memory_mib", "vcpus", "cluster", "count"}
# A request's extra arguments are copied into every VM's record, to plugins,
# LNMs and clients: at most MAX_ARGS of them, each value at most MAX_ARG_LEN
# characters, names and values together at most MAX_ARGS_BYTES (UTF-8).
MAX_ARG_LEN = 4096
MAX_ARGS = 32
MAX_ARGS_BYTES = 16384


def _check_args(args):
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise InvalidRequest("request arguments must be a dict")
    if len(args) > MAX_ARGS:
        raise InvalidRequest(f"at most {MAX_ARGS} request arguments (got {len(args)})")
    clean = {}
    size = 0
    for key, value in args.items():
        if not isinstance(key, str) or not key.isidentifier() or len(key) > 64:
            raise InvalidRequest(f"invalid argument name {key[:64]!r}"
                                 if isinstance(key, str) else "invalid argument name")
        if isinstance(value, bool) or value is None:
            clean[key] = value
        elif isinstance(value, (int, float)):
            clean[key] = value
        elif isinstance(value, str) and len(value) <= MAX_ARG_LEN:
            clean[key] = value
            size += len(value.encode("utf-8", "surrogatepass"))
        else:
            raise InvalidRequest(f"argument {key!r} must be a short string or a number")
        size += len(key)
        if size > MAX_ARGS_BYTES:
            raise InvalidRequest(f"request arguments are larger than {MAX_ARGS_BYTES} "
                                 "bytes in all")
    for key in ("memory_mib", "vcpus", "count"):
        if key in clean and (not isinstance(clean[key], int) or isinstance(clean[key], bool)
                             or clean[key] < 1):
            raise InvalidRequest(f"argument {key!r} must be a positive integer")
    if "cluster" in clean:
        if not isinstance(clean["cluster"], str):
            raise InvalidRequest("cluster must be a string")
        check_label(clean["cluster"], "cluster name")
    return clean


def plugin_set_args(user_args, args, vm_args):
    """The names of a new VM's ``args`` that plugins set rather than the
    user's request (its record's ``plugin_args``, which the LNM's
    ``plugin_args`` option applies to instead of ``request_args``): those of
    ``vm_args`` (``Request.set_vm_arg``) and those whose value is not the one
    the user sent. A value the user sent and no plugin changed stays the
    user's, whatever plugins saw it."""
    return sorted(key for key, value in args.items()
                  if key in vm_args or key not in user_args
                  or not (user_args[key] is value or user_args[key] == value))


class Controller:
    def __init__(self, *, domain, clock, admins=(), default_memory=256, default_vcpus=1,
                 call_timeout=30.0, start_timeout=120.0, max_request_vms=1000,
                 known_lnms=None, lnm_concurrency=64, status_history=60,
                 vm_status_history=15, status_history_interval=60.0,
                 user_visibility="own", max_selection_names=MAX_NAMES,
                 max_selection_patterns=MAX_PATTERNS, lnm_limits=None):
        self.domain = domain
        self.clock = clock
        self.admins = set(admins)
        self.default_memory = default_memory
        self.default_vcpus = default_vcpus
        self.call_timeout = call_timeout
        self.start_timeout = start_timeout
        self.max_request_vms = max_request_vms
        if user_visibility not in VISIBILITY:
            raise ValueError(f"user_visibility must be one of {', '.join(VISIBILITY)}")
        self.user_visibility = user_visibility
        # Every selection of one request together (usher.vmset.Budget).
        self.selection_limits = Limits(max_selection_names, max_selection_patterns)
        self.known_lnms = known_lnms
        self.lnm_concurrency = lnm_concurrency
        self.lnm_limits = lnm_limits or LNMLimits()
        self.state = GlobalState(domain)
        self.chains = EventChains(clock)
        self.api = PluginAPI(self)
        self.plugins = None          # a PluginRegistry, set by the service
        self.hub = SubscriptionHub(self.state, clock)
        self.monitoring = Monitoring(self.state, clock, lnm_history=status_history,
                                     vm_history=vm_status_history,
                                     history_interval=status_history_interval)
        # Logged-in client sessions (the PB boundary counts them).
        self.client_sessions = 0
        # Request and plugin-chain timings (usher.controller.metrics).
        self.instruments = NoInstruments()
        self._busy = {}              # VM name -> what is in flight
        self._starting = set()       # names reserved by start requests in flight
        self._semaphores = {}
        # Failures (see the module docstring).
        self.recovery = None         # a usher.controller.recovery.Recovery, if recovering
        self._lnm_watchers = []
        self._unconfirmed = {}       # VM name -> LNM: start sent, answer never came
        self._retained = {}          # VM name -> {"source", "target"}: kept exports
        self._in_flux = {}           # VM name -> LNM: listed busy, its end not heard yet
        self._resolving = set()
        self._resolve_scheduled = None
        # A compromised LNM must not reach other hosts' VMs or other users'
        # namespaces (README "Security"): a VM changes host only by a
        # migration the controller drove (a migration whose outcome is
        # unknown may still land on its target), and a managed name nobody
        # started there is quarantined, except in the first inventory an LNM
        # known before a restart hands over (``_trusted``, recovery).
        self._unsettled_moves = {}   # VM name -> target LNM: migration outcome unknown
        self._first_attached = set() # LNMs whose first inventory has been taken
        self._trusted = {}           # LNM -> managed names its recovery inventory vouches for
        self.state.listen(self._state_changed)

    # -- users ---------------------------------------------------------------

    def is_admin(self, user, role=None):
        return role == "admin" or user in self.admins

    def _qualifier(self, user, admin):
        def qualify_name(name):
            if admin and isinstance(name, str) and split(name.strip().lower(), self.domain):
                return name.strip().lower()
            return qualify(name, user, self.domain)
        return qualify_name

    def budget(self):
        """A fresh count of what one request may name (``selection_limits``)."""
        return Budget(self.selection_limits)

    def selection(self, selection, budget=None):
        """A selection from the wire (or a Selection already made, checked
        against this controller's limits) -> Selection."""
        budget = self.budget() if budget is None else budget
        if isinstance(selection, Selection):
            budget.take_names(len(selection.names) + len(selection.clusters))
            if selection.regex is not None:
                budget.take_pattern()
            return selection
        return Selection.from_wire(selection, budget=budget)

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

    async def _pick(self, selection, pool, qualify):
        """``selection.pick`` over ``pool``; a regex scan lets the reactor run
        between slices (usher.vmset.SCAN_SLICE), and what was removed
        meanwhile is left out."""
        steps = selection.picking(pool, qualify)
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

    async def _select(self, user, admin, selection, *, own=True, budget=None):
        """Resolve a selection to records; unknown or foreign names are errors."""
        return await self._resolve(user, admin, self.selection(selection, budget), own)

    async def _resolve(self, user, admin, selection, own):
        owner = None if (admin or not own) else user
        if admin and selection.everything:
            owner = user
        # Views, not copies: a request naming one VM among 10,000 costs the
        # lookup of one VM.
        pool = self.state.vms if owner is None else self.state.owned_view(owner)
        if selection.clusters and not (selection.regex is not None or selection.everything):
            pool = _ScanOnly(pool, self.state.cluster_members(selection.clusters, owner))
        # Who may see others' VMs may name them in full.
        chosen, unknown = await self._pick(selection, pool,
                                           self._qualifier(user, admin or not own))
        if unknown:
            foreign = [n for n in unknown if n in self.state.vms]
            if foreign:
                raise PermissionDenied(f"not your VM: {', '.join(foreign[:5])}")
            raise NoSuchVM(f"no such VM: {', '.join(unknown[:5])}"
                           + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""))
        return chosen

    # -- Table 4: list, list_lnm -----------------------------------------------

    async def list(self, user, admin, selection, status=False):
        """The VMs of ``selection`` that ``user`` may see: an ordinary user
        sees only their own unless user_visibility is "all" (then other
        users' without args, and unmanaged VMs); list_request plugins may
        hide more."""
        selection = self.selection(selection)       # (None: everything)
        # Right after a restart the state is still being rebuilt from the LNMs.
        await self.settled()
        everyone = self.sees_all(admin)
        if selection.names or not everyone:
            records = await self._resolve(user, admin, selection, own=not everyone)
        else:
            if selection.clusters and not (selection.regex is not None or selection.everything):
                wanted = set(selection.clusters)
                members = self.state.cluster_members(wanted)
                members.update(name for name, rec in self.state.unmanaged.items()
                               if rec.get("cluster") in wanted)
                pool = _ScanOnly(collections.ChainMap(self.state.vms, self.state.unmanaged),
                                 members)
            else:
                pool = dict(self.state.vms)
                pool.update(self.state.unmanaged)
            records, _ = await self._pick(selection, pool, self._qualifier(user, admin))
        return await self._visible(user, admin, records, status)

    async def _visible(self, user, admin, records, status, count=None):
        """``records`` through the list_request chain -> the copies that may
        leave the controller (at most ``count``; with figures if ``status``)."""
        request = Request("list", user, admin=admin, vms=[r["name"] for r in records],
                          records={r["name"]: r for r in records})
        await self.chains.fire_request(Event("list_request", self.api, request=request))
        visible = set(request.vms)
        result = []
        for rec in records:
            if rec["name"] in visible and rec.get("state") is not None and (
                    count is None or len(result) < count):
                rec = self.shown(rec, user, admin)
                if status:
                    rec["status"] = self.monitoring.vm_status(rec["name"])
                result.append(rec)
        return result

    def list_lnm(self, user, admin, patterns=(), status=False, budget=None):
        names = sorted(self.state.vmms)
        if patterns:
            names = match_names(names, patterns, self.budget() if budget is None else budget)
        lnms = []
        for name in names:
            data = self.state.vmms[name].to_wire()
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
        if self.sees_all(admin):
            busiest = self.monitoring.busiest_vms(names, wanted)
        else:
            on = set(names)
            figures = ((name, self.monitoring.vm_figure(name, "cpu", 1))
                       for name, rec in self.state.owned_view(user).items()
                       if rec["vmm"] in on)
            busiest = heapq.nlargest(wanted, ((n, v) for n, v in figures if v is not None),
                                     key=lambda item: item[1])
        records = [self.state.vms.get(n) or self.state.unmanaged.get(n) for n, _ in busiest]
        records = [r for r in records if r is not None]
        return {"lnms": lnms, "vms": await self._visible(user, admin, records, True, count)}

    # -- Table 4: start ----------------------------------------------------------

    def _new_names(self, user, admin, vms, args, budget=None):
        qualify_name = self._qualifier(user, admin)
        if not isinstance(vms, (list, tuple)):
            raise InvalidRequest("vms must be a list of names")
        budget = self.budget() if budget is None else budget
        names = []
        for pattern in vms:
            if not isinstance(pattern, str):
                raise InvalidRequest("VM names must be strings")
            names.extend(qualify_name(n) for n in expand_ranges(pattern, budget))
        count = args.pop("count", None)
        if count is not None:
            cluster = args.get("cluster")
            if not cluster:
                raise InvalidRequest("a count needs a cluster name (-n CLUSTER)")
            if count > self.max_request_vms:
                raise InvalidRequest(f"at most {self.max_request_vms} VMs per request")
            taken = {split(n, self.domain)[0] for n in self.state.owned_view(user)}
            taken.update(split(n, self.domain)[0] for n in self._starting
                         if split(n, self.domain)[1] == user)
            taken.update(split(n, self.domain)[0] for n in names)
            index = 0
            while count:
                index += 1
                short = f"{index}.{cluster}"
                if short not in taken:
                    names.append(qualify(short, user, self.domain))
                    count -= 1
        if not names:
            raise InvalidRequest("nothing to start: give VM names or -n CLUSTER -c COUNT")
        if len(names) > self.max_request_vms:
            raise InvalidRequest(f"at most {self.max_request_vms} VMs per request")
        if len(set(names)) != len(names):
            raise InvalidRequest("the same VM name appears twice in the request")
        return names

    async def start(self, user, admin, vms, lnms=(), args=None):
        started_at = self.clock.seconds()
        self._refuse_while_recovering()
        args = _check_args(args)
        budget = self.budget()
        lnms = self._check_lnm_list(lnms, budget)
        names = self._new_names(user, admin, vms, args, budget)
        clash = [n for n in names if n in self._starting]
        if clash:
            raise InvalidRequest(f"{clash[0]} is already being started")
        # Reserved until their records are in the state: two concurrent
        # requests (plugins may take their time) never pick the same names.
        self._starting.update(names)
        try:
            return await self._start(user, admin, names, lnms, args, started_at)
        finally:
            self._starting.difference_update(names)

    async def _start(self, user, admin, names, lnms, args, started_at):
        restart = [n for n in names if n in self.state.vms]
        for name in restart:
            rec = self.state.vms[name]
            if rec["state"] != states.SHUTOFF:
                raise InvalidRequest(f"{name} already exists ({rec['state']})")
        new = [n for n in names if n not in self.state.vms]
        memory = args.pop("memory_mib", self.default_memory)
        vcpus = args.pop("vcpus", self.default_vcpus)
        cluster = args.pop("cluster", None)
        # VMs started again go through the chain too (limits count them), with
        # their records; they start on the host that holds them.
        records = {n: {"memory_mib": memory, "vcpus": vcpus} for n in new}
        records.update((n, dict(self.state.vms[n])) for n in restart)
        request = Request("start", user, admin=admin, vms=new + restart, lnms=lnms, args=args,
                          records=records)
        request.args.update(memory_mib=memory, vcpus=vcpus)
        if cluster:
            request.args["cluster"] = cluster
        await self.chains.fire_request(Event("start_request", self.api, request=request))
        memory = request.args.pop("memory_mib")
        vcpus = request.args.pop("vcpus")
        cluster = request.args.pop("cluster", cluster)
        failed = [{"name": n, "error": why} for n, why in request.dropped.items()]
        placed = []
        for name in request.vms:
            if name in restart:
                continue
            lnm = request.placement.get(name)
            vmm = self.state.vmms.get(lnm) if lnm else None
            if vmm is None or not vmm.connected:
                failed.append({"name": name, "error": "no placement: no plugin placed it"
                               if lnm is None else f"LNM {lnm} is not connected"})
                continue
            vm_args = request.vm_args.get(name, {})
            record = self.state.new_record(
                name, state=states.STARTING, vmm=lnm, cluster=cluster,
                memory_mib=memory, vcpus=vcpus, uuid=str(uuid.uuid4()),
                args=dict(request.args, **vm_args))
            record["plugin_args"] = plugin_set_args(args, record["args"], vm_args)
            self.state.add(record)
            placed.append(record)
        for name in restart:
            if name not in request.vms:
                continue     # dropped by a plugin: already in failed
            rec = self.state.vms[name]
            vmm = self.state.vmms.get(rec["vmm"])
            if vmm is None or not vmm.connected:
                failed.append({"name": name, "error": f"LNM {rec['vmm']} is not connected"})
            else:
                self.state.update(name, state=states.STARTING)
                placed.append(rec)
        if self.chains.has("register_vm"):
            # Plugins (DNS, filesystems …) prepare each VM before it starts.
            await defer.DeferredList([
                defer.Deferred.fromCoroutine(self.chains.fire_notification(
                    Event("register_vm", self.api, vm=dict(rec), request=request)))
                for rec in placed if rec["name"] not in restart], consumeErrors=True)

        by_lnm = {}
        for rec in placed:
            by_lnm.setdefault(rec["vmm"], []).append(rec)
        started = []
        await defer.DeferredList([
            defer.Deferred.fromCoroutine(self._start_on(lnm, recs, started, failed,
                                                        set(restart)))
            for lnm, recs in by_lnm.items()], consumeErrors=True)
        elapsed = self.clock.seconds() - started_at
        started.sort(key=lambda s: s["name"])
        return {"started": started, "failed": failed, "notes": request.notes,
                "elapsed": elapsed}

    async def _start_on(self, lnm, records, started, failed, restart):
        handle = self.state.vmms[lnm].handle
        try:
            if handle is None:
                raise LinkFailure(f"LNM {lnm} disconnected", sent=False)
            await handle.receive([lnm_view(r) for r in records])
        except UsherError as e:
            for rec in records:
                # No start was sent: whatever happened to the records, no VM.
                self._start_failed(rec, failed,
                                   OperationFailed(f"LNM {lnm} did not take the VM: {e}"),
                                   restart)
            return

        def succeeded(rec, info):
            self.state.update(rec["name"], state=info.get("state") or states.RUN,
                              uuid=info.get("uuid"))
            started.append({"name": rec["name"], "vmm": lnm})
            self.chains.notify(Event("start_complete", self.api, vm=dict(rec), ok=True,
                                     error=None))

        async def one(rec):
            name = rec["name"]
            self._busy[name] = "start"
            try:
                async with self._slot(lnm):
                    if self.state.vmms[lnm].handle is not handle:
                        raise LinkFailure(f"LNM {lnm} disconnected before {name} was "
                                          "started", sent=False)
                    info = await handle.start(name)
            except UsherError as e:
                self._start_failed(rec, failed, e, restart, lnm, handle)
                return
            finally:
                self._busy.pop(name, None)
            succeeded(rec, info or {})

        async def batch(recs):
            # One start_many per batch: one round trip for many VMs, and the
            # LNM creates them together (the per-VM start is Table 2's).
            names = [rec["name"] for rec in recs]
            for name in names:
                self._busy[name] = "start"
            try:
                async with self._batch_slot(lnm):
                    if self.state.vmms[lnm].handle is not handle:
                        raise LinkFailure(f"LNM {lnm} disconnected before the start of "
                                          f"{len(names)} VMs was sent", sent=False)
                    outcomes = dict(await handle.start_many(names))
            except UsherError as e:
                outcomes = dict.fromkeys(names, e)
            finally:
                for name in names:
                    self._busy.pop(name, None)
            for rec in recs:
                outcome = outcomes[rec["name"]]
                if isinstance(outcome, UsherError):
                    self._start_failed(rec, failed, outcome, restart, lnm, handle)
                else:
                    succeeded(rec, outcome)

        if getattr(handle, "start_many", None) is None:
            work = [defer.Deferred.fromCoroutine(one(r)) for r in records]
        else:
            work = [defer.Deferred.fromCoroutine(batch(records[i:i + START_BATCH]))
                    for i in range(0, len(records), START_BATCH)]
        await defer.DeferredList(work, consumeErrors=True)

    def _start_failed(self, rec, failed, error, restart, lnm=None, handle=None):
        name = rec["name"]
        if isinstance(error, LinkFailure) and error.sent:
            # Sent, but the answer never came: the VM may be running. Keep its
            # name (lost) so that nothing starts it a second time; the LNM's
            # next inventory gives it its real state, or shows it never was.
            text = (f"{error}: the outcome is unknown; {name} is lost until LNM {lnm} "
                    "reports back, then takes its real state"
                    + ("" if name in restart else " (or is removed if it never started)"))
            if name not in restart:
                self._unconfirmed[name] = lnm
            if rec["state"] == states.STARTING:
                self.state.update(name, state=states.LOST)
                self.chains.notify(Event("vm_lost", self.api, vm=dict(rec)))
            self._resynchronize(lnm, handle, f"no answer to the start of {name}")
        else:
            text = str(error)
            if isinstance(error, LinkFailure):
                text = (f"LNM {lnm} disconnected before {name} could be started; nothing "
                        "was done")
            if rec["state"] in (states.STARTING, states.LOST):
                if name in restart:
                    self.state.update(name, state=states.SHUTOFF)
                else:
                    self.state.remove(name)
        failed.append({"name": name, "error": text})
        self.chains.notify(Event("start_complete", self.api, vm=dict(rec), ok=False,
                                 error=text))

    def _slot(self, lnm):
        sem = self._semaphores.get(lnm)
        if sem is None:
            sem = self._semaphores[lnm] = defer.DeferredSemaphore(self.lnm_concurrency)
        return _SemaphoreSlot(sem)

    def _batch_slot(self, lnm):
        """Batches of starts in flight on one LNM: as many VMs at most as
        ``lnm_concurrency`` single commands (each batch's timeout covers only
        the VMs queued on the LNM before it)."""
        key = ("batches", lnm)
        sem = self._semaphores.get(key)
        if sem is None:
            sem = self._semaphores[key] = defer.DeferredSemaphore(
                max(1, self.lnm_concurrency // START_BATCH))
        return _SemaphoreSlot(sem)

    def _check_lnm_list(self, lnms, budget=None):
        if lnms is None:
            return []
        if not isinstance(lnms, (list, tuple)):
            raise InvalidRequest("lnms must be a list")
        if not lnms:
            return []
        return match_names(sorted(self.state.vmms), list(lnms),
                           self.budget() if budget is None else budget)

    # -- Table 4: op_on ------------------------------------------------------------

    async def op_on(self, user, admin, operation, selection, args=None):
        if operation not in states.OPERATIONS:
            raise InvalidRequest(f"unknown operation {operation!r}; valid: "
                                 + ", ".join(states.OPERATIONS))
        args = _check_args(args)
        records = await self._select(user, admin, selection)
        if not records:
            raise NoSuchVM("no VM matches")
        request = Request(operation, user, admin=admin, vms=[r["name"] for r in records],
                          args=args, records={r["name"]: r for r in records})
        await self.chains.fire_request(Event(f"{operation}_request", self.api,
                                             request=request))
        failed = [{"name": n, "error": why} for n, why in request.dropped.items()]
        done = []
        work = []
        for name in request.vms:
            rec = self.state.vms.get(name)
            if rec is None:
                failed.append({"name": name, "error": "no such VM"})
                continue
            allowed = states.OPERATION_PRECONDITIONS[operation]
            vmm = self.state.vmms.get(rec["vmm"])
            if name in self._busy:
                failed.append({"name": name, "error": f"busy ({self._busy[name]} in progress)"})
            elif rec["state"] not in allowed:
                failed.append({"name": name, "error": f"cannot {operation} a VM that is "
                               f"{rec['state']}"})
            elif vmm is None or not vmm.connected:
                if operation == "destroy" and rec["state"] in (states.MISSING,):
                    self.state.remove(name)
                    done.append({"name": name, "state": None})
                else:
                    failed.append({"name": name, "error": f"LNM {rec['vmm']} is not connected"})
            else:
                work.append(rec)

        async def one(rec):
            name, lnm = rec["name"], rec["vmm"]
            self._busy[name] = operation
            handle = None
            try:
                async with self._slot(lnm):
                    handle = self.state.vmms[lnm].handle
                    if handle is None:
                        raise LinkFailure(f"LNM {lnm} disconnected before {operation} was "
                                          "sent", sent=False)
                    info = await handle.op_on(operation, name)
            except UsherError as e:
                error = str(e)
                if isinstance(e, LinkFailure) and not e.sent:
                    error = (f"LNM {lnm} disconnected before {operation} could be sent; "
                             "nothing was done")
                if isinstance(e, LinkFailure) and e.sent:
                    error = (f"{e}: the outcome is unknown; {name} is lost until LNM {lnm} "
                             "reports back")
                    self._resynchronize(lnm, handle, f"no answer to {operation} {name}")
                failed.append({"name": name, "error": error})
                if isinstance(e, NoSuchVM) and operation == "destroy":
                    self.state.remove(name)
                self.chains.notify(Event("op_complete", self.api, operation=operation,
                                         vm=dict(rec), ok=False, error=error))
                return
            finally:
                self._busy.pop(name, None)
            if operation == "destroy" or info is None:
                self.state.remove(name)
                done.append({"name": name, "state": None})
            else:
                new_state = info.get("state") or states.OPERATION_RESULT[operation]
                self.state.update(name, state=new_state)
                done.append({"name": name, "state": new_state})
            self.chains.notify(Event("op_complete", self.api, operation=operation,
                                     vm=dict(rec), ok=True, error=None))

        await defer.DeferredList([defer.Deferred.fromCoroutine(one(r)) for r in work],
                                 consumeErrors=True)
        done.sort(key=lambda d: d["name"])
        return {"operation": operation, "done": done, "failed": failed,
                "notes": request.notes}

    # -- Table 4: migrate ----------------------------------------------------------

    async def migrate(self, user, admin, selection, lnms=(), args=None):
        args = _check_args(args)
        budget = self.budget()
        lnms = self._check_lnm_list(lnms, budget)
        records = await self._select(user, admin, selection, budget=budget)
        if not records:
            raise NoSuchVM("no VM matches")
        request = Request("migrate", user, admin=admin, vms=[r["name"] for r in records],
                          lnms=lnms, args=args, records={r["name"]: r for r in records})
        await self.chains.fire_request(Event("migrate_request", self.api, request=request))
        failed = [{"name": n, "error": why} for n, why in request.dropped.items()]
        migrated = []
        work = []
        for name in request.vms:
            rec = self.state.vms.get(name)
            target = request.placement.get(name)
            if rec is None:
                failed.append({"name": name, "error": "no such VM"})
            elif name in self._busy:
                failed.append({"name": name, "error": f"busy ({self._busy[name]} in progress)"})
            elif rec["state"] not in (states.RUN, states.PAUSED):
                failed.append({"name": name, "error": f"cannot migrate a VM that is "
                               f"{rec['state']}"})
            elif target is None:
                failed.append({"name": name, "error": "no placement plugin chose a target"})
            elif target == rec["vmm"]:
                failed.append({"name": name, "error": f"already on {target}"})
            elif not self._connected(rec["vmm"]) or not self._connected(target):
                failed.append({"name": name, "error": "source or target LNM not connected"})
            else:
                work.append((rec, target))
        await defer.DeferredList([
            defer.Deferred.fromCoroutine(self._migrate_one(rec, target, migrated, failed))
            for rec, target in work], consumeErrors=True)
        migrated.sort(key=lambda m: m["name"])
        return {"migrated": migrated, "failed": failed, "notes": request.notes}

    def _connected(self, lnm):
        vmm = self.state.vmms.get(lnm)
        return vmm is not None and vmm.connected

    async def _migrate_one(self, rec, target, migrated, failed):
        name, source = rec["name"], rec["vmm"]
        before = rec["state"]
        self._busy[name] = "migrate"
        self.state.incoming[name] = target
        self.state.update(name, state=states.MIGRATING)
        try:
            outcome, info, error = await self._move(rec, before, target)
        except Exception as e:
            # Never leave the request silent about a VM it was asked to move.
            log.failure("migration of {vm} to {target} failed", vm=name, target=target)
            outcome, info, error = "unknown", None, UsherError(
                f"internal error: {e.__class__.__name__}")
        finally:
            self._busy.pop(name, None)
            self.state.incoming.pop(name, None)
        if outcome == "unknown":
            # It may yet be found on its target: the one report that may
            # move it there (see _may_move).
            self._unsettled_moves[name] = target
        else:
            self._unsettled_moves.pop(name, None)
        if outcome == "moved":
            self.state.update(name, vmm=target, state=info.get("state") or before)
            await self._send_record(target, name)
            migrated.append({"name": name, "from": source, "to": target})
            self.chains.notify(Event("migrate_complete", self.api, vm=dict(rec), ok=True,
                                     source=source, target=target, error=None))
            return
        text = f"migration to {target} failed: {error}"
        if outcome == "stayed":
            self.state.update(name, state=(info or {}).get("state") or before)
        elif outcome == "missing":
            text += f"; {name} is no longer on {source} either"
            self._mark_missing(rec)
        else:
            text += (f"; the outcome is unknown: {name} is lost until its LNMs report back "
                     "(it is never left running twice, nor nowhere)")
            self.state.update(name, state=states.LOST)
        # The record still names the source: the target drops its copy.
        await self._send_record(target, name)
        failed.append({"name": name, "error": text})
        self.chains.notify(Event("migrate_complete", self.api, vm=dict(rec), ok=False,
                                 source=source, target=target, error=text))
        self.resolve_soon()

    async def _move(self, rec, before, target):
        """Move a VM -> (outcome, info, error): "moved" (``info`` from the
        target), "stayed" (``info`` from the source, or None) or "unknown" (a
        link failed under a command: the LNMs' next inventories settle it)."""
        name, source = rec["name"], rec["vmm"]
        src, dst = self.state.vmms[source], self.state.vmms[target]
        # The connections these commands go to: an LNM that reattaches
        # meanwhile is another connection, which knows nothing of them.
        src_handle, dst_handle = src.handle, dst.handle
        if src_handle is None or dst_handle is None:
            return "stayed", None, LinkFailure("source or target LNM disconnected",
                                               sent=False)
        moved = dict(rec, vmm=target, state=before)
        live = (src.info.get("live_migration") and dst.info.get("live_migration")
                and dst.info.get("migration_uri"))
        if live:
            try:
                # Migrating: the target must not report the VM absent (or its
                # arrival) while libvirt moves it; the final record settles it.
                await dst_handle.receive([lnm_view(dict(moved, state=states.MIGRATING))])
                await src_handle.migrate(name, {"name": target,
                                                "migration_uri": dst.info["migration_uri"]})
            except UsherError as e:
                if isinstance(e, LinkFailure) and e.sent:
                    self._resynchronize(source, src_handle, f"no answer while moving {name}")
                where, info = await self._locate(name, target, dst_handle)
                if where == "there":
                    return "moved", info, None
                return await self._stayed(name, source, src_handle, e)
            where, info = await self._locate(name, target, dst_handle)
            if where == "there":
                return "moved", info, None
            return await self._stayed(name, source, src_handle, LinkFailure(
                f"{name} did not show up on {target} after the migration"))
        try:
            payload = await src_handle.export_image(name)
        except UsherError as e:
            # A lost answer: the source keeps the export (or put the VM back);
            # its inventory, once it reattaches, says which.
            return await self._stayed(name, source, src_handle, e)
        # The source keeps the export until it hears what became of the VM.
        self._retained[name] = {"source": source, "target": target}
        try:
            await dst_handle.receive([lnm_view(moved)])
            info = await dst_handle.import_image(name, payload)
        except UsherError as e:
            if isinstance(e, LinkFailure) and e.sent:
                # The import may still finish there. Dropping the connection
                # makes the target undo an import that ends after it (its
                # answer could reach no one), and its inventory says which.
                self._resynchronize(target, dst_handle, f"no answer to the import of {name}")
                return "unknown", None, e
            where, info = await self._locate(name, target, dst_handle)
            if where == "there":
                await self._release_export(name, source, src_handle)
                return "moved", info, None
            if where == "unknown":
                # It may run there: put back nothing until the target says.
                self._resynchronize(target, dst_handle, f"no answer about {name}")
                return "unknown", None, e
            try:
                info = await src_handle.restore_export(name)
            except UsherError as restore_error:
                self._resynchronize(source, src_handle,
                                    f"putting {name} back failed: {restore_error}")
                return "unknown", None, e
            self._retained.pop(name, None)
            return "stayed", info, e
        await self._release_export(name, source, src_handle)
        return "moved", info, None

    async def _stayed(self, name, source, src_handle, error):
        """The VM did not move: -> ("stayed", source's details, error), or
        ("unknown", None, error) when the source cannot say."""
        if isinstance(error, LinkFailure) and error.sent:
            self._resynchronize(source, src_handle, f"no answer while moving {name}")
        where, info = await self._locate(name, source, src_handle)
        if where == "there":
            return "stayed", info, error
        if where == "absent" and not isinstance(error, LinkFailure):
            return "missing", None, error   # the VMM lost it (paper: "missing")
        return "unknown", None, error

    async def _release_export(self, name, source, src_handle):
        """The VM runs on its target: the source may forget its export. On
        failure it stays in ``_retained`` and is released when the source
        next attaches."""
        try:
            await src_handle.release_export(name)
        except UsherError as e:
            log.warn("LNM {lnm} could not be told to forget the export of {vm}: {error}; "
                     "it will be when it next attaches", lnm=source, vm=name, error=str(e))
            return
        self._retained.pop(name, None)

    async def _send_record(self, lnm, name):
        """Give an LNM the current record of a VM, which replaces (or, when it
        names another LNM and the VM is not there, drops) its cached copy.
        Best effort: a failure is logged, the LNM's next report corrects it."""
        vmm = self.state.vmms.get(lnm)
        rec = self.state.vms.get(name)
        if vmm is None or not vmm.connected or rec is None:
            return
        try:
            await vmm.handle.receive([lnm_view(rec)])
        except UsherError as e:
            log.warn("could not send the record of {vm} to LNM {lnm}: {error}",
                     vm=name, lnm=lnm, error=str(e))

    # -- failures ------------------------------------------------------------------

    def watch_lnms(self, watcher):
        """``watcher.lnm_attached(name, handle)`` once an LNM has attached (its
        inventory taken), ``watcher.lnm_detached(name, handle)`` when it goes."""
        self._lnm_watchers.append(watcher)

    def _tell_watchers(self, what, name, handle):
        for watcher in list(self._lnm_watchers):
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

    def _refuse_while_recovering(self):
        if self.recovering:
            raise Unavailable(f"the controller is recovering: {self.recovery.describe()}; "
                              "a VM started now could duplicate one of theirs, so starts "
                              "wait until they are back: try again shortly")

    def _resynchronize(self, lnm, handle, why):
        """A command on an attached LNM went unanswered: the controller no
        longer knows what that LNM did. Drop the connection, so that the LNM
        reattaches and its inventory settles every VM."""
        vmm = self.state.vmms.get(lnm)
        if handle is None or vmm is None or vmm.handle is not handle:
            return
        log.error("LNM {lnm}: {why}; dropping its connection so that it reattaches and "
                  "reports its VMs afresh", lnm=lnm, why=why)
        self.detach_lnm(lnm, handle)
        (getattr(handle, "abort", None) or handle.disconnect)()

    async def _locate(self, name, lnm, handle):
        """Is ``name`` on LNM ``lnm`` (through ``handle``, the connection a
        command went to)? -> ("there", details), ("absent", None) or
        ("unknown", None)."""
        vmm = self.state.vmms.get(lnm)
        if handle is None or vmm is None or vmm.handle is not handle:
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

    def resolve_soon(self):
        """Settle, on the next reactor turn, the migrations cut short whose
        VMs can now be found (``_resolve_retained``)."""
        if not self._retained or self._resolve_scheduled is not None:
            return

        def run():
            self._resolve_scheduled = None
            defer.Deferred.fromCoroutine(self._resolve_retained())

        self._resolve_scheduled = self.clock.callLater(0, run)

    async def _resolve_retained(self):
        """For each export an LNM keeps (a migration cut short): if the VM
        runs elsewhere, the LNM forgets it; if it is nowhere, and every LNM
        that could hold it has reported, the LNM puts it back. While in
        doubt, wait: never two copies, never none."""
        live = (states.RUN, states.PAUSED, states.SHUTOFF, states.HIBERNATED,
                states.UNKNOWN)
        for name in sorted(self._retained):
            if name in self._resolving or name in self._busy or name in self._in_flux:
                continue
            entry = self._retained[name]
            source, target = entry["source"], entry.get("target")
            vmm = self.state.vmms.get(source)
            handle = vmm.handle if vmm is not None else None
            if handle is None:
                continue
            rec = self.state.vms.get(name)
            other = rec["vmm"] if rec is not None and rec["vmm"] != source else None
            elsewhere = (other is not None and self._connected(other)
                         and rec["state"] in live)
            if not elsewhere:
                if other is not None and not self._connected(other):
                    continue     # where it may run cannot answer yet
                if target not in (None, source) and not self._connected(target):
                    continue
                if self.recovering:
                    continue     # an LNM not back yet may hold it
            self._resolving.add(name)
            try:
                if elsewhere:
                    await handle.release_export(name)
                    log.info("VM {vm} runs on {other}: LNM {lnm} forgets its export",
                             vm=name, other=other, lnm=source)
                else:
                    info = await handle.restore_export(name)
                    log.warn("VM {vm} was found on no LNM after an interrupted migration: "
                             "LNM {lnm} put it back from the export it kept", vm=name,
                             lnm=source)
                    if info:
                        self._observe(source, dict(info, name=name))
                        await self._send_record(source, name)
                self._retained.pop(name, None)
            except NoSuchVM:
                self._retained.pop(name, None)
            except UsherError as e:
                log.warn("could not settle the interrupted migration of {vm} on LNM {lnm}: "
                         "{error}; trying again when an LNM attaches", vm=name, lnm=source,
                         error=str(e))
            finally:
                self._resolving.discard(name)

    # -- LNMs ----------------------------------------------------------------------

    async def attach_lnm(self, name, handle, hello=None):
        hello = hello or {}
        vmm = self.state.vmms.get(name)
        if vmm is not None and vmm.connected and vmm.handle is not handle:
            log.warn("LNM {lnm} connected again; dropping its previous connection", lnm=name)
            old = vmm.handle
            self.detach_lnm(name, old)
            # Abort: the old connection may lead nowhere (a cut link).
            (getattr(old, "abort", None) or old.disconnect)()
        info = await handle.get_node_info()
        vmm = self.state.vmms.setdefault(name, VMMInfo(name))
        vmm.info = info
        vmm.handle = handle
        vmm.connected = True
        if self.known_lnms is not None:
            self.known_lnms.remember(name, hostname=info.get("hostname"),
                                     recovery_host=hello.get("recovery_host"),
                                     recovery_port=hello.get("recovery_port"))
        domains = await handle.list_vms()
        if vmm.handle is not handle:
            return       # replaced while we waited
        self._reconcile(name, domains, trusting=self._trusts_inventory(name))
        self._first_attached.add(name)
        mine = [lnm_view(self.state.vms[n]) for n in sorted(vmm.vms)
                if self.state.vms[n]["state"] not in (states.MISSING,)]
        if mine:
            await handle.receive(mine)
        log.info("LNM {lnm} attached: {vms} VMs, {cpus} CPUs, {memory} MiB",
                 lnm=name, vms=len(domains), cpus=info.get("cpus"),
                 memory=info.get("memory_mib"))
        self.chains.notify(Event("lnm_connected", self.api, lnm=name, info=dict(info)))
        if vmm.handle is handle:
            self._tell_watchers("lnm_attached", name, handle)
            self.resolve_soon()

    def detach_lnm(self, name, handle):
        vmm = self.state.vmms.get(name)
        if vmm is None or vmm.handle is not handle:
            return
        vmm.connected = False
        vmm.handle = None
        self.monitoring.lnm_detached(name)
        self._tell_watchers("lnm_detached", name, handle)
        for vm_name in [n for n, where in self._in_flux.items() if where == name]:
            del self._in_flux[vm_name]
        lost = []
        for vm_name in sorted(vmm.vms):
            rec = self.state.vms[vm_name]
            if rec["state"] not in (states.MISSING, states.LOST):
                self.state.update(vm_name, state=states.LOST)
                lost.append(vm_name)
        self.state.drop_unmanaged_on(name)
        log.error("LNM {lnm} disconnected; {count} VMs are lost", lnm=name, count=len(lost))
        for vm_name in lost:
            self.chains.notify(Event("vm_lost", self.api, vm=dict(self.state.vms[vm_name])))
        self.chains.notify(Event("lnm_disconnected", self.api, lnm=name, lost=lost))

    def forget_lnm(self, name):
        """Retire a disconnected LNM: forget it (also in the persisted list)
        and the VMs Usher last knew on it. -> the names of those VMs."""
        vmm = self.state.vmms.get(name)
        if vmm is None:
            raise NoSuchLNM(f"no LNM {name} is known")
        if vmm.connected:
            raise InvalidRequest(f"LNM {name} is connected; stop it before forgetting it")
        busy = [n for n in vmm.vms if n in self._busy]
        if busy:
            raise InvalidRequest(f"LNM {name} has commands in flight ({busy[0]} …)")
        forgotten = sorted(vmm.vms)
        for vm_name in forgotten:
            self._unconfirmed.pop(vm_name, None)
            self.state.remove(vm_name)
        self.state.drop_unmanaged_on(name)
        del self.state.vmms[name]
        self._trusted.pop(name, None)
        self._first_attached.discard(name)
        if self.known_lnms is not None:
            self.known_lnms.forget(name)
        log.warn("LNM {lnm} forgotten with {count} VMs", lnm=name, count=len(forgotten))
        return forgotten

    def _reconcile(self, lnm, domains, trusting=False):
        """Take an LNM's full inventory as the truth about its host (about
        the VMs the controller has there, and its strangers). ``trusting``:
        the first inventory, after a restart, of an LNM known before it
        (``_trusts_inventory``)."""
        complaints = {}
        if trusting:
            self._trust(lnm, domains)
        seen = set()
        for dom in domains:
            self._observe(lnm, dom, complaints)
            seen.add(dom["name"])
        if trusting:
            # What is still trusted: VMs whose end is still to come (busy,
            # kept exports); the rest is settled (adopted, or not).
            unsettled = {name for name in self._trusted.get(lnm, ())
                         if self._in_flux.get(name) == lnm
                         or self._retained.get(name, {}).get("source") == lnm}
            if unsettled:
                self._trusted[lnm] = unsettled
            else:
                self._trusted.pop(lnm, None)
        self._complained(lnm, complaints)
        for vm_name in sorted(self.state.vmms[lnm].vms - seen):
            rec = self.state.vms[vm_name]
            if vm_name not in self._busy and rec["state"] not in (states.STARTING,
                                                                   states.MIGRATING):
                if self._unconfirmed.get(vm_name) == lnm:
                    self._never_started(vm_name, lnm)
                else:
                    self._mark_missing(rec)

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

    def _trust(self, lnm, domains):
        names = set()
        for dom in domains[:self.lnm_limits.max_vms]:
            parts = split(dom["name"], self.domain)
            meta = dom.get("metadata")
            if parts is not None and isinstance(meta, dict) and meta.get("owner") == parts[1]:
                names.add(dom["name"])
        if names:
            self._trusted[lnm] = names

    def _trusted_name(self, lnm, name):
        return name in self._trusted.get(lnm, ())

    def _untrust(self, lnm, name):
        names = self._trusted.get(lnm)
        if names is not None:
            names.discard(name)
            if not names:
                del self._trusted[lnm]

    def _may_move(self, name, lnm):
        """May a report from ``lnm`` place ``name`` there, though the
        controller has it on another LNM? Only as the target of a migration
        the controller drove, whose outcome it does not know."""
        return (self._unsettled_moves.get(name) == lnm
                or (self._retained.get(name) or {}).get("target") == lnm)

    def _on_lnm(self, lnm, rec):
        """Is ``rec`` a VM the controller has on ``lnm`` (or is moving there)?
        Only those are acknowledged to it."""
        return rec["vmm"] == lnm or self.state.incoming.get(rec["name"]) == lnm

    def _complain(self, complaints, kind, lnm, name, **details):
        """A VM an LNM reported that the controller will not take as it
        says: one "error" event per VM for plugins, one log line per kind
        and report (``_complained``)."""
        if complaints is not None:
            complaints.setdefault(kind, []).append(name)
        self.chains.notify(Event("error", self.api, kind=kind, lnm=lnm, vm_name=name,
                                 **details))

    _COMPLAINTS = {
        "duplicate_vm": "reported VMs the controller has on another LNM (a VM changes "
                        "host only by migration; kept where they are)",
        "vm_quarantined": "reported VMs with managed names that the controller did not "
                          "start there and has no record of (quarantined: listed for "
                          "administrators, not given to their owners)",
        "foreign_export": "listed exports of VMs it does not hold (ignored)",
        "unmanaged_limit": "reported VMs beyond lnm_max_unmanaged (not listed)",
    }

    def _complained(self, lnm, complaints):
        for kind, names in sorted(complaints.items()):
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more"
                                            if len(names) > 3 else "")
            log.error("LNM {lnm}: {count} {what}: {names}", lnm=lnm, count=len(names),
                      what=self._COMPLAINTS.get(kind, kind), names=shown)

    def lnm_refused(self, lnm, what, error):
        """The PB boundary refused what ``lnm`` sent (usher.controller.lnm_input)."""
        log.warn("LNM {lnm}: {what} refused: {error}", lnm=lnm, what=what,
                 error=str(error)[:300])
        self.chains.notify(Event("error", self.api, kind="lnm_input_refused", lnm=lnm,
                                 what=what, error=str(error)[:300]))

    def _never_started(self, name, lnm):
        """A start whose answer never came, and the LNM does not have the VM:
        it never started. Not missing: it never was."""
        del self._unconfirmed[name]
        log.info("VM {vm} never started on LNM {lnm} (its start was interrupted); "
                 "removing it", vm=name, lnm=lnm)
        self.state.remove(name)

    def _mark_missing(self, rec):
        if rec["state"] != states.MISSING:
            self.state.update(rec["name"], state=states.MISSING)
            self.chains.notify(Event("vm_missing", self.api, vm=dict(rec)))

    def _observe(self, lnm, dom, complaints=None):
        """What ``lnm`` reports of one domain (validated: usher.controller.
        lnm_input) -> the record of the VM when it is this LNM's, else None."""
        name = dom["name"]
        rec = self.state.vms.get(name)
        if dom.get("retained"):
            # An export the LNM keeps for us: the VM is in the middle of a
            # migration that was cut short (see _resolve_retained). Only the
            # LNM the controller exported it from, or (recovery) one whose
            # inventory vouches for it, may hold one.
            entry = self._retained.get(name)
            if entry is None and ((rec is not None and rec["vmm"] == lnm)
                                  or self._trusted_name(lnm, name)):
                entry = self._retained[name] = {"source": lnm, "target": None}
            if entry is None or entry["source"] != lnm:
                self._complain(complaints, "foreign_export", lnm, name)
                return None
            return rec if rec is not None and self._on_lnm(lnm, rec) else None
        if (rec is not None and rec["vmm"] != lnm and self.state.incoming.get(name) != lnm
                and not self._may_move(name, lnm)):
            if dom.get("state") is not None or dom.get("busy"):
                self._complain(complaints, "duplicate_vm", lnm, name, other=rec["vmm"],
                               vm=dict(rec))
            return None
        if dom.get("busy"):
            # A command from before this connection is still running on it:
            # its end is reported; nothing about the VM is settled until then.
            self._in_flux[name] = lnm
            return rec
        if self._in_flux.get(name) == lnm:
            del self._in_flux[name]
            self.resolve_soon()
        state = dom.get("state")
        if state is not None and state not in states.ALL_STATES:
            state = states.UNKNOWN
        parts = split(name, self.domain)
        if parts is None:
            self._observe_stranger(lnm, dom, state, complaints)
            return None
        if name in self._busy:
            return rec
        if rec is None:
            if state is not None and self._trusted_name(lnm, name):
                self._untrust(lnm, name)
                return self._adopt(lnm, dom, state)
            if state is None:
                self._untrust(lnm, name)
            self._observe_stranger(lnm, dom, state, complaints, quarantine=(
                "the controller did not start it on this LNM and has no record of it"))
            return None
        if state is None:
            if rec["vmm"] == lnm:
                if self._unconfirmed.get(name) == lnm:
                    self._never_started(name, lnm)
                else:
                    self._mark_missing(rec)
            return rec
        if self._unconfirmed.get(name) == lnm:
            del self._unconfirmed[name]
        if self._unsettled_moves.pop(name, None) is not None and rec["vmm"] != lnm:
            log.info("VM {vm} found on LNM {lnm} after a migration whose outcome was "
                     "unknown", vm=name, lnm=lnm)
        old = rec["state"]
        self.state.update(name, state=state, vmm=lnm, uuid=dom.get("uuid"))
        if old != state:
            self.chains.notify(Event("vm_state_changed", self.api, vm=dict(rec),
                                     old_state=old, new_state=state))
        return rec

    def _adopt(self, lnm, dom, state):
        """Recovery: a managed VM the LNM's trusted inventory vouches for."""
        name = dom["name"]
        meta = dom.get("metadata") or {}
        rec = self.state.new_record(name, state=state, vmm=lnm,
                                    cluster=meta.get("cluster"),
                                    memory_mib=dom.get("memory_mib"),
                                    vcpus=dom.get("vcpus"), uuid=dom.get("uuid"))
        self.state.add(rec)
        # After a restart every VM comes back this way: one line each for
        # thousands of VMs would say nothing the recovery lines do not.
        (log.debug if self.recovering else log.info)(
            "adopted VM {vm} found on {lnm}", vm=name, lnm=lnm)
        self.chains.notify(Event("vm_adopted", self.api, vm=dict(rec), lnm=lnm))
        return rec

    def _observe_stranger(self, lnm, dom, state, complaints, quarantine=None):
        """A VM Usher does not manage, or (``quarantine``: why) one with a
        managed name that is not given to its owner: listed as unmanaged on
        its LNM, at most ``lnm_max_unmanaged`` per LNM, first LNM first."""
        name = dom["name"]
        known = self.state.unmanaged.get(name)
        if known is not None and known["vmm"] != lnm:
            if state is not None:
                self._complain(complaints, "duplicate_vm", lnm, name, other=known["vmm"])
            return
        if state is None:
            if known is not None:
                self.state.set_unmanaged(name, lnm, None)
            return
        if known is None and self.state.unmanaged_on(lnm) >= self.lnm_limits.max_unmanaged:
            if complaints is not None:
                complaints.setdefault("unmanaged_limit", []).append(name)
            return
        record = self.state.set_unmanaged(name, lnm, state, quarantined=quarantine,
                                          memory_mib=dom.get("memory_mib"),
                                          vcpus=dom.get("vcpus"), uuid=dom.get("uuid"))
        if known is None:
            # (Event's own first argument is called name: pass the VM.)
            if quarantine is not None:
                self._complain(complaints, "vm_quarantined", lnm, name, reason=quarantine,
                               vm=dict(record))
            else:
                self.chains.notify(Event("vm_unmanaged", self.api, lnm=lnm,
                                         vm=dict(record)))

    def lnm_report(self, lnm, changes):
        """An LNM's observed changes -> the updated records of its own VMs
        (the paper's ack), as LNMs are sent them (``lnm_view``)."""
        if not self._connected(lnm):
            raise NoSuchLNM(f"LNM {lnm} is not attached")
        if len(changes) > self.lnm_limits.max_report_changes:
            raise InvalidRequest(f"a report may have at most "
                                 f"{self.lnm_limits.max_report_changes} changes")
        complaints = {}
        acks = []
        for change in changes:
            if not isinstance(change, dict) or not isinstance(change.get("name"), str):
                raise InvalidRequest("malformed change report")
            if change.get("busy") or change.get("retained"):
                # Inventory-only flags (list_vms): a report carries neither.
                change = dict(change, busy=False, retained=False)
            rec = self._observe(lnm, change, complaints)
            if rec is not None and rec.get("state") is not None and self._on_lnm(lnm, rec):
                acks.append(lnm_view(rec))
        self._complained(lnm, complaints)
        return acks

    def lnm_status_report(self, lnm, node, vms):
        """An LNM's monitoring figures (usher.protocol, Monitoring)."""
        if not self._connected(lnm):
            raise NoSuchLNM(f"LNM {lnm} is not attached")
        return self.monitoring.report(lnm, node, vms)

    # -- notifications to plugins ------------------------------------------------------

    def _state_changed(self, record, old_state):
        if record["state"] is None and old_state is not None:
            self._unsettled_moves.pop(record["name"], None)
            self.chains.notify(Event("vm_removed", self.api, vm=dict(record)))


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


class _SemaphoreSlot:
    def __init__(self, sem):
        self.sem = sem

    async def __aenter__(self):
        await self.sem.acquire()

    async def __aexit__(self, *exc):
        self.sem.release()
