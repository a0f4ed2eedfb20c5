"""Table 4's ``migrate``: the ``migrate_request`` chain, then each VM's move
between two LNMs as an explicit state machine (``Move``, automat, after
magic-wormhole's one machine per module), ending in a ``MoveOutcome``.

A move is live (libvirt migrates the running VM; the target expects it) or
cold (the source exports the VM and keeps the export, the target imports
it, the source forgets it). A link that fails under a command leaves the
outcome unknown: the LNMs' next inventories settle it, and a kept export is
released or restored only once the VM is found (``LNMInventory.
resolve_soon``): a VM is never left running twice, nor nowhere.
"""

import enum

from automat import MethodicalMachine
from twisted.internet import defer
from twisted.logger import Logger

from usher import errors, states
from usher.controller.commands import (INTERNAL_ERROR, Reason, Room, check_args,
                                       dropped_failures, failed_entry, lnm_view, run_each,
                                       unaccounted, unanswered)
from usher.controller.events import Event, Request
from usher.controller.state import ORIGIN_LNM
from usher.errors import LinkFailure, NoSuchVM, UsherError

log = Logger()


class MoveOutcome(enum.Enum):
    MOVED = "moved"       # it runs on the target
    STAYED = "stayed"     # it is still on the source
    MISSING = "missing"   # on neither: the hypervisor lost it (paper: "missing")
    UNKNOWN = "unknown"   # a link failed under a command: the LNMs' next inventories say


