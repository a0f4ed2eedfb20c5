"""Maintenance mode and evacuation of an LNM (issue 15, part A).

An administrator puts an LNM into maintenance: the hold ``maintenance``
(``usher.controller.holds``) keeps placement (every placement plugin, the
rebalancer's targets) off it, and the rebalancer moves nothing off it
either. An evacuation live-migrates every VM off the LNM through the
controller's ``migrate`` as the system (``"usher"``, an administrator), so
``migrate_request`` plugins and placement (affinity included) choose each
target; at most ``concurrency`` moves run at once, each VM on its own (one
that fails or hangs never holds the others back beyond its slot). A VM that
cannot move (shut off, hibernated, busy, no host with room, a failed
migration) is reported with why and not retried in the same pass.

The hold's details say whether an evacuation was asked for and has not
finished (``evacuate: true``): a controller restarted meanwhile resumes it
once the LNM has attached again and recovery has settled. Progress is kept
in memory (``status``); the hold keeps only the counts of the last pass.
"""

from twisted.internet import defer, task
from twisted.logger import Logger

from usher import errors as codes, states
from usher.controller.commands import failed_entry
from usher.errors import InvalidRequest, NoSuchLNM, NoSuchVM, UsherError
from usher.vmset import Selection

log = Logger()

KIND = "maintenance"
DEFAULT_CONCURRENCY = 4
MAX_CONCURRENCY = 64
MAX_REASON = 200
MOVABLE = (states.RUN, states.PAUSED)
# How long an evacuation waits, polling, for the VMs of migrations cut short
# (by a controller restart) to be settled: put back on the LNM or found
# elsewhere (usher.controller.inventory's kept exports).
SETTLE_PATIENCE = 60.0
SETTLE_POLL = 0.5
# The system's identity for the migrations it asks for (as api.migrate).
SYSTEM = "usher"


def check_concurrency(concurrency):
    if concurrency is None:
        return None
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not (
            1 <= concurrency <= MAX_CONCURRENCY):
        raise InvalidRequest(f"concurrency must be a whole number from 1 to {MAX_CONCURRENCY}")
    return concurrency


def check_reason(reason):
    if reason is None:
        return None
    if not isinstance(reason, str):
        raise InvalidRequest("the reason must be a string")
    reason = " ".join(reason.split())
    if len(reason) > MAX_REASON:
        raise InvalidRequest(f"the reason is too long (at most {MAX_REASON} characters)")
    return reason or None


class Evacuation:
    """One pass over the VMs of an LNM: every VM that was on it when the
    pass began is moved, or listed as failed with why."""

    def __init__(self, lnm, concurrency):
        self.lnm = lnm
        self.concurrency = concurrency
        self.total = 0
        self.moved = []            # {"name", "to"}
        self.failed = []           # {"name", "error"}
        self.running = set()
        self.waiting = []          # names not started yet
        self.started = False       # the VMs have been counted
        self.stopped = False       # maintenance left: start no more
        # Asked again while stopped with moves still running: the concurrency
        # (or 0: the default) of the pass to begin once this one is over.
        self.again = None
        self.done = False
        self.peak = 0              # the most moves under way at once
        self._waiters = []

    def to_wire(self):
        return {"evacuating": not self.done, "done": self.done, "total": self.total,
                "moved": sorted(self.moved, key=lambda m: m["name"]),
                "failed": sorted(self.failed, key=lambda f: f["name"]),
                "running": sorted(self.running), "waiting": len(self.waiting),
                "concurrency": self.concurrency, "stopped": self.stopped}

    def wait(self):
        if self.done:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def finish(self):
        self.done = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


