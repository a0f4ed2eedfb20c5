"""`usher ipam` and `usher report usage` (usher.admin.main, called in-process)
on a temporary SQLite database named by a SQL plugin configuration file."""

import json

import pytest

from usher import admin
from usher.plugins.sql import ipam
from usher.plugins.sql.store import Store

T0 = 1_790_004_800.0   # 2026-09-21 15:33:20 UTC


def run(*argv):
    return admin.main(list(argv))


@pytest.fixture
def database(tmp_path):
    """(config file, URL) of a database with the schema and no data."""
    url = f"sqlite:///{tmp_path / 'usher.db'}"
    config = tmp_path / "sql.config"
    config.write_text(f"database = {url}\n", encoding="utf-8")
    store = Store.open(url)
    store.migrate()
    store.close()
    return str(config), url


@pytest.fixture
def config(database):
    return database[0]


def in_db(url, function, *args):
    store = Store.open(url)
    try:
        return store.run(function, *args)
    finally:
        store.close()


def ipam_cmd(config, *argv):
    return run("ipam", *argv, "--plugin-config", config)


def json_out(capsys, status_and_call):
    assert status_and_call == 0
    return json.loads(capsys.readouterr().out)


def one_error_line(capsys, *words):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("usher: error: ")
    assert not any(line.startswith("usher: error") for line in lines[:-1])
    for word in words:
        assert word in lines[-1]
    return lines[-1]


# -- subnets -----------------------------------------------------------------------

def test_subnet_add_list_remove(config, capsys):
    assert ipam_cmd(config, "subnet", "add", "lab", "10.1.0.0/24", "--vlan", "12",
                    "--gateway", "10.1.0.1", "--dns", "10.1.0.2,10.1.0.3",
                    "--exclude", "10.1.0.250-10.1.0.255", "--bridge", "br12") == 0
    assert ipam_cmd(config, "subnet", "add", "v6", "2001:db8:1::/64") == 0
    assert "Added subnet lab 10.1.0.0/24" in capsys.readouterr().out

    subnets = {s["name"]: s for s in json_out(capsys, ipam_cmd(config, "subnet", "list",
                                                                "--json"))}
    assert subnets["lab"]["cidr"] == "10.1.0.0/24" and subnets["lab"]["vlan"] == 12
    assert subnets["lab"]["bridge"] == "br12"
    assert list(subnets["lab"]["dns"]) == ["10.1.0.2", "10.1.0.3"]
    assert subnets["v6"]["cidr"] == "2001:db8:1::/64"

    assert ipam_cmd(config, "subnet", "list") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["name", "cidr"] and any("br12" in line for line in table)

    assert ipam_cmd(config, "subnet", "remove", "v6") == 0
    assert "Removed subnet v6" in capsys.readouterr().out
    assert [s["name"] for s in json_out(capsys, ipam_cmd(config, "subnet", "list",
                                                          "--json"))] == ["lab"]


@pytest.mark.parametrize("argv, complaint", [
    (["10.1.0.5/24"], "host bits set"),
    (["10.1.0.0/33"], "invalid CIDR"),
    (["lab"], "invalid CIDR"),
    (["10.1.0.0/24", "--vlan", "4095"], "VLAN id"),
    (["10.1.0.0/24", "--gateway", "10.1.0.300"], "invalid gateway"),
    (["10.1.0.0/24", "--gateway", "10.2.0.1"], "not in 10.1.0.0/24"),
    (["10.1.0.0/24", "--dns", "10.1.0.2,nope"], "invalid DNS server"),
    (["10.1.0.0/24", "--exclude", "10.1.0.9-10.1.0.3"], "comes before"),
])
def test_subnet_add_refuses_bad_values_and_changes_nothing(config, database, capsys, argv,
                                                           complaint):
    assert ipam_cmd(config, "subnet", "add", "lab", *argv) == 1
    one_error_line(capsys, complaint, "nothing changed")
    assert in_db(database[1], ipam.list_subnets) == []


@pytest.mark.parametrize("argv, complaint", [
    (["10.1.0.0/24", "--vlan", "twelve"], "not a whole number"),
    (["10.1.0.0/24", "--bridge", "br0", "--network", "default"], "not allowed with"),
])
def test_subnet_add_refuses_a_bad_command_line_with_exit_2(config, capsys, argv, complaint):
    assert ipam_cmd(config, "subnet", "add", "lab", *argv) == 2
    one_error_line(capsys, complaint)


