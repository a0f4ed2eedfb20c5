"""The SQL plugin through the real controller on the in-process grid, on
SQLite: the paper's event order, the VM arguments it sets, refusal when a
range is exhausted, release on destroy, the mirror."""

import textwrap

import pytest
import pytest_twisted
from twisted.internet import reactor

from usher.lnm.domain_xml import ArgPolicy
from usher.errors import Rejected
from usher.plugins.sql import ipam
from usher.plugins.sql import log as sqllog
from usher.plugins.sql.store import Store
from usher.settings import default_plugin_registrations

from tests.clientgrid import plugin_instance
from tests.grid import DOMAIN, Grid
from tests.test_sql_worker import FlakyStore

NET_ARGS = ("mac", "ip_address", "ip_prefix", "ip_gateway", "ip_dns", "vlan")

SQL_EVENTS = ["start_request", "register_vm", "start_complete", "vm_state_changed",
              "vm_removed", "op_complete", "migrate_complete", "vm_lost", "vm_missing",
              "vm_adopted"]


def net_args_allowed(state_dir):
    """The LNMs let plugins set a VM's network arguments, as a site running
    the SQL plugin configures them (README "Network arguments")."""
    return {"arg_policy": ArgPolicy(state_dir=state_dir, plugin_args=NET_ARGS)}


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def sql_config(tmp_path, extra=""):
    db = tmp_path / "usher-sql.db"
    path = tmp_path / "sql.config"
    path.write_text(textwrap.dedent(f"""\
        database = sqlite:///{db}
        [subnets]
        [[lan]]
        cidr = 10.9.0.0/28
        gateway = 10.9.0.1
        dns = 10.9.0.2, 192.0.2.53
        vlan = 42
        [ranges]
        [[alice]]
        subnet = lan
        first = 10.9.0.1
        last = 10.9.0.6
        owner = alice
        """) + textwrap.dedent(extra), encoding="utf-8")
    return str(path), f"sqlite:///{db}"


def sql_registrations(config):
    registrations = default_plugin_registrations()
    registrations["sql"] = {"plugin": "sql", "events": SQL_EVENTS, "config": config,
                            "order": None}
    return registrations


@pytest_twisted.async_yield_fixture
async def sql_grid(tmp_path):
    config, url = sql_config(tmp_path)
    registrations = sql_registrations(config)
    grid = Grid(reactor, tmp_path, vmm_options=net_args_allowed, registrations=registrations)
    await grid.start()
    plugin = plugin_instance(grid, "sql")
    await plugin.prepared
    await plugin.reconciled
    store = Store.open(url)
    yield grid, plugin, store
    store.close()
    grid.controller.plugins.unregister_all()
    await grid.stop()


def read(store, function, *args):
    return store.run(function, *args)


def events(tx):
    return tx.query("SELECT id, event, vm, new_state, detail FROM events ORDER BY id")


async def start(grid, count, cluster="web", user="alice"):
    return await grid.controller.start(user, False, [], [], {"cluster": cluster,
                                                            "count": count})


@pytest_twisted.ensureDeferred
async def test_the_papers_event_order_and_the_vm_arguments(sql_grid):
    grid, plugin, store = sql_grid
    result = await start(grid, 2)
    assert [s["name"] for s in result["started"]] == [full("1.web"), full("2.web")]
    await plugin.worker.flushed()

    rows = read(store, events)
    order = [(event, vm) for _id, event, vm, _state, _detail in rows]
    for vm in (full("1.web"), full("2.web")):
        steps = [order.index(("start_request", None)), order.index(("address_reserved", vm)),
                 order.index(("register_vm", vm)), order.index(("start_complete", vm)),
                 order.index(("address_used", vm))]
        assert steps == sorted(steps), order
    leases = {row["vm"]: row for row in read(store, ipam.leases)}
    assert {row["state"] for row in leases.values()} == {"used"}
    assert sorted(row["address"] for row in leases.values()) == ["10.9.0.3", "10.9.0.4"]

    record = grid.controller.state.vms[full("1.web")]
    address = leases[full("1.web")]["address"]
    assert record["args"]["ip_address"] == address
    assert record["args"]["ip_prefix"] == "28"
    assert record["args"]["ip_gateway"] == "10.9.0.1"
    assert record["args"]["ip_dns"] == "10.9.0.2,192.0.2.53"
    assert record["args"]["vlan"] == "42"
    assert record["args"]["mac"] == ipam.mac_for(address)
    assert {"ip_address", "ip_prefix", "mac", "vlan"} <= set(record["plugin_args"])

    mirror = {row["name"]: row for row in read(store, sqllog.mirror)}
    assert mirror[full("1.web")]["state"] == "run"
    assert mirror[full("1.web")]["address"] == address
    requests = read(store, lambda tx: tx.query("SELECT user_name, kind, ok FROM requests"))
    assert [(user, kind, bool(ok)) for user, kind, ok in requests] == [("alice", "start", True)]


