"""The SQL plugin's store and address management on SQLite: migrations,
transactions, IPv4 and IPv6 allocation (a /64 without enumerating it),
what is never given, exhaustion, clusters kept together, reconciliation
after recovery, deterministic MACs."""

import ipaddress

import pytest

from usher.plugins.sql import ipam
from usher.plugins.sql import log as sqllog
from usher.plugins.sql.schema import SCHEMA_VERSION
from usher.plugins.sql.store import Conflict, DatabaseError, Store


@pytest.fixture
def store():
    store = Store.open("sqlite:///:memory:")
    store.migrate()
    yield store
    store.close()


def run(store, function, *args, **kwargs):
    return store.run(function, *args, **kwargs)


# -- store --------------------------------------------------------------------------------

def test_migrations_create_the_schema_once_and_record_its_version(tmp_path):
    url = f"sqlite:///{tmp_path}/usher.db"
    store = Store.open(url)
    assert store.version() == 0
    assert store.migrate() == 0
    assert store.migrate() == SCHEMA_VERSION
    store.close()
    again = Store.open(url)
    assert again.version() == SCHEMA_VERSION
    tables = {name for (name,) in again.run(lambda tx: tx.query(
        "SELECT name FROM sqlite_master WHERE type = 'table'"))}
    assert {"schema_version", "requests", "events", "vms", "subnets", "ranges",
            "addresses"} <= tables


def test_a_newer_schema_is_refused(store):
    store.run(lambda tx: tx.execute("UPDATE schema_version SET version = ?",
                                    (SCHEMA_VERSION + 1,)))
    with pytest.raises(DatabaseError, match="newer than this Usher"):
        store.migrate()


def test_bad_urls_are_refused():
    with pytest.raises(DatabaseError, match="sqlite:/// or postgresql://"):
        Store.open("mysql://x/y")
    with pytest.raises(DatabaseError, match="absolute"):
        Store.open("sqlite://relative.db")


def test_a_transaction_that_raises_changes_nothing(store):
    def half(tx):
        ipam.add_subnet(tx, "lan", "10.0.0.0/24")
        raise RuntimeError("stop")
    with pytest.raises(RuntimeError):
        store.run(half)
    assert run(store, ipam.list_subnets) == []


def test_a_busy_database_is_retried(tmp_path):
    url = f"sqlite:///{tmp_path}/usher.db"
    first = Store.open(url)
    first.migrate()
    tries = []

    def once_busy(tx):
        tries.append(1)
        if len(tries) == 1:
            from usher.plugins.sql.store import TryAgain
            raise TryAgain("busy")
        return "done"
    assert first.run(once_busy) == "done" and len(tries) == 2


def test_constraints_are_conflicts(store):
    run(store, ipam.add_subnet, "lan", "10.0.0.0/24")
    with pytest.raises(Conflict):
        store.run(lambda tx: tx.execute(
            "INSERT INTO subnets (name, cidr, family, dns, excluded) VALUES (?, ?, ?, ?, ?)",
            ("other", "10.0.0.0/24", 4, "[]", "[]")))


# -- subnets and ranges ----------------------------------------------------------------------

def test_subnets_are_checked(store):
    for bad, message in [(("lan", "10.0.0.1/24"), "invalid CIDR"),
                         (("lan", "nonsense"), "invalid CIDR"),
                         (("bad name!", "10.0.0.0/24"), "invalid subnet name")]:
        with pytest.raises(ipam.IpamError, match=message):
            run(store, ipam.add_subnet, *bad)
    with pytest.raises(ipam.IpamError, match="not in 10.0.0.0/24"):
        run(store, ipam.add_subnet, "lan", "10.0.0.0/24", gateway="10.0.1.1")
    with pytest.raises(ipam.IpamError, match="VLAN"):
        run(store, ipam.add_subnet, "lan", "10.0.0.0/24", vlan=5000)
    with pytest.raises(ipam.IpamError, match="not both"):
        run(store, ipam.add_subnet, "lan", "10.0.0.0/24", bridge="br0", network="default")
    run(store, ipam.add_subnet, "lan", "10.0.0.0/24")
    with pytest.raises(ipam.IpamError, match="overlaps subnet lan"):
        run(store, ipam.add_subnet, "lan2", "10.0.0.128/25")
    with pytest.raises(ipam.IpamError, match="exists"):
        run(store, ipam.add_subnet, "lan", "10.9.0.0/24")


