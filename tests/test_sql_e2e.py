"""The SQL plugin through real processes: a controller and three LNMs over
TLS on 127.0.0.1 (tests.sqlsystem.SqlSandbox), the real client library, the
plugin on SQLite and on a real PostgreSQL server the tests start themselves
(tests.pgserver). What the issue's "Done when" asks: the paper's event order
in the database; allocation by user range and cluster; refusal of an
exhausted range; 20 concurrent clients; ``kill -9`` of the controller in
the middle of a start; the database stopped mid-run."""

import ipaddress

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.python.failure import Failure

from usher.errors import LinkFailure, Rejected, UsherError

from tests.e2e import sleep, wait_for
from tests.sqlsystem import SqlSandbox

DOMAIN = "usher.test"
ENGINES = ["sqlite", "postgresql"]
CROWD_USERS = [f"crowd{i}" for i in range(1, 6)]
CROWD_CLIENTS_PER_USER = 4
CROWD_VMS_PER_CLIENT = 3
PASSWORD = "sql-e2e-secret"


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def in_range(address, first, last):
    value = ipaddress.ip_address(address)
    return ipaddress.ip_address(first) <= value <= ipaddress.ip_address(last)


# The shared system's address plan: each test its own users or clusters.
SUBNETS = [
    ("lab", "10.20.0.0/24", {"vlan": 120, "gateway": "10.20.0.1",
                             "dns": ("10.20.0.2", "10.20.0.3"), "excluded": ("10.20.0.15",)}),
    ("lab6", "2001:db8:20::/64", {"gateway": "2001:db8:20::1"}),
    ("crowd", "10.30.0.0/24", {"gateway": "10.30.0.1"}),
]
RANGES = [
    ("lab", "10.20.0.10", "10.20.0.19", {"owner": "alice", "cluster": "web"}),
    ("lab", "10.20.0.20", "10.20.0.29", {"owner": "alice"}),
    ("lab6", "2001:db8:20::100", "2001:db8:20::1ff", {"owner": "bob"}),
    ("lab", "10.20.0.40", "10.20.0.43", {"owner": "carol"}),
] + [("crowd", f"10.30.0.{16 * i}", f"10.30.0.{16 * i + 15}", {"owner": user})
     for i, user in enumerate(CROWD_USERS, start=1)]


async def started_sandbox(directory, engine, postgres, **kwargs):
    box = SqlSandbox(directory, engine, postgres if engine == "postgresql" else None,
                     **kwargs)
    box.seed(SUBNETS, RANGES)
    await box.start()
    for user in ["bob", "carol"] + CROWD_USERS:
        box.add_user(user, PASSWORD)
    return box


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture(scope="module")
def database_server(engine, request):
    """The session's PostgreSQL server where the engine needs one."""
    return request.getfixturevalue("postgres") if engine == "postgresql" else None


@pytest_twisted.async_yield_fixture(scope="module")
async def sql_system(engine, database_server, tmp_path_factory):
    box = await started_sandbox(tmp_path_factory.mktemp(f"sql-{engine}"), engine,
                                database_server)
    yield box
    await box.stop()


async def eventually(check, timeout=60.0, what="condition"):
    """Poll an async ``check`` (real processes, real time) -> its last value."""
    from twisted.internet import reactor
    deadline = reactor.seconds() + timeout
    while True:
        value = await check()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout:g} s ({value!r})")
        await sleep(0.2)


async def leases_of(box, names):
    rows = await box.select("SELECT vm, address, state FROM addresses")
    return {vm: (address, state) for vm, address, state in rows if vm in set(names)}


async def _all_used(box, names):
    held = await leases_of(box, names)
    return len(held) == len(names) and all(state == "used" for _a, state in held.values())


# -- the harness itself -----------------------------------------------------------------

def test_the_private_postgresql_server_stops_and_starts_again_keeping_its_data(postgres):
    url = postgres.create_database("harness_check")
    assert url.startswith("postgresql://usher@127.0.0.1:")
    postgres.psql("harness_check", "CREATE TABLE kept (n INTEGER); INSERT INTO kept VALUES (7)")
    postgres.stop()
    assert not postgres.running
    postgres.start()
    assert postgres.running
    assert postgres.psql("harness_check", "SELECT n FROM kept").strip() == "7"


