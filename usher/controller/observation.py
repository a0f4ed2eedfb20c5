"""What one LNM's word about one domain does to the global state (its
inventory, its reports): the VM's record follows it, or the VM is adopted
(recovery), listed as unmanaged, quarantined, or complained of.

An LNM host may be compromised (README "Security"): a VM changes host only
by a migration the controller drove, a managed name nobody started there is
quarantined (listed for administrators, not given to its owner), and only
the first inventory an LNM known before a restart hands over vouches for
the managed VMs on it (``trust``). Every complaint is one "error" event per
VM for plugins and one log line per kind and report.
"""

from twisted.logger import Logger

from usher import states
from usher.controller.events import Event
from usher.controller.state import ORIGIN_LNM
from usher.naming import split

log = Logger()

_COMPLAINTS = {
    "duplicate_vm": "reported VMs the controller has on another LNM (a VM changes "
                    "host only by migration; kept where they are)",
    "vm_quarantined": "reported VMs with managed names that the controller did not "
                      "start there and has no record of (quarantined: listed for "
                      "administrators, not given to their owners)",
    "foreign_export": "listed exports of VMs it does not hold (ignored)",
    "unmanaged_limit": "reported VMs beyond lnm_max_unmanaged (not listed)",
}


class Observation:
    """Takes what LNMs report of their domains."""

    def __init__(self, *, domain, state, chains, api, ledger, lnm_limits, recovering,
                 resolve_soon):
        self.domain = domain
        self.state = state
        self.chains = chains
        self.api = api
        self.ledger = ledger
        self.lnm_limits = lnm_limits
        self._recovering = recovering
        self._resolve_soon = resolve_soon
        self._trusted = {}           # LNM -> managed names its recovery inventory vouches for

    # -- trust (recovery) -----------------------------------------------------------

    def trust(self, lnm, domains):
        """The first inventory of ``lnm`` after a restart vouches for the
        managed VMs on it whose metadata names the owner their name does."""
        names = set()
        for dom in domains[:self.lnm_limits.max_vms]:
            parts = split(dom["name"], self.domain)
            meta = dom.get("metadata")
            if parts is not None and isinstance(meta, dict) and meta.get("owner") == parts[1]:
                names.add(dom["name"])
        if names:
            self._trusted[lnm] = names

    def keep_trusting_unsettled(self, lnm):
        """After a trusted inventory: what is still trusted are the VMs whose
        end is still to come (busy, kept exports); the rest is settled
        (adopted, or not)."""
        unsettled = {name for name in self._trusted.get(lnm, ())
                     if self.ledger.unsettled_on(name, lnm)}
        if unsettled:
            self._trusted[lnm] = unsettled
        else:
            self._trusted.pop(lnm, None)

    def forget(self, lnm):
        self._trusted.pop(lnm, None)

    def _trusted_name(self, lnm, name):
        return name in self._trusted.get(lnm, ())

    def _untrust(self, lnm, name):
        names = self._trusted.get(lnm)
        if names is not None:
            names.discard(name)
            if not names:
                del self._trusted[lnm]

    def _known_stale(self, lnm, name):
        """(issue 15, part B) Is this the copy a fenced LNM still has of a VM
        restarted elsewhere? Expected, and deleted or listed by the
        fencing's policy: no complaint (it would say "kept where they are")."""
        holds = self.state.holds
        fenced = holds.get(lnm, "fenced") if holds is not None else None
        return bool(fenced) and name in fenced.get("restarted", ())

    # -- complaints ------------------------------------------------------------------

    def _complain(self, complaints, kind, lnm, name, **details):
        """A VM an LNM reported that the controller will not take as it
        says: one "error" event per VM for plugins, one log line per kind
        and report (``complained``)."""
        if complaints is not None:
            complaints.setdefault(kind, []).append(name)
        self.chains.notify(Event("error", self.api, kind=kind, lnm=lnm, vm_name=name,
                                 **details))

    def complained(self, lnm, complaints):
        for kind, names in sorted(complaints.items()):
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more"
                                            if len(names) > 3 else "")
            log.error("LNM {lnm}: {count} {what}: {names}", lnm=lnm, count=len(names),
                      what=_COMPLAINTS.get(kind, kind), names=shown)

    # -- one domain -------------------------------------------------------------------

    def on_lnm(self, lnm, rec):
        """Is ``rec`` a VM the controller has on ``lnm`` (or is moving there)?
        Only those are acknowledged to it."""
        return rec["lnm"] == lnm or self.state.incoming.get(rec["name"]) == lnm

    def absent(self, lnm, rec):
        """``lnm``, which holds ``rec``, does not have the VM: a start whose
        answer never came never started (the VM never was); otherwise the
        VM is missing."""
        name = rec["name"]
        if self.ledger.unanswered_start_on(name, lnm):
            self.ledger.start_settled(name)
            log.info("VM {vm} never started on LNM {lnm} (its start was interrupted); "
                     "removing it", vm=name, lnm=lnm)
            self.state.remove(name)
        else:
            self.mark_missing(rec)

    def mark_missing(self, rec):
        if rec["state"] != states.MISSING:
            self.state.update(rec["name"], state=states.MISSING)
            self.chains.notify(Event("vm_missing", self.api, vm=dict(rec)))

    def observe(self, lnm, dom, complaints=None):
        """What ``lnm`` reports of one domain (validated: usher.controller.
        lnm_input) -> the record of the VM when it is this LNM's, else None."""
        ledger = self.ledger
        name = dom["name"]
        rec = self.state.vms.get(name)
        if dom.get("retained"):
            # An export the LNM keeps for us: the VM is in the middle of a
            # migration that was cut short (see LNMInventory.resolve_soon).
            # Only the LNM the controller exported it from, or (recovery)
            # one whose inventory vouches for it, may hold one.
            entry = ledger.kept_export(name)
            if entry is None and ((rec is not None and rec["lnm"] == lnm)
                                  or self._trusted_name(lnm, name)):
                entry = ledger.keep_export(name, lnm, None)
            if entry is None or entry["source"] != lnm:
                self._complain(complaints, "foreign_export", lnm, name)
                return None
            return rec if rec is not None and self.on_lnm(lnm, rec) else None
        if (rec is not None and rec["lnm"] != lnm and self.state.incoming.get(name) != lnm
                and not ledger.may_land(name, lnm)):
            if self._known_stale(lnm, name):
                return None     # the fencing's to settle (usher.controller.fencing)
            if dom.get("state") is not None or dom.get("busy"):
                self._complain(complaints, "duplicate_vm", lnm, name, other=rec["lnm"],
                               vm=dict(rec))
            return None
        if dom.get("busy"):
            # A command from before this connection is still running on it:
            # its end is reported; nothing about the VM is settled until then.
            ledger.listed_busy(name, lnm)
            return rec
        if ledger.busy_on(name, lnm):
            ledger.busy_listing_ended(name)
            self._resolve_soon()
        state = dom.get("state")
        if state is not None and state not in states.ALL_STATES:
            state = states.UNKNOWN
        parts = split(name, self.domain)
        if parts is None:
            self._observe_stranger(lnm, dom, state, complaints)
            return None
        if ledger.is_busy(name):
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
            if rec["lnm"] == lnm:
                self.absent(lnm, rec)
            return rec
        if ledger.unanswered_start_on(name, lnm):
            ledger.start_settled(name)
        if ledger.move_settled(name) is not None and rec["lnm"] != lnm:
            log.info("VM {vm} found on LNM {lnm} after a migration whose outcome was "
                     "unknown", vm=name, lnm=lnm)
        # (vm_state_changed fires from the state's listener: Controller.)
        self.state.update(name, state=state, lnm=lnm, uuid=dom.get("uuid"),
                          origin=ORIGIN_LNM)
        return rec

    def _adopt(self, lnm, dom, state):
        """Recovery: a managed VM the LNM's trusted inventory vouches for."""
        name = dom["name"]
        meta = dom.get("metadata") or {}
        rec = self.state.new_record(name, state=state, lnm=lnm,
                                    cluster=meta.get("cluster"),
                                    memory_mib=dom.get("memory_mib"),
                                    vcpus=dom.get("vcpus"), uuid=dom.get("uuid"))
        self.state.add(rec)
        # After a restart every VM comes back this way: one line each for
        # thousands of VMs would say nothing the LNMs' attach lines do not
        # (and a line costs even when debug is filtered out).
        if not self._recovering():
            log.info("adopted VM {vm} found on {lnm}", vm=name, lnm=lnm)
        self.chains.notify(Event("vm_adopted", self.api, vm=dict(rec), lnm=lnm))
        return rec

    def _observe_stranger(self, lnm, dom, state, complaints, quarantine=None):
        """A VM Usher does not manage, or (``quarantine``: why) one with a
        managed name that is not given to its owner: listed as unmanaged on
        its LNM, at most ``lnm_max_unmanaged`` per LNM, first LNM first."""
        name = dom["name"]
        known = self.state.unmanaged.get(name)
        if known is not None and known["lnm"] != lnm:
            if state is not None:
                self._complain(complaints, "duplicate_vm", lnm, name, other=known["lnm"])
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
