"""Hole 4 of the security issue: a compromised LNM is contained.

A real sandbox (controller and LNMs as processes, mutual TLS on 127.0.0.1)
in which host ``lnm3`` is compromised: its usherlnm is replaced by the
attacker's own PB client holding lnm3's real certificate and key, which
sends whatever it likes (``FakeLNM``). Each test performs one attack and
checks that it is refused or contained, that the controller kept answering
another user meanwhile, and that nothing changed for anyone else.
"""

import json
import os
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.spread import pb

from usher import pki, records, states
from usher.client import Selection
from usher.controller import commands, lnm_input
from usher.controller.core import Controller
from usher.controller.recovery import Recovery
from usher.errors import InvalidRequest, NoSuchVM
from usher.liveness import HeardBroker
from usher.pbutil import call
from usher.protocol import PROTOCOL_VERSION

from tests.e2e import RunningSandbox, wait_for
from tests.grid import DOMAIN as GRID_DOMAIN
from tests.grid import Grid
from tests.test_failures_controller import reattach

DOMAIN = "usher.test"
MAX_UNMANAGED = 40
MAX_CHANGES = 512
MAX_VMS = 300
GOOD_INFO = {"hostname": "lnm3", "uri": "test:///default", "driver": "Test", "cpus": 16,
             "memory_mib": 65536, "model": "evil", "live_migration": False,
             "migration_uri": None, "name": "lnm3"}


def full(short, owner):
    return f"{short}.{owner}.{DOMAIN}"


class FakeNode(pb.Referenceable):
    """The node API the attacker hands over: answers what the test sets,
    records what the controller sends it."""

    def __init__(self, info=None, inventory=(), raw_inventory=None):
        self.info = dict(GOOD_INFO) if info is None else info
        self.inventory = list(inventory)
        self.raw_inventory = raw_inventory
        self.received = []
        self.started = []

    def remote_get_node_info(self):
        return self.info

    def remote_list_vms(self):
        if self.raw_inventory is not None:
            return self.raw_inventory
        return records.encode_chunks(self.inventory)

    def remote_receive(self, chunks):
        got = records.decode_chunks(chunks)
        self.received.extend(got)
        return len(got)

    def remote_start_many(self, names):
        self.started.extend(names)
        return records.encode_chunks([
            {"name": name, "info": {"name": name, "state": states.RUN,
                                    "uuid": str(uuid.uuid4()), "memory_mib": 256,
                                    "vcpus": 1}} for name in names])

    def remote_op_on(self, operation, name):
        if operation == "delete":
            return None
        return {"name": name, "state": states.OPERATION_RESULT[operation]}

    def remote_get_node_status(self):
        return {"vms": 0}

    def remote_ping(self):
        return True


class FakeLNM:
    """The attacker's program on lnm3: a real PB client over mutual TLS with
    lnm3's certificate, attached with its own node API."""

    def __init__(self, system, node):
        self.system = system
        self.node = node
        self.broker = None
        self.reporter = None

    async def attach(self):
        d = self.system.description
        pki_dir = os.path.join(d["dir"], "pki")
        options = pki.client_tls_options("localhost", d["ca_file"],
                                         os.path.join(pki_dir, "lnm3_cert.pem"),
                                         os.path.join(pki_dir, "lnm3_key.pem"))
        factory = pb.PBClientFactory()
        factory.protocol = HeardBroker
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                             d["lnm_port"]))
        self.broker = await endpoint.connect(factory)
        root = await factory.getRootObject()
        self.reporter = await call(root, "attach", self.node,
                                   {"protocol": PROTOCOL_VERSION, "recovery_port": None},
                                   timeout=20, clock=reactor)
        return self

    async def report(self, changes, raw=None):
        chunks = raw if raw is not None else records.encode_chunks(changes)
        reply = await call(self.reporter, "report", chunks, timeout=20, clock=reactor)
        return records.decode_chunks(reply)

    async def report_status(self, node, vms):
        return await call(self.reporter, "report_status", json.dumps(node),
                          records.encode_chunks(vms), timeout=20, clock=reactor)

    def close(self):
        if self.broker is not None and self.broker.transport is not None:
            self.broker.transport.abortConnection()