# -- the paper's event order ----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_the_database_records_the_papers_event_order(sql_system):
    box = sql_system
    alice = await box.connected_client()
    result = await alice.start(cluster="order", count=2)
    names = sorted(s["name"] for s in result["started"])
    assert names == [full("1.order"), full("2.order")] and not result["failed"]

    # The plugin logs off the reactor, behind the answer: wait until the
    # request's outcome is in.
    async def finished():
        rows = await box.select("SELECT id, at, user_name, kind, vms, finished_at, ok "
                                "FROM requests WHERE kind = ? ORDER BY id", ("start",))
        ours = [r for r in rows if full("1.order") in r[4]]
        return ours if ours and ours[0][5] is not None else None
    ours = await eventually(finished, 30, "the request's outcome logged")
    assert len(ours) == 1
    request_id, request_at, user, _kind, _vms, finished_at, ok = ours[0]
    assert user == "alice"
    await eventually(lambda: _all_used(box, names), 30, "the addresses in use")
    reservations = await box.select(
        "SELECT vm, address, state, reserved_at, request_id FROM addresses WHERE "
        "request_id = ? ORDER BY vm", (request_id,))
    assert [r[0] for r in reservations] == names
    assert all(r[3] >= request_at for r in reservations)
    # start_complete: the result logged, the address used.
    assert ok and finished_at >= max(r[3] for r in reservations)
    assert all(state == "used" for _vm, _a, state, _at, _r in reservations)
    # register_vm: the mirror has each VM, with its address.
    mirror = dict(((n, (s, a)) for n, s, a in await box.select(
        "SELECT name, state, address FROM vms")))
    for vm, address, _state, _at, _r in reservations:
        assert mirror[vm][1] == address
    # The order, as the events table has it: the request, then for each VM
    # its reservation, the mirror, the result and the address in use.
    events = await box.select("SELECT id, event, vm, detail FROM events ORDER BY id")
    request_event = [i for i, e, _vm, detail in events
                     if e == "start_request" and detail.startswith(f"request {request_id}:")]
    assert len(request_event) == 1
    for vm, address, *_ in reservations:
        paper = ["address_reserved", "register_vm", "start_complete", "address_used"]
        sequence = [e for _i, e, v, _d in events if v == vm]
        assert [e for e in sequence if e in paper] == paper, sequence
        # (The state change starting -> run, which the LNM's answer makes,
        # comes between the mirror row and the result.)
        assert "vm_state_changed" in sequence
        first = min(i for i, _e, v, _d in events if v == vm)
        assert request_event[0] < first
    # The address reached the VM's record, as arguments the plugin set.
    for vm, address, *_ in reservations:
        args = alice.vms[vm]["args"]
        assert args["ip_address"] == address and args["ip_prefix"] == "24"
        assert args["ip_gateway"] == "10.20.0.1" and args["vlan"] == "120"
        assert args["mac"].startswith("02:")

    # A state change that starts at the LNM changes the mirror; destroy frees.
    await alice.pause([names[0]])
    await wait_for(lambda: alice.vms[names[0]]["state"] == "paused")

    async def mirror_state():
        return (await box.select("SELECT state FROM vms WHERE name = ?", (names[0],)))[0][0]
    for _ in range(100):
        if await mirror_state() == "paused":
            break
        await sleep(0.1)
    assert await mirror_state() == "paused"
    await alice.delete([names[0]], {"force": True})
    await wait_for(lambda: names[0] not in alice.vms)
    for _ in range(100):
        if names[0] not in await leases_of(box, names):
            break
        await sleep(0.1)
    assert list(await leases_of(box, names)) == [names[1]]
    assert not await box.select("SELECT name FROM vms WHERE name = ?", (names[0],))


# -- allocation ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_addresses_come_from_the_users_range_for_the_cluster_together(sql_system):
    box = sql_system
    alice = await box.connected_client()
    bob = await box.connected_client("bob", PASSWORD)
    web = await alice.start(cluster="web", count=3)
    other = await alice.start(cluster="db", count=2)
    ipv6 = await bob.start(cluster="v6", count=2)
    assert not web["failed"] and not other["failed"] and not ipv6["failed"]

    def addresses(client, result):
        return {s["name"]: client.vms[s["name"]]["args"]["ip_address"]
                for s in result["started"]}
    web_addresses = addresses(alice, web)
    # The range of (alice, web), and together: consecutive addresses.
    assert all(in_range(a, "10.20.0.10", "10.20.0.19") for a in web_addresses.values())
    numbers = sorted(int(ipaddress.ip_address(a)) for a in web_addresses.values())
    assert numbers == list(range(numbers[0], numbers[0] + 3))
    # Another cluster of alice's: her range for any cluster.
    assert all(in_range(a, "10.20.0.20", "10.20.0.29")
               for a in addresses(alice, other).values())
    # bob's range is IPv6.
    for name, address in addresses(bob, ipv6).items():
        assert in_range(address, "2001:db8:20::100", "2001:db8:20::1ff")
        assert bob.vms[name]["args"]["ip_prefix"] == "64"
    # What the database holds is what the VMs were given.
    everything = {**web_addresses, **addresses(alice, other), **addresses(bob, ipv6)}
    held = await leases_of(box, everything)
    assert {vm: address for vm, (address, _state) in held.items()} == everything


