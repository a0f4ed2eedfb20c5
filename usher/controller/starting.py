"""Table 4's ``start``: new VM names, the ``start_request`` chain and its
placement, the records, ``register_vm``, and the starts sent to each LNM in
batches (``start_many``).

A start whose answer never came leaves its VM ``lost`` (its outcome is
unknown: nothing may start it a second time) and drops the connection, so
that the LNM's inventory settles it; a start never sent is undone. Every VM
of a request ends in ``started`` or ``failed``: an unexpected error is
logged with its traceback and reported, and no record stays ``starting``.
"""

import uuid

from twisted.internet import defer
from twisted.logger import Logger

from usher import errors, states
from usher.controller.commands import (INTERNAL_ERROR, Room, check_args, dropped_failures,
                                       failed_entry, failure_text, lnm_view, plugin_set_args,
                                       run_each, unaccounted, unanswered, unexpected)
from usher.controller.events import Event, Request
from usher.controller.state import ORIGIN_LNM
from usher.errors import InvalidRequest, LinkFailure, OperationFailed, Unavailable, UsherError
from usher.naming import qualify, split
from usher.vmset import expand_ranges

log = Logger()

# VMs per start_many sent to one LNM.
START_BATCH = 32


class Starts(Room):
    """Starting VMs."""

    def __init__(self, *, domain, clock, slots, max_request_vms, default_memory,
                 default_vcpus, **room):
        super().__init__(**room)
        self.domain = domain
        self.clock = clock
        self.slots = slots
        self.max_request_vms = max_request_vms
        self.default_memory = default_memory
        self.default_vcpus = default_vcpus
        self._relocating = {}        # (issue 15, part B) name -> (LNM it left, undone)

    def _refuse_while_recovering(self):
        recovery = self.inventory.recovery
        if self.inventory.recovering:
            raise Unavailable(f"the controller is recovering: {recovery.describe()}; "
                              "a VM started now could duplicate one of theirs, so starts "
                              "wait until they are back: try again shortly")

    def _new_names(self, user, admin, vms, args, budget=None):
        qualify_name = self.visibility.qualifier(user, admin)
        if not isinstance(vms, (list, tuple)):
            raise InvalidRequest("vms must be a list of names")
        budget = self.visibility.budget() if budget is None else budget
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
            taken.update(split(n, self.domain)[0] for n in self.ledger.reserved_names()
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
        args = check_args(args)
        budget = self.visibility.budget()
        lnms = self.visibility.check_lnm_list(lnms, budget)
        names = self._new_names(user, admin, vms, args, budget)
        # Reserved until their records are in the state: two concurrent
        # requests (plugins may take their time) never pick the same names.
        with self.ledger.reserving(names):
            return await self._start(user, admin, names, lnms, args, started_at)

    async def _start(self, user, admin, names, lnms, args, started_at):
        # A VM named that runs already is started: "already", nothing sent.
        already = [{"name": n, "lnm": self.state.vms[n]["lnm"], "already": True}
                   for n in names if (self.state.vms.get(n) or {}).get("state") == states.RUN]
        if already:
            running = {entry["name"] for entry in already}
            names = [n for n in names if n not in running]
            if not names:
                return {"started": already, "failed": [], "notes": [],
                        "elapsed": self.clock.seconds() - started_at}
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
        # -- affinity (issue 15): the core takes the start's affinity argument
        # and sets the clusters' rule before placement sees the request --
        rules = getattr(self.state, "affinity", None)
        undo_affinity = None
        if rules is not None:
            undo_affinity = await rules.take_start_arg(self.state, self.domain, user,
                                                       new + restart, request.args)
        try:
            await self.chains.fire_request(Event("start_request", self.api, request=request))
        except BaseException:
            if undo_affinity is not None:
                await undo_affinity()
            raise
        memory = request.args.pop("memory_mib")
        vcpus = request.args.pop("vcpus")
        cluster = request.args.pop("cluster", cluster)
        failed = dropped_failures(request)
        placed = []
        # New VMs first, then those started again (dropped ones are in failed).
        order = ([n for n in request.vms if n not in restart]
                 + [n for n in restart if n in request.vms])
        restart = set(restart)
        for name in order:
            try:
                rec = self._place(name, name in restart, request, args, memory, vcpus,
                                  cluster)
            except UsherError as e:
                failed.append(failed_entry(name, e))
                continue
            except Exception:
                log.failure("start of {vm}: its record could not be made", vm=name)
                failed.append(failed_entry(name, INTERNAL_ERROR, errors.INTERNAL))
                continue
            placed.append(rec)
        if self.chains.has("register_vm"):
            # Plugins (DNS, filesystems …) prepare each VM before it starts.
            await run_each([self.chains.fire_notification(
                Event("register_vm", self.api, vm=dict(rec), request=request))
                for rec in placed if rec["name"] not in restart], "register_vm")

        by_lnm = {}
        for rec in placed:
            by_lnm.setdefault(rec["lnm"], []).append(rec)
        started = []
        await run_each([self._start_on(lnm, recs, started, failed, restart)
                        for lnm, recs in by_lnm.items()], "start")
        for name in unaccounted([rec["name"] for rec in placed], started, failed):
            self._settle_unaccounted(self.state.vms.get(name), name, failed, restart)
        elapsed = self.clock.seconds() - started_at
        started.extend(already)
        started.sort(key=lambda s: s["name"])
        return {"started": started, "failed": failed, "notes": request.notes,
                "elapsed": elapsed}

    def _place(self, name, restarting, request, user_args, memory, vcpus, cluster):
        """The record of a VM to start (new, on the LNM placement chose; or
        started again where it is), ``starting`` -> the record."""
        if restarting:
            rec = self.state.vms[name]
            if not self.inventory.connected(rec["lnm"]):
                raise OperationFailed(f"LNM {rec['lnm']} is not connected")
            self.state.update(name, state=states.STARTING)
            return rec
        lnm = request.placement.get(name)
        if lnm is None:
            raise OperationFailed("no placement: no plugin placed it")
        if not self.inventory.connected(lnm):
            raise OperationFailed(f"LNM {lnm} is not connected")
        vm_args = request.vm_args.get(name, {})
        record = self.state.new_record(
            name, state=states.STARTING, lnm=lnm, cluster=cluster,
            memory_mib=memory, vcpus=vcpus, uuid=str(uuid.uuid4()),
            args=dict(request.args, **vm_args))
        record["plugin_args"] = plugin_set_args(user_args, record["args"], vm_args)
        self.state.add(record)
        return record

    async def _start_on(self, lnm, records, started, failed, restart):
        handle = self.inventory.handle_of(lnm)
        try:
            if handle is None:
                raise LinkFailure(f"LNM {lnm} disconnected", sent=False)
            await handle.receive([lnm_view(r) for r in records])
        except Exception as e:
            if not isinstance(e, UsherError):
                log.failure("LNM {lnm}: the records of {count} VMs to start could not be "
                            "sent", lnm=lnm, count=len(records))
            for rec in records:
                # No start was sent: whatever happened to the records, no VM.
                self._start_failed(rec, failed,
                                   OperationFailed(f"LNM {lnm} did not take the VM: {e}"),
                                   restart)
            return
        await run_each([self._start_batch(lnm, handle, records[i:i + START_BATCH], started,
                                          failed, restart)
                        for i in range(0, len(records), START_BATCH)], "start", lnm=lnm)

    async def _start_batch(self, lnm, handle, recs, started, failed, restart):
        # One start_many per batch: one round trip for many VMs, and the LNM
        # creates them together (the per-VM start is Table 2's).
        names = [rec["name"] for rec in recs]
        with self.ledger.commanding(names, "start"):
            try:
                async with self.slots.batch_of_starts(lnm):
                    if not self.inventory.current(lnm, handle):
                        raise LinkFailure(f"LNM {lnm} disconnected before the start of "
                                          f"{len(names)} VMs was sent", sent=False)
                    outcomes = dict(await handle.start_many(names))
            except UsherError as e:
                outcomes = dict.fromkeys(names, e)
            except Exception as e:
                log.failure("LNM {lnm}: the start of {count} VMs failed unexpectedly",
                            lnm=lnm, count=len(names))
                outcomes = dict.fromkeys(names, unexpected(e))
        for rec in recs:
            try:
                outcome = outcomes[rec["name"]]
                if isinstance(outcome, UsherError):
                    self._start_failed(rec, failed, outcome, restart, lnm, handle)
                else:
                    self._started(rec, outcome or {}, lnm, started)
            except Exception:
                log.failure("start of {vm} on LNM {lnm}: its outcome could not be taken",
                            vm=rec["name"], lnm=lnm)
                self._settle_unaccounted(rec, rec["name"], failed, restart)

    def _started(self, rec, info, lnm, started):
        self.state.update(rec["name"], state=info.get("state") or states.RUN,
                          uuid=info.get("uuid"), origin=ORIGIN_LNM)
        started.append({"name": rec["name"], "lnm": lnm})
        self.chains.notify(Event("start_complete", self.api, vm=dict(rec), ok=True,
                                 error=None))

    def _start_failed(self, rec, failed, error, restart, lnm=None, handle=None):
        name = rec["name"]
        if unanswered(error):
            # Sent, but the answer never came: the VM may be running. Keep its
            # name (lost) so that nothing starts it a second time; the LNM's
            # next inventory gives it its real state, or shows it never was.
            text = (failure_text(error, lnm, name, "") + ", then takes its real state"
                    + ("" if name in restart else " (or is removed if it never started)"))
            if name not in restart:
                self.ledger.start_unanswered(name, lnm)
            if rec["state"] == states.STARTING:
                self.state.update(name, state=states.LOST)
                self.chains.notify(Event("vm_lost", self.api, vm=dict(rec)))
            self.inventory.resynchronize(lnm, handle, f"no answer to the start of {name}")
        else:
            text = failure_text(error, lnm, name, f"{name} could be started")
            self._undo(rec, name in restart)
        failed.append(failed_entry(name, text, error.code))
        self.chains.notify(Event("start_complete", self.api, vm=dict(rec), ok=False,
                                 error=text))

    def _undo(self, rec, restarting):
        """A start that did nothing: a VM started again is shut off again,
        a new one was never."""
        if rec["name"] in self._relocating:
            self._relocation_undone(rec)
            return
        if rec["state"] in (states.STARTING, states.LOST):
            if restarting:
                self.state.update(rec["name"], state=states.SHUTOFF)
            else:
                self.state.remove(rec["name"])

    def _settle_unaccounted(self, rec, name, failed, restart):
        """The last guard: a VM whose start ended in an error no one
        expected (logged where it happened) is reported failed, and its
        record does not stay ``starting``."""
        if not any(entry["name"] == name for entry in failed):
            failed.append(failed_entry(name, INTERNAL_ERROR, errors.INTERNAL))
        if rec is not None and name in self._relocating:
            # Its start may have been sent: lost where it went, never undone.
            if rec.get("state") == states.STARTING:
                self.state.update(name, state=states.LOST)
        elif rec is not None and rec.get("state") == states.STARTING:
            self._undo(rec, name in restart)

    # -- HA restart (issue 15, part B: usher.controller.fencing) ---------------------

    async def relocate(self, user, admin, leaving, *, before_send, undone):
        """Start on other hosts lost VMs whose host was fenced: ``leaving``
        is {name: the LNM it leaves}. Their records go down the
        ``start_request`` chain with ``request.relocate`` (placement picks
        another host, as for a migration); ``before_send({name: LNM left})``
        runs before any start is sent (it may raise: nothing is sent); each
        record then names its new host. A start that surely did nothing puts
        the record back where it was, still lost, and calls ``undone(name,
        LNM left)``; one whose answer never came leaves it lost on the new
        host (its inventory settles it). -> like ``start``'s answer."""
        started_at = self.clock.seconds()
        self._refuse_while_recovering()
        names = sorted(leaving)
        request = Request("start", user, admin=admin, vms=names,
                          records={n: dict(self.state.vms[n]) for n in names})
        request.relocate = dict(leaving)
        await self.chains.fire_request(Event("start_request", self.api, request=request))
        failed = dropped_failures(request)
        placed = {}
        for name in request.vms:
            rec, target = self.state.vms.get(name), request.placement.get(name)
            if rec is None or rec["state"] != states.LOST or rec["lnm"] != leaving[name]:
                why = "it changed meanwhile (no longer lost on the LNM it was to leave)"
            elif target is None or target == leaving[name]:
                why = "no placement: no plugin placed it on another LNM"
            elif not self.inventory.connected(target):
                why = f"LNM {target} is not connected"
            else:
                placed[name] = target
                continue
            failed.append(failed_entry(name, why))
        if placed:
            before_send({name: leaving[name] for name in placed})
        by_lnm = {}
        for name, target in placed.items():
            self._relocating[name] = (leaving[name], undone)
            self.state.update(name, state=states.STARTING, lnm=target)
            by_lnm.setdefault(target, []).append(self.state.vms[name])
        started = []
        try:
            await run_each([self._start_on(lnm, recs, started, failed, set(placed))
                            for lnm, recs in by_lnm.items()], "start")
            for name in unaccounted(list(placed), started, failed):
                self._settle_unaccounted(self.state.vms.get(name), name, failed, set(placed))
        finally:
            for name in placed:
                self._relocating.pop(name, None)
        started.sort(key=lambda s: s["name"])
        return {"started": started, "failed": failed, "notes": request.notes,
                "elapsed": self.clock.seconds() - started_at}

    def _relocation_undone(self, rec):
        name = rec["name"]
        left, undone = self._relocating.pop(name)
        target = rec["lnm"]
        if rec["state"] in (states.STARTING, states.LOST):
            self.state.update(name, state=states.LOST, lnm=left)
        undone(name, left)
        # The new host may have cached the record: it names the old one now.
        defer.Deferred.fromCoroutine(self.inventory.send_record(target, name))
