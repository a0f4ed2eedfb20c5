"""Holds on hosts: why an LNM takes no new VMs for now.

A hold is a kind (``maintenance``, ``fenced``, ``powered_down`` ...) and a
small dict of JSON details (who set it, when, why, and what its owner needs
to remember, e.g. an evacuation under way or the VMs restarted elsewhere).
Mechanism only: the maintenance, fencing and power rooms and plugins set and
release holds; placement (``usher.controller.capacity.Ledger``: every
placement plugin and the rebalancer) refuses a held host with the hold's
reason, so no policy can put a VM on a host being drained, fenced or
powered down.

Holds are persisted with the LNMs the controller knows (the ``holds`` field
of the LNM's entry in ``state_dir/lnms.json``, ``usher.controller.known_lnms``)
so they survive a controller restart; forgetting an LNM forgets its holds.
Listeners hear of every change (the controller turns them into the
``lnm_hold_changed`` event).
"""

import copy
import re

from twisted.logger import Logger

from usher.errors import InvalidRequest, NoSuchLNM

log = Logger()

KIND = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")

# How each known kind reads in a refusal ("LNM x: in maintenance: ...").
DESCRIPTIONS = {
    "maintenance": "in maintenance",
    "fenced": "fenced (its VMs may be restarted elsewhere; it takes VMs again once "
              "its stale copies are removed)",
    "powered_down": "powered down",
}
# Details shown to users in a refusal, after the description.
SHOWN_DETAILS = ("reason",)


def describe(kind, details):
    text = DESCRIPTIONS.get(kind, kind.replace("_", " "))
    reason = details.get("reason") if isinstance(details, dict) else None
    if isinstance(reason, str) and reason:
        text += f": {reason[:200]}"
    return text


class HostHolds:
    """The holds on every LNM, persisted through ``known_lnms`` (a
    ``usher.controller.known_lnms.KnownLNMs``, or None: in memory only)."""

    def __init__(self, known_lnms=None):
        self.known_lnms = known_lnms
        self._holds = {}            # LNM -> {kind: details}
        self._listeners = []
        if known_lnms is not None:
            for name, entry in known_lnms.entries.items():
                holds = entry.get("holds")
                if isinstance(holds, dict):
                    kept = {k: v for k, v in holds.items()
                            if isinstance(k, str) and KIND.match(k) and isinstance(v, dict)}
                    if kept:
                        self._holds[name] = kept

    # -- listeners ----------------------------------------------------------

    def listen(self, callback):
        """``callback(lnm, kind, details)`` after each change; ``details`` is
        None when the hold was released. -> a function that stops listening."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def _tell(self, lnm, kind, details):
        for callback in list(self._listeners):
            try:
                callback(lnm, kind, copy.deepcopy(details))
            except Exception:
                log.failure("hold listener {listener!r} failed on {kind} of {lnm}",
                            listener=callback, kind=kind, lnm=lnm)

    # -- changes ------------------------------------------------------------

    def _known(self, lnm):
        if self.known_lnms is not None and lnm not in self.known_lnms.entries:
            raise NoSuchLNM(f"no LNM {lnm} is known (it must have attached once)")

    def _save(self, lnm):
        if self.known_lnms is not None and lnm in self.known_lnms.entries:
            self.known_lnms.remember(lnm, holds=copy.deepcopy(self._holds.get(lnm, {})))

    def hold(self, lnm, kind, **details):
        """Put (or replace) the hold ``kind`` on ``lnm``. -> its details."""
        if not isinstance(kind, str) or not KIND.match(kind):
            raise InvalidRequest(f"invalid hold kind {str(kind)[:40]!r}")
        self._known(lnm)
        self._holds.setdefault(lnm, {})[kind] = copy.deepcopy(details)
        self._save(lnm)
        self._tell(lnm, kind, details)
        return copy.deepcopy(details)

    def update(self, lnm, kind, **details):
        """Change some details of an existing hold. -> its details, or None
        if ``lnm`` has no such hold."""
        current = self._holds.get(lnm, {}).get(kind)
        if current is None:
            return None
        current.update(copy.deepcopy(details))
        self._save(lnm)
        self._tell(lnm, kind, current)
        return copy.deepcopy(current)

    def release(self, lnm, kind):
        """-> True if ``lnm`` had the hold ``kind`` (now gone)."""
        holds = self._holds.get(lnm)
        if not holds or kind not in holds:
            return False
        del holds[kind]
        if not holds:
            del self._holds[lnm]
        self._save(lnm)
        self._tell(lnm, kind, None)
        return True

    def forget(self, lnm):
        """The LNM was forgotten: so are its holds (no listener is told)."""
        self._holds.pop(lnm, None)

    # -- queries ------------------------------------------------------------

    def of(self, lnm):
        """-> {kind: details} of ``lnm`` (a copy; empty when it has none)."""
        return copy.deepcopy(self._holds.get(lnm, {}))

    def get(self, lnm, kind):
        details = self._holds.get(lnm, {}).get(kind)
        return copy.deepcopy(details) if details is not None else None

    def has(self, lnm, kind):
        return kind in self._holds.get(lnm, ())

    def held(self, lnm):
        return bool(self._holds.get(lnm))

    def with_kind(self, kind):
        """-> the LNMs that hold ``kind``, sorted."""
        return sorted(lnm for lnm, holds in self._holds.items() if kind in holds)

    def reason(self, lnm):
        """-> why ``lnm`` takes no new VMs (one line), or None."""
        holds = self._holds.get(lnm)
        if not holds:
            return None
        return "; ".join(describe(kind, holds[kind]) for kind in sorted(holds))

    def to_wire(self, lnm):
        """What ``list_lnm`` shows: {kind: details} with only JSON values."""
        return self.of(lnm)
