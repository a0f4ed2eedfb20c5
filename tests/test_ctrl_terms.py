"""The controller's side of terms of leadership (usher.protocol,
"Controller terms"): ``controller_term`` right after an LNM attaches, and
the term in the recovery announcement."""

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.spread import pb

from usher.controller.lnm_link import HALNMRoot, LNMGateway, StandbyGateway
from usher.controller.recovery import _AnnounceProtocol
from usher.errors import InvalidRequest, Standby
from usher.protocol import PROTOCOL_VERSION


class NodeAPIDouble:
    """Stands for the LNM's node API reference: answers controller_term."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def callRemote(self, method, *args):
        self.calls.append((method, args))
        if isinstance(self.answer, Failure):
            return defer.fail(self.answer)
        return defer.succeed(self.answer)


class BrokerDouble:
    def __init__(self):
        self.transport = StringTransport()


class ControllerDouble:
    def __init__(self, term, ha):
        self.term, self.ha, self.ha_name = term, ha, "ctrl-a"


def tell(term, ha, answer):
    broker = BrokerDouble()
    gateway = LNMGateway(ControllerDouble(term, ha), broker, clock=task.Clock(),
                         call_timeout=5, command_timeout=5)
    node = NodeAPIDouble(answer)
    d = defer.Deferred.fromCoroutine(gateway._tell_term("node1", node))
    return d, node, broker


def no_such_method():
    return Failure(pb.NoSuchMethod("No such method: remote_controller_term"))


def test_the_term_is_told_first_and_an_accepted_one_keeps_the_link():
    d, node, broker = tell(3, True, {"accepted": True, "highest": 3})
    assert node.calls == [("controller_term", ({"term": 3, "controller": "ctrl-a"},))]
    assert d.called and d.result is None
    assert not broker.transport.disconnecting


def test_a_refused_term_drops_the_link():
    d, _node, broker = tell(3, True, {"accepted": False, "highest": 4})
    failures = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(Standby)
    assert broker.transport.disconnecting


def test_an_old_lnm_is_accepted_by_one_controller_only():
    d, node, broker = tell(0, False, no_such_method())
    assert node.calls[0][1] == ({"term": 0, "controller": "ctrl-a"},)
    assert d.called and d.result is None and not broker.transport.disconnecting
    d, _node, broker = tell(2, True, no_such_method())
    failures = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(InvalidRequest)
    assert broker.transport.disconnecting


def test_a_standby_refuses_attach():
    root = HALNMRoot(clock=task.Clock(), call_timeout=5, command_timeout=5,
                     standby_message=lambda: "standby controller b; the active one is a")
    gateway = root.rootObject(BrokerDouble())
    assert isinstance(gateway, StandbyGateway)
    failures = []
    gateway.remote_attach(None).addErrback(failures.append)
    assert str(failures[0].value) == "standby controller b; the active one is a"
    assert failures[0].value.code == "standby"


@pytest.mark.parametrize("term, line", [
    (None, f"USHER-RECOVERY {PROTOCOL_VERSION}"),
    (7, f"USHER-RECOVERY {PROTOCOL_VERSION} 7"),
])
def test_the_announcement_carries_the_term_of_a_standby_pair(term, line):
    proto = _AnnounceProtocol(defer.Deferred(), term)
    transport = StringTransport()
    proto.makeConnection(transport)
    assert transport.value() == (line + "\r\n").encode("ascii")
    proto.setTimeout(None)


class AbortableTransport(StringTransport):
    aborted = False

    def abortConnection(self):
        self.aborted = True


def test_stepping_down_cuts_every_lnm_link_and_new_ones_meet_standby():
    root = HALNMRoot(clock=task.Clock(), call_timeout=5, command_timeout=5,
                     standby_message=lambda: "standby controller b; the active one is a")
    root.controller = ControllerDouble(2, True)
    brokers = [BrokerDouble() for _ in range(3)]
    for broker in brokers:
        broker.transport = AbortableTransport()
        assert isinstance(root.rootObject(broker), LNMGateway)
    root.controller = None
    root.drop_all()
    assert all(b.transport.aborted for b in brokers)
    assert isinstance(root.rootObject(BrokerDouble()), StandbyGateway)