class Move:
    """One VM's move from its source LNM to ``target``: ``run()`` -> a
    Deferred (MoveOutcome, details from the LNM that has it or None, the
    error that stopped it or None). Each step is a command to an LNM whose
    result is the machine's next input."""

    _machine = MethodicalMachine()

    def __init__(self, inventory, ledger, rec, before, target):
        self.inventory = inventory
        self.ledger = ledger
        self.name, self.source, self.target = rec["name"], rec["lnm"], target
        src, dst = inventory.state.lnms[self.source], inventory.state.lnms[target]
        # The connections these commands go to: an LNM that reattaches
        # meanwhile is another connection, which knows nothing of them.
        self._src, self._dst = src.handle, dst.handle
        self._live = (src.info.get("live_migration") and dst.info.get("live_migration")
                      and dst.info.get("migration_uri"))
        self._migration_uri = dst.info.get("migration_uri")
        self._moved = dict(rec, lnm=target, state=before)
        self._info = None
        self._error = None
        self._done = defer.Deferred()

    def run(self):
        if self._src is None or self._dst is None:
            self.unreachable(LinkFailure("source or target LNM disconnected", sent=False))
        elif self._live:
            self.go_live()
        else:
            self.go_cold()
        return self._done

    # -- states --------------------------------------------------------------------

    @_machine.state(initial=True)
    def ready(self):
        "Nothing sent yet."

    @_machine.state()
    def migrating(self):
        "Live: the target expects the VM, the source is moving it."

    @_machine.state()
    def finding_on_target(self):
        "Live: has it arrived?"

    @_machine.state()
    def exporting(self):
        "Cold: the source saves the VM (and keeps the export)."

    @_machine.state()
    def importing(self):
        "Cold: the target takes the export in."

    @_machine.state()
    def finding_imported(self):
        "Cold: the import failed; is the VM on the target all the same?"

    @_machine.state()
    def restoring(self):
        "Cold: the VM is on neither; the source puts its export back."

    @_machine.state()
    def releasing(self):
        "The VM runs on the target: the source forgets its export."

    @_machine.state()
    def finding_on_source(self):
        "The move failed: is the VM still where it was?"

    @_machine.state(terminal=True)
    def done(self):
        "The outcome is known (or known to be unknown)."

    # -- inputs: what the LNMs answered -----------------------------------------------

    @_machine.input()
    def unreachable(self, error):
        "A handle is gone before anything was sent."

    @_machine.input()
    def go_live(self):
        "Both LNMs can live-migrate."

    @_machine.input()
    def go_cold(self):
        "Export and import."

    @_machine.input()
    def migrated(self):
        "The source says it moved the VM."

    @_machine.input()
    def exported(self, payload):
        "The source saved the VM."

    @_machine.input()
    def imported(self, info):
        "The target runs the VM."

    @_machine.input()
    def failed(self, error):
        "The LNM refused, or the link failed."

    @_machine.input()
    def no_answer(self, error):
        "The command was sent; its answer never came."

    @_machine.input()
    def found(self, info):
        "The LNM asked has the VM."

    @_machine.input()
    def absent(self):
        "The LNM asked does not have the VM."

    @_machine.input()
    def unknown(self):
        "The LNM asked cannot say."

    @_machine.input()
    def restored(self, info):
        "The source put the VM back."

    @_machine.input()
    def released(self):
        "The source was told to forget its export (or will be when it reattaches)."

    # -- outputs ------------------------------------------------------------------------

    def _spawn(self, step):
        """Run one step (a coroutine feeding the next input); an error no one
        expected ends the move with it."""
        defer.Deferred.fromCoroutine(step).addErrback(self._crashed)

    def _crashed(self, failure):
        if not self._done.called:
            self._done.errback(failure)

    @_machine.output()
    def _note_error(self, error):
        self._error = error

    @_machine.output()
    def _note_info(self, info):
        self._info = info

    @_machine.output()
    def _send_live(self):
        self._spawn(self._migrate_live())

    @_machine.output()
    def _expect_arrival(self):
        self._error = LinkFailure(f"{self.name} did not show up on {self.target} after "
                                  "the migration")

    @_machine.output()
    def _resync_source_if_unanswered(self, error):
        if unanswered(error):
            self.inventory.resynchronize(self.source, self._src,
                                         f"no answer while moving {self.name}")

    @_machine.output()
    def _find_on_target(self):
        self._spawn(self._locate(self.target, self._dst))

    @_machine.output()
    def _check_source(self):
        if unanswered(self._error):
            self.inventory.resynchronize(self.source, self._src,
                                         f"no answer while moving {self.name}")
        # After a link failure, absent from the source is no proof the VMM
        # lost it.
        self._spawn(self._locate(self.source, self._src,
                                 absent_is_unknown=isinstance(self._error, LinkFailure)))

    @_machine.output()
    def _export(self):
        self._spawn(self._export_image())

    @_machine.output()
    def _keep_export(self):
        # The source keeps the export until it hears what became of the VM.
        self.ledger.keep_export(self.name, self.source, self.target)

    @_machine.output()
    def _import(self, payload):
        self._spawn(self._import_image(payload))

    @_machine.output()
    def _resync_target_import(self):
        # The import may still finish there. Dropping the connection makes
        # the target undo an import that ends after it (its answer could
        # reach no one), and its inventory says which.
        self.inventory.resynchronize(self.target, self._dst,
                                     f"no answer to the import of {self.name}")

    @_machine.output()
    def _resync_target_about(self):
        # It may run there: put back nothing until the target says.
        self.inventory.resynchronize(self.target, self._dst, f"no answer about {self.name}")

    @_machine.output()
    def _restore(self):
        self._spawn(self._restore_export())

    @_machine.output()
    def _resync_source_restore(self, error):
        self.inventory.resynchronize(self.source, self._src,
                                     f"putting {self.name} back failed: {error}")

    @_machine.output()
    def _export_settled(self):
        self.ledger.export_settled(self.name)

    @_machine.output()
    def _release(self):
        self._spawn(self._release_export())

    @_machine.output()
    def _finish_moved(self):
        self._done.callback((MoveOutcome.MOVED, self._info, None))

    @_machine.output()
    def _finish_stayed(self):
        self._done.callback((MoveOutcome.STAYED, self._info, self._error))

    @_machine.output()
    def _finish_missing(self):
        self._done.callback((MoveOutcome.MISSING, None, self._error))

    @_machine.output()
    def _finish_unknown(self):
        self._done.callback((MoveOutcome.UNKNOWN, None, self._error))

    # -- transitions ---------------------------------------------------------------------

    ready.upon(unreachable, enter=done, outputs=[_note_error, _finish_stayed])
    ready.upon(go_live, enter=migrating, outputs=[_send_live])
    ready.upon(go_cold, enter=exporting, outputs=[_export])

    migrating.upon(migrated, enter=finding_on_target, outputs=[_expect_arrival,
                                                               _find_on_target])
    migrating.upon(failed, enter=finding_on_target,
                   outputs=[_note_error, _resync_source_if_unanswered, _find_on_target])
    finding_on_target.upon(found, enter=done, outputs=[_note_info, _finish_moved])
    finding_on_target.upon(absent, enter=finding_on_source, outputs=[_check_source])
    finding_on_target.upon(unknown, enter=finding_on_source, outputs=[_check_source])

    exporting.upon(exported, enter=importing, outputs=[_keep_export, _import])
    exporting.upon(failed, enter=finding_on_source, outputs=[_note_error, _check_source])
    importing.upon(imported, enter=releasing, outputs=[_note_info, _release])
    importing.upon(no_answer, enter=done, outputs=[_note_error, _resync_target_import,
                                                    _finish_unknown])
    importing.upon(failed, enter=finding_imported, outputs=[_note_error, _find_on_target])
    finding_imported.upon(found, enter=releasing, outputs=[_note_info, _release])
    finding_imported.upon(absent, enter=restoring, outputs=[_restore])
    finding_imported.upon(unknown, enter=done, outputs=[_resync_target_about,
                                                        _finish_unknown])
    restoring.upon(restored, enter=done, outputs=[_note_info, _export_settled,
                                                  _finish_stayed])
    restoring.upon(failed, enter=done, outputs=[_resync_source_restore, _finish_unknown])
    releasing.upon(released, enter=done, outputs=[_finish_moved])

    finding_on_source.upon(found, enter=done, outputs=[_note_info, _finish_stayed])
    finding_on_source.upon(absent, enter=done, outputs=[_finish_missing])
    finding_on_source.upon(unknown, enter=done, outputs=[_finish_unknown])

    # -- steps: one command each, its answer the next input ----------------------------------

    async def _migrate_live(self):
        try:
            # Migrating: the target must not report the VM absent (or its
            # arrival) while libvirt moves it; the final record settles it.
            await self._dst.receive([lnm_view(dict(self._moved, state=states.MIGRATING))])
            await self._src.migrate(self.name, {"name": self.target,
                                                "migration_uri": self._migration_uri})
        except UsherError as e:
            self.failed(e)
        else:
            self.migrated()

    async def _locate(self, lnm, handle, absent_is_unknown=False):
        where, info = await self.inventory.locate(self.name, lnm, handle)
        if where == "there":
            self.found(info)
        elif where == "absent" and not absent_is_unknown:
            self.absent()
        else:
            self.unknown()

    async def _export_image(self):
        try:
            payload = await self._src.export_image(self.name)
        except UsherError as e:
            # A lost answer: the source keeps the export (or put the VM back);
            # its inventory, once it reattaches, says which.
            self.failed(e)
        else:
            self.exported(payload)

    async def _import_image(self, payload):
        try:
            await self._dst.receive([lnm_view(self._moved)])
            info = await self._dst.import_image(self.name, payload)
        except UsherError as e:
            (self.no_answer if unanswered(e) else self.failed)(e)
        else:
            self.imported(info)

    async def _restore_export(self):
        try:
            info = await self._src.restore_export(self.name)
        except UsherError as e:
            self.failed(e)
        else:
            self.restored(info)

    async def _release_export(self):
        """On failure the export stays kept and is released when the source
        next attaches."""
        try:
            await self._src.release_export(self.name)
        except UsherError as e:
            log.warn("LNM {lnm} could not be told to forget the export of {vm}: {error}; "
                     "it will be when it next attaches", lnm=self.source, vm=self.name,
                     error=str(e))
        else:
            self.ledger.export_settled(self.name)
        self.released()