def test_subnet_add_refuses_a_duplicate_and_an_overlap(config, capsys):
    assert ipam_cmd(config, "subnet", "add", "lab", "10.1.0.0/24") == 0
    capsys.readouterr()

    assert ipam_cmd(config, "subnet", "add", "lab", "10.2.0.0/24") == 1
    one_error_line(capsys, "lab")
    assert ipam_cmd(config, "subnet", "add", "other", "10.1.0.0/16") == 1
    one_error_line(capsys)

    assert [s["name"] for s in json_out(capsys, ipam_cmd(config, "subnet", "list",
                                                          "--json"))] == ["lab"]


def test_removing_an_unknown_subnet_fails(config, capsys):
    assert ipam_cmd(config, "subnet", "remove", "nope") == 1
    one_error_line(capsys, "nope")


# -- ranges, free, leases, who ---------------------------------------------------------

@pytest.fixture
def lab(config, capsys):
    assert ipam_cmd(config, "subnet", "add", "lab", "10.1.0.0/24", "--gateway", "10.1.0.1") == 0
    assert ipam_cmd(config, "range", "add", "lab", "10.1.0.10", "10.1.0.19",
                    "--owner", "alice") == 0
    assert "Added range" in capsys.readouterr().out
    return config


def test_range_add_list_remove(lab, capsys):
    added = json_out(capsys, ipam_cmd(lab, "range", "add", "lab", "10.1.0.20", "10.1.0.29",
                                      "--owner", "bob", "--cluster", "web", "--json"))["added"]

    ranges = json_out(capsys, ipam_cmd(lab, "range", "list", "--json"))
    assert [(r["first"], r["last"], r["owner"], r["cluster"], r["free"]) for r in ranges] == [
        ("10.1.0.10", "10.1.0.19", "alice", None, 10), ("10.1.0.20", "10.1.0.29", "bob", "web", 10)]
    assert [r["owner"] for r in json_out(capsys, ipam_cmd(lab, "range", "list", "--owner", "bob",
                                                          "--json"))] == ["bob"]

    assert ipam_cmd(lab, "range", "remove", str(added)) == 0
    assert capsys.readouterr().out == f"Removed range {added}\n"
    assert len(json_out(capsys, ipam_cmd(lab, "range", "list", "--json"))) == 1


@pytest.mark.parametrize("first, last, subnet, complaint", [
    ("10.1.0.15", "10.1.0.25", "lab", "overlap"),
    ("10.1.0.5", "10.1.0.12", "lab", "overlap"),
    ("10.2.0.1", "10.2.0.9", "lab", "10.2.0.1"),
    ("10.1.0.40", "10.1.0.30", "lab", ""),
    ("10.1.0.40", "10.1.0.50", "nope", "nope"),
])
def test_range_add_refusals_change_nothing(lab, capsys, first, last, subnet, complaint):
    assert ipam_cmd(lab, "range", "add", subnet, first, last, "--owner", "bob") == 1
    one_error_line(capsys, complaint, "nothing changed")
    assert len(json_out(capsys, ipam_cmd(lab, "range", "list", "--json"))) == 1


def test_removing_an_unknown_range_fails(lab, capsys):
    assert ipam_cmd(lab, "range", "remove", "99") == 1
    one_error_line(capsys, "99")


def _reserve(tx, owner, cluster, vms):
    return ipam.reserve(tx, owner, cluster, vms, request_id=None, now=T0)