def domain(name, state=states.RUN, owner=None, cluster=None, **extra):
    entry = {"name": name, "state": state, "uuid": str(uuid.uuid4()), "memory_mib": 256,
             "vcpus": 1, "metadata": {k: v for k, v in (("owner", owner),
                                                        ("cluster", cluster)) if v}}
    entry.update(extra)
    return entry


@pytest_twisted.async_yield_fixture(scope="module")
async def system(tmp_path_factory):
    box = RunningSandbox(tmp_path_factory.mktemp("sandbox"), lnms=3, settings={"ctrl": {
        "lnm_max_unmanaged": MAX_UNMANAGED, "lnm_max_report_changes": MAX_CHANGES,
        "lnm_max_vms": MAX_VMS}})
    await box.start()
    box.add_user("bob", "bob-secret")
    box.add_user("carol", "carol-secret")
    # Host lnm3 is compromised: its usherlnm is gone, its key is the attacker's.
    await box.kill("lnm3")
    box.admin = await box.connected_client()            # alice, the sandbox admin
    box.bob = await box.connected_client("bob", "bob-secret")
    box.carol = await box.connected_client("carol", "carol-secret")
    started = await box.bob.start(["web1", "web2"], lnms=["lnm1"], args={"token": "s3cret"})
    assert started["failed"] == []
    started = await box.bob.start(["sleepy"], lnms=["lnm2"])
    assert started["failed"] == []
    await box.bob.hibernate(["sleepy"])
    started = await box.carol.start(["mine"], lnms=["lnm1"])
    assert started["failed"] == []
    await wait_for(lambda: box.bob.vms.get(full("sleepy", "bob"), {}).get("state")
                   == states.HIBERNATED)
    yield box
    await box.stop()


async def snapshot(system):
    """Every managed VM as the administrator lists it from the controller."""
    return {r["name"]: (r["owner"], r["cluster"], r["state"], r["lnm"], r["uuid"],
                        r["memory_mib"], r["vcpus"])
            for r in await system.admin.list(remote=True) if r["managed"]}


async def carol_is_answered(system):
    listed = await system.carol.list(Selection(clusters=["default"]), remote=True)
    mine = {r["name"]: r for r in listed if r["owner"] == "carol"}
    assert mine[full("mine", "carol")]["state"] == states.RUN


async def attacked(system, node, attack):
    """Attach ``node`` as lnm3 and run ``attack(fake)`` while carol lists her
    VMs; -> the fake (closed)."""
    fake = FakeLNM(system, node)
    try:
        await fake.attach()
        await defer.gatherResults([defer.Deferred.fromCoroutine(attack(fake)),
                                   defer.Deferred.fromCoroutine(carol_is_answered(system))],
                                  consumeErrors=True)
    finally:
        fake.close()
    return fake


async def refused(coroutine):
    with pytest.raises(InvalidRequest) as caught:
        await coroutine
    return str(caught.value)


@pytest_twisted.ensureDeferred
async def test_inventory_claiming_other_users_vms_gets_nothing_moves_nothing(system):
    before = await snapshot(system)
    web1, sleepy = full("web1", "bob"), full("sleepy", "bob")
    forged = full("forged", "bob")
    node = FakeNode(inventory=[domain(web1, owner="bob"), domain(sleepy, owner="bob"),
                               domain(forged, owner="bob", cluster="default")])

    async def attack(fake):
        # Reports of bob's VMs, running, paused, gone: no acknowledgment.
        acks = await fake.report([domain(web1, states.PAUSED, owner="bob"),
                                  domain(sleepy, owner="bob"),
                                  domain(full("web2", "bob"), None)])
        assert acks == []
        assert await snapshot(system) == before
        # The forged name is quarantined: not bob's, listed with why.
        assert forged not in system.bob.vms
        with pytest.raises(NoSuchVM):
            await system.bob.list([forged], remote=True)
        listed = {r["name"]: r for r in await system.admin.list(remote=True)}
        assert listed[forged]["owner"] is None and listed[forged]["managed"] is False
        assert "no record" in listed[forged]["quarantined"]
        assert listed[forged]["lnm"] == "lnm3"
        # bob's namespace stays his: he can start that very name elsewhere,
        # and the fake's copy is a duplicate from then on.
        result = await system.bob.start(["forged"], lnms=["lnm2"])
        assert result["failed"] == [] and result["started"][0]["lnm"] == "lnm2"
        assert await fake.report([domain(forged, owner="bob")]) == []
        [mine] = await system.bob.list([forged], remote=True)
        assert (mine["lnm"], mine["owner"], mine["managed"]) == ("lnm2", "bob", True)
        await system.bob.delete(["forged"], {"force": True})
    fake = await attacked(system, node, attack)
    # Nothing of anyone's was sent to it, and nothing moved.
    assert fake.node.received == []
    assert await snapshot(system) == before
    assert system.bob.vms[sleepy]["state"] == states.HIBERNATED
    assert system.bob.vms[sleepy]["lnm"] == "lnm2"