@pytest_twisted.ensureDeferred
async def test_an_exhausted_range_refuses_the_start_and_destroy_frees(sql_grid):
    grid, plugin, store = sql_grid
    await start(grid, 3)
    # 10.9.0.1-6 less the gateway and a DNS server: 4 addresses; 1 left.
    with pytest.raises(Rejected) as refused:
        await start(grid, 2, cluster="db")
    assert "no address range of user alice has 2 free addresses for cluster db" in str(
        refused.value)
    assert sorted(grid.controller.state.vms) == sorted(full(f"{i}.web") for i in (1, 2, 3))
    await plugin.worker.flushed()
    assert read(store, ipam.free_in_range, 1) == 1

    from usher.vmset import Selection
    await grid.controller.op_on("alice", False, "delete", Selection(names=[full("1.web")]),
                                {"force": True})
    await plugin.worker.flushed()
    assert read(store, ipam.free_in_range, 1) == 2
    assert full("1.web") not in {row["name"] for row in read(store, sqllog.mirror)}
    result = await start(grid, 2, cluster="db")
    assert len(result["started"]) == 2
    await plugin.worker.flushed()
    refusals = read(store, lambda tx: tx.query(
        "SELECT ok, detail FROM requests WHERE ok = ? ORDER BY id", (False,)))
    assert len(refusals) == 1 and "no address range" in refusals[0][1]


@pytest_twisted.ensureDeferred
async def test_a_user_without_a_range_is_refused_and_nothing_starts(sql_grid):
    grid, plugin, store = sql_grid
    with pytest.raises(Rejected) as refused:
        await start(grid, 1, user="bob")
    assert "user bob has no address range" in str(refused.value)
    assert not grid.controller.state.vms


@pytest_twisted.ensureDeferred
async def test_the_mirror_follows_what_lnms_report_not_the_controllers_conclusions(sql_grid):
    from usher.vmset import Selection
    grid, plugin, store = sql_grid
    result = await start(grid, 1)
    name = result["started"][0]["name"]
    await grid.controller.op_on("alice", False, "pause", Selection(names=[name]))
    await plugin.worker.flushed()
    mirror = {row["name"]: row for row in read(store, sqllog.mirror)}
    assert mirror[name]["state"] == "paused"
    lnm = grid.controller.state.vms[name]["lnm"]
    grid.cut(lnm)
    await grid.settle()
    assert grid.controller.state.vms[name]["state"] == "lost"
    await plugin.worker.flushed()
    mirror = {row["name"]: row for row in read(store, sqllog.mirror)}
    assert mirror[name]["state"] == "paused"
    changes = read(store, lambda tx: tx.query(
        "SELECT old_state, new_state, detail FROM events WHERE event = ? AND vm = ? "
        "ORDER BY id", ("vm_state_changed", name)))
    assert changes[-1] == ("paused", "lost", "origin controller")
    assert ("run", "paused", "origin lnm") in changes


@pytest_twisted.ensureDeferred
async def test_a_database_down_refuses_starts_clearly_and_the_log_catches_up(
        tmp_path, monkeypatch):
    import usher.plugins.sql as sql_plugin
    config, url = sql_config(tmp_path, "")
    text = open(config).read().replace("database =", "retry_initial = 0.05\nretry_max = 0.1\n"
                                       "database =", 1)
    open(config, "w").write(text)
    real = Store.open(url)
    real.migrate()
    flaky = FlakyStore(real)
    monkeypatch.setattr(sql_plugin, "_opened", lambda _url: flaky)
    registrations = sql_registrations(config)
    grid = Grid(reactor, tmp_path, vmm_options=net_args_allowed, registrations=registrations)
    await grid.start()
    plugin = plugin_instance(grid, "sql")
    try:
        await plugin.prepared
        await start(grid, 1)
        flaky.down = True
        with pytest.raises(Rejected, match="the address database is unavailable: "
                                           "connection refused"):
            await start(grid, 1, cluster="db")
        assert sorted(grid.controller.state.vms) == [full("1.web")]
        # The controller still serves, and the VM's events wait in the queue.
        from usher.vmset import Selection
        listed = await grid.controller.list("alice", False, Selection(names=[full("1.web")]))
        assert listed
        await grid.controller.op_on("alice", False, "delete", Selection(names=[full("1.web")]),
                                    {"force": True})
        assert plugin.worker.queued > 0 and plugin.worker.healthy is False
        flaky.down = False
        await plugin.worker.flushed()
        assert plugin.worker.healthy is True
        assert read(flaky.real, ipam.leases) == []
        refusals = read(flaky.real, lambda tx: tx.query(
            "SELECT detail FROM requests WHERE ok = ?", (False,)))
        assert len(refusals) == 1 and "unavailable" in refusals[0][0]
        removed = read(flaky.real, lambda tx: tx.query(
            "SELECT vm FROM events WHERE event = ?", ("vm_removed",)))
        assert removed == [(full("1.web"),)]
    finally:
        grid.controller.plugins.unregister_all()
        await grid.stop()
        flaky.real.close()