def test_free_leases_and_who(lab, database, capsys):
    in_db(database[1], _reserve, "alice", "sneetch", ["1.sneetch", "2.sneetch"])
    in_db(database[1], ipam.mark_used, "1.sneetch")

    free = json_out(capsys, ipam_cmd(lab, "free", "--json"))
    assert free["free"] == 8 and free["ranges"][0]["free"] == 8
    assert ipam_cmd(lab, "free", "lab") == 0
    assert "8 free addresses in 1 ranges" in capsys.readouterr().out

    leases = json_out(capsys, ipam_cmd(lab, "leases", "--owner", "alice", "--json"))
    assert sorted((lease["vm"], lease["state"]) for lease in leases) == [
        ("1.sneetch", "used"), ("2.sneetch", "reserved")]
    assert json_out(capsys, ipam_cmd(lab, "leases", "--owner", "bob", "--json")) == []

    address = next(lease["address"] for lease in leases if lease["vm"] == "1.sneetch")
    held = json_out(capsys, ipam_cmd(lab, "who", address, "--json"))
    assert (held["held"], held["vm"], held["owner"]) == (True, "1.sneetch", "alice")
    assert ipam_cmd(lab, "who", address) == 0
    assert "1.sneetch" in capsys.readouterr().out
    assert ipam_cmd(lab, "who", "10.1.0.19") == 0
    assert "held by no VM (subnet lab)" in capsys.readouterr().out
    assert ipam_cmd(lab, "who", "192.0.2.1") == 0
    assert "no subnet" in capsys.readouterr().out

    # Held addresses keep their range and subnet.
    assert ipam_cmd(lab, "subnet", "remove", "lab") == 1
    one_error_line(capsys, "nothing changed")


def test_free_of_an_unknown_subnet_fails(lab, capsys):
    assert ipam_cmd(lab, "free", "nope") == 1
    one_error_line(capsys, "nope")


# -- the database --------------------------------------------------------------------

def test_a_missing_configuration_file_is_one_clear_line(tmp_path, capsys):
    assert run("ipam", "subnet", "list", "--plugin-config", str(tmp_path / "none.config")) == 1
    one_error_line(capsys, "none.config", "--plugin-config")


def test_a_database_that_cannot_be_opened_is_one_clear_line(tmp_path, capsys):
    config = tmp_path / "sql.config"
    config.write_text(f"database = sqlite:///{tmp_path}/no/such/dir/usher.db\n")

    assert ipam_cmd(str(config), "subnet", "add", "lab", "10.1.0.0/24") == 1
    one_error_line(capsys, "usher.db")
    assert not (tmp_path / "no").exists()


def test_reading_a_database_that_does_not_exist_creates_none(tmp_path, capsys):
    config = tmp_path / "sql.config"
    config.write_text(f"database = sqlite:///{tmp_path}/usher.db\n")

    assert ipam_cmd(str(config), "subnet", "list") == 1
    one_error_line(capsys, "no such database")
    assert run("report", "usage", "--since", "2026-01-01", "--plugin-config", str(config)) == 1
    one_error_line(capsys, "no such database")
    assert not (tmp_path / "usher.db").exists()


def test_a_bad_database_url_is_one_clear_line(tmp_path, capsys):
    config = tmp_path / "sql.config"
    config.write_text("database = mysql://somewhere/usher\n")

    assert ipam_cmd(str(config), "subnet", "list") == 1
    one_error_line(capsys, "sqlite:///")


def test_a_first_change_creates_the_schema(tmp_path, capsys):
    config = tmp_path / "sql.config"
    config.write_text(f"database = sqlite:///{tmp_path}/usher.db\n")

    assert ipam_cmd(str(config), "subnet", "add", "lab", "10.1.0.0/24") == 0
    assert Store.open(f"sqlite:///{tmp_path}/usher.db").version() >= 1


# -- usher report usage -------------------------------------------------------------

def _events(tx, rows):
    for at, vm, owner, new_state in rows:
        tx.execute("INSERT INTO events (at, event, vm, owner, cluster, lnm, new_state, "
                   "memory_mib, vcpus) VALUES (?, 'vm_state_changed', ?, ?, ?, 'lnm1', ?, "
                   "2048, 2)", (at, vm, owner, vm.split(".", 1)[1], new_state))


@pytest.fixture
def logged(database):
    in_db(database[1], _events, [
        (T0 - 3600, "1.web", "alice", "run"),           # running before since
        (T0 + 3600, "1.web", "alice", "shutoff"),
        (T0 + 1800, "1.db", "bob", "run"),              # still running at until
        (T0 + 2 * 3600, "2.web", "alice", "run"),
        (T0 + 3 * 3600, "2.web", "alice", "paused"),
    ])
    return database[0]


def usage(config, *argv):
    return run("report", "usage", "--since", "2026-09-21T15:33:20Z",
               "--until", "2026-09-21T19:33:20+00:00", "--plugin-config", config, *argv)


