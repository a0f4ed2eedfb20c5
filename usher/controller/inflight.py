"""The controller's in-flight ledger: what is under way on VMs and not
settled yet.

Failures (paper, "Failures"; README "Failures and recovery") leave VMs whose
fate the controller does not know for a while: a start whose answer never
came, an export a source keeps after a migration was cut short, a VM an LNM
listed busy with a command from before its connection. The rooms of the
controller (``starting``, ``operations``, ``migration``, ``inventory``) note
these here and ask about them by what they mean; nothing else holds them.
Plain Python, no I/O.
"""

import contextlib

from usher.errors import InvalidRequest


class InFlight:
    """Per VM name: the command in flight, the start request that reserved
    the name, the start never answered, the export kept, the LNM that listed
    it busy, the settling under way, the migration whose outcome is unknown."""

    def __init__(self):
        self._commands = {}          # VM name -> what is in flight ("start", "pause" ...)
        self._reserved = set()       # names reserved by start requests in flight
        self._unanswered_starts = {} # VM name -> LNM: start sent, answer never came
        self._kept_exports = {}      # VM name -> {"source", "target"}: kept exports
        self._in_flux = {}           # VM name -> LNM: listed busy, its end not heard yet
        self._settling = set()       # kept exports being released or restored
        self._unsettled_moves = {}   # VM name -> target LNM: migration outcome unknown

    # -- commands in flight ----------------------------------------------------

    def command_on(self, name):
        """What is in flight on ``name`` ("start", "migrate", an operation), or None."""
        return self._commands.get(name)

    def is_busy(self, name):
        return name in self._commands

    @contextlib.contextmanager
    def commanding(self, names, what):
        """``names`` are busy with ``what`` for the block."""
        for name in names:
            self._commands[name] = what
        try:
            yield
        finally:
            for name in names:
                self._commands.pop(name, None)

    # -- names reserved by start requests ------------------------------------------

    @contextlib.contextmanager
    def reserving(self, names):
        """Reserve new VM names for the block (until their records are in
        the state): two concurrent requests never pick the same names."""
        clash = [n for n in names if n in self._reserved]
        if clash:
            raise InvalidRequest(f"{clash[0]} is already being started")
        self._reserved.update(names)
        try:
            yield
        finally:
            self._reserved.difference_update(names)

    def is_reserved(self, name):
        return name in self._reserved

    def reserved_names(self):
        return set(self._reserved)

    # -- starts whose answer never came ---------------------------------------------

    def start_unanswered(self, name, lnm):
        self._unanswered_starts[name] = lnm

    def unanswered_start_on(self, name, lnm):
        """Was a start of ``name`` sent to ``lnm`` and never answered?"""
        return self._unanswered_starts.get(name) == lnm

    def start_settled(self, name):
        """The LNM has shown what became of an unanswered start (or the VM is gone)."""
        self._unanswered_starts.pop(name, None)

    # -- exports kept after a migration cut short -----------------------------------

    def keep_export(self, name, source, target):
        """``source`` keeps the export of ``name`` until the VM is found
        (on ``target``, or nowhere). -> the entry."""
        entry = self._kept_exports[name] = {"source": source, "target": target}
        return entry

    def kept_export(self, name):
        """-> {"source", "target"} of the export kept of ``name``, or None."""
        return self._kept_exports.get(name)

    def export_settled(self, name):
        self._kept_exports.pop(name, None)

    def kept_exports(self):
        """The names with a kept export, sorted."""
        return sorted(self._kept_exports)

    def has_kept_exports(self):
        return bool(self._kept_exports)

    @contextlib.contextmanager
    def settling(self, name):
        """The kept export of ``name`` is being released or restored."""
        self._settling.add(name)
        try:
            yield
        finally:
            self._settling.discard(name)

    def may_settle(self, name):
        """Is nothing under way on ``name`` that a kept export's settling
        would race with (a command, an earlier settling, a busy listing)?"""
        return not (name in self._settling or name in self._commands
                    or name in self._in_flux)

    # -- VMs an LNM listed busy ----------------------------------------------------

    def listed_busy(self, name, lnm):
        """``lnm`` runs a command on ``name`` from before this connection."""
        self._in_flux[name] = lnm

    def busy_on(self, name, lnm):
        return self._in_flux.get(name) == lnm

    def busy_listing_ended(self, name):
        self._in_flux.pop(name, None)

    def lnm_gone(self, lnm):
        """``lnm`` disconnected: what it listed busy will be listed again."""
        for name in [n for n, where in self._in_flux.items() if where == lnm]:
            del self._in_flux[name]

    def unsettled_on(self, name, lnm):
        """Is the end of ``name`` on ``lnm`` still to come (listed busy
        there, or an export kept there)?"""
        return (self.busy_on(name, lnm)
                or (self._kept_exports.get(name) or {}).get("source") == lnm)

    # -- migrations whose outcome is unknown -----------------------------------------

    def move_unsettled(self, name, target):
        """A migration of ``name`` to ``target`` ended without an answer: it
        may yet be found there."""
        self._unsettled_moves[name] = target

    def move_settled(self, name):
        """-> the target of an unsettled migration of ``name`` (None if there was none)."""
        return self._unsettled_moves.pop(name, None)

    def may_land(self, name, lnm):
        """May ``name`` show up on ``lnm`` though the controller has it
        elsewhere? Only as the target of a migration the controller drove,
        whose outcome it does not know."""
        return (self._unsettled_moves.get(name) == lnm
                or (self._kept_exports.get(name) or {}).get("target") == lnm)
