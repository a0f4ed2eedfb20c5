"""The test doubles (tests.fakes) against the interfaces they stand for, and
the in-process PB connection of the grid (tests.wire) against what PB does:
calls cross on a later turn through jelly and banana, errors as PB sends
them, and the switches fail calls the way pbutil tells links failing."""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.spread import jelly, pb
from zope.interface.verify import verifyObject

from usher.controller.lnm_link import RemoteLNM
from usher.errors import InvalidRequest, LinkFailure, NoSuchVM, UsherError
from usher.interfaces import IAuthModule, ILNMHandle, IVMM
from usher.pbutil import call

from tests.fakes import FakeAuthModule, FakeLNMHandle, FakeVMM
from tests.grid import Grid
from tests.wire import NOT_SENT, SENT, EventualQueue, LocalConnection


def test_the_fakes_provide_their_interfaces():
    assert verifyObject(IVMM, FakeVMM())
    assert verifyObject(ILNMHandle, FakeLNMHandle())
    assert verifyObject(IAuthModule, FakeAuthModule("table", True))


@pytest_twisted.ensureDeferred
async def test_the_grid_drives_its_lnms_through_the_real_remote_lnm(tmp_path):
    grid = await Grid(reactor, tmp_path, lnms=1).start()
    try:
        handle = grid.handles["lnm1"]
        assert isinstance(handle, RemoteLNM) and verifyObject(ILNMHandle, handle)
        assert grid.controller.state.lnms["lnm1"].handle is handle
        await grid.controller.start("alice", False, ["w1"], ["lnm1"], {})
        assert grid.to_lnm("lnm1").calls["start_many"] == 1
        assert grid.to_lnm("lnm1").calls["receive"] >= 1
        grid.to_lnm("lnm1").not_sent.add("get_details")
        with pytest.raises(LinkFailure) as lost:
            await handle.get_details("w1.alice.usher.test")
        assert lost.value.sent is False
        grid.cut("lnm1")
        assert not grid.controller.state.lnms["lnm1"].connected
        assert grid.nodes["lnm1"].reporter is None          # the LNM saw it too
        await grid.attach("lnm1")
        assert grid.controller.state.lnms["lnm1"].connected
        assert grid.nodes["lnm1"].reporter is not None
    finally:
        await grid.stop()


# -- the wire ---------------------------------------------------------------------

class Echo(pb.Root):
    def __init__(self):
        self.ran = []

    def remote_echo(self, value):
        self.ran.append(value)
        return value

    def remote_missing(self, name):
        raise NoSuchVM(f"no VM {name}")

    def remote_bug(self):
        raise RuntimeError("a bug")


class Opaque:
    pass


@pytest.fixture
def wire():
    clock = task.Clock()
    echo = Echo()
    server = pb.PBServerFactory(echo).buildProtocol(None)
    client = pb.PBClientFactory().buildProtocol(None)
    connection = LocalConnection(client, server, EventualQueue(clock))
    clock.advance(0)                                  # banana's negotiation
    connection.echo, connection.clock = echo, clock
    connection.root = client.remoteForName("root")
    return connection


def ask(wire, method, *args, timeout=10):
    """pbutil.call over the wire -> (outcome or failure value, ran at once?)."""
    results = []
    call(wire.root, method, *args, timeout=timeout, clock=wire.clock).addBoth(results.append)
    synchronous = bool(results)
    wire.clock.advance(0)
    [result] = results
    if hasattr(result, "value"):
        result = result.value
    return result, synchronous


def test_a_call_runs_the_remote_method_on_a_later_turn_through_jelly(wire):
    value = {"name": "vm", "sizes": [1, 2.5], "nested": ("a", None, True)}
    result, synchronous = ask(wire, "echo", value)
    assert not synchronous
    assert result == {"name": "vm", "sizes": [1, 2.5], "nested": ("a", None, True)}
    assert result is not value and wire.echo.ran == [value]
    assert wire.client_calls.calls["echo"] == 1


def test_what_pb_cannot_send_fails_here_too(wire):
    arrived, _ = ask(wire, "echo", Opaque())   # security lets no such instance through
    assert isinstance(arrived, jelly.Unpersistable) and "deemed insecure" in str(arrived)
    error, _ = ask(wire, "echo", "x" * (640 * 1024 + 1))
    assert isinstance(error, InvalidRequest) and "cannot be sent" in str(error)
    assert len(wire.echo.ran) == 1


def test_errors_cross_as_pb_sends_them(wire):
    error, _ = ask(wire, "missing", "vm1")
    assert type(error) is NoSuchVM and str(error) == "no VM vm1"
    error, _ = ask(wire, "bug")
    assert type(error) is UsherError and "a bug" in str(error)


def test_broken_tells_never_sent_from_sent_and_lost(wire):
    wire.client_calls.broken = NOT_SENT
    error, synchronous = ask(wire, "echo", 1)
    assert synchronous and isinstance(error, LinkFailure) and error.sent is False
    wire.client_calls.broken = SENT
    error, synchronous = ask(wire, "echo", 2)
    assert not synchronous and isinstance(error, LinkFailure) and error.sent is True
    assert wire.echo.ran == []


def test_a_lost_answer_was_carried_out(wire):
    wire.client_calls.lose_answer.add("echo")
    error, _ = ask(wire, "echo", 3)
    assert isinstance(error, LinkFailure) and error.sent is True
    assert wire.echo.ran == [3]


def test_hung_calls_wait_for_their_deferred_or_time_out(wire):
    gate = defer.Deferred()
    wire.client_calls.hung_until = gate
    results = []
    call(wire.root, "echo", 4, timeout=10, clock=wire.clock).addBoth(results.append)
    wire.clock.advance(5)
    assert results == [] and wire.echo.ran == []
    gate.callback(None)
    wire.clock.advance(0)
    assert results == [4]
    wire.client_calls.hang["echo"] = defer.Deferred()     # never fires
    results = []
    call(wire.root, "echo", 5, timeout=10, clock=wire.clock).addBoth(results.append)
    wire.clock.advance(9)
    assert results == []
    wire.clock.advance(1)
    assert isinstance(results[0].value, LinkFailure) and "no answer within" in str(
        results[0].value)
    assert wire.echo.ran == [4]


def test_a_failed_hang_is_the_peers_answer(wire):
    gate = defer.Deferred()
    wire.client_calls.hang["echo"] = gate
    results = []
    call(wire.root, "echo", 6, timeout=10, clock=wire.clock).addBoth(results.append)
    gate.errback(NoSuchVM("gave up"))
    wire.clock.advance(0)
    assert type(results[0].value) is NoSuchVM and wire.echo.ran == []


def test_a_cut_connection_fails_what_is_in_flight_and_what_comes_after(wire):
    lost = []
    wire.client.notifyOnDisconnect(lambda: lost.append("client"))
    wire.server.notifyOnDisconnect(lambda: lost.append("server"))
    results = []
    call(wire.root, "echo", 7, timeout=10, clock=wire.clock).addBoth(results.append)
    wire.cut()
    assert sorted(lost) == ["client", "server"]
    assert isinstance(results[0].value, LinkFailure) and results[0].value.sent is True
    error, synchronous = ask(wire, "echo", 8)
    assert synchronous and error.sent is False
