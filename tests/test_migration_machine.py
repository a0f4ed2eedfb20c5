"""One VM's move as a state machine (usher.controller.migration.Move), each
path to its MoveOutcome, against scripted LNM handles."""

import pytest
import pytest_twisted

from usher import states
from usher.controller.inflight import InFlight
from usher.controller.migration import Move, MoveOutcome
from usher.controller.state import GlobalState, LNMInfo
from usher.errors import LinkFailure, NoSuchVM, OperationFailed

VM = "1.web.alice.usher.test"
DETAILS = {"name": VM, "state": states.RUN}


class Script:
    """A handle whose commands answer from ``answers`` (an exception is raised)."""

    def __init__(self, **answers):
        self.answers = answers
        self.calls = []

    def __getattr__(self, method):
        async def command(*args):
            self.calls.append(method)
            answer = self.answers.get(method)
            if isinstance(answer, Exception):
                raise answer
            return answer
        return command


class Inventory:
    """Where the VM is, as each LNM would answer get_details."""

    def __init__(self, src, dst, live=False, where=None):
        self.state = GlobalState("usher.test")
        info = {"live_migration": live, "migration_uri": "qemu+tls://dst/system"}
        self.state.lnms["src"] = LNMInfo("src", dict(info), src)
        self.state.lnms["dst"] = LNMInfo("dst", dict(info), dst)
        self.where = where or {}
        self.resynchronized = []

    def resynchronize(self, lnm, handle, why):
        # (Once: it drops the connection, a second call finds it gone.)
        if lnm not in self.resynchronized:
            self.resynchronized.append(lnm)

    async def locate(self, name, lnm, handle):
        where = self.where.get(lnm, "unknown")
        return where, (DETAILS if where == "there" else None)


def move(inventory, ledger=None):
    rec = {"name": VM, "lnm": "src", "state": states.RUN}
    return Move(inventory, ledger or InFlight(), rec, states.RUN, "dst").run()


@pytest.mark.parametrize("src, dst, where, outcome, resynchronized", [
    # live
    (Script(), Script(), {"dst": "there"}, MoveOutcome.MOVED, []),
    (Script(migrate=OperationFailed("no")), Script(), {"dst": "absent", "src": "there"},
     MoveOutcome.STAYED, []),
    (Script(migrate=LinkFailure("lost")), Script(), {"dst": "absent", "src": "absent"},
     MoveOutcome.UNKNOWN, ["src"]),
    (Script(), Script(), {"dst": "absent", "src": "absent"}, MoveOutcome.UNKNOWN, ["src"]),
])
@pytest_twisted.ensureDeferred
async def test_live_moves(src, dst, where, outcome, resynchronized):
    inventory = Inventory(src, dst, live=True, where=where)
    got, info, _error = await move(inventory)
    assert got is outcome
    assert (info is not None) == (outcome in (MoveOutcome.MOVED, MoveOutcome.STAYED))
    assert inventory.resynchronized == resynchronized


@pytest.mark.parametrize("src, dst, where, outcome, kept, resynchronized", [
    (Script(export_image={}), Script(import_image=DETAILS), {}, MoveOutcome.MOVED,
     False, []),
    # The source could not be told to forget its export: kept, released later.
    (Script(export_image={}, release_export=LinkFailure("lost")),
     Script(import_image=DETAILS), {}, MoveOutcome.MOVED, True, []),
    (Script(export_image=OperationFailed("no")), Script(), {"src": "there"},
     MoveOutcome.STAYED, False, []),
    (Script(export_image=OperationFailed("no")), Script(), {"src": "absent"},
     MoveOutcome.MISSING, False, []),
    (Script(export_image={}), Script(import_image=LinkFailure("lost")), {},
     MoveOutcome.UNKNOWN, True, ["dst"]),
    (Script(export_image={}, restore_export=DETAILS),
     Script(import_image=OperationFailed("no")), {"dst": "absent"},
     MoveOutcome.STAYED, False, []),
    (Script(export_image={}), Script(import_image=OperationFailed("no")),
     {"dst": "there"}, MoveOutcome.MOVED, False, []),
    (Script(export_image={}), Script(import_image=OperationFailed("no")),
     {"dst": "unknown"}, MoveOutcome.UNKNOWN, True, ["dst"]),
    (Script(export_image={}, restore_export=NoSuchVM("gone")),
     Script(import_image=OperationFailed("no")), {"dst": "absent"},
     MoveOutcome.UNKNOWN, True, ["src"]),
])
@pytest_twisted.ensureDeferred
async def test_cold_moves(src, dst, where, outcome, kept, resynchronized):
    inventory = Inventory(src, dst, where=where)
    ledger = InFlight()
    got, _info, error = await move(inventory, ledger)
    assert got is outcome
    assert (ledger.kept_export(VM) is not None) == kept
    assert inventory.resynchronized == resynchronized
    assert (error is None) == (outcome is MoveOutcome.MOVED)


@pytest_twisted.ensureDeferred
async def test_a_move_with_a_handle_gone_stays_and_sends_nothing():
    src = Script()
    inventory = Inventory(src, None)
    got, info, error = await move(inventory)
    assert (got, info) == (MoveOutcome.STAYED, None)
    assert isinstance(error, LinkFailure) and not error.sent and src.calls == []


@pytest_twisted.ensureDeferred
async def test_an_unexpected_error_in_a_step_ends_the_move_with_it():
    inventory = Inventory(Script(export_image=RuntimeError("bug")), Script())
    with pytest.raises(RuntimeError, match="bug"):
        await move(inventory)