@pytest_twisted.ensureDeferred
async def test_after_recovery_vms_keep_their_addresses_and_orphans_are_released(tmp_path):
    """A restarted controller's plugin reconciles: the VM that came back
    (adopted from its LNM's inventory) keeps its address, and gets its
    network arguments back; a reservation of a start cut short is freed."""
    config, url = sql_config(tmp_path)
    registrations = sql_registrations(config)
    grid = Grid(reactor, tmp_path, vmm_options=net_args_allowed, registrations=registrations,
                lnms=1)
    await grid.start()
    store = Store.open(url)
    try:
        await _restart_and_reconcile(grid, store, config, registrations)
    finally:
        grid.controller.plugins.unregister_all()
        store.close()
        await grid.stop()


async def _restart_and_reconcile(grid, store, config, registrations):
    plugin = plugin_instance(grid, "sql")
    await plugin.prepared
    result = await start(grid, 1)
    assert result["started"], result
    await plugin.worker.flushed()
    # A start cut short by a crash: reserved, never started.
    store.run(ipam.reserve, "alice", "crashed", [full("1.crashed")], request_id=99, now=1)
    address = read(store, ipam.lease_of, full("1.web")).address
    # The controller "restarts": the plugin of a new controller, whose state
    # has the VM back (as recovery adopts it) without its arguments.
    grid.controller.plugins.unregister_all()
    from usher.controller.core import Controller
    from usher.controller.plugins import PluginRegistry
    from usher.config import load_plugin_config
    restarted = Controller(domain=DOMAIN, clock=reactor, admins=["root"])
    restarted.plugins = PluginRegistry(restarted.chains, restarted.api,
                                       load_config=load_plugin_config)
    old = grid.controller.state.vms[full("1.web")]
    restarted.state.add(restarted.state.new_record(
        old["name"], state=old["state"], lnm=old["lnm"], memory_mib=old["memory_mib"],
        vcpus=old["vcpus"], uuid=old["uuid"]))
    try:
        again = restarted.plugins.register("sql", "vm_removed", config)
        released = await again.reconciled
        assert [row["vm"] for row in released] == [full("1.crashed")]
        assert read(store, ipam.lease_of, full("1.web")).address == address
        record = restarted.state.vms[full("1.web")]
        assert record["args"]["ip_address"] == address
        assert "ip_address" in record["plugin_args"]
    finally:
        restarted.plugins.unregister_all()


VETO = '''
"""Veto: refuses starts of cluster 'vetoed' after the SQL plugin reserved (a test plugin)."""


class Plugin:
    order = 70

    def __init__(self, config, api):
        pass

    def entry_point(self, event):
        if event.request.args.get("cluster") == "vetoed":
            event.request.reject("vetoed")
'''


@pytest_twisted.ensureDeferred
async def test_a_start_refused_after_the_reservation_frees_it(tmp_path):
    config, url = sql_config(tmp_path)
    plugin_dir = tmp_path / "thirdparty"
    plugin_dir.mkdir()
    (plugin_dir / "veto.py").write_text(VETO, encoding="utf-8")
    registrations = sql_registrations(config)
    registrations["veto"] = {"plugin": "veto", "events": ["start_request"], "config": None,
                             "order": None}
    grid = Grid(reactor, tmp_path, vmm_options=net_args_allowed, registrations=registrations,
                plugin_dir=str(plugin_dir))
    await grid.start()
    store = Store.open(url)
    try:
        plugin = plugin_instance(grid, "sql")
        await plugin.prepared
        with pytest.raises(Rejected, match="vetoed"):
            await start(grid, 2, cluster="vetoed")
        assert len(read(store, ipam.leases)) == 2
        from twisted.internet import task as twisted_task
        await twisted_task.deferLater(reactor, 1.5, lambda: None)
        await plugin.worker.flushed()
        assert read(store, ipam.leases) == []
        outcome = read(store, lambda tx: tx.query("SELECT ok, detail FROM requests"))
        assert [(bool(ok), detail) for ok, detail in outcome] == [(False, "refused: vetoed")]
    finally:
        grid.controller.plugins.unregister_all()
        store.close()
        await grid.stop()
