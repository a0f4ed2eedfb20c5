"""ush's address commands (ranges, addresses) and list's address column,
against the in-memory double of the client library of ``tests.test_ush``."""

import re

from tests.test_ush import (USER, Harness, OneShot, full, record, sample_world, ush,
                             ush_help)

RANGES = [
    {"id": 3, "subnet": "lab", "first": "10.1.0.100", "last": "10.1.0.199", "owner": USER,
     "cluster": None, "free": 98},
    {"id": 1, "subnet": "lab", "first": "10.1.0.10", "last": "10.1.0.19", "owner": USER,
     "cluster": "sneetch", "free": 7},
    {"id": 2, "subnet": "lab", "first": "10.1.0.20", "last": "10.1.0.29", "owner": "bob",
     "cluster": None, "free": 10},
    {"id": 4, "subnet": "lab", "first": "10.1.0.30", "last": "10.1.0.39", "owner": None,
     "cluster": None, "free": 9},
]
LEASES = [
    {"address": "10.1.0.11", "prefix": 24, "vm": full("2.sneetch"), "owner": USER,
     "cluster": "sneetch", "state": "used", "subnet": "lab", "vlan": 12,
     "mac": "02:aa:bb:cc:dd:02"},
    {"address": "10.1.0.9", "prefix": 24, "vm": full("1.sneetch"), "owner": USER,
     "cluster": "sneetch", "state": "reserved", "subnet": "lab", "vlan": 12,
     "mac": "02:aa:bb:cc:dd:01"},
    {"address": "10.1.0.20", "prefix": 24, "vm": full("web", "bob"), "owner": "bob",
     "cluster": "default", "state": "used", "subnet": "lab", "vlan": 12,
     "mac": "02:aa:bb:cc:dd:03"},
]


def by_owner(rows):
    """A handler as the SQL plugin's: one's own rows; administrators all or
    one owner's."""
    def handler(user, admin, args):
        owner = args.get("owner")
        if owner is not None and not admin:
            from usher.errors import PermissionDenied
            raise PermissionDenied("only administrators may name an owner")
        if admin:
            return [dict(r) for r in rows if owner is None or r["owner"] == owner]
        return [dict(r) for r in rows if r["owner"] in (user, None)]
    return handler


def ipam_world():
    world = sample_world()
    world.queries = {"ipam.ranges": by_owner(RANGES), "ipam.addresses": by_owner(LEASES)}
    return world