@pytest_twisted.ensureDeferred
async def test_acknowledgments_cover_only_its_own_vms_and_what_it_needs(system):
    node = FakeNode()
    seen = {}

    async def attack(fake):
        # carol starts a VM that lands on the compromised host: that one is its own.
        result = await system.carol.start(["there"], lnms=["lnm3"], args={"note": "x"})
        assert result["failed"] == [], result
        seen["received"] = [r["name"] for r in fake.node.received]
        acks = await fake.report([domain(full("there", "carol"), states.PAUSED),
                                  domain(full("web1", "bob"), states.PAUSED),
                                  domain(full("mine", "carol"), states.PAUSED)])
        seen["acks"] = acks
        assert (await system.carol.delete([full("there", "carol")], {"force": True}))["failed"] == []
    await attacked(system, node, attack)
    there = full("there", "carol")
    assert seen["received"] == [there]
    [ack] = seen["acks"]
    assert ack["name"] == there and ack["lnm"] == "lnm3" and ack["state"] == states.PAUSED
    assert set(ack) <= {"name", "owner", "cluster", "state", "lnm", "memory_mib", "vcpus",
                        "uuid", "version", "args", "plugin_args"}
    assert system.bob.vms[full("web1", "bob")]["state"] == states.RUN
    assert system.carol.vms[full("mine", "carol")]["state"] == states.RUN


@pytest.mark.parametrize("info, message", [
    (dict(GOOD_INFO, memory_mib="lots"), "memory_mib"),
    (dict(GOOD_INFO, memory_mib=-65536), "memory_mib"),
    (dict(GOOD_INFO, cpus=1e9), "cpus"),
    (dict(GOOD_INFO, cpus=True), "cpus"),
    (dict(GOOD_INFO, hostname=["x"]), "hostname"),
    ("not a dict", "dict"),
])
@pytest_twisted.ensureDeferred
async def test_poisoned_node_information_is_refused_and_starts_go_on(system, info, message):
    before = await snapshot(system)
    fake = FakeLNM(system, FakeNode(info=info))
    try:
        assert message in await refused(fake.attach())
    finally:
        fake.close()
    await carol_is_answered(system)
    # Starts are not blocked: placement still reads sound figures.
    result = await system.bob.start(["again"], lnms=[])
    assert result["failed"] == [], result
    assert result["started"][0]["lnm"] in ("lnm1", "lnm2")
    await system.bob.delete(["again"], {"force": True})
    await wait_for(lambda: full("again", "bob") not in system.bob.vms)
    assert await snapshot(system) == before
    lnms = {lnm["name"]: lnm for lnm in await system.admin.list_lnm()}
    assert lnms["lnm3"]["connected"] is False
    memory = lnms["lnm3"]["memory_mib"]
    assert memory is None or (isinstance(memory, int) and memory >= 0)


