"""The controller's logic: requests, the global state and the LNMs.

Plain Python with async methods; no Perspective Broker here. LNMs are
reached through *handles* (``usher.controller.lnm_link.RemoteLNM`` over PB,
or an in-process handle in tests) with these coroutine methods::

    get_node_info() get_node_status() list_vms() get_details(name)
    get_status(name) receive(records) start(name) op_on(operation, name)
    migrate(name, target) export_image(name) import_image(name, payload)
    ping() disconnect()
"""

import time
import uuid

from twisted.internet import defer
from twisted.logger import Logger

from usher import states
from usher.controller.events import Event, EventChains, Request
from usher.controller.state import GlobalState, VMMInfo
from usher.controller.subscriptions import SubscriptionHub
from usher.errors import (InvalidRequest, NoSuchLNM, NoSuchVM, OperationFailed,
                          PermissionDenied, Rejected, UsherError)
from usher.naming import check_label, check_short_name, qualify, split
from usher.vmset import Selection, expand_ranges, match_names

log = Logger()

# Keys a request's extra arguments may not shadow.
RESERVED_ARGS = {"memory_mib", "vcpus", "cluster", "count"}
MAX_ARG_LEN = 4096


def _check_args(args):
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise InvalidRequest("request arguments must be a dict")
    clean = {}
    for key, value in args.items():
        if not isinstance(key, str) or not key.isidentifier() or len(key) > 64:
            raise InvalidRequest(f"invalid argument name {key!r}")
        if isinstance(value, bool) or value is None:
            clean[key] = value
        elif isinstance(value, (int, float)):
            clean[key] = value
        elif isinstance(value, str) and len(value) <= MAX_ARG_LEN:
            clean[key] = value
        else:
            raise InvalidRequest(f"argument {key!r} must be a short string or a number")
    for key in ("memory_mib", "vcpus", "count"):
        if key in clean and (not isinstance(clean[key], int) or isinstance(clean[key], bool)
                             or clean[key] < 1):
            raise InvalidRequest(f"argument {key!r} must be a positive integer")
    if "cluster" in clean:
        if not isinstance(clean["cluster"], str):
            raise InvalidRequest("cluster must be a string")
        check_label(clean["cluster"], "cluster name")
    return clean


class PluginAPI:
    """What plugins may use: the state, configuration and a few actions."""

    def __init__(self, controller):
        self._controller = controller

    @property
    def state(self):
        return self._controller.state

    @property
    def clock(self):
        return self._controller.clock

    @property
    def default_memory(self):
        return self._controller.default_memory

    @property
    def default_vcpus(self):
        return self._controller.default_vcpus

    def register_plugin(self, name, event, config_file=None, order=None):
        return self._controller.plugins.register(name, event, config_file, order)

    def unregister_plugin(self, name, event=None):
        return self._controller.plugins.unregister(name, event)

    def migrate(self, vms, lnms=(), args=None):
        """Migrate VMs on the system's behalf (rebalancers); -> Deferred."""
        return defer.Deferred.fromCoroutine(self._controller.migrate(
            "usher", True, Selection(names=list(vms)), list(lnms), args))


