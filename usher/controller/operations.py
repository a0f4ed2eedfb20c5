"""Table 4's ``op_on``: one Table 3 operation (pause, resume, shutdown,
reboot, hibernate, restore, destroy, cycle) or ``delete`` on the VMs of a
selection, through its ``<operation>_request`` chain.

``destroy`` is Table 3's hard shutdown: the VM is powered off and kept
(``start`` boots it again). ``delete`` (issue 17) removes a VM that is off:
its definition and saved image on its LNM, then its record (``vm_removed``
lets plugins release what it held). It refuses a VM that runs unless the
request's args carry ``force: True``, which powers it off first (a destroy,
then the delete). A VM its LNM no longer has (it went missing) is deleted
at once: only its record is left.

An LNM before issue 17 (its hello has no ``destroy_keeps``) removes the VM
on destroy and knows no delete: destroy is refused there (it would remove
what the user means to keep), and delete is sent as that destroy.

An operation whose answer never came leaves the outcome unknown: the LNM's
connection is dropped so that its inventory settles the VM. Every VM of a
request ends in ``done`` or ``failed``; an unexpected error is logged with
its traceback and reported. A VM already in the operation's result state
(``states.ALREADY``) is done with ``"already": True`` and nothing is sent;
each failed entry has the code of its error (usher.errors.ERROR_CODES).
"""

from twisted.logger import Logger

from usher import errors, states
from usher.controller.commands import (INTERNAL_ERROR, Reason, Room, check_args, dropped_failures,
                                       failed_entry, failure_text, hard_off, run_each, unaccounted,
                                       unanswered, unexpected)
from usher.controller.events import Event, Request
from usher.controller.state import ORIGIN_LNM
from usher.errors import InvalidRequest, LinkFailure, NoSuchVM, UsherError

log = Logger()


