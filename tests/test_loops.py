"""usher.loops: periodic work that a failure neither stops nor hides."""

from twisted.internet import defer, task
from twisted.logger import Logger

from usher.loops import every, unfailing


def test_a_failing_function_keeps_being_called_and_each_failure_is_logged():
    clock = task.Clock()
    events = []
    log = Logger(observer=events.append)
    calls = []

    async def scan():
        calls.append(clock.seconds())
        if len(calls) % 2:
            raise RuntimeError(f"bad answer {len(calls)}")

    call = unfailing(scan, log=log, message="periodic {what} failed", what="scan")
    loop = every(10, call, clock=clock, now=True)
    for _ in range(4):
        clock.advance(10)
    assert loop.running
    assert calls == [0, 10, 20, 30, 40]
    failures = [event["log_failure"] for event in events]
    assert [f.getErrorMessage() for f in failures] == ["bad answer 1", "bad answer 3",
                                                        "bad answer 5"]
    assert all(f.getTracebackObject() is not None for f in failures)
    assert all(event["what"] == "scan" and event["log_format"] == "periodic {what} failed"
               for event in events)
    loop.stop()


def test_the_call_waits_for_a_deferred_and_never_fails():
    events = []
    answer = defer.Deferred()
    d = unfailing(lambda: answer, log=Logger(observer=events.append), message="m")()
    assert not d.called
    answer.errback(ValueError("late"))
    assert d.called and d.result is None
    assert events[0]["log_failure"].check(ValueError)


def test_a_loop_started_later_waits_for_its_first_interval():
    clock = task.Clock()
    calls = []

    async def sample():
        calls.append(clock.seconds())

    loop = every(5, unfailing(sample, log=Logger(observer=lambda e: None), message="m"),
                 clock=clock, now=False)
    assert calls == []
    clock.advance(5)
    assert calls == [5]
    loop.stop()