def test_ranges_stay_inside_their_subnet_and_never_overlap(store):
    run(store, ipam.add_subnet, "lan", "10.0.0.0/24")
    with pytest.raises(ipam.IpamError, match="not in"):
        run(store, ipam.add_range, "lan", "10.0.0.10", "10.0.1.10")
    with pytest.raises(ipam.IpamError, match="comes before"):
        run(store, ipam.add_range, "lan", "10.0.0.20", "10.0.0.10")
    with pytest.raises(ipam.IpamError, match="needs its owner"):
        run(store, ipam.add_range, "lan", "10.0.0.10", "10.0.0.20", cluster="web")
    first = run(store, ipam.add_range, "lan", "10.0.0.10", "10.0.0.20", owner="alice")
    with pytest.raises(ipam.IpamError, match=f"overlaps range {first}"):
        run(store, ipam.add_range, "lan", "10.0.0.20", "10.0.0.30", owner="bob")
    with pytest.raises(ipam.IpamError, match="no subnet"):
        run(store, ipam.add_range, "wan", "10.0.0.1", "10.0.0.2")


def test_definitions_from_the_configuration_are_idempotent(store):
    assert run(store, ipam.define_subnet, "lan", "10.0.0.0/24", gateway="10.0.0.1") == "added"
    assert run(store, ipam.define_subnet, "lan", "10.0.0.0/24", gateway="10.0.0.1") == "unchanged"
    assert run(store, ipam.define_subnet, "lan", "10.0.0.0/24", gateway="10.0.0.254") == "updated"
    with pytest.raises(ipam.IpamError, match="remove it first"):
        run(store, ipam.define_subnet, "lan", "10.1.0.0/24")
    rid, outcome = run(store, ipam.define_range, "lan", "10.0.0.10", "10.0.0.20", owner="alice")
    assert outcome == "added"
    assert run(store, ipam.define_range, "lan", "10.0.0.10", "10.0.0.20",
               owner="alice") == (rid, "unchanged")
    assert run(store, ipam.define_range, "lan", "10.0.0.10", "10.0.0.20",
               owner="bob") == (rid, "updated")
    assert [r["owner"] for r in run(store, ipam.list_ranges)] == ["bob"]


def test_a_subnet_or_range_holding_addresses_stays(store):
    run(store, ipam.add_subnet, "lan", "10.0.0.0/24")
    rid = run(store, ipam.add_range, "lan", "10.0.0.10", "10.0.0.20", owner="alice")
    run(store, ipam.reserve, "alice", "web", ["vm1"], now=1)
    with pytest.raises(ipam.IpamError, match="held by VMs"):
        run(store, ipam.remove_subnet, "lan")
    with pytest.raises(ipam.IpamError, match="held by VMs"):
        run(store, ipam.remove_range, rid)
    run(store, ipam.release, "vm1")
    run(store, ipam.remove_subnet, "lan")
    assert run(store, ipam.list_ranges) == []


# -- allocation --------------------------------------------------------------------------------

def test_network_broadcast_gateway_dns_and_exclusions_are_never_given(store):
    run(store, ipam.add_subnet, "lan", "10.0.0.0/28", gateway="10.0.0.1", dns="10.0.0.2",
        excluded=["10.0.0.5-10.0.0.7", "10.0.0.9"])
    rid = run(store, ipam.add_range, "lan", "10.0.0.0", "10.0.0.15", owner="alice")
    # 16 less network, broadcast, gateway, DNS and 4 excluded.
    assert run(store, ipam.free_in_range, rid) == 8
    leases = run(store, ipam.reserve, "alice", "web", [f"vm{i}" for i in range(8)], now=1)
    given = sorted(ipaddress.ip_address(lease.address) for lease in leases.values())
    assert [str(a) for a in given] == ["10.0.0.3", "10.0.0.4", "10.0.0.8", "10.0.0.10",
                                       "10.0.0.11", "10.0.0.12", "10.0.0.13", "10.0.0.14"]
    assert run(store, ipam.free_in_range, rid) == 0
    with pytest.raises(ipam.Exhausted, match="no address range of user alice has 1 free "
                                             "addresses for cluster web.*at most 0 free"):
        run(store, ipam.reserve, "alice", "web", ["vm9"], now=1)


def test_exhaustion_is_all_or_nothing(store):
    run(store, ipam.add_subnet, "lan", "10.0.0.0/24")
    rid = run(store, ipam.add_range, "lan", "10.0.0.10", "10.0.0.12", owner="alice")
    with pytest.raises(ipam.Exhausted, match="4 free addresses.*at most 3 free"):
        run(store, ipam.reserve, "alice", "web", ["a", "b", "c", "d"], now=1)
    assert run(store, ipam.leases) == []
    assert run(store, ipam.free_in_range, rid) == 3
    with pytest.raises(ipam.Exhausted, match="user bob has no address range"):
        run(store, ipam.reserve, "bob", "web", ["x"], now=1)