GHOSTS = [
    ({"metadata": {"owner": "bob", "cluster": ["a", "list"]}}, "metadata"),
    ({"state": "flying"}, "unknown state"),
    ({"state": ["run"]}, "unknown state"),
    ({"uuid": "not-a-uuid"}, "uuid"),
    ({"memory_mib": -512}, "memory_mib"),
    ({"memory_mib": "lots"}, "memory_mib"),
    ({"vcpus": 2.5}, "vcpus"),
    ({"name": "bad name.bob.usher.test"}, "invalid VM name"),
    ({"name": "x" * 300}, "invalid VM name"),
    ({"name": "Shout.bob.usher.test"}, "lower case"),
    ({"name": ["web1.bob.usher.test"]}, "must be a string"),
    ({"busy": "yes"}, "busy"),
]


@pytest.mark.parametrize("field, message", GHOSTS)
@pytest_twisted.ensureDeferred
async def test_malformed_reports_leave_no_ghost_record(system, field, message):
    before = await snapshot(system)
    unmanaged = {r["name"] for r in await system.admin.list(remote=True) if not r["managed"]}
    ghost = dict(domain(full("ghost", "bob"), owner="bob", cluster="ghosts"), **field)

    async def attack(fake):
        # In a report (refused whole, the valid change with it) ...
        assert message in await refused(fake.report([domain("fine.example.org"), ghost]))
        listed = await system.admin.list(remote=True)
        assert {r["name"] for r in listed if not r["managed"]} <= unmanaged
        assert await snapshot(system) == before
    await attacked(system, FakeNode(), attack)
    # ... and in an inventory (the attach is refused).
    fake = FakeLNM(system, FakeNode(inventory=[ghost]))
    try:
        assert message in await refused(fake.attach())
    finally:
        fake.close()
    assert await snapshot(system) == before
    listed = await system.admin.list(remote=True)
    assert {r["name"] for r in listed if not r["managed"]} <= unmanaged
    # Every user's regex listing still works.
    found = await system.bob.list(Selection(regex=r"^web"), remote=True)
    assert {r["name"] for r in found} == {full("web1", "bob"), full("web2", "bob")}


@pytest_twisted.ensureDeferred
async def test_garbage_chunks_and_oversized_reports_are_refused(system):
    before = await snapshot(system)

    async def attack(fake):
        for raw in (["{not json"], "no list", [7], ['{"a": 1}'], ["[1, 2]"],
                    ["[]"] * 1000, ["[" + " " * (300 * 1024) + "]"]):
            await refused(fake.report(None, raw=raw))
        too_many = [domain(f"s{i}.example.org") for i in range(MAX_CHANGES + 1)]
        assert "more than" in await refused(fake.report(too_many))
        assert "twice" in await refused(fake.report([domain("a.example.org")] * 2))
    await attacked(system, FakeNode(), attack)
    fake = FakeLNM(system, FakeNode(inventory=[domain(f"i{i}.example.org")
                                               for i in range(MAX_VMS + 1)]))
    try:
        assert "more than" in await refused(fake.attach())
    finally:
        fake.close()
    assert await snapshot(system) == before


@pytest_twisted.ensureDeferred
async def test_a_flood_of_unmanaged_vms_is_capped(system):
    before = await snapshot(system)
    baseline = len(await system.admin.list(remote=True))
    own = await system.carol.list(remote=True)

    async def listed_strangers():
        listed = await system.admin.list(remote=True)
        assert len(listed) == baseline + MAX_UNMANAGED
        # Unmanaged VMs are for administrators (user_visibility = own).
        assert await system.carol.list(remote=True) == own
        lnms = {lnm["name"]: lnm for lnm in await system.admin.list_lnm()}
        assert lnms["lnm3"]["unmanaged"] == MAX_UNMANAGED

    async def attack(fake):
        for batch in range(4):
            acks = await fake.report([domain(f"flood{batch}-{i}.example.org")
                                      for i in range(MAX_CHANGES)])
            assert acks == []
        await listed_strangers()
    await attacked(system, FakeNode(), attack)
    log = os.path.join(system.dir, "logs", "usherctrl.log")
    await wait_for(lambda: "beyond lnm_max_unmanaged" in open(log).read())
    # The same through its inventory.
    inventory = [domain(f"inv{i}.example.org") for i in range(MAX_VMS)]
    await attacked(system, FakeNode(inventory=inventory), lambda fake: listed_strangers())
    # The fake's strangers go once the controller has seen its link close
    # (asynchronously: on a loaded machine, after the close returns).
    for _ in range(600):
        if len(await system.admin.list(remote=True)) == baseline:
            break
        await task.deferLater(reactor, 0.05)
    assert len(await system.admin.list(remote=True)) == baseline
    assert await snapshot(system) == before


