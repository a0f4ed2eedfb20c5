"""The SQL plugin's database thread: a database that is down fails calls
cleanly and queues log writes (bounded), retried with back-off and caught
up in order when it is back; a call that takes too long is abandoned. A
fake store, synchronous "threads" and task.Clock."""

import pytest
from twisted.internet import defer, task

from usher.plugins.sql.store import DatabaseUnavailable, Store
from usher.plugins.sql.worker import DatabaseWorker


class FlakyStore:
    """A real SQLite store that can be "down"."""

    def __init__(self):
        self.real = Store.open("sqlite:///:memory:")
        self.real.run(lambda tx: tx.execute("CREATE TABLE notes (n INTEGER)"))
        self.down = False
        self.opened = 0

    def run(self, function, *args, **kwargs):
        if self.down:
            raise DatabaseUnavailable("connection refused")
        return self.real.run(function, *args, **kwargs)

    def close(self):
        pass

    def notes(self):
        return [n for (n,) in self.real.run(lambda tx: tx.query(
            "SELECT n FROM notes ORDER BY rowid"))]


def note(tx, n):
    tx.execute("INSERT INTO notes (n) VALUES (?)", (n,))


def count(tx):
    return tx.query("SELECT COUNT(*) FROM notes")[0][0]


def synchronous(function, *args):
    return defer.maybeDeferred(function, *args)


@pytest.fixture
def flaky():
    return FlakyStore()


def make_worker(flaky, clock, **options):
    def open_store():
        flaky.opened += 1
        return flaky
    return DatabaseWorker(open_store, reactor=None, clock=clock, run_in_thread=synchronous,
                          **options)


def result_of(d):
    outcome = []
    d.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    return outcome[0]


def test_a_call_while_the_database_is_down_fails_cleanly(flaky):
    clock = task.Clock()
    worker = make_worker(flaky, clock)
    flaky.down = True
    failure = result_of(worker.call(count))
    assert failure.check(DatabaseUnavailable) and "connection refused" in str(failure.value)
    assert worker.healthy is False
    flaky.down = False
    assert result_of(worker.call(count)) == 0
    assert worker.healthy is True


def test_log_writes_queue_while_down_and_catch_up_in_order(flaky):
    clock = task.Clock()
    worker = make_worker(flaky, clock, retry_initial=1.0, retry_max=4.0)
    worker.enqueue_log(note, 1)
    assert flaky.notes() == [1]
    flaky.down = True
    for n in (2, 3, 4):
        worker.enqueue_log(note, n)
    assert worker.queued == 3 and worker.healthy is False
    # Back-off: 1, 2, 4, 4 ... seconds between tries.
    clock.advance(1)
    clock.advance(2)
    assert worker.queued == 3
    flaky.down = False
    clock.advance(3.9)
    assert flaky.notes() == [1]
    clock.advance(0.1)
    assert flaky.notes() == [1, 2, 3, 4]
    assert worker.queued == 0 and worker.healthy is True
    assert result_of(worker.flushed()) is None


def test_the_queue_is_bounded_and_drops_the_oldest(flaky):
    clock = task.Clock()
    worker = make_worker(flaky, clock, max_queue=3)
    flaky.down = True
    for n in range(1, 6):
        worker.enqueue_log(note, n)
    assert worker.queued == 3 and worker.dropped == 2
    flaky.down = False
    clock.advance(60)
    assert flaky.notes() == [3, 4, 5]


def test_a_call_writes_the_queue_first(flaky):
    clock = task.Clock()
    worker = make_worker(flaky, clock)
    flaky.down = True
    worker.enqueue_log(note, 1)
    worker.enqueue_log(note, 2)
    flaky.down = False
    # Before the retry is due, a call sees both writes.
    assert result_of(worker.call(count)) == 2
    assert flaky.notes() == [1, 2] and worker.queued == 0
    clock.advance(60)
    assert flaky.notes() == [1, 2]


def test_an_entry_that_cannot_be_written_is_dropped_and_the_rest_written(flaky):
    clock = task.Clock()
    worker = make_worker(flaky, clock)
    flaky.down = True
    worker.enqueue_log(note, 1)
    worker.enqueue_log(lambda tx: tx.execute("INSERT INTO nowhere VALUES (1)"))
    worker.enqueue_log(note, 3)
    flaky.down = False
    clock.advance(1)
    assert flaky.notes() == [1, 3]
    assert worker.queued == 0


def test_a_call_too_slow_is_abandoned_and_undone_if_it_came_late(flaky):
    clock = task.Clock()
    pending = []

    def later(function, *args):
        d = defer.Deferred()
        pending.append((d, function, args))
        return d
    worker = DatabaseWorker(lambda: flaky, reactor=None, clock=clock, run_in_thread=later,
                            call_timeout=5.0)
    undone = []
    d = worker.call(note, 1, on_late=undone.append)
    clock.advance(5)
    failure = result_of(d)
    assert failure.check(DatabaseUnavailable) and "no answer in 5 s" in str(failure.value)
    # The thread gets to it only now: abandoned, rolled back.
    waiting, function, args = pending.pop()
    try:
        outcome = function(*args)
    except Exception as e:
        waiting.errback(e)
    else:
        waiting.callback(outcome)
    assert flaky.notes() == [] and undone == []


def test_a_late_answer_is_given_to_on_late(flaky):
    clock = task.Clock()
    pending = []

    def later(function, *args):
        d = defer.Deferred()
        pending.append(d)
        return d
    worker = DatabaseWorker(lambda: flaky, reactor=None, clock=clock, run_in_thread=later,
                            call_timeout=5.0)
    undone = []
    d = worker.call(count, on_late=undone.append)
    clock.advance(5)
    assert result_of(d).check(DatabaseUnavailable)
    # It had committed just before the caller gave up.
    pending.pop().callback(("the result", []))
    assert undone == ["the result"]