def test_ipv6_a_whole_64_without_enumerating_it(store):
    run(store, ipam.add_subnet, "v6", "2001:db8:1::/64", gateway="2001:db8:1::1")
    rid = run(store, ipam.add_range, "v6", "2001:db8:1::", "2001:db8:1::ffff:ffff:ffff:ffff",
              owner="alice")
    assert run(store, ipam.free_in_range, rid) == 2 ** 64 - 2
    queries = []
    original = store._execute

    def counting(cursor, sql, params):
        queries.append(sql)
        return original(cursor, sql, params)
    store._execute = counting
    leases = run(store, ipam.reserve, "alice", "web", ["a", "b", "c"], now=1)
    assert len(queries) < 30
    assert sorted(lease.address for lease in leases.values()) == [
        "2001:db8:1::2", "2001:db8:1::3", "2001:db8:1::4"]
    assert {lease.prefix for lease in leases.values()} == {64}
    assert run(store, ipam.free_in_range, rid) == 2 ** 64 - 5
    # A cluster grows after its addresses, however far into the /64.
    run(store, ipam.add_subnet, "v6b", "2001:db8:2::/64")
    run(store, ipam.add_range, "v6b", "2001:db8:2::ffff:ffff:ffff:fffd",
        "2001:db8:2::ffff:ffff:ffff:ffff", owner="bob")
    leases = run(store, ipam.reserve, "bob", "top", ["t1", "t2", "t3"], now=1)
    assert leases["t3"].address == "2001:db8:2:0:ffff:ffff:ffff:ffff"
    with pytest.raises(ipam.Exhausted):
        run(store, ipam.reserve, "bob", "top", ["t4"], now=1)


def test_gaps_between_held_addresses_are_found(store):
    run(store, ipam.add_subnet, "lan", "10.0.0.0/24")
    run(store, ipam.add_range, "lan", "10.0.0.1", "10.0.0.254", owner="alice")
    run(store, ipam.reserve, "alice", "web", [f"vm{i}" for i in range(6)], now=1)
    run(store, ipam.release, "vm1")
    run(store, ipam.release, "vm4")
    leases = run(store, ipam.reserve, "alice", "db", ["n1", "n2", "n3"], now=2)
    assert sorted(lease.address for lease in leases.values()) == [
        "10.0.0.2", "10.0.0.5", "10.0.0.7"]


def test_a_clusters_vms_come_from_one_range_next_to_its_addresses(store):
    run(store, ipam.add_subnet, "lan", "10.0.0.0/24")
    small = run(store, ipam.add_range, "lan", "10.0.0.10", "10.0.0.12", owner="alice")
    large = run(store, ipam.add_range, "lan", "10.0.0.100", "10.0.0.199", owner="alice")
    web = run(store, ipam.add_range, "lan", "10.0.0.50", "10.0.0.59", owner="alice",
              cluster="web")
    # The cluster's own range first.
    leases = run(store, ipam.reserve, "alice", "web", ["w1", "w2"], now=1)
    assert {lease.address for lease in leases.values()} == {"10.0.0.50", "10.0.0.51"}
    # Four VMs do not fit in the first range of the user: all from the next.
    leases = run(store, ipam.reserve, "alice", "db", ["d1", "d2", "d3", "d4"], now=1)
    assert {lease.address for lease in leases.values()} == {
        "10.0.0.100", "10.0.0.101", "10.0.0.102", "10.0.0.103"}
    run(store, ipam.reserve, "alice", "other", ["o1"], now=1)
    # The cluster grows in the range it is in, after its addresses.
    leases = run(store, ipam.reserve, "alice", "db", ["d5"], now=2)
    assert leases["d5"].address == "10.0.0.104"
    held = {row["vm"]: row["range_id"] for row in run(store, ipam.leases)}
    assert held["o1"] == small and held["w1"] == web and held["d5"] == large


def test_open_ranges_serve_everyone_after_their_own(store):
    run(store, ipam.add_subnet, "lan", "10.0.0.0/24")
    run(store, ipam.add_range, "lan", "10.0.0.200", "10.0.0.210")
    run(store, ipam.add_range, "lan", "10.0.0.10", "10.0.0.10", owner="alice")
    assert run(store, ipam.reserve, "alice", "c", ["a1"], now=1)["a1"].address == "10.0.0.10"
    assert run(store, ipam.reserve, "alice", "c", ["a2"], now=1)["a2"].address == "10.0.0.200"
    assert run(store, ipam.reserve, "bob", "c", ["b1"], now=1)["b1"].address == "10.0.0.201"