def table(output, first_title):
    """The header and the rows of the table in ``output``, split on spaces."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_title + " "))
    rows = []
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith(("ush>", "<Command", "Command")):
            break
        rows.append(line.split())
    return lines[start].split(), rows


def test_ranges_shows_ones_own_with_free_counts():
    h = Harness(ipam_world())
    h.connect()
    output = h.run("ranges")
    assert "3 address ranges, 114 addresses free:" in output
    header, rows = table(output, "range")
    assert header == ["range", "subnet", "first", "last", "owner", "cluster", "free"]
    assert rows == [["1", "lab", "10.1.0.10", "10.1.0.19", USER, "sneetch", "7"],
                    ["4", "lab", "10.1.0.30", "10.1.0.39", "anyone", "-", "9"],
                    ["3", "lab", "10.1.0.100", "10.1.0.199", USER, "-", "98"]]
    assert h.sent("query") == [("query", {"name": "ipam.ranges", "args": {}})]


def test_addresses_shows_ones_own_sorted_by_address():
    h = Harness(ipam_world())
    h.connect()
    output = h.run("addresses")
    assert "2 addresses:" in output
    header, rows = table(output, "address")
    assert header == ["address", "VM", "state", "cluster", "subnet", "VLAN", "MAC"]
    assert [row[:3] for row in rows] == [["10.1.0.9", full("1.sneetch"), "reserved"],
                                         ["10.1.0.11", full("2.sneetch"), "used"]]


def test_administrators_see_every_owner_or_one():
    world = ipam_world()
    world.admins.add(USER)
    h = Harness(world)
    h.connect()
    header, rows = table(h.run("ranges"), "range")
    assert "owner" in header and len(rows) == 4
    output = h.run("addresses -o bob")
    header, rows = table(output, "address")
    assert "owner" in header and [row[0] for row in rows] == ["10.1.0.20"]
    assert "1 address:" in output
    assert h.sent("query")[-1] == ("query", {"name": "ipam.addresses",
                                             "args": {"owner": "bob"}})


def test_an_ordinary_user_naming_an_owner_is_refused_by_the_controller():
    h = Harness(ipam_world())
    h.connect()
    assert "Error: only administrators may name an owner" in h.run("ranges --owner bob")


def test_bad_owner_is_a_usage_error_and_nothing_is_sent():
    h = Harness(ipam_world())
    h.connect()
    output = h.run("addresses -o 'Bob Smith'")
    assert "addresses: invalid user name 'Bob Smith'" in output
    assert h.sent("query") == []


def test_empty_answers_and_a_site_without_address_management():
    world = sample_world()
    world.queries = {"ipam.ranges": lambda user, admin, args: [],
                     "ipam.addresses": lambda user, admin, args: []}
    h = Harness(world)
    h.connect()
    assert "No address range is assigned to you." in h.run("ranges")
    assert "No address is held by your VMs." in h.run("addresses")
    h = Harness(sample_world())
    h.connect()
    assert "Error: no such query: ipam.ranges" in h.run("ranges")


def test_one_shot_json():
    run = OneShot(ipam_world())
    assert run("--json", "ranges") == 0
    assert sorted(r["id"] for r in run.json()) == [1, 3, 4]
    run = OneShot(ipam_world())
    assert run("--json", "addresses") == 0
    assert {r["address"] for r in run.json()} == {"10.1.0.9", "10.1.0.11"}
    run = OneShot(sample_world())
    assert run("--json", "addresses") == ush.EXIT_USAGE   # as every InvalidRequest
    assert run.json() == {"error": "no such query: ipam.addresses (registered: none)",
                          "code": "invalid_request"}


def test_list_shows_each_vms_address_blank_when_none():
    world = sample_world()
    world.add(record("1.sneetch", args={"ip_address": "10.1.0.9", "mac": "02:aa"}))
    world.add(record("2.sneetch", args={"ip_address": "2001:db8::5"}))
    h = Harness(world)
    h.connect()
    output = h.run("list")
    header = next(line for line in output.splitlines() if line.startswith("VM "))
    assert header.split() == ["VM", "state", "LNM", "address"]
    lines = {line.split()[0]: line.split() for line in output.splitlines()
             if line.startswith(tuple(world.vms))}
    assert lines[full("1.sneetch")][-1] == "10.1.0.9"
    assert lines[full("2.sneetch")][-1] == "2001:db8::5"
    assert len(lines[full("horton")]) == 3     # no address: blank
    # with -s the address stays next to the host
    header = next(line for line in h.run("list -s").splitlines() if line.startswith("VM "))
    assert header.split()[:5] == ["VM", "state", "LNM", "address", "cluster"]


def test_list_without_addresses_keeps_figure_3s_columns():
    h = Harness(sample_world())
    h.connect()
    header = next(line for line in h.run("list").splitlines() if line.startswith("VM "))
    assert header.split() == ["VM", "state", "LNM"]


def test_the_address_commands_have_help():
    for command in ("ranges", "addresses"):
        text = ush_help.render(command)
        assert text.startswith(f"usage: {command} [-o USER]")
        assert re.search(r"-o, --owner USER", text)
        assert command in ush_help.overview()


def test_query_asks_any_plugin_query_with_its_arguments():
    world = ipam_world()
    world.queries["dns.status"] = lambda user, admin, args: [
        {"pending": 2, "failing_since": None, "last_error": "connection refused"}]
    h = Harness(world)
    h.connect()
    output = h.run("query dns.status")
    header, rows = table(output, "pending")
    assert header == ["pending", "failing_since", "last_error"]
    assert rows == [["2", "-", "connection", "refused"]]
    h.run("query ipam.addresses owner=bob limit=5 name=x")
    assert h.sent("query")[-1] == ("query", {"name": "ipam.addresses",
                                             "args": {"owner": "bob", "limit": 5, "name": "x"}})


def test_query_words_that_are_not_key_value_are_usage_errors():
    h = Harness(ipam_world())
    h.connect()
    sent = len(h.sent("query"))
    assert "is not KEY=VALUE" in h.run("query dns.status nonsense")
    assert "is not a query name" in h.run("query 'bad name!'")
    assert "owner given twice" in h.run("query ipam.addresses owner=a owner=b")
    assert len(h.sent("query")) == sent
