"""The leadership state machine (usher.controller.leadership.Leadership) on
a task.Clock with a double of the database, and the real lock on a real
PostgreSQL (tests/pgserver.py)."""

import functools

import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from usher.controller.leadership import (ACQUIRING, ACTIVE, STANDBY, STEPPING_DOWN,
                                         Leadership, LeadershipDB, connect)


class FakeDB:
    """The lock and the term as the database keeps them, shared by the
    controllers' doubles; ``down`` makes every call fail, ``hang`` never
    answer."""

    def __init__(self, shared, name):
        self.shared, self.name = shared, name
        self.connected = False

    def try_acquire(self, name):
        if self.shared["down"]:
            raise OSError("connection refused")
        holder = self.shared["lock"]
        if holder not in (None, self.name):
            return None, self.shared["holder"]
        self.shared["lock"] = self.name
        self.shared["term"] += 1
        self.shared["holder"] = name
        return self.shared["term"], name

    def check(self, term):
        if self.shared["down"]:
            raise OSError("connection lost")
        return self.shared["term"] == term and self.shared["lock"] == self.name

    def close(self):
        if self.shared["lock"] == self.name:
            self.shared["lock"] = None


def run_now(hung):
    def run(f, *args):
        if hung and f.__name__ != "close":
            return defer.Deferred()
        return defer.maybeDeferred(f, *args)
    return run


def make(shared, name, clock, events, hung=()):
    db = FakeDB(shared, name)
    return Leadership(db, run_now(hung), name=name, clock=clock, check_interval=1.0,
                      lost_after=5.0,
                      on_active=lambda term: events.append((name, "active", term)),
                      on_standby=lambda reason: events.append((name, "standby", reason)))


def shared_db():
    return {"lock": None, "term": 0, "holder": None, "down": False}


def test_first_wins_second_stands_by_and_takes_over_with_a_higher_term():
    clock, events, db = task.Clock(), [], shared_db()
    a, b = make(db, "a", clock, events), make(db, "b", clock, events)
    a.startService()
    b.startService()
    assert (a.state, a.term) == (ACTIVE, 1)
    assert b.state == STANDBY and b.holder == "a"
    assert a.transitions == [(ACQUIRING, 0), (ACTIVE, 1)]
    # a dies: its session (and lock) ends; b wins at its next check.
    a._loop.stop()
    db["lock"] = None
    clock.advance(1.0)
    assert (b.state, b.term) == (ACTIVE, 2)
    assert events == [("a", "active", 1), ("b", "active", 2)]


def test_the_database_lost_steps_down_after_lost_after_then_retries():
    clock, events, db = task.Clock(), [], shared_db()
    a = make(db, "a", clock, events)
    a.startService()
    db["down"] = True
    clock.pump([1.0] * 5)
    assert a.state == ACTIVE
    clock.advance(1.0)
    assert a.state == STANDBY
    assert ("a", "standby", "no successful check of the database for 5 s") in events
    assert [s for s, _t in a.transitions][-2:] == [STEPPING_DOWN, STANDBY]
    assert db["lock"] is None          # its connection (and the lock) dropped
    db["down"] = False
    clock.advance(1.0)
    assert (a.state, a.term) == (ACTIVE, 2)


def test_a_check_that_hangs_counts_as_lost():
    clock, events, db = task.Clock(), [], shared_db()
    a = make(db, "a", clock, events)
    a.startService()
    a.run = run_now(hung=True)
    clock.pump([1.0] * 6)
    assert a.state == STANDBY


def test_a_newer_term_in_the_database_or_a_fenced_write_steps_down_at_once():
    clock, events, db = task.Clock(), [], shared_db()
    a = make(db, "a", clock, events)
    a.startService()
    db["term"] = 7
    clock.advance(1.0)
    assert a.state == STANDBY
    db["lock"] = None
    db["term"] = 7
    clock.advance(1.0)
    assert (a.state, a.term) == (ACTIVE, 8)
    a.fenced("stale")
    assert a.state == STANDBY
    assert events[-1] == ("a", "standby", "a state write was refused: stale")


# -- the real lock ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_real_postgres_leadership_moves_when_the_leader_closes(postgres, pool):
    dsn = postgres.create_database("leadership_real")
    run = functools.partial(threads.deferToThreadPool, reactor, pool)
    events = []
    leaders = [Leadership(LeadershipDB(lambda: connect(dsn)), run, name=n, clock=reactor,
                          check_interval=0.2, lost_after=5.0,
                          on_active=lambda t, n=n: events.append((n, t)))
               for n in ("a", "b")]
    leaders[0].startService()
    while not leaders[0].active:
        await task.deferLater(reactor, 0.05, lambda: None)
    leaders[1].startService()
    for _ in range(100):
        if leaders[1].holder == "a":
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    assert leaders[1].holder == "a" and not leaders[1].active
    await leaders[0].stopService()
    for _ in range(100):
        if leaders[1].active:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    assert events == [("a", 1), ("b", 2)]
    await leaders[1].stopService()