class Maintenance:
    """``controller.maintenance``: the maintenance holds and the evacuations."""

    def __init__(self, *, state, holds, inventory, migrations, clock, settled,
                 concurrency=DEFAULT_CONCURRENCY):
        self.state = state
        self.holds = holds
        self.inventory = inventory
        self.migrations = migrations
        self.clock = clock
        self._settled = settled
        self.concurrency = check_concurrency(concurrency) or DEFAULT_CONCURRENCY
        self.evacuations = {}      # LNM -> its last Evacuation
        self._attach_waiters = {}  # LNM -> [Deferred] fired when it attaches
        inventory.watch(self)

    # -- the LNMs coming and going (inventory watcher) ------------------------------

    def lnm_attached(self, name, handle):
        for d in self._attach_waiters.pop(name, ()):
            d.callback(None)
        details = self.holds.get(name, KIND)
        evacuation = self.evacuations.get(name)
        if details and details.get("evacuate") and (evacuation is None or evacuation.done):
            # Asked for before a restart (or before it went away) and not
            # finished: go on.
            log.info("resuming the evacuation of LNM {lnm}", lnm=name)
            self._begin(name, details.get("concurrency"))

    def lnm_detached(self, name, handle):
        pass

    def _attached(self, lnm):
        if self.inventory.connected(lnm):
            return defer.succeed(None)
        d = defer.Deferred()
        self._attach_waiters.setdefault(lnm, []).append(d)
        return d

    # -- requests ---------------------------------------------------------------------

    def _check_lnm(self, lnm):
        if not isinstance(lnm, str) or not lnm or len(lnm) > 255:
            raise InvalidRequest("an LNM name must be a short string")
        known = self.inventory.known_lnms
        if lnm not in self.state.lnms and (known is None or lnm not in known.entries):
            raise NoSuchLNM(f"no such LNM: {lnm}")

    async def set(self, lnm, on, *, by, reason=None, evacuate=False, concurrency=None):
        """Put ``lnm`` into maintenance (``on``), optionally evacuating it,
        or take it out (which stops an evacuation under way: the moves
        running finish, no more start). -> ``status(lnm)``."""
        self._check_lnm(lnm)
        reason = check_reason(reason)
        concurrency = check_concurrency(concurrency)
        if not on:
            if self.holds.release(lnm, KIND):
                log.info("LNM {lnm} leaves maintenance ({by})", lnm=lnm, by=by)
            evacuation = self.evacuations.get(lnm)
            if evacuation is not None and not evacuation.done:
                evacuation.stopped = True
                evacuation.waiting.clear()
                if not evacuation.running:
                    evacuation.finish()
            return self.status(lnm)
        current = self.holds.get(lnm, KIND)
        evacuation = self.evacuations.get(lnm)
        under_way = evacuation is not None and not evacuation.done
        details = {"reason": reason if reason is not None else (current or {}).get("reason"),
                   "by": by,
                   "since": (current or {}).get("since", self.clock.seconds()),
                   "evacuate": bool(evacuate or under_way)}
        if concurrency is not None:
            details["concurrency"] = concurrency
        elif current and "concurrency" in current and details["evacuate"]:
            details["concurrency"] = current["concurrency"]
        self.holds.hold(lnm, KIND, **details)
        log.info("LNM {lnm} in maintenance ({by}): {reason}; evacuate: {evacuate}",
                 lnm=lnm, by=by, reason=details["reason"], evacuate=bool(evacuate))
        if evacuate and under_way and evacuation.stopped:
            # Stopped (maintenance left) while moves still run, and asked
            # again: a new pass once those are over (never two at once).
            evacuation.again = details.get("concurrency") or 0
        elif evacuate and not under_way:
            self._begin(lnm, details.get("concurrency"))
        return self.status(lnm)

    def status(self, lnm):
        """-> the maintenance and evacuation of ``lnm``."""
        self._check_lnm(lnm)
        details = self.holds.get(lnm, KIND)
        result = {"lnm": lnm, "maintenance": details is not None,
                  "reason": (details or {}).get("reason"),
                  "by": (details or {}).get("by"), "since": (details or {}).get("since"),
                  "evacuating": False, "done": False, "total": 0, "moved": [],
                  "failed": [], "running": [], "waiting": 0}
        evacuation = self.evacuations.get(lnm)
        if evacuation is not None:
            result.update(evacuation.to_wire())
        return result

    def wait(self, lnm):
        """-> Deferred firing when the evacuation of ``lnm`` (if any) is done."""
        evacuation = self.evacuations.get(lnm)
        return evacuation.wait() if evacuation is not None else defer.succeed(None)

    # -- evacuating -----------------------------------------------------------------------

    def _begin(self, lnm, concurrency):
        evacuation = Evacuation(lnm, concurrency or self.concurrency)
        self.evacuations[lnm] = evacuation
        d = defer.Deferred.fromCoroutine(self._evacuate(evacuation))
        d.addErrback(self._crashed, evacuation)
        return evacuation

    def _crashed(self, failure, evacuation):
        log.failure("the evacuation of LNM {lnm} failed unexpectedly", failure=failure,
                    lnm=evacuation.lnm)
        evacuation.waiting.clear()
        if not evacuation.done:
            evacuation.finish()

    async def _evacuate(self, evacuation):
        lnm = evacuation.lnm
        # After a restart the state is rebuilt from the LNMs first; a VM can
        # be moved only off an LNM that is there.
        await self._settled()
        if self._on(lnm) or self._unsettled(lnm):
            await self._attached(lnm)
        if evacuation.stopped or self.evacuations.get(lnm) is not evacuation:
            if not evacuation.done:
                evacuation.finish()
            return
        evacuation.started = True
        attempted = set()
        waited = 0.0
        while not evacuation.stopped:
            # Every VM on it not tried yet in this pass: at first all, then
            # those that came back meanwhile (a migration cut short by a
            # restart, put back on it from the export it kept).
            fresh = [name for name in self._on(lnm) if name not in attempted]
            if fresh:
                attempted.update(fresh)
                self._queue(evacuation, fresh)
                log.info("evacuating LNM {lnm}: {count} VMs, {concurrency} at a time",
                         lnm=lnm, count=len(evacuation.waiting),
                         concurrency=evacuation.concurrency)
                workers = [defer.Deferred.fromCoroutine(self._worker(evacuation))
                           for _ in range(min(evacuation.concurrency,
                                              len(evacuation.waiting)))]
                await defer.DeferredList(workers, consumeErrors=True)
                continue
            if not self._unsettled(lnm) or waited >= SETTLE_PATIENCE:
                break
            # A move cut short may yet put a VM back here: wait for it.
            await task.deferLater(self.clock, SETTLE_POLL, lambda: None)
            waited += SETTLE_POLL
        self._finished(evacuation)

    def _on(self, lnm):
        """The VMs the controller has on ``lnm``, by name."""
        lnm_info = self.state.lnms.get(lnm)
        return sorted(lnm_info.vms) if lnm_info is not None else []

    def _unsettled(self, lnm):
        """Does ``lnm`` keep the export of a migration cut short (its VM may
        come back to it)?"""
        ledger = self.inventory.ledger
        return any((ledger.kept_export(name) or {}).get("source") == lnm
                   for name in ledger.kept_exports())

    def _queue(self, evacuation, names):
        for name in names:
            rec = self.state.vms.get(name)
            if rec is None:
                continue
            evacuation.total += 1
            if rec["state"] not in MOVABLE:
                evacuation.failed.append(failed_entry(name, (
                    f"cannot migrate a VM that is {rec['state']}"
                    + (" (start it elsewhere, or delete it)" if rec["state"] in (
                        states.SHUTOFF, states.HIBERNATED) else "")), codes.WRONG_STATE))
            else:
                evacuation.waiting.append(name)

    async def _worker(self, evacuation):
        while evacuation.waiting and not evacuation.stopped:
            name = evacuation.waiting.pop(0)
            evacuation.running.add(name)
            evacuation.peak = max(evacuation.peak, len(evacuation.running))
            try:
                await self._move(evacuation, name)
            except Exception:
                log.failure("evacuating {vm} off LNM {lnm} failed unexpectedly", vm=name,
                            lnm=evacuation.lnm)
                evacuation.failed.append(failed_entry(
                    name, "internal error in the controller (see its log)", codes.INTERNAL))
            finally:
                evacuation.running.discard(name)

    async def _move(self, evacuation, name):
        try:
            result = await self.migrations.migrate(SYSTEM, True, Selection(names=[name]))
        except NoSuchVM:
            evacuation.failed.append(failed_entry(name, "removed meanwhile",
                                                  codes.NO_SUCH_VM))
            return
        except UsherError as e:
            evacuation.failed.append(failed_entry(name, e))
            return
        for moved in result.get("migrated") or ():
            if moved.get("name") == name:
                evacuation.moved.append({"name": name, "to": moved.get("to")})
                return
        mine = [f for f in result.get("failed") or () if f.get("name") == name]
        error = mine[0].get("error") if mine else "the controller did not migrate it"
        code = mine[0].get("code") if mine else codes.INTERNAL
        notes = result.get("notes") or []
        if notes:
            error += " (" + "; ".join(str(n) for n in notes[:3]) + ")"
        evacuation.failed.append(failed_entry(name, error, code))

    def _finished(self, evacuation):
        lnm = evacuation.lnm
        if evacuation.done:
            return      # stopped (maintenance left) with nothing running
        log.info("evacuation of LNM {lnm} done: {moved} moved, {failed} could not move",
                 lnm=lnm, moved=len(evacuation.moved), failed=len(evacuation.failed))
        for failed in evacuation.failed:
            log.warn("evacuation of LNM {lnm}: {vm} did not move: {error}", lnm=lnm,
                     vm=failed["name"], error=failed["error"])
        again = evacuation.again is not None and self.holds.has(lnm, KIND)
        if self.evacuations.get(lnm) is evacuation and not again:
            # Done: a restart now does not start it again (the hold stays).
            self.holds.update(lnm, KIND, evacuate=False,
                              evacuated={"moved": len(evacuation.moved),
                                         "failed": len(evacuation.failed)})
        evacuation.finish()
        if again and self.evacuations.get(lnm) is evacuation:
            self._begin(lnm, evacuation.again or None)