@pytest_twisted.ensureDeferred
async def test_an_exhausted_range_refuses_the_whole_start_and_starts_nothing(sql_system):
    box = sql_system
    carol = await box.connected_client("carol", PASSWORD)
    with pytest.raises(Rejected) as refused:
        await carol.start(cluster="big", count=5)
    message = str(refused.value)
    assert "carol" in message and "4" in message, message
    await sleep(0.5)
    assert not [n for n in carol.vms if ".big." in n]
    assert not [r for r in await carol.list(remote=True) if ".big." in r["name"]]
    assert not [vm for (vm,) in await box.select("SELECT vm FROM addresses")
                if vm and vm.endswith(".carol." + DOMAIN)]
    # Exactly what is left fits; then nothing more does.
    fits = await carol.start(cluster="big", count=4)
    assert len(fits["started"]) == 4 and not fits["failed"]
    with pytest.raises(Rejected, match="carol"):
        await carol.start(cluster="more", count=1)
    assert not [n for n in carol.vms if ".more." in n]


@pytest_twisted.ensureDeferred
async def test_twenty_concurrent_clients_never_share_an_address(sql_system):
    box = sql_system
    clients = []
    for user in CROWD_USERS:
        for _ in range(CROWD_CLIENTS_PER_USER):
            clients.append(box.client(user, PASSWORD))
    assert len(clients) == 20
    for client in clients:
        # One login after the other (the controller paces logins); the
        # starts are what is concurrent.
        await client.connect()
    results = await defer.gatherResults([
        defer.ensureDeferred(_start(client, f"c{i}", CROWD_VMS_PER_CLIENT))
        for i, client in enumerate(clients)])
    given = {}
    for client, result in zip(clients, results):
        assert not result["failed"], result["failed"]
        for started in result["started"]:
            given[started["name"]] = client.vms[started["name"]]["args"]["ip_address"]
    assert len(given) == 20 * CROWD_VMS_PER_CLIENT
    assert len(set(given.values())) == len(given), "an address was given twice"
    # Each in its owner's range.
    owners = {r[3]["owner"]: (r[1], r[2]) for r in RANGES if r[0] == "crowd"}
    for name, address in given.items():
        first, last = owners[name.split(".")[2]]
        assert in_range(address, first, last), (name, address)
    await eventually(lambda: _all_used(box, given), 60, "every address in use")
    held = await leases_of(box, given)
    assert {vm: a for vm, (a, state) in held.items()} == given


async def _start(client, cluster, count):
    return await client.start(cluster=cluster, count=count)


# -- kill -9 of the controller in the middle of a start ----------------------------------

HOLD_PLUGIN = '''
"""Test plugin: notes in a file that it was called, then holds the event."""
from twisted.internet import defer

MARKER = {marker!r}


class Plugin:
    def __init__(self, config, api):
        pass

    def entry_point(self, event):
        with open(MARKER, "a") as f:
            f.write(event.name + "\\n")
        return defer.Deferred()
'''


def marked(path):
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("kill_engine", ENGINES)
@pytest_twisted.ensureDeferred
async def test_kill_9_mid_start_gives_no_address_twice_and_leaks_none(kill_engine, tmp_path,
                                                                      request):
    postgres = request.getfixturevalue("postgres") if kill_engine == "postgresql" else None
    box = await started_sandbox(tmp_path / "box", kill_engine, postgres)
    try:
        await _kill_mid_start(box, tmp_path)
    finally:
        await box.stop()