def test_report_usage_json(logged, capsys):
    report = json_out(capsys, usage(logged, "--json"))

    assert (report["since"], report["until"], report["by"]) == (T0, T0 + 4 * 3600,
                                                                ["owner", "cluster"])
    assert [(r["owner"], r["cluster"], r["vms"], r["vm_hours"]) for r in report["rows"]] == [
        ("alice", "web", 2, 1.0 + 2.0), ("bob", "db", 1, 3.5)]
    assert report["total"]["vcpu_hours"] == 2 * 6.5
    assert report["total"]["memory_gib_hours"] == 2 * 6.5


def test_report_usage_by_owner_as_a_table(logged, capsys):
    assert usage(logged, "--by", "owner") == 0
    lines = capsys.readouterr().out.splitlines()

    assert lines[0] == "Usage from 2026-09-21 15:33:20 to 2026-09-21 19:33:20 (UTC)"
    assert lines[1].split()[:3] == ["owner", "VMs", "VM-hours"]
    assert lines[3].split()[:3] == ["alice", "2", "3.00"]
    assert lines[-1].split()[:3] == ["total", "3", "6.50"]


@pytest.mark.parametrize("argv, complaint", [
    (["--by", "lnm"], "cannot group by"),
    (["--since", "yesterday"], "is not a date"),
    (["--since", "2026-09-22"], "must be before"),
])
def test_report_usage_refuses_bad_arguments(logged, capsys, argv, complaint):
    assert usage(logged, *argv) == 2
    one_error_line(capsys, complaint)


# -- PostgreSQL ------------------------------------------------------------------------

def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_postgresql_server_that_is_down_is_one_clear_line(tmp_path, capsys):
    config = tmp_path / "sql.config"
    config.write_text(f"database = postgresql://usher@127.0.0.1:{_free_port()}/usher\n")

    assert ipam_cmd(str(config), "subnet", "add", "lab", "10.1.0.0/24") == 1
    one_error_line(capsys, "postgresql://usher@127.0.0.1")
    assert run("report", "usage", "--since", "2026-01-01", "--plugin-config", str(config)) == 1
    one_error_line(capsys, "postgresql://usher@127.0.0.1")


@pytest.fixture
def pg_config(request, tmp_path):
    """A SQL plugin configuration naming a new database on the tests'
    PostgreSQL server (the ``postgres`` fixture of tests/conftest.py)."""
    try:
        server = request.getfixturevalue("postgres")
    except pytest.FixtureLookupError:
        pytest.skip("the postgres fixture (tests/pgserver.py) is not in this tree")
    url = server.create_database(f"admin_{tmp_path.name.lower()[-40:]}".replace("-", "_"))
    config = tmp_path / "sql.config"
    config.write_text(f"database = {url}\n", encoding="utf-8")
    return str(config), url


def test_ipam_and_usage_on_postgresql(pg_config, capsys):
    config, url = pg_config
    assert ipam_cmd(config, "subnet", "add", "lab", "10.1.0.0/24", "--vlan", "7") == 0
    assert ipam_cmd(config, "subnet", "add", "v6", "2001:db8:7::/64") == 0
    assert ipam_cmd(config, "range", "add", "v6", "2001:db8:7::10", "2001:db8:7::ffff:ffff",
                    "--owner", "alice") == 0
    assert ipam_cmd(config, "range", "add", "lab", "10.1.0.5", "10.1.0.200",
                    "--owner", "alice") == 0
    assert ipam_cmd(config, "range", "add", "lab", "10.1.0.100", "10.1.0.250") == 1
    one_error_line(capsys, "overlaps", "nothing changed")
    in_db(url, _reserve, "alice", "web", ["1.web", "2.web"])

    ranges = json_out(capsys, ipam_cmd(config, "range", "list", "--json"))
    assert [r["free"] for r in ranges] == [2 ** 32 - 0x10 - 2, 196]
    leases = json_out(capsys, ipam_cmd(config, "leases", "--json"))
    assert sorted(lease["vm"] for lease in leases) == ["1.web", "2.web"]
    held = json_out(capsys, ipam_cmd(config, "who", leases[0]["address"], "--json"))
    assert held["owner"] == "alice" and held["held"]

    in_db(url, _events, [(T0, "1.web", "alice", "run"), (T0 + 3600, "1.web", "alice", "paused")])
    report = json_out(capsys, usage(config, "--json", "--by", "cluster"))
    assert report["rows"] == [{"cluster": "web", "vms": 1, "vm_hours": 4.0, "vcpu_hours": 8.0,
                               "memory_gib_hours": 8.0}]