class Migrations(Room):
    """Migrating VMs."""

    async def migrate(self, user, admin, selection, lnms=(), args=None):
        args = check_args(args)
        budget = self.visibility.budget()
        lnms = self.visibility.check_lnm_list(lnms, budget)
        records = await self.visibility.select(user, admin, selection, budget=budget)
        if not records:
            raise NoSuchVM("no VM matches")
        request = Request("migrate", user, admin=admin, vms=[r["name"] for r in records],
                          lnms=lnms, args=args, records={r["name"]: r for r in records})
        await self.chains.fire_request(Event("migrate_request", self.api, request=request))
        failed = dropped_failures(request)
        migrated = []
        work = []
        for name in request.vms:
            target = request.placement.get(name)
            rec, why = self.refusal(name, (states.RUN, states.PAUSED), "migrate")
            if why is None and target == rec["lnm"]:
                # Where it is asked to be already: done, nothing to move.
                migrated.append({"name": name, "from": target, "to": target, "already": True})
                continue
            if why is None:
                why = self._target_refusal(rec, target)
            if why is None:
                work.append((rec, target))
            else:
                failed.append(failed_entry(name, why))
        await run_each([self._migrate_one(rec, target, migrated, failed)
                        for rec, target in work], "migration")
        for name in unaccounted([rec["name"] for rec, _target in work], migrated, failed):
            failed.append(failed_entry(name, INTERNAL_ERROR, errors.INTERNAL))
            if (self.state.vms.get(name) or {}).get("state") == states.MIGRATING:
                self.state.update(name, state=states.LOST)
        migrated.sort(key=lambda m: m["name"])
        return {"migrated": migrated, "failed": failed, "notes": request.notes}

    def _target_refusal(self, rec, target):
        """Why ``rec`` may not move to ``target`` (the placement's choice), or None."""
        if target is None:
            return Reason("no placement plugin chose a target", errors.NO_CAPACITY)
        if not (self.inventory.connected(rec["lnm"]) and self.inventory.connected(target)):
            return Reason("source or target LNM not connected", errors.UNAVAILABLE)
        return None

    async def _migrate_one(self, rec, target, migrated, failed):
        name, source = rec["name"], rec["lnm"]
        before = rec["state"]
        with self.ledger.commanding([name], "migrate"):
            self.state.incoming[name] = target
            self.state.update(name, state=states.MIGRATING)
            try:
                outcome, info, error = await Move(self.inventory, self.ledger, rec, before,
                                                  target).run()
            except Exception as e:
                # Never leave the request silent about a VM it was asked to move.
                log.failure("migration of {vm} to {target} failed", vm=name, target=target)
                outcome, info, error = MoveOutcome.UNKNOWN, None, UsherError(
                    f"internal error: {e.__class__.__name__}")
            finally:
                self.state.incoming.pop(name, None)
        if outcome is MoveOutcome.UNKNOWN:
            # It may yet be found on its target: the one report that may
            # move it there (see InFlight.may_land).
            self.ledger.move_unsettled(name, target)
        else:
            self.ledger.move_settled(name)
        if outcome is MoveOutcome.MOVED:
            self.state.update(name, lnm=target, state=info.get("state") or before,
                              origin=ORIGIN_LNM)
            await self.inventory.send_record(target, name)
            migrated.append({"name": name, "from": source, "to": target})
            self.chains.notify(Event("migrate_complete", self.api, vm=dict(rec), ok=True,
                                     source=source, target=target, error=None))
            return
        text = f"migration to {target} failed: {error}"
        if outcome is MoveOutcome.STAYED:
            self.state.update(name, state=(info or {}).get("state") or before,
                              origin=ORIGIN_LNM)
        elif outcome is MoveOutcome.MISSING:
            text += f"; {name} is no longer on {source} either"
            self.inventory.observation.mark_missing(rec)
        else:
            text += (f"; the outcome is unknown: {name} is lost until its LNMs report back "
                     "(it is never left running twice, nor nowhere)")
            self.state.update(name, state=states.LOST)
        # The record still names the source: the target drops its copy.
        await self.inventory.send_record(target, name)
        failed.append(failed_entry(name, text, errors.OUTCOME_UNKNOWN
                                   if outcome is MoveOutcome.UNKNOWN
                                   else getattr(error, "code", errors.OPERATION_FAILED)))
        self.chains.notify(Event("migrate_complete", self.api, vm=dict(rec), ok=False,
                                 source=source, target=target, error=text))
        self.inventory.resolve_soon()