async def _kill_mid_start(box, tmp_path):
    alice = await box.connected_client()
    kept = await alice.start(cluster="kept", count=2)
    assert not kept["failed"]
    hold = str(tmp_path / "hold.config")
    with open(hold, "w") as f:
        f.write("timeout = 600\n")
    landed_marker, orphan_marker = str(tmp_path / "landed"), str(tmp_path / "orphan")
    box.write_plugin("e2e_hold_complete", HOLD_PLUGIN.format(marker=landed_marker))
    box.write_plugin("e2e_hold_request", HOLD_PLUGIN.format(marker=orphan_marker))

    # Started on the LNMs, but the plugin never hears start_complete (a
    # plugin before it on that chain holds it): reserved, never marked used.
    await alice.register_plugin("e2e_hold_complete", "start_complete", hold, 1)
    landed = await alice.start(cluster="landed", count=2)
    assert not landed["failed"]
    landed_names = [s["name"] for s in landed["started"]]
    await wait_for(lambda: len(marked(landed_marker)) >= 2, 30)
    # Reserved by the plugin (its start_request turn, order 60), then held
    # by a plugin after it on the chain: the controller dies mid-start.
    await alice.register_plugin("e2e_hold_request", "start_request", hold, 70)
    stuck = []
    alice.start(cluster="orphan", count=2).addBoth(stuck.append)
    await wait_for(lambda: marked(orphan_marker), 30)
    orphans = [full("1.orphan"), full("2.orphan")]
    reserved = await eventually(lambda: leases_of(box, orphans), 30,
                                "the orphans' reservations")
    assert len(reserved) == 2
    before = await leases_of(box, [full(f"{i}.{c}") for c in ("kept", "landed")
                                   for i in (1, 2)])
    assert len(before) == 4
    assert {before[n][1] for n in landed_names} == {"reserved"}

    assert await box.kill("usherctrl") is None      # killed by the signal
    await wait_for(lambda: stuck, 30)
    assert isinstance(stuck[0], Failure) and stuck[0].check(LinkFailure), stuck
    box.restart("usherctrl")
    alice = await _reconnect(box)
    live = landed_names + [s["name"] for s in kept["started"]]
    await wait_for(lambda: all(alice.vms.get(n, {}).get("state") == "run" for n in live), 60)
    assert not [n for n in alice.vms if ".orphan." in n]

    # After recovery: the orphans' reservations released, the VMs that came
    # back keep their addresses (and those that landed are now used).
    async def settled():
        held = await leases_of(box, live + orphans)
        return held if (not set(held) & set(orphans)
                        and all(state == "used" for _a, state in held.values())) else None
    held = await eventually(settled, 60, "the reconciled leases")
    assert {vm: address for vm, (address, _s) in held.items()} == {
        vm: address for vm, (address, _s) in before.items()}
    for name in live:
        assert alice.vms[name]["args"]["ip_address"] == held[name][0]
    # Nothing leaked: every address held belongs to a VM that exists.
    rows = await box.select("SELECT address, vm FROM addresses")
    assert {vm for _a, vm in rows} == set(live)
    # And the next start does not get an address already held.
    after = await alice.start(cluster="after", count=2)
    assert not after["failed"]
    new = {alice.vms[s["name"]]["args"]["ip_address"] for s in after["started"]}
    assert not new & {address for address, _vm in rows}
    assert len(new) == 2


async def _reconnect(box, timeout=60.0):
    from twisted.internet import reactor
    deadline = reactor.seconds() + timeout
    while True:
        client = box.client()
        try:
            await client.connect()
            return client
        except Exception:
            await client.disconnect()
            if reactor.seconds() > deadline:
                raise
            await sleep(0.3)


# -- the database stopped mid-run ------------------------------------------------------------

def _blocking(function, *args):
    from twisted.internet import threads
    return threads.deferToThread(function, *args)


@pytest_twisted.ensureDeferred
async def test_with_the_database_stopped_starts_fail_clearly_the_rest_serves_and_the_log_catches_up(
        postgres, tmp_path):
    box = await started_sandbox(tmp_path / "box", "postgresql", postgres)
    try:
        await _database_stopped(box, postgres)
    finally:
        if not postgres.running:
            await _blocking(postgres.start)
        await box.stop()


async def _database_stopped(box, postgres):
    alice = await box.connected_client()
    before = await alice.start(cluster="before", count=2)
    assert not before["failed"]
    vm = before["started"][0]["name"]
    await eventually(lambda: leases_of(box, [vm]), 30, "the first lease")

    await _blocking(postgres.stop)
    with pytest.raises(UsherError, match="the address database is unavailable"):
        await alice.start(cluster="during", count=1)
    assert not [n for n in alice.vms if ".during." in n]
    # The controller still serves everything that needs no address.
    assert len(await alice.list_lnm()) == 3
    assert {r["name"] for r in await alice.list(remote=True)} >= {
        s["name"] for s in before["started"]}
    await alice.pause([vm])
    await wait_for(lambda: alice.vms[vm]["state"] == "paused")
    await alice.resume([vm])
    await wait_for(lambda: alice.vms[vm]["state"] == "run")

    await _blocking(postgres.start)

    # The events of the outage reach the database once it is back.
    async def logged():
        states = [s for (s,) in await box.select(
            "SELECT new_state FROM events WHERE vm = ? ORDER BY id", (vm,))]
        return states if "paused" in states else None
    states = await eventually(logged, 60, "the outage's events logged")
    assert states.index("paused") < len(states) - 1 or "run" in states
    # And starts get addresses again.

    async def starts_again():
        try:
            return await alice.start(cluster="after", count=1)
        except UsherError as e:
            assert "unavailable" in str(e), e
            return None
    after = await eventually(starts_again, 60, "a start after the database returned")
    assert not after["failed"]
    name = after["started"][0]["name"]
    assert (await leases_of(box, [name]))[name][0] == alice.vms[name]["args"]["ip_address"]