class Controller:
    def __init__(self, *, domain, clock, admins=(), default_memory=256, default_vcpus=1,
                 call_timeout=30.0, start_timeout=120.0, max_request_vms=10000,
                 known_lnms=None, lnm_concurrency=64):
        self.domain = domain
        self.clock = clock
        self.admins = set(admins)
        self.default_memory = default_memory
        self.default_vcpus = default_vcpus
        self.call_timeout = call_timeout
        self.start_timeout = start_timeout
        self.max_request_vms = max_request_vms
        self.known_lnms = known_lnms
        self.lnm_concurrency = lnm_concurrency
        self.state = GlobalState(domain)
        self.chains = EventChains(clock)
        self.api = PluginAPI(self)
        self.plugins = None          # a PluginRegistry, set by the service
        self.hub = SubscriptionHub(self.state, clock)
        self._busy = {}              # VM name -> what is in flight
        self._semaphores = {}
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

    def _select(self, user, admin, selection, *, own=True):
        """Resolve a selection to records; unknown or foreign names are errors."""
        if not isinstance(selection, Selection):
            selection = Selection.from_wire(selection)
        pool = self.state.vms if (admin or not own) else self.state.owned_by(user)
        if admin and selection.everything:
            pool = self.state.owned_by(user)
        chosen, unknown = selection.pick(pool, self._qualifier(user, admin))
        if unknown:
            foreign = [n for n in unknown if n in self.state.vms]
            if foreign:
                raise PermissionDenied(f"not your VM: {', '.join(foreign[:5])}")
            raise NoSuchVM(f"no such VM: {', '.join(unknown[:5])}"
                           + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""))
        return chosen

    # -- Table 4: list, list_lnm -----------------------------------------------

    async def list(self, user, admin, selection, status=False):
        if selection is None:
            selection = Selection(everything=True)
        elif not isinstance(selection, Selection):
            selection = Selection.from_wire(selection)
        if selection.names:
            records = self._select(user, admin, selection, own=False)
        else:
            pool = dict(self.state.vms)
            pool.update(self.state.unmanaged)
            records, _ = selection.pick(pool, self._qualifier(user, admin))
        request = Request("list", user, admin=admin, vms=[r["name"] for r in records],
                          records={r["name"]: r for r in records})
        await self.chains.fire_request(Event("list_request", self.api, request=request))
        visible = set(request.vms)
        result = []
        for rec in records:
            if rec["name"] in visible:
                rec = dict(rec)
                if status:
                    vmm = self.state.vmms.get(rec["vmm"])
                    rec["status"] = dict(vmm.status.get("vms", {}).get(rec["name"], {})) \
                        if vmm else {}
                result.append(rec)
        return result

    def list_lnm(self, user, admin, patterns=(), status=False):
        names = sorted(self.state.vmms)
        if patterns:
            names = match_names(names, list(patterns))
        return [self.state.vmms[n].to_wire(status) for n in names]

    # -- Table 4: start ----------------------------------------------------------

    def _new_names(self, user, admin, vms, args):
        qualify_name = self._qualifier(user, admin)
        if not isinstance(vms, (list, tuple)):
            raise InvalidRequest("vms must be a list of names")
        names = []
        for pattern in vms:
            if not isinstance(pattern, str):
                raise InvalidRequest("VM names must be strings")
            names.extend(qualify_name(n) for n in expand_ranges(pattern))
        count = args.pop("count", None)
        if count is not None:
            cluster = args.get("cluster")
            if not cluster:
                raise InvalidRequest("a count needs a cluster name (-n CLUSTER)")
            if count > self.max_request_vms:
                raise InvalidRequest(f"at most {self.max_request_vms} VMs per request")
            taken = {split(n, self.domain)[0] for n in self.state.vms
                     if self.state.vms[n]["owner"] == user}
            taken.update(n.split(".", 1)[0] for n in names)
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
        args = _check_args(args)
        lnms = self._check_lnm_list(lnms)
        names = self._new_names(user, admin, vms, args)
        restart = [n for n in names if n in self.state.vms]
        for name in restart:
            rec = self.state.vms[name]
            if rec["state"] != states.SHUTOFF:
                raise InvalidRequest(f"{name} already exists ({rec['state']})")
        new = [n for n in names if n not in self.state.vms]
        memory = args.pop("memory_mib", self.default_memory)
        vcpus = args.pop("vcpus", self.default_vcpus)
        cluster = args.pop("cluster", None)
        request = Request("start", user, admin=admin, vms=new, lnms=lnms, args=args,
                          records={n: {"memory_mib": memory, "vcpus": vcpus} for n in new})
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
            lnm = request.placement.get(name)
            vmm = self.state.vmms.get(lnm) if lnm else None
            if vmm is None or not vmm.connected:
                failed.append({"name": name, "error": "no placement: no plugin placed it"
                               if lnm is None else f"LNM {lnm} is not connected"})
                continue
            record = self.state.new_record(
                name, state=states.STARTING, vmm=lnm, cluster=cluster,
                memory_mib=memory, vcpus=vcpus, uuid=str(uuid.uuid4()), args=request.args)
            self.state.add(record)
            placed.append(record)
        for name in restart:
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
            await handle.receive([dict(r) for r in records])
        except UsherError as e:
            for rec in records:
                self._start_failed(rec, failed, f"LNM {lnm} refused the VM: {e}", restart)
            return

        async def one(rec):
            name = rec["name"]
            self._busy[name] = "start"
            try:
                async with self._slot(lnm):
                    info = await handle.start(name)
            except UsherError as e:
                self._start_failed(rec, failed, str(e), restart)
                return
            finally:
                self._busy.pop(name, None)
            self.state.update(name, state=info.get("state") or states.RUN,
                              uuid=info.get("uuid"))
            started.append({"name": name, "vmm": lnm})
            self.chains.notify(Event("start_complete", self.api, vm=dict(rec), ok=True,
                                     error=None))

        await defer.DeferredList([defer.Deferred.fromCoroutine(one(r)) for r in records],
                                 consumeErrors=True)

    def _start_failed(self, rec, failed, error, restart):
        failed.append({"name": rec["name"], "error": error})
        if rec["state"] == states.STARTING:
            if rec["name"] in restart:
                self.state.update(rec["name"], state=states.SHUTOFF)
            else:
                self.state.remove(rec["name"])
        self.chains.notify(Event("start_complete", self.api, vm=dict(rec), ok=False,
                                 error=error))

    def _slot(self, lnm):
        sem = self._semaphores.get(lnm)
        if sem is None:
            sem = self._semaphores[lnm] = defer.DeferredSemaphore(self.lnm_concurrency)
        return _SemaphoreSlot(sem)

    def _check_lnm_list(self, lnms):
        if lnms is None:
            return []
        if not isinstance(lnms, (list, tuple)):
            raise InvalidRequest("lnms must be a list")
        if not lnms:
            return []
        return match_names(sorted(self.state.vmms), list(lnms))

    # -- Table 4: op_on ------------------------------------------------------------

    async def op_on(self, user, admin, operation, selection, args=None):
        if operation not in states.OPERATIONS:
            raise InvalidRequest(f"unknown operation {operation!r}; valid: "
                                 + ", ".join(states.OPERATIONS))
        args = _check_args(args)
        records = self._select(user, admin, selection)
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
            try:
                async with self._slot(lnm):
                    info = await self.state.vmms[lnm].handle.op_on(operation, name)
            except UsherError as e:
                failed.append({"name": name, "error": str(e)})
                if isinstance(e, NoSuchVM) and operation == "destroy":
                    self.state.remove(name)
                self.chains.notify(Event("op_complete", self.api, operation=operation,
                                         vm=dict(rec), ok=False, error=str(e)))
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
        lnms = self._check_lnm_list(lnms)
        records = self._select(user, admin, selection)
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
        src = self.state.vmms[source]
        dst = self.state.vmms[target]
        self._busy[name] = "migrate"
        self.state.update(name, state=states.MIGRATING)
        try:
            moved = dict(rec, vmm=target, state=before)
            live = (src.info.get("live_migration") and dst.info.get("live_migration")
                    and dst.info.get("migration_uri"))
            if live:
                await dst.handle.receive([moved])
                await src.handle.migrate(name, {"name": target,
                                                "migration_uri": dst.info["migration_uri"]})
                info = await dst.handle.get_details(name)
            else:
                payload = await src.handle.export_image(name)
                try:
                    await dst.handle.receive([moved])
                    info = await dst.handle.import_image(name, payload)
                except UsherError:
                    # Put the VM back where it was: never zero copies.
                    await src.handle.import_image(name, payload)
                    raise
        except UsherError as e:
            failed.append({"name": name, "error": f"migration to {target} failed: {e}"})
            self._busy.pop(name, None)
            try:
                info = await src.handle.get_details(name)
                self.state.update(name, state=info.get("state") or before)
            except UsherError:
                self.state.update(name, state=states.LOST if not self._connected(source)
                                  else before)
            self.chains.notify(Event("migrate_complete", self.api, vm=dict(rec), ok=False,
                                     source=source, target=target, error=str(e)))
            return
        self._busy.pop(name, None)
        self.state.update(name, vmm=target, state=info.get("state") or before)
        migrated.append({"name": name, "from": source, "to": target})
        self.chains.notify(Event("migrate_complete", self.api, vm=dict(rec), ok=True,
                                 source=source, target=target, error=None))

    # -- LNMs ----------------------------------------------------------------------

    async def attach_lnm(self, name, handle, hello=None):
        hello = hello or {}
        vmm = self.state.vmms.get(name)
        if vmm is not None and vmm.connected and vmm.handle is not handle:
            log.warn("LNM {lnm} connected again; dropping its previous connection", lnm=name)
            old = vmm.handle
            self.detach_lnm(name, old)
            old.disconnect()
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
        self._reconcile(name, domains)
        mine = [dict(self.state.vms[n]) for n in sorted(vmm.vms)
                if self.state.vms[n]["state"] not in (states.MISSING,)]
        if mine:
            await handle.receive(mine)
        log.info("LNM {lnm} attached: {vms} VMs, {cpus} CPUs, {memory} MiB",
                 lnm=name, vms=len(domains), cpus=info.get("cpus"),
                 memory=info.get("memory_mib"))
        self.chains.notify(Event("lnm_connected", self.api, lnm=name, info=dict(info)))

    def detach_lnm(self, name, handle):
        vmm = self.state.vmms.get(name)
        if vmm is None or vmm.handle is not handle:
            return
        vmm.connected = False
        vmm.handle = None
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

    def _reconcile(self, lnm, domains):
        """Take an LNM's full inventory as the truth about its host."""
        seen = set()
        for dom in domains:
            self._observe(lnm, dom)
            seen.add(dom["name"])
        for vm_name in sorted(self.state.vmms[lnm].vms - seen):
            rec = self.state.vms[vm_name]
            if vm_name not in self._busy and rec["state"] not in (states.STARTING,
                                                                   states.MIGRATING):
                self._mark_missing(rec)

    def _mark_missing(self, rec):
        if rec["state"] != states.MISSING:
            self.state.update(rec["name"], state=states.MISSING)
            self.chains.notify(Event("vm_missing", self.api, vm=dict(rec)))

    def _observe(self, lnm, dom):
        name = dom["name"]
        state = dom.get("state")
        if state is not None and state not in states.ALL_STATES:
            state = states.UNKNOWN
        if split(name, self.domain) is None:
            known = name in self.state.unmanaged
            self.state.set_unmanaged(name, lnm, state, memory_mib=dom.get("memory_mib"),
                                     vcpus=dom.get("vcpus"), uuid=dom.get("uuid"))
            if state is not None and not known:
                self.chains.notify(Event("vm_unmanaged", self.api, lnm=lnm, name=name))
            return None
        rec = self.state.vms.get(name)
        if name in self._busy:
            return rec
        if rec is None:
            if state is None:
                return None
            meta = dom.get("metadata") or {}
            rec = self.state.new_record(name, state=state, vmm=lnm,
                                        cluster=meta.get("cluster"),
                                        memory_mib=dom.get("memory_mib"),
                                        vcpus=dom.get("vcpus"), uuid=dom.get("uuid"))
            self.state.add(rec)
            log.info("adopted VM {vm} found on {lnm}", vm=name, lnm=lnm)
            self.chains.notify(Event("vm_adopted", self.api, vm=dict(rec), lnm=lnm))
            return rec
        if state is None:
            if rec["vmm"] == lnm:
                self._mark_missing(rec)
            return rec
        if rec["vmm"] != lnm and self._connected(rec["vmm"]) and rec["state"] in (
                states.RUN, states.PAUSED):
            log.error("VM {vm} reported on {lnm} but runs on {other}; keeping {other}",
                      vm=name, lnm=lnm, other=rec["vmm"])
            self.chains.notify(Event("error", self.api, kind="duplicate_vm", vm=dict(rec),
                                     lnm=lnm))
            return rec
        old = rec["state"]
        self.state.update(name, state=state, vmm=lnm, uuid=dom.get("uuid"))
        if old != state:
            self.chains.notify(Event("vm_state_changed", self.api, vm=dict(rec),
                                     old_state=old, new_state=state))
        return rec

    def lnm_report(self, lnm, changes):
        """An LNM's observed changes -> the updated records (the paper's ack)."""
        if not self._connected(lnm):
            raise NoSuchLNM(f"LNM {lnm} is not attached")
        acks = []
        for change in changes:
            if not isinstance(change, dict) or not isinstance(change.get("name"), str):
                raise InvalidRequest("malformed change report")
            rec = self._observe(lnm, change)
            if rec is not None and rec.get("state") is not None:
                acks.append(dict(rec))
        return acks

    # -- notifications to plugins ------------------------------------------------------

    def _state_changed(self, record, old_state):
        if record["state"] is None and old_state is not None:
            self.chains.notify(Event("vm_removed", self.api, vm=dict(record)))


class _SemaphoreSlot:
    def __init__(self, sem):
        self.sem = sem

    async def __aenter__(self):
        await self.sem.acquire()

    async def __aexit__(self, *exc):
        self.sem.release()
