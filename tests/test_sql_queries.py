"""The SQL plugin's user queries (``ipam.ranges``, ``ipam.addresses``) on
SQLite, through the real controller, its client port and ush: each user sees
their own ranges and addresses, administrators everyone's or one owner's;
``list`` shows each VM's address."""

import json

import pytest
import pytest_twisted

from usher.errors import InvalidRequest, PermissionDenied
from usher.settings import default_plugin_registrations

from tests.clientgrid import plugin_instance
from tests.test_plugins_ush import run_ush
from tests.test_sql_plugin import SQL_EVENTS, full, net_args_allowed, sql_config

OPEN_RANGE = """\
    [[open]]
    subnet = lan
    first = 10.9.0.10
    last = 10.9.0.12
    """


async def sql_client_grid(tmp_path, client_grids):
    config, _url = sql_config(tmp_path, OPEN_RANGE)
    registrations = default_plugin_registrations()
    registrations["sql"] = {"plugin": "sql", "events": SQL_EVENTS, "config": config,
                            "order": None}
    grid = await client_grids(registrations=registrations, vmm_options=net_args_allowed)
    plugin = plugin_instance(grid, "sql")
    await plugin.prepared
    await plugin.reconciled
    return grid, plugin


@pytest_twisted.ensureDeferred
async def test_users_see_their_ranges_and_addresses(tmp_path, client_grids):
    grid, plugin = await sql_client_grid(tmp_path, client_grids)
    alice = await grid.connected("alice")
    started = await alice.start(cluster="web", count=2)
    assert len(started["started"]) == 2
    await plugin.worker.flushed()

    ranges = await alice.query("ipam.ranges")
    assert [(r["first"], r["last"], r["owner"]) for r in ranges] == [
        ("10.9.0.1", "10.9.0.6", "alice"), ("10.9.0.10", "10.9.0.12", None)]
    assert ranges[0]["free"] == 2 and ranges[1]["free"] == 3
    leases = await alice.query("ipam.addresses")
    assert sorted((r["vm"], r["state"]) for r in leases) == [(full("1.web"), "used"),
                                                             (full("2.web"), "used")]
    # the address the plugin gave is in the VM's record, as list shows it
    records = {r["name"]: r for r in await alice.list(remote=True)}
    assert {r["vm"]: r["address"] for r in leases} == {
        name: r["args"]["ip_address"] for name, r in records.items()}

    bob = await grid.connected("bob")
    assert await bob.query("ipam.addresses") == []
    assert [r["owner"] for r in await bob.query("ipam.ranges")] == [None]
    with pytest.raises(PermissionDenied, match="only administrators"):
        await bob.query("ipam.addresses", owner="alice")
    with pytest.raises(InvalidRequest, match="unknown query arguments: subnet"):
        await bob.query("ipam.addresses", subnet="lan")
    with pytest.raises(InvalidRequest, match="invalid user name"):
        await bob.query("ipam.addresses", owner=["alice"])

    root = await grid.connected("root")
    assert len(await root.query("ipam.addresses")) == 2
    assert len(await root.query("ipam.addresses", owner="alice")) == 2
    assert await root.query("ipam.addresses", owner="bob") == []
    assert len(await root.query("ipam.ranges")) == 2

    code, out, err = await run_ush(grid, "alice", "addresses")
    assert code == 0, err
    assert out.startswith("2 addresses:\n")
    assert all(r["address"] in out for r in leases)
    code, out, err = await run_ush(grid, "alice", "list", "-a")
    assert code == 0, err
    assert out.splitlines()[2].split() == ["VM", "state", "LNM", "address"]
    assert all(r["address"] in out for r in leases)
    code, out, err = await run_ush(grid, "alice", "ranges", json_output=True)
    assert code == 0, err
    assert [r["free"] for r in json.loads(out)] == [2, 3]

    # one SQL plugin answers them: a second is refused, the first goes on
    second = tmp_path / "second"
    second.mkdir()
    other_config, _url = sql_config(second)
    with pytest.raises(InvalidRequest, match="query ipam.ranges is already registered"):
        await root.register_plugin("sql", "vm_removed", other_config)
    assert len(await root.query("ipam.ranges")) == 2

    # the queries go with the plugin
    await root.unregister_plugin("sql")
    with pytest.raises(InvalidRequest, match="no such query: ipam.ranges"):
        await alice.query("ipam.ranges")


@pytest_twisted.ensureDeferred
async def test_a_database_that_is_down_is_a_clear_error():
    from twisted.internet import defer

    from usher.errors import OperationFailed
    from usher.plugins.sql.store import DatabaseUnavailable
    from usher.plugins.sql.user_queries import UserQueries

    class DownWorker:
        def call(self, fn, *args):
            return defer.fail(DatabaseUnavailable("connection refused"))
    queries = UserQueries(DownWorker())
    for ask in (queries.ranges, queries.addresses):
        with pytest.raises(OperationFailed, match="the address database is unavailable: "
                                                  "connection refused"):
            await ask("alice", False, {})
