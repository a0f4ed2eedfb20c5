"""HA restart, only with fencing: the mechanism that restarts elsewhere the
VMs of a lost LNM once that host is known to be off, and removes their
stale copies when it comes back (issue 15, part B; policy in plugins/ha).

The safety is here, whatever plugin asks: a VM is restarted elsewhere only
when it is ``lost`` on an LNM that holds ``fenced`` -- the evidence of a
fence agent or an administrator's explicit confirmation that the host is
off (``confirm_fenced``); never on silence alone, and never for a connected
LNM. The hold (``usher.controller.holds``, kind ``fenced``) keeps the host
out of placement and remembers, persisted, every VM restarted elsewhere
(``restarted``), written **before** its start is sent: if the controller dies
next, the copy the fenced host may still hold is known as stale.

When a fenced LNM attaches again (``lnm_attached``) its evidence is spent
(``back_since``): lost again before the hold is released, nothing is
restarted off it until it is fenced anew. Its recovery inventory
never vouches for a VM in ``restarted`` (``LNMInventory.reconcile``); each
such VM it still holds while the VM's record names another LNM (or was
removed: ``gone``; a record merely unknown after a restart is in doubt) is a
stale copy. Policy ``stale_copies``: ``delete`` (the default; ``destroy``,
its name before issue 17, is read as it) removes it there (the LNM's
destroy, a hard power-off, then its delete: undefine), and once none is
left the hold is released and the host takes VMs again (a maintenance hold,
if any, stays); ``hold`` keeps the host held and lists the stale copies in
the hold's ``stale`` for the administrator (checked again by ``clean_up``).
A VM whose copy elsewhere is itself in doubt (lost, missing, busy) is left
alone and listed in ``waiting``. The VMs of that LNM that were not restarted
simply come back: they are the only copy.
"""

from twisted.internet import defer
from twisted.logger import Logger

from usher import errors, states
from usher.controller.commands import Reason, failed_entry, hard_off, lnm_view
from usher.errors import InvalidRequest, NoSuchLNM, UsherError

log = Logger()

KIND = "fenced"
MAX_EVIDENCE = 1000
STALE_POLICIES = ("delete", "hold")
# Policy names of earlier versions -> what they mean now.
STALE_POLICY_ALIASES = {"destroy": "delete"}
# States in which the copy a restart made elsewhere is known to exist: the
# one on the fenced host is then surely stale.
_LIVE = (states.RUN, states.PAUSED, states.SHUTOFF, states.HIBERNATED, states.UNKNOWN)


