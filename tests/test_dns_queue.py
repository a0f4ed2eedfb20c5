"""The DNS plugin's update queue (usher.plugins.dns.queue) with task.Clock
and a fake sender: coalescing per name, batching, exponential backoff,
logged at the first failure and at recovery, nothing lost."""

from twisted.internet import defer, task
from twisted.logger import LogLevel

from usher.plugins.dns.queue import UpdateQueue
from usher.plugins.dns.updates import DnsUnavailable

from tests.hostile import LogCapture


class FakeSender:
    """Records each message; ``down``: each fails with DnsUnavailable;
    ``hold``: each waits until released."""

    def __init__(self):
        self.sent = []
        self.down = False
        self.hold = False
        self.waiting = []
        self.zone_state = {}     # (zone, name, rdtype, value) present

    def __call__(self, zone, changes):
        self.sent.append((zone, list(changes)))
        if self.down:
            return defer.fail(DnsUnavailable("127.0.0.1:5353: connection refused"))
        d = defer.Deferred()
        d.addCallback(lambda _: self._apply(zone, changes))
        if self.hold:
            self.waiting.append(d)
        else:
            d.callback(None)
        return d

    def _apply(self, zone, changes):
        for name, rdtype, value, wanted in changes:
            key = (zone, name, rdtype, value)
            if wanted:
                self.zone_state[key] = True
            else:
                self.zone_state.pop(key, None)

    def release(self):
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)


def make(**options):
    clock = task.Clock()
    sender = FakeSender()
    options.setdefault("retry_initial", 1.0)
    options.setdefault("retry_max", 8.0)
    return UpdateQueue(sender, clock, **options), sender, clock


class Captured(LogCapture):
    def at(self, level):
        return [e for e in self.events if e.get("log_level") == level]


def test_changes_to_a_name_in_flight_are_coalesced_into_the_next_message():
    queue, sender, _clock = make()
    sender.hold = True
    queue.put("z", "a.z", "A", "10.0.0.1", True)
    # While the first message is out, three changes to b.z: the latest wins.
    queue.put("z", "b.z", "A", "10.0.0.2", True)
    queue.put("z", "b.z", "A", "10.0.0.2", False)
    queue.put("z", "b.z", "A", "10.0.0.3", True)
    assert len(sender.sent) == 1 and queue.pending == 2
    sender.release()
    assert sender.sent[1] == ("z", [("b.z", "A", "10.0.0.2", False),
                                    ("b.z", "A", "10.0.0.3", True)])
    sender.release()
    assert queue.pending == 0 and queue.applied == 2


def test_names_of_one_zone_share_a_message_up_to_max_batch():
    queue, sender, _clock = make(max_batch=2)
    sender.hold = True
    queue.put("z", "first.z", "A", "10.0.0.9", True)
    for i in range(3):
        queue.put("z", f"n{i}.z", "A", f"10.0.0.{i}", True)
    queue.put("arpa", "1.0.0.10.in-addr.arpa", "PTR", "n1.z", True)
    sender.release()
    assert [zone for zone, _ in sender.sent] == ["z", "z"]
    assert [c[0] for c in sender.sent[1][1]] == ["n0.z", "n1.z"]
    sender.release()
    sender.release()
    assert [zone for zone, _ in sender.sent] == ["z", "z", "z", "arpa"]
    sender.release()
    assert queue.pending == 0


def test_a_server_down_is_retried_with_exponential_backoff_and_nothing_is_lost():
    queue, sender, clock = make(retry_initial=1.0, retry_max=8.0)
    sender.down = True
    with Captured() as log:
        queue.put("z", "a.z", "A", "10.0.0.1", True)
        assert queue.failures == 1 and queue.failing_since == 0
        attempts_at = [0.0]
        for _ in range(6):
            before = len(sender.sent)
            # New changes while failing wait for the next attempt (no hammering).
            queue.put("z", "b.z", "A", "10.0.0.2", True)
            assert len(sender.sent) == before
            clock.advance(clock.getDelayedCalls()[0].getTime() - clock.seconds())
            attempts_at.append(clock.seconds())
        gaps = [b - a for a, b in zip(attempts_at, attempts_at[1:])]
        assert gaps == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
        warnings = log.at(LogLevel.warn)
        assert len(warnings) == 1 and "connection refused" in warnings[0]["error"]
        assert queue.status()["last_error"] == "127.0.0.1:5353: connection refused"
        sender.down = False
        clock.advance(8.0)
        assert queue.pending == 0 and queue.failures == 0 and queue.failing_since is None
        infos = [e for e in log.at(LogLevel.info) if "answers again" in e["log_format"]]
        assert len(infos) == 1 and infos[0]["failures"] == 7
    assert sender.zone_state == {("z", "a.z", "A", "10.0.0.1"): True,
                                 ("z", "b.z", "A", "10.0.0.2"): True}


def test_a_change_made_while_its_batch_fails_wins_over_the_failed_one():
    queue, sender, clock = make()
    sender.hold = True
    queue.put("z", "a.z", "A", "10.0.0.1", True)
    queue.put("z", "a.z", "A", "10.0.0.1", False)   # while the add is out
    sender.down = True
    sender.waiting.pop().errback(DnsUnavailable("timed out"))
    assert queue.pending_change("z", "a.z", "A", "10.0.0.1") is False
    sender.down = False
    sender.hold = False
    clock.advance(1.0)
    assert sender.sent[-1] == ("z", [("a.z", "A", "10.0.0.1", False)])
    assert sender.zone_state == {}


def test_an_unexpected_error_is_logged_with_its_traceback_and_retried():
    queue, sender, clock = make()

    calls = []

    def broken(zone, changes):
        calls.append(zone)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return defer.succeed(None)
    queue._send = broken
    with Captured() as log:
        queue.put("z", "a.z", "A", "10.0.0.1", True)
        assert queue.last_error == "internal error: RuntimeError"
        assert any(e.get("log_failure") is not None for e in log.at(LogLevel.critical))
    clock.advance(1.0)
    assert calls == ["z", "z"] and queue.pending == 0


def test_wait_clean_fires_when_the_names_are_applied_or_says_false_after_its_timeout():
    queue, sender, clock = make()
    sender.hold = True
    queue.put("z", "a.z", "A", "10.0.0.1", True)
    applied = queue.wait_clean({("z", "a.z")}, timeout=2.0)
    assert not applied.called
    sender.release()
    assert applied.result is True
    sender.down = True
    queue.put("z", "b.z", "A", "10.0.0.2", True)
    late = queue.wait_clean({("z", "b.z")}, timeout=2.0)
    clock.advance(2.0)
    assert late.result is False
    assert queue.pending == 1     # still queued: the start went on, the update waits
    assert queue.wait_clean({("z", "other.z")}).result is True


def test_stop_drops_the_queue_and_cancels_the_retry():
    queue, sender, clock = make()
    sender.down = True
    queue.put("z", "a.z", "A", "10.0.0.1", True)
    queue.stop()
    assert clock.getDelayedCalls() == [] and queue.pending == 0
    queue.put("z", "b.z", "A", "10.0.0.2", True)
    assert len(sender.sent) == 1