@pytest.mark.parametrize("node, vms, message", [
    ({"memory_mib": "lots"}, [], "memory_mib"),
    ({"free_memory_mib": -1}, [], "free_memory_mib"),
    ({"cpu": [-5.0, 1.0, 1.0]}, [], "cpu"),
    ({"cpu": [1e300, 1.0, 1.0]}, [], "cpu"),
    ({"vms": 10 ** 30}, [], "vms"),
    ({}, [{"name": "web1.bob.usher.test", "cpu": ["a", 1, 1]}], "cpu"),
    ({}, [{"name": "bad name"}], "valid name"),
])
@pytest_twisted.ensureDeferred
async def test_status_reports_are_checked(system, node, vms, message):
    async def attack(fake):
        assert message in await refused(fake.report_status(node, vms))
        # Figures for another host's VMs are not taken.
        await fake.report_status({"cpu": [50.0, 50.0, 50.0], "source": "forged"},
                                 [{"name": full("web1", "bob"), "cpu": [99.0, 99.0, 99.0],
                                   "source": "forged"}])
    await attacked(system, FakeNode(), attack)
    [web1] = await system.bob.list([full("web1", "bob")], status=True)
    assert web1["status"].get("source") != "forged"


@pytest_twisted.ensureDeferred
async def test_a_report_never_moves_a_vm(system):
    """bob's hibernated VM on lnm2, reported running by lnm3 (in its
    inventory and in a report): a duplicate, never a move; bob's
    operations and migrations go on. (While lnm2 is away too: see
    test_a_report_never_moves_a_vm_whose_host_is_away.)"""
    sleepy = full("sleepy", "bob")

    async def claim(fake):
        assert await fake.report([domain(sleepy, owner="bob", cluster="default")]) == []
        [listed] = await system.bob.list([sleepy], remote=True)
        assert (listed["lnm"], listed["state"]) == ("lnm2", states.HIBERNATED)
    fake = await attacked(system, FakeNode(inventory=[domain(sleepy, owner="bob")]), claim)
    assert fake.node.received == []
    log = os.path.join(system.dir, "logs", "usherctrl.log")
    await wait_for(lambda: "reported VMs the controller has on another LNM" in open(log).read())
    assert (await system.bob.restore([sleepy]))["failed"] == []
    result = await system.bob.migrate([sleepy], ["lnm1"])
    assert result["migrated"] == [{"name": sleepy, "from": "lnm2", "to": "lnm1"}], result
    assert (await system.bob.hibernate([sleepy]))["failed"] == []
    await carol_is_answered(system)


@pytest_twisted.ensureDeferred
async def test_the_fake_cannot_take_over_an_export_kept_elsewhere(system):
    """A "retained" export of a VM it never held is ignored: nothing is put
    back from it, nothing is released elsewhere."""
    before = await snapshot(system)
    web2 = full("web2", "bob")
    node = FakeNode(inventory=[domain(web2, states.MIGRATING, owner="bob", retained=True),
                               domain(full("ghost2", "bob"), states.MIGRATING, owner="bob",
                                      retained=True)])

    async def attack(fake):
        assert await snapshot(system) == before
    fake = await attacked(system, node, attack)
    assert fake.node.received == []
    log = os.path.join(system.dir, "logs", "usherctrl.log")
    await wait_for(lambda: "listed exports of VMs it does not hold" in open(log).read())
    assert await snapshot(system) == before
    assert full("ghost2", "bob") not in {r["name"] for r in await system.admin.list(
        remote=True)}


# -- in process: the controller's rules, on a grid of real libvirt test hosts ----------

@pytest_twisted.async_yield_fixture
async def grid(tmp_path):
    g = Grid(reactor, tmp_path)
    await g.start()
    yield g
    await g.stop()


def grid_name(short, owner):
    return f"{short}.{owner}.{GRID_DOMAIN}"