class Operations(Room):
    """Operations on existing VMs."""

    def __init__(self, *, slots, **room):
        super().__init__(**room)
        self.slots = slots

    async def op_on(self, user, admin, operation, selection, args=None):
        if operation not in states.OPERATIONS:
            raise InvalidRequest(f"unknown operation {operation!r}; valid: "
                                 + ", ".join(states.OPERATIONS))
        args = check_args(args)
        forced = _forced(operation, args)
        records = await self.visibility.select(user, admin, selection)
        if not records:
            raise NoSuchVM("no VM matches")
        request = Request(operation, user, admin=admin, vms=[r["name"] for r in records],
                          args=args, records={r["name"]: r for r in records})
        await self.chains.fire_request(Event(f"{operation}_request", self.api,
                                             request=request))
        failed = dropped_failures(request)
        done = []
        work = []
        allowed = set(states.OPERATION_PRECONDITIONS[operation])
        if forced:
            allowed |= states.DELETE_FORCED_FROM
        already = states.ALREADY.get(operation, set())
        for name in request.vms:
            rec, why = self.refusal(name, allowed | already, operation)
            if why is not None:
                if rec is not None and why.startswith("cannot"):
                    why = Reason(why + _HINTS.get((operation, rec["state"]), ""),
                                 getattr(why, "code", errors.WRONG_STATE))
                failed.append(failed_entry(name, why))
            elif rec["state"] in already:
                done.append({"name": name, "state": rec["state"], "already": True})
            elif not self.inventory.connected(rec["lnm"]):
                if operation == "delete" and rec["state"] in (states.MISSING,):
                    self.state.remove(name)
                    done.append({"name": name, "state": None})
                else:
                    failed.append(failed_entry(name, f"LNM {rec['lnm']} is not connected",
                                               errors.UNAVAILABLE))
            elif operation == "destroy" and not self.inventory.destroy_keeps(rec["lnm"]):
                failed.append(failed_entry(name, _OLD_DESTROY.format(lnm=rec["lnm"]),
                                           errors.OPERATION_FAILED))
            else:
                work.append(rec)
        await run_each([self._one(operation, rec, done, failed, request, forced)
                        for rec in work],
                       operation)
        for name in unaccounted([rec["name"] for rec in work], done, failed):
            failed.append(failed_entry(name, INTERNAL_ERROR, errors.INTERNAL))
        done.sort(key=lambda d: d["name"])
        return {"operation": operation, "done": done, "failed": failed,
                "notes": request.notes}

    async def _one(self, operation, rec, done, failed, request, forced):
        name, lnm = rec["name"], rec["lnm"]
        handle = None
        with self.ledger.commanding([name], operation):
            try:
                async with self.slots.command(lnm):
                    handle = self.inventory.handle_of(lnm)
                    if handle is None:
                        raise LinkFailure(f"LNM {lnm} disconnected before {operation} was "
                                          "sent", sent=False)
                    info = {}
                    if forced and rec["state"] in states.DELETE_FORCED_FROM:
                        info = await self._power_off(handle, name)
                    if info is not None:
                        info = await handle.op_on(self._sent_as(operation, lnm), name)
            except NoSuchVM as e:
                if operation != "delete":
                    self._failed(operation, rec, lnm, handle, e, failed)
                    return
                # Already gone from its host (it went missing): what a delete
                # asks for is so; only the record was left.
                request.note(f"{name} was no longer on LNM {lnm} ({e}); its record is "
                             "removed")
                info = None
            except UsherError as e:
                self._failed(operation, rec, lnm, handle, e, failed)
                return
            except Exception as e:
                log.failure("{operation} {vm} on LNM {lnm} failed unexpectedly",
                            operation=operation, vm=name, lnm=lnm)
                self._failed(operation, rec, lnm, handle, unexpected(e), failed)
                return
        if operation == "delete" or info is None:
            self.state.remove(name)
            done.append({"name": name, "state": None})
        else:
            new_state = info.get("state") or states.OPERATION_RESULT[operation]
            self.state.update(name, state=new_state, origin=ORIGIN_LNM)
            done.append({"name": name, "state": new_state})
        self.chains.notify(Event("op_complete", self.api, operation=operation,
                                 vm=dict(rec), ok=True, error=None))

    def _sent_as(self, operation, lnm):
        """-> the operation sent to ``lnm`` for ``operation``: delete is the
        destroy of an LNM before issue 17."""
        if operation == "delete" and not self.inventory.destroy_keeps(lnm):
            return "destroy"
        return operation

    async def _power_off(self, handle, name):
        """A forced delete's first step: destroy the VM (hard power-off) ->
        its domain info, or None if that left nothing (a transient domain).
        A VM its LNM finds already off is the delete's to judge."""
        info = await hard_off(handle, name)
        if info:
            self.state.update(name, state=info.get("state") or states.SHUTOFF,
                              origin=ORIGIN_LNM)
        return info

    def _failed(self, operation, rec, lnm, handle, error, failed):
        name = rec["name"]
        text = failure_text(error, lnm, name, f"{operation} could be sent")
        if unanswered(error):
            self.inventory.resynchronize(lnm, handle, f"no answer to {operation} {name}")
        failed.append(failed_entry(name, text, error.code))
        self.chains.notify(Event("op_complete", self.api, operation=operation,
                                 vm=dict(rec), ok=False, error=text))


_DELETE_RUNNING = (": shut it down or destroy it first, or force the delete "
                   "(ush delete --force), which powers it off")
# What to do instead, after the refusal of an operation from a state (issue
# 17: destroy no longer removes; delete does).
_HINTS = {("delete", state): _DELETE_RUNNING for state in states.DELETE_FORCED_FROM}
_HINTS.update({
    ("destroy", states.MISSING): ": it is gone from its host; delete removes its record",
    ("destroy", states.HIBERNATED): ": it is not running; restore it, or delete it",
})

# Destroy on an LNM before issue 17 (no destroy_keeps in its hello).
_OLD_DESTROY = ("LNM {lnm} runs an older usherlnm whose destroy removes the VM: upgrade it, "
                "or use delete --force")


def _forced(operation, args):
    """Does a delete's ``force`` argument ask to power running VMs off? Only
    ``True`` does; any other value is a mistake worth saying."""
    force = args.get("force")
    if force is None or force is False:
        return False
    if force is not True:
        raise InvalidRequest(f"argument 'force' must be true or false, not {force!r}")
    if operation != "delete":
        raise InvalidRequest(f"argument 'force' is for delete, not {operation}")
    return True
