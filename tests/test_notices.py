"""Notices to a user's clients (usher.controller.notices): every session of
that user and nobody else's, bounded (kind, message, queue), one call in
flight per session, timeouts; through the real client port (the realm
adds and drops sessions, UsherClient reports them), and on to usherweb's
event stream -- on a task.Clock."""

import pytest
import pytest_twisted
from twisted.internet import defer, task

from usher.controller.notices import MAX_MESSAGE, UserNotices, check_notice
from usher.errors import InvalidRequest

from tests.e2e import wait_for


class Observer:
    """A client's observer: answers each notice at once, or holds them."""

    def __init__(self, hold=False):
        self.hold = hold
        self.got = []
        self.waiting = []

    def callRemote(self, method, *args):
        assert method == "notice"
        self.got.append(args)
        if self.hold:
            d = defer.Deferred()
            self.waiting.append(d)
            return d
        return defer.succeed(None)


def test_a_notice_reaches_every_session_of_its_user_only():
    notices = UserNotices(task.Clock())
    alice1, alice2, bob = Observer(), Observer(), Observer()
    for user, observer in (("alice", alice1), ("alice", alice2), ("bob", bob)):
        notices.add(user, observer)
    assert notices.notify("alice", "lease", "your VM ends in 10m") == 2
    assert alice1.got == alice2.got == [("lease", "your VM ends in 10m")]
    assert bob.got == []
    assert notices.notify("carol", "lease", "nobody listens") == 0


def test_kinds_and_messages_are_bounded():
    assert check_notice("lease", "two\nlines\t here") == ("lease", "two lines here")
    kind, message = check_notice("lease", "x" * 5000)
    assert len(message) == MAX_MESSAGE and message.endswith("\u2026")
    for kind in ("", "Lease", "a" * 33, "le ase", 7, None, "-x"):
        with pytest.raises(InvalidRequest, match="notice kind"):
            check_notice(kind, "m")
    with pytest.raises(InvalidRequest, match="must be text"):
        check_notice("lease", b"bytes")
    with pytest.raises(InvalidRequest):
        UserNotices(task.Clock()).notify(None, "lease", "m")


def test_a_slow_session_holds_a_bounded_queue_and_hears_what_it_missed():
    notices = UserNotices(task.Clock(), max_queued=3)
    slow = Observer(hold=True)
    session = notices.add("alice", slow)
    for i in range(10):
        notices.notify("alice", "lease", f"n{i}")
    # One in flight, three waiting, the six oldest of the rest dropped.
    assert slow.got == [("lease", "n0")]
    assert [m for _k, m in session.queue] == ["n7", "n8", "n9"]
    assert session.dropped_total == 6
    slow.waiting.pop(0).callback(None)
    assert slow.got[-1] == ("lease", "n7 (6 earlier notices dropped: too many at once)")
    for _ in range(2):
        slow.waiting.pop(0).callback(None)
    assert [m for _k, m in slow.got] == ["n0", "n7 (6 earlier notices dropped: too many at "
                                         "once)", "n8", "n9"]
    assert session.delivered == 3 and not session.queue


def test_a_session_that_never_answers_times_out_and_the_next_goes():
    clock = task.Clock()
    notices = UserNotices(clock, call_timeout=5)
    silent = Observer(hold=True)
    notices.add("alice", silent)
    notices.notify("alice", "lease", "first")
    notices.notify("alice", "lease", "second")
    assert len(silent.got) == 1
    clock.advance(5)
    assert silent.got[-1] == ("lease", "second")


def test_a_closed_session_hears_nothing_more():
    notices = UserNotices(task.Clock())
    observer = Observer()
    session = notices.add("alice", observer)
    session.close()
    assert notices.notify("alice", "lease", "gone") == 0
    assert observer.got == [] and notices.sessions_of("alice") == set()


@pytest_twisted.ensureDeferred
async def test_through_the_client_port_sessions_come_and_go(client_grids):
    grid = await client_grids()
    controller = grid.controller
    alice, bob = await grid.connected("alice"), await grid.connected("bob")
    heard = {"alice": [], "bob": []}
    for user, client in (("alice", alice), ("bob", bob)):
        client.on_connection(lambda state, detail, user=user:
                             state == "notice" and heard[user].append(detail))
    assert controller.api.notify_user("alice", "lease", "the lease of x ends in 10m") == 1
    await wait_for(lambda: heard["alice"] == ["lease: the lease of x ends in 10m"])
    assert heard["bob"] == []
    await alice.disconnect()
    await wait_for(lambda: not controller.notices.sessions_of("alice"))
    assert controller.notify_user("alice", "lease", "nobody") == 0
    assert len(controller.notices.sessions_of("bob")) == 1


@pytest_twisted.ensureDeferred
async def test_usherweb_forwards_a_notice_to_the_browser():
    from tests.test_web_sessions import open_stream
    sessions, clock, client, request, stream = await open_stream(vms=1)
    for callback in list(client._connections):
        callback("notice", "lease: the lease of x ends in 10m")
    assert request.events()[-1] == ("connection", {
        "state": "notice", "detail": "lease: the lease of x ends in 10m"})