async def define(grid, lnm, name, owner, cluster="x"):
    """A domain defined on a host behind the controller's back."""
    await grid.vmms[lnm].create({"name": name, "uuid": None, "memory_mib": 128, "vcpus": 1,
                                 "owner": owner, "cluster": cluster, "args": {}})


@pytest_twisted.ensureDeferred
async def test_after_a_restart_only_names_vouched_for_by_known_lnms_come_back(grid):
    c = grid.controller
    assert (await c.start("alice", False, ["a1"], ["lnm1"], {"cluster": "red"}))[
        "failed"] == []
    assert (await c.start("bob", False, ["b1"], ["lnm2"], {}))["failed"] == []
    mismatch, newcomer = grid_name("mismatch", "bob"), grid_name("newcomer", "bob")
    await define(grid, "lnm2", mismatch, owner="alice")      # metadata names someone else
    await define(grid, "lnm3", newcomer, owner="bob")        # lnm3 was not known before
    # The controller restarts: it knew lnm1 and lnm2.
    fresh = Controller(domain=GRID_DOMAIN, clock=reactor)
    fresh.recovery = Recovery(["lnm1", "lnm2"], clock=task.Clock(), window=30)
    fresh.watch_lnms(fresh.recovery)
    for name in ("lnm1", "lnm2", "lnm3"):
        await reattach(grid, name, fresh)
    assert fresh.recovery.done
    a1, b1 = grid_name("a1", "alice"), grid_name("b1", "bob")
    assert {n: (r["owner"], r["cluster"], r["lnm"], r["state"])
            for n, r in fresh.state.vms.items()} == {
        a1: ("alice", "red", "lnm1", states.RUN), b1: ("bob", "default", "lnm2", states.RUN)}
    for name in (mismatch, newcomer):
        assert fresh.state.unmanaged[name]["quarantined"]
        assert fresh.state.unmanaged[name]["owner"] is None
    assert set(fresh.state.owned_by("bob")) == {b1}
    # Past its first inventory an LNM vouches for nothing more.
    late = grid_name("late", "alice")
    await define(grid, "lnm1", late, owner="alice")
    await grid.nodes["lnm1"].scan()
    await grid.nodes["lnm1"].drain()
    assert late not in fresh.state.vms and fresh.state.unmanaged[late]["quarantined"]


@pytest_twisted.ensureDeferred
async def test_a_report_never_moves_a_vm_whose_host_is_away(grid):
    c = grid.controller
    assert (await c.start("bob", False, ["b1"], ["lnm2"], {}))["failed"] == []
    b1 = grid_name("b1", "bob")
    grid.cut("lnm2")
    assert c.state.vms[b1]["state"] == states.LOST
    claim = lnm_input.check_domain(domain(b1, owner="bob"), GRID_DOMAIN)
    assert c.lnm_report("lnm3", [claim]) == []
    assert (c.state.vms[b1]["lnm"], c.state.vms[b1]["state"]) == ("lnm2", states.LOST)
    assert b1 not in c.state.lnms["lnm3"].vms and b1 not in c.state.unmanaged
    # Its own host back, the lost VM is there again.
    await grid.attach("lnm2")
    assert (c.state.vms[b1]["lnm"], c.state.vms[b1]["state"]) == ("lnm2", states.RUN)


@pytest_twisted.ensureDeferred
async def test_an_lnm_is_sent_its_own_vms_only_and_no_more_of_them_than_it_needs(grid):
    c = grid.controller
    sent = []
    assert (await c.start("bob", False, ["b1"], ["lnm2"], {"token": "s3cret"}))[
        "failed"] == []
    assert (await c.start("alice", False, ["a1"], ["lnm1"], {}))["failed"] == []
    node = grid.nodes["lnm2"]
    receive = node.receive

    async def recording(records_):
        sent.extend(records_)
        return await receive(records_)
    node.receive = recording
    grid.cut("lnm2")
    await grid.attach("lnm2")
    assert [r["name"] for r in sent] == [grid_name("b1", "bob")]
    assert set(sent[0]) == set(commands.LNM_FIELDS)
