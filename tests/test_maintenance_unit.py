"""usher.controller.maintenance with in-memory doubles and task.Clock: the
bound on moves at once, counts while under way, the wait for a migration
cut short, the hold's details and the plugin API."""

import pytest_twisted
from twisted.internet import defer, task

from usher import states
from usher.controller.core import Controller
from usher.controller.state import LNMInfo


class Migrations:
    """migrate(...) answers when the test says."""

    def __init__(self):
        self.pending = {}

    def migrate(self, user, admin, selection, lnms=(), args=None):
        (name,) = selection.names
        d = self.pending[name] = defer.Deferred()
        return d

    def answer(self, name, to=None, error=None):
        d = self.pending.pop(name)
        if error is None:
            d.callback({"migrated": [{"name": name, "from": "lnm1", "to": to}],
                        "failed": [], "notes": []})
        else:
            d.callback({"migrated": [], "failed": [{"name": name, "error": error}],
                        "notes": ["a note"]})


def controller_with(vms):
    clock = task.Clock()
    c = Controller(domain="usher.test", clock=clock)
    for lnm in ("lnm1", "lnm2"):
        c.state.lnms[lnm] = LNMInfo(lnm, {"cpus": 8, "memory_mib": 8192}, handle=object())
    for name, state in vms:
        c.state.add(c.state.new_record(name, state=state, lnm="lnm1", owner="alice",
                                       cluster="x"))
    fake = Migrations()
    c.maintenance.migrations = fake
    return c, clock, fake


@pytest_twisted.ensureDeferred
async def test_moves_run_at_most_concurrency_at_once_and_progress_counts():
    vms = [(f"vm{i}.x.alice.usher.test", states.RUN) for i in range(5)]
    c, clock, fake = controller_with(vms + [("off.x.alice.usher.test", states.SHUTOFF)])
    clock.advance(1000)
    status = await c.api.set_maintenance("lnm1", True, reason="r", evacuate=True,
                                         concurrency=2)
    assert status["maintenance"] and status["since"] == 1000 and status["by"] == "usher"
    assert status["total"] == 6 and len(status["running"]) == 2 and status["waiting"] == 3
    assert status["failed"] == [{"name": "off.x.alice.usher.test", "error":
                                 "cannot migrate a VM that is shutoff (start it elsewhere, "
                                 "or delete it)", "code": "wrong_state"}]
    assert len(fake.pending) == 2
    first = sorted(fake.pending)[0]
    fake.answer(first, to="lnm2")
    assert len(fake.pending) == 2          # the freed slot is taken at once
    for name in sorted(fake.pending):
        fake.answer(name, error="no room")
    while fake.pending:
        fake.answer(sorted(fake.pending)[0], to="lnm2")
    status = c.maintenance.status("lnm1")
    assert status["done"] and not status["evacuating"] and status["running"] == []
    assert len(status["moved"]) == 3 and len(status["failed"]) == 3
    assert {f["error"] for f in status["failed"]} >= {"no room (a note)"}
    hold = c.holds.get("lnm1", "maintenance")
    assert hold == {"reason": "r", "by": "usher", "since": 1000, "evacuate": False,
                    "concurrency": 2, "evacuated": {"moved": 3, "failed": 3}}


@pytest_twisted.ensureDeferred
async def test_an_evacuation_waits_for_a_migration_cut_short_to_settle():
    c, clock, fake = controller_with([])
    c.inflight.keep_export("back.x.alice.usher.test", "lnm1", "lnm2")
    status = await c.maintenance.set("lnm1", True, by="root", evacuate=True)
    assert status["evacuating"] and status["total"] == 0
    clock.advance(5)
    assert not c.maintenance.status("lnm1")["done"]
    # The export is put back: the VM is on lnm1 again, and moves.
    c.state.add(c.state.new_record("back.x.alice.usher.test", state=states.RUN, lnm="lnm1",
                                   owner="alice", cluster="x"))
    c.inflight.export_settled("back.x.alice.usher.test")
    clock.advance(0.5)
    fake.answer("back.x.alice.usher.test", to="lnm2")
    status = c.maintenance.status("lnm1")
    assert status["done"] and status["moved"] == [{"name": "back.x.alice.usher.test",
                                                   "to": "lnm2"}]


@pytest_twisted.ensureDeferred
async def test_an_evacuation_of_a_disconnected_lnm_waits_for_it():
    c, clock, fake = controller_with([("a.x.alice.usher.test", states.RUN)])
    handle = c.state.lnms["lnm1"].handle
    c.state.lnms["lnm1"].connected = False
    status = await c.maintenance.set("lnm1", True, by="root", evacuate=True)
    assert status["evacuating"] and not fake.pending
    c.state.lnms["lnm1"].connected = True
    c.maintenance.lnm_attached("lnm1", handle)
    assert list(fake.pending) == ["a.x.alice.usher.test"]
    fake.answer("a.x.alice.usher.test", to="lnm2")
    assert c.maintenance.status("lnm1")["done"]