class Fencing:
    """``controller.fencing``: confirm_fenced, restart_elsewhere and the
    stale copies of fenced hosts. Watches the LNMs (``inventory.watch``)."""

    def __init__(self, *, state, holds, inventory, starts, ledger, clock):
        self.state = state
        self.holds = holds
        self.inventory = inventory
        self.starts = starts
        self.ledger = ledger
        self.clock = clock
        # The site's policy (set by the HA plugin): what to do with a stale copy.
        self.stale_copies = "delete"
        self._cleaning = {}          # LNM -> Deferred of its clean-up under way
        inventory.watch(self)
        state.listen(self._vm_changed)

    # -- evidence ----------------------------------------------------------------

    def _known(self, lnm):
        known = self.inventory.known_lnms
        return lnm in self.state.lnms or (known is not None and lnm in known.entries)

    def confirm_fenced(self, lnm, *, evidence, by):
        """The host of ``lnm`` is known to be off (a fence agent's evidence,
        or an administrator's word). -> the hold's details."""
        if not isinstance(lnm, str) or not self._known(lnm):
            raise NoSuchLNM(f"no LNM {str(lnm)[:100]} is known")
        if self.inventory.connected(lnm):
            raise InvalidRequest(f"LNM {lnm} is connected: a host that answers is not "
                                 "fenced (fence only a lost LNM)")
        if not isinstance(evidence, str) or not evidence.strip():
            raise InvalidRequest("fencing needs evidence: a non-empty text")
        if len(evidence) > MAX_EVIDENCE:
            raise InvalidRequest(f"the evidence may have at most {MAX_EVIDENCE} characters")
        previous = self.holds.get(lnm, KIND) or {}
        # Fresh evidence: a hold whose host came back meanwhile (back_since)
        # is valid again; what was restarted and removed off it is kept.
        details = self.holds.hold(lnm, KIND, evidence=evidence.strip(), by=str(by)[:100],
                                  since=int(self.clock.seconds()),
                                  restarted=list(previous.get("restarted", [])),
                                  gone=list(previous.get("gone", [])))
        log.warn("LNM {lnm} is fenced ({by}: {evidence}); its lost VMs may be restarted "
                 "elsewhere", lnm=lnm, by=by, evidence=evidence.strip()[:200])
        return details

    def fenced(self, lnm):
        """Held as fenced (maybe back, with stale copies to remove)."""
        return self.holds.has(lnm, KIND)

    def evidence_valid(self, lnm):
        """Fenced, and not back since: the host is known to be off now. A
        host that came back (``back_since``) and went away again runs its
        VMs as far as anyone knows, until fresh evidence says otherwise."""
        details = self.holds.get(lnm, KIND)
        return details is not None and not details.get("back_since")

    def restarted_from(self, lnm):
        """-> the VMs restarted elsewhere off fenced ``lnm`` (maybe stale there)."""
        return list((self.holds.get(lnm, KIND) or {}).get("restarted", []))

    # -- restarts ------------------------------------------------------------------

    def _why_not(self, name):
        rec = self.state.vms.get(name)
        if rec is None:
            return Reason(f"no VM {name}", errors.NO_SUCH_VM)
        lnm = rec.get("lnm")
        if rec["state"] != states.LOST:
            return f"{name} is {rec['state']}, not lost: only a lost VM is restarted elsewhere"
        if not self.fenced(lnm):
            return (f"its LNM {lnm} is not fenced: a lost VM is restarted elsewhere only "
                    "once its host is known to be off (a fence agent or an "
                    "administrator's confirmation), never on silence alone")
        if not self.evidence_valid(lnm):
            return (f"its LNM {lnm} came back after it was fenced, so that evidence no "
                    "longer says the host is off: fence it again (never on silence alone)")
        if self.inventory.connected(lnm):
            return f"its LNM {lnm} is connected"
        if self.ledger.is_busy(name):
            return f"{name} has a command in flight"
        return None

    async def restart_elsewhere(self, names, *, by="usher"):
        """Start again on other hosts the ``names`` that are lost on fenced
        LNMs, through the ``start_request`` chain (``request.relocate``).
        -> {"started", "failed", "notes"} like ``start``'s."""
        failed, leaving = [], {}
        for name in dict.fromkeys(names):
            why = self._why_not(name)
            if why is not None:
                failed.append(failed_entry(name, why, getattr(why, "code",
                                                              errors.WRONG_STATE)))
            else:
                leaving[name] = self.state.vms[name]["lnm"]
        if not leaving:
            return {"started": [], "failed": failed, "notes": []}
        try:
            result = await self.starts.relocate(by, True, leaving,
                                                before_send=self._note_restarted,
                                                undone=self._restart_undone)
        except UsherError as e:
            result = {"started": [], "notes": [],
                      "failed": [failed_entry(n, e) for n in sorted(leaving)]}
        result["failed"] = failed + result["failed"]
        for entry in result["started"]:
            log.warn("VM {vm} restarted on LNM {lnm} (its host {old} is fenced)",
                     vm=entry["name"], lnm=entry["lnm"], old=leaving[entry["name"]])
        for lnm in set(leaving.values()):
            if self.inventory.connected(lnm):
                self.clean_up(lnm)       # came back while we restarted
        return result

    def _note_restarted(self, placed):
        """Before any start is sent: the VMs restarted off each fenced LNM,
        persisted with its hold."""
        by_lnm = {}
        for name, lnm in placed.items():
            by_lnm.setdefault(lnm, set()).add(name)
        for lnm, names in by_lnm.items():
            restarted = set(self.restarted_from(lnm)) | names
            if self.holds.update(lnm, KIND, restarted=sorted(restarted)) is None:
                raise InvalidRequest(f"LNM {lnm} is no longer fenced")

    def _restart_undone(self, name, lnm):
        """The start elsewhere surely did nothing: the VM stays lost on ``lnm``."""
        restarted = self.restarted_from(lnm)
        if name in restarted:
            restarted.remove(name)
            self.holds.update(lnm, KIND, restarted=restarted)

    # -- the fenced host comes back ---------------------------------------------------

    def lnm_attached(self, lnm, handle):
        if self.fenced(lnm):
            # The evidence is spent: the host runs again. If it is lost again
            # before the hold is released, nothing is restarted off it until
            # it is fenced anew.
            self.holds.update(lnm, KIND, back_since=int(self.clock.seconds()))
            self.clean_up(lnm)

    def _vm_changed(self, record, old_state):
        """A VM restarted off a fenced host and then removed (its owner
        deleted it): the copy the fenced host holds is stale. Only a removal
        says so -- a record merely absent (after a controller restart, its
        new host not back) may be the only copy."""
        if record.get("state") is not None or old_state is None:
            return
        name = record.get("name")
        for lnm in self.holds.with_kind(KIND):
            details = self.holds.get(lnm, KIND) or {}
            if name in details.get("restarted", ()) and name not in details.get("gone", ()):
                self.holds.update(lnm, KIND, gone=sorted(set(details.get("gone", ())) | {name}))

    def lnm_detached(self, lnm, handle):
        pass

    def clean_up(self, lnm):
        """Remove the stale copies of a fenced, connected LNM (one pass at a
        time per LNM). -> Deferred of the hold's details (None: released)."""
        running = self._cleaning.get(lnm)
        if running is not None:
            return running
        d = defer.Deferred.fromCoroutine(self._clean_up(lnm))

        def done(result):
            self._cleaning.pop(lnm, None)
            return result

        def failed(failure):
            log.failure("LNM {lnm}: the stale copies of its fenced VMs could not be "
                        "settled", failure, lnm=lnm)
            return None
        d.addBoth(done).addErrback(failed)
        if not d.called:
            self._cleaning[lnm] = d
        return d

    def _verdict(self, name, lnm):
        """-> "stale" (a copy on ``lnm`` would be a second one), "ours" (the
        record is back on ``lnm``: not a restart any more) or "waiting"
        (where the VM runs is in doubt: leave it alone)."""
        rec = self.state.vms.get(name)
        if rec is not None and rec.get("lnm") == lnm:
            return "ours"
        if self.ledger.is_busy(name):
            return "waiting"
        if rec is None:
            # Removed by its owner meanwhile: stale. Merely unknown (a
            # restarted controller whose other host is not back): in doubt.
            gone = (self.holds.get(lnm, KIND) or {}).get("gone", ())
            return "stale" if name in gone else "waiting"
        if rec["state"] in _LIVE:
            return "stale"        # known elsewhere
        return "waiting"

    async def _clean_up(self, lnm):
        await self.inventory.settled()
        restarted = self.restarted_from(lnm)
        handle = self.inventory.handle_of(lnm)
        if not self.fenced(lnm) or handle is None:
            return self.holds.get(lnm, KIND)
        kept, stale, waiting = [], [], []
        for name in restarted:
            verdict = self._verdict(name, lnm)
            if verdict == "ours":
                continue
            if verdict == "waiting":
                kept.append(name)
                waiting.append(name)
                continue
            where, _details = await self.inventory.locate(name, lnm, handle)
            if where == "absent":
                continue
            if where == "there" and self.stale_copies == "delete":
                if await self._delete_stale(name, lnm, handle):
                    continue
            kept.append(name)
            (stale if where == "there" else waiting).append(name)
        if not self.fenced(lnm):
            return None
        if not kept and self.inventory.current(lnm, handle):
            self.holds.release(lnm, KIND)
            log.warn("LNM {lnm} is back with no stale copy left: no longer fenced", lnm=lnm)
            return None
        log.warn("LNM {lnm} stays fenced: {stale} stale copies ({policy}), {waiting} VMs "
                 "in doubt", lnm=lnm, stale=len(stale), waiting=len(waiting),
                 policy=self.stale_copies)
        return self.holds.update(lnm, KIND, restarted=sorted(kept), stale=sorted(stale),
                                 waiting=sorted(waiting))

    async def _delete_stale(self, name, lnm, handle):
        """Power off and delete the stale copy of ``name`` on ``lnm``. -> True
        if it is gone."""
        rec = self.state.vms.get(name)
        # The LNM acts on what it has a record of: the current one (naming
        # the LNM the VM runs on), or, for a VM that is gone, a bare one.
        view = lnm_view(rec) if rec is not None else {"name": name, "lnm": lnm}
        try:
            await handle.receive([view])
            if await hard_off(handle, name) is not None:
                await handle.op_on("delete", name)
        except UsherError as e:
            log.error("LNM {lnm}: the stale copy of {vm} could not be removed: {error}",
                      lnm=lnm, vm=name, error=str(e))
            return False
        unmanaged = self.state.unmanaged.get(name)
        if unmanaged is not None and unmanaged.get("lnm") == lnm:
            self.state.set_unmanaged(name, lnm, None)
        log.warn("LNM {lnm}: removed the stale copy of {vm} (restarted elsewhere while "
                 "its host was fenced)", lnm=lnm, vm=name)
        return True
