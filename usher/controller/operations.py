"""Table 4's ``op_on``: one Table 3 operation (pause, resume, shutdown,
reboot, hibernate, restore, destroy, cycle) on the VMs of a selection,
through its ``<operation>_request`` chain.

An operation whose answer never came leaves the outcome unknown: the LNM's
connection is dropped so that its inventory settles the VM. A ``destroy``
of a VM its LNM no longer has (it went missing) is done: the record goes,
and the answer says so. Every VM of a request ends in ``done`` or
``failed``; an unexpected error is logged with its traceback and reported.
A VM already in the operation's result state (``states.ALREADY``) is done
with ``"already": True`` and nothing is sent; each failed entry has the
code of its error (usher.errors.ERROR_CODES).
"""

from twisted.logger import Logger

from usher import states
from usher import errors
from usher.controller.commands import (INTERNAL_ERROR, Room, check_args, dropped_failures,
                                       failed_entry, failure_text, run_each, unaccounted,
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
        allowed = states.OPERATION_PRECONDITIONS[operation]
        already = states.ALREADY.get(operation, set())
        for name in request.vms:
            rec, why = self.refusal(name, allowed | already, operation)
            if why is not None:
                failed.append(failed_entry(name, why))
            elif rec["state"] in already:
                done.append({"name": name, "state": rec["state"], "already": True})
            elif not self.inventory.connected(rec["lnm"]):
                if operation == "destroy" and rec["state"] in (states.MISSING,):
                    self.state.remove(name)
                    done.append({"name": name, "state": None})
                else:
                    failed.append(failed_entry(name, f"LNM {rec['lnm']} is not connected",
                                               errors.UNAVAILABLE))
            else:
                work.append(rec)
        await run_each([self._one(operation, rec, done, failed, request) for rec in work],
                       operation)
        for name in unaccounted([rec["name"] for rec in work], done, failed):
            failed.append(failed_entry(name, INTERNAL_ERROR, errors.INTERNAL))
        done.sort(key=lambda d: d["name"])
        return {"operation": operation, "done": done, "failed": failed,
                "notes": request.notes}

    async def _one(self, operation, rec, done, failed, request):
        name, lnm = rec["name"], rec["lnm"]
        handle = None
        with self.ledger.commanding([name], operation):
            try:
                async with self.slots.command(lnm):
                    handle = self.inventory.handle_of(lnm)
                    if handle is None:
                        raise LinkFailure(f"LNM {lnm} disconnected before {operation} was "
                                          "sent", sent=False)
                    info = await handle.op_on(operation, name)
            except NoSuchVM as e:
                if operation != "destroy":
                    self._failed(operation, rec, lnm, handle, e, failed)
                    return
                # Already gone from its host (it went missing): what a destroy
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
        if operation == "destroy" or info is None:
            self.state.remove(name)
            done.append({"name": name, "state": None})
        else:
            new_state = info.get("state") or states.OPERATION_RESULT[operation]
            self.state.update(name, state=new_state, origin=ORIGIN_LNM)
            done.append({"name": name, "state": new_state})
        self.chains.notify(Event("op_complete", self.api, operation=operation,
                                 vm=dict(rec), ok=True, error=None))

    def _failed(self, operation, rec, lnm, handle, error, failed):
        name = rec["name"]
        text = failure_text(error, lnm, name, f"{operation} could be sent")
        if unanswered(error):
            self.inventory.resynchronize(lnm, handle, f"no answer to {operation} {name}")
        failed.append(failed_entry(name, text, error.code))
        self.chains.notify(Event("op_complete", self.api, operation=operation,
                                 vm=dict(rec), ok=False, error=text))
