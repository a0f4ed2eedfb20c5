"""The push of VM changes to subscribed clients (usher.controller.subscriptions):
each subscription gets what it may see, and a change is encoded once per turn
however many of the user's clients carry it."""

from twisted.internet import task

from usher.controller import subscriptions
from usher.controller.state import GlobalState
from usher.controller.subscriptions import SubscriptionHub
from usher.records import decode_chunks


def _hub():
    state = GlobalState("example.org")
    clock = task.Clock()
    return state, clock, SubscriptionHub(state, clock)


def _sink(received):
    def sink(seq, chunks, removed):
        received.append((seq, decode_chunks(chunks), removed))
    return sink


def _record(state, short, owner, cluster):
    return state.new_record(f"{short}.{owner}.example.org", owner=owner, lnm="lnm1",
                            state="run", memory_mib=256, vcpus=1, cluster=cluster)


def test_one_encoding_per_change_and_turn_for_all_of_a_users_clients(monkeypatch):
    state, clock, hub = _hub()
    encoded = []
    real = subscriptions.encode_item
    monkeypatch.setattr(subscriptions, "encode_item",
                        lambda item: encoded.append(item["name"]) or real(item))
    alice = [[] for _ in range(3)]
    for received in alice:
        hub.add("alice", False, None, _sink(received))
    only_web = []
    hub.add("alice", False, ["web"], _sink(only_web))
    bob = []
    hub.add("bob", False, None, _sink(bob))

    db = state.add(_record(state, "1.db", "alice", "db"))
    web = state.add(_record(state, "1.web", "alice", "web"))
    state.update(db["name"], state="paused")         # twice in one turn
    clock.advance(0)

    assert sorted(encoded) == sorted([db["name"], web["name"]])
    for received in alice:
        [(seq, records, removed)] = received
        assert seq == 1 and removed == []
        assert {r["name"]: r["state"] for r in records} == {db["name"]: "paused",
                                                            web["name"]: "run"}
    [(_, records, _)] = only_web
    assert [r["name"] for r in records] == [web["name"]]
    assert bob == []


def test_a_later_turn_sends_the_later_state_and_removals():
    state, clock, hub = _hub()
    first, second = [], []
    hub.add("alice", False, None, _sink(first))
    hub.add("alice", False, None, _sink(second))
    db = state.add(_record(state, "1.db", "alice", "db"))
    clock.advance(0)
    state.update(db["name"], state="paused")
    clock.advance(0)
    state.remove(db["name"])
    clock.advance(0)
    for received in (first, second):
        assert [seq for seq, _r, _x in received] == [1, 2, 3]
        assert received[1][1][0]["state"] == "paused"
        assert received[2][1:] == ([], [db["name"]])


# -- the push itself: a one-way PB message (usher.pbutil.tell) -------------------------

def _pb_pair():
    from twisted.spread import pb
    from twisted.test import iosim

    class Root(pb.Root):
        observer = None

        def remote_hand(self, observer):
            self.observer = observer

    class Observer(pb.Referenceable):
        def __init__(self):
            self.pushes = []

        def remote_vm_changes(self, seq, chunks, removed):
            self.pushes.append((seq, decode_chunks(chunks), removed))
            return "an answer nobody waits for"

    root, observer = Root(), Observer()
    server_factory, client_factory = pb.PBServerFactory(root), pb.PBClientFactory()
    server, client, pump = iosim.connectedServerAndClient(
        ServerClass=lambda: server_factory.buildProtocol(None),
        ClientClass=lambda: client_factory.buildProtocol(None))
    client_factory.getRootObject().addCallback(
        lambda remote_root: remote_root.callRemote("hand", observer))
    pump.flush()
    assert root.observer is not None
    return root, observer, server, client, pump


def test_a_push_is_one_way_and_a_gone_client_is_not_sent_to():
    from usher.errors import LinkFailure
    from usher.pbutil import tell
    from usher.records import encode_chunks

    root, observer, server, client, pump = _pb_pair()
    assert tell(root.observer, "vm_changes", 1, encode_chunks([{"name": "a"}]), []) is None
    pump.flush()
    assert observer.pushes == [(1, [{"name": "a"}], [])]
    # Nothing waits for an answer, and the client sent none.
    assert server.waitingForAnswers == {} and client.waitingForAnswers == {}
    server.transport.loseConnection()
    pump.flush()
    assert server.disconnected
    try:
        tell(root.observer, "vm_changes", 2, [], [])
    except LinkFailure as e:
        assert not e.sent
    else:
        raise AssertionError("a push to a gone client was not refused")


def test_a_subscription_that_stops_wanting_a_record_never_lends_its_old_copy():
    # One turn: a change, then the VM moves out of one subscription's
    # cluster (several hubs: the subscriptions flush in no set order).
    for _ in range(20):
        state, clock, hub = _hub()
        only_web, everything = [], []
        hub.add("alice", False, ["web"], _sink(only_web))
        hub.add("alice", False, None, _sink(everything))
        vm = state.add(_record(state, "1.web", "alice", "web"))
        clock.advance(0)
        state.update(vm["name"], state="shutoff")
        state.update(vm["name"], cluster="db")
        clock.advance(0)
        [(_, latest, _)] = everything[1:]
        assert (latest[0]["cluster"], latest[0]["version"]) == ("db", vm["version"])


def test_one_push_that_cannot_be_made_does_not_stop_the_others():
    state, clock, hub = _hub()
    received = []

    def broken(seq, chunks, removed):
        raise RuntimeError("cannot push")
    hub.add("alice", False, None, broken)
    hub.add("alice", False, None, _sink(received))
    state.add(_record(state, "1.db", "alice", "db"))
    clock.advance(0)
    assert len(received) == 1


def test_flushing_now_pushes_what_is_queued_at_once_and_only_once():
    state, clock, hub = _hub()
    received = []
    hub.add("alice", False, None, _sink(received))
    state.add(_record(state, "1.db", "alice", "db"))
    hub.flush_now()                 # (a request's answer is about to leave)
    assert [seq for seq, _r, _x in received] == [1]
    clock.advance(0)
    hub.flush_now()
    assert [seq for seq, _r, _x in received] == [1]