def test_a_vm_keeps_its_address_and_its_lease_carries_the_subnet(store):
    run(store, ipam.add_subnet, "lan", "10.0.0.0/24", vlan=7, gateway="10.0.0.1",
        dns=["10.0.0.2", "10.0.0.3"], network="lab")
    run(store, ipam.add_range, "lan", "10.0.0.10", "10.0.0.20", owner="alice")
    first = run(store, ipam.reserve, "alice", "c", ["a"], now=1)["a"]
    again = run(store, ipam.reserve, "alice", "c", ["a"], now=2)["a"]
    assert first == again == run(store, ipam.lease_of, "a")
    assert first.vm_args() == {"ip_address": "10.0.0.10", "ip_prefix": "24",
                               "ip_gateway": "10.0.0.1", "ip_dns": "10.0.0.2,10.0.0.3",
                               "vlan": "7", "mac": ipam.mac_for("10.0.0.10"),
                               "network": "lab"}


def test_used_reserved_and_released(store):
    run(store, ipam.add_subnet, "lan", "10.0.0.0/24")
    run(store, ipam.add_range, "lan", "10.0.0.10", "10.0.0.20", owner="alice")
    run(store, ipam.reserve, "alice", "c", ["a", "b"], request_id=7, now=1)
    assert run(store, ipam.mark_used, "a")
    # What request 7 reserved and never used goes; a used address stays.
    assert run(store, ipam.release_reserved, "a", 7) is None
    assert run(store, ipam.release_reserved, "b", 8) is None
    assert run(store, ipam.release_reserved, "b", 7) == "10.0.0.11"
    assert run(store, ipam.holder_of, "10.0.0.10")["vm"] == "a"
    assert run(store, ipam.release, "a") == "10.0.0.10"
    assert run(store, ipam.release, "a") is None
    assert run(store, ipam.leases) == []


def test_mac_addresses_are_deterministic_and_locally_administered():
    mac = ipam.mac_for("10.0.0.5")
    assert mac == ipam.mac_for("10.0.0.5") != ipam.mac_for("10.0.0.6")
    assert mac.startswith("02:") and len(mac.split(":")) == 6
    assert ipam.mac_for("2001:db8::5").startswith("02:")
    macs = {ipam.mac_for(str(a)) for a in ipaddress.ip_network("10.0.0.0/22")}
    assert len(macs) == 1024


def test_reconcile_keeps_the_vms_that_came_back_and_releases_orphans(store):
    run(store, ipam.add_subnet, "lan", "10.0.0.0/24")
    run(store, ipam.add_range, "lan", "10.0.0.10", "10.0.0.20", owner="alice")
    run(store, ipam.reserve, "alice", "c", ["back", "never", "elsewhere"], now=1)
    run(store, ipam.mark_used, "back")
    store.run(sqllog.mirror_upsert, {"name": "elsewhere", "lnm": "lnm9"}, 1)
    released = run(store, ipam.reconcile, {"back": "10.0.0.10", "readopted": "10.0.0.19"}, 5,
                   {"readopted": ("alice", "c")}, connected={"lnm1"})
    assert [row["vm"] for row in released] == ["never"]
    held = {row["vm"]: row for row in run(store, ipam.leases)}
    assert held["back"]["state"] == "used"
    # Its LNM has not come back: it may still run there.
    assert "elsewhere" in held
    # A VM naming a free address of a range gets it again.
    assert held["readopted"]["address"] == "10.0.0.19"
    assert held["readopted"]["owner"] == "alice"
    # Without knowing the LNMs, an absent VM's address is an orphan.
    released = run(store, ipam.reconcile, {"back": None, "readopted": None}, 6)
    assert [row["vm"] for row in released] == ["elsewhere"]


def test_what_users_may_see(store):
    run(store, ipam.add_subnet, "lan", "10.0.0.0/24")
    run(store, ipam.add_range, "lan", "10.0.0.10", "10.0.0.20", owner="alice")
    run(store, ipam.add_range, "lan", "10.0.0.30", "10.0.0.40", owner="bob")
    run(store, ipam.add_range, "lan", "10.0.0.50", "10.0.0.60")
    run(store, ipam.reserve, "alice", "c", ["a"], now=1)
    run(store, ipam.reserve, "bob", "c", ["b"], now=1)
    mine = run(store, ipam.ranges_for, "alice", False)
    assert [(r["owner"], r["free"]) for r in mine] == [("alice", 10), (None, 11)]
    assert len(run(store, ipam.ranges_for, "root", True)) == 3
    assert [r["owner"] for r in run(store, ipam.ranges_for, "root", True, "bob")] == ["bob"]
    assert [row["vm"] for row in run(store, ipam.leases_for, "alice", False)] == ["a"]
    assert len(run(store, ipam.leases_for, "root", True)) == 2
    with pytest.raises(ipam.IpamError, match="only administrators"):
        run(store, ipam.leases_for, "alice", False, "bob")
