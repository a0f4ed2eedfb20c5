"""The DNS plugin through the real controller (the in-process grid) against
a real BIND (the session's ``bind``): A/AAAA and PTR records for new VMs,
gone on destroy; the round-robin cluster name; nothing on migration; a
server that is down never blocks a start and loses no update; the zones
reconciled after a controller restart. Checked with dnspython queries."""

import subprocess
import textwrap

import dns.query
import dns.update
import pytest
import pytest_twisted
from twisted.internet import reactor

from usher.controller.plugin_api import thread_pool_runner
from usher.vmset import Selection

from tests.clientgrid import plugin_instance
from tests.grid import DOMAIN, Grid
from tests.test_sql_plugin import net_args_allowed, sql_config, sql_registrations

DNS_EVENTS = ["register_vm", "vm_removed", "vm_adopted", "migrate_complete"]
REVERSE_V4 = "0.9.10.in-addr.arpa"
REVERSE_V6 = "1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def dns_config(tmp_path, bind, extra=""):
    path = tmp_path / "dns.config"
    path.write_text(textwrap.dedent(f"""\
        server = 127.0.0.1
        port = {bind.port}
        tsig_key_file = {bind.key_file}
        reverse_zones = {REVERSE_V4}, {REVERSE_V6}
        retry_initial = 0.05
        retry_max = 0.2
        register_wait = 1.0
        """) + textwrap.dedent(extra), encoding="utf-8")
    return str(path)


def registrations_for(tmp_path, bind, extra=""):
    sql, _url = sql_config(tmp_path)
    registrations = sql_registrations(sql)
    registrations["dns"] = {"plugin": "dns", "events": DNS_EVENTS,
                            "config": dns_config(tmp_path, bind, extra), "order": None}
    return registrations


def with_plugin_pool(grid):
    """The grid's controller runs blocking plugin work in the grid's pool
    (as the daemon's service gives it its plugin pool)."""
    grid.controller.api.run_in_thread = thread_pool_runner(reactor, grid.pool)
    return grid


async def dns_grid(tmp_path, bind, lnms=2, extra=""):
    grid = with_plugin_pool(Grid(reactor, tmp_path, lnms=lnms, vmm_options=net_args_allowed,
                                 registrations=registrations_for(tmp_path, bind, extra)))
    await grid.start()
    plugin = plugin_instance(grid, "dns")
    await plugin.reconciled
    await plugin.queue.flushed()
    return grid, plugin


@pytest_twisted.async_yield_fixture
async def grid(tmp_path, bind):
    grid, plugin = await dns_grid(tmp_path, bind)
    yield grid, plugin
    grid.controller.plugins.unregister_all()
    await grid.stop()


async def start(grid, count, cluster="web", user="alice"):
    result = await grid.controller.start(user, False, [], [], {"cluster": cluster,
                                                               "count": count})
    assert not result["failed"], result
    return {s["name"]: grid.controller.state.vms[s["name"]]["args"]["ip_address"]
            for s in result["started"]}


async def destroy(grid, *names, user="alice"):
    await grid.controller.op_on(user, False, "delete", Selection(names=list(names)),
                                {"force": True})


def serial(bind, zone):
    return bind.query(zone, "SOA").answer[0][0].serial


@pytest_twisted.ensureDeferred
async def test_a_and_ptr_appear_for_new_vms_and_vanish_on_destroy(grid, bind):
    grid, plugin = grid
    addresses = await start(grid, 2)
    await plugin.queue.flushed()
    for vm, address in addresses.items():
        assert bind.values(vm, "A") == [address]
        assert bind.values(address, "PTR") == [vm]
    # The cluster's round-robin name holds every VM's address ...
    assert bind.values(full("web"), "A") == sorted(addresses.values())

    first, second = sorted(addresses)
    await destroy(grid, first)
    await plugin.queue.flushed()
    assert bind.values(first, "A") == []
    assert bind.values(addresses[first], "PTR") == []
    assert bind.values(second, "A") == [addresses[second]]
    # ... and loses them one by one.
    assert bind.values(full("web"), "A") == [addresses[second]]
    await destroy(grid, second)
    await plugin.queue.flushed()
    assert bind.values(full("web"), "A") == []
    assert bind.values(addresses[second], "PTR") == []
    status = await plugin.status("root", True, {})
    assert status[0]["pending"] == 0 and status[0]["failures"] == 0


@pytest_twisted.ensureDeferred
async def test_migration_changes_nothing_in_the_zones(grid, bind):
    grid, plugin = grid
    addresses = await start(grid, 1, cluster="mig")
    await plugin.queue.flushed()
    vm, address = next(iter(addresses.items()))
    before = (serial(bind, DOMAIN), serial(bind, REVERSE_V4))
    source = grid.controller.state.vms[vm]["lnm"]
    target = next(name for name in grid.nodes if name != source)
    await grid.controller.migrate("alice", False, Selection(names=[vm]), [target])
    assert grid.controller.state.vms[vm]["lnm"] == target
    await plugin.queue.flushed()
    assert plugin.queue.applied == status_applied(plugin)
    assert (serial(bind, DOMAIN), serial(bind, REVERSE_V4)) == before
    assert bind.values(vm, "A") == [address]
    await destroy(grid, vm)
    await plugin.queue.flushed()


def status_applied(plugin):
    return plugin.queue.status()["applied"]


@pytest_twisted.ensureDeferred
async def test_a_server_down_never_blocks_a_start_and_loses_no_update(grid, bind):
    grid, plugin = grid
    kept = await start(grid, 1, cluster="keep")
    await plugin.queue.flushed()
    bind.stop()
    try:
        started = await start(grid, 2, cluster="down")
        assert plugin.queue.failures > 0 and plugin.queue.pending > 0
        status = await plugin.status("root", True, {})
        assert status[0]["failing_since"] is not None
        assert "connection refused" in status[0]["last_error"]
        # A VM destroyed while the server is away: its records go when it is back.
        await destroy(grid, *kept)
        first = sorted(started)[0]
        await destroy(grid, first)
    finally:
        bind.start()
    await plugin.queue.flushed()
    assert plugin.queue.failures == 0 and plugin.queue.failing_since is None
    for vm, address in started.items():
        if vm == first:
            assert bind.values(vm, "A") == []
            assert bind.values(address, "PTR") == []
        else:
            assert bind.values(vm, "A") == [address]
            assert bind.values(address, "PTR") == [vm]
    assert bind.values(full("down"), "A") == [started[v] for v in sorted(started) if v != first]
    for vm, address in kept.items():
        assert bind.values(vm, "A") == [] and bind.values(address, "PTR") == []
    await destroy(grid, *(v for v in started if v != first))
    await plugin.queue.flushed()


def nsupdate(bind, zone, *lines):
    """Change the zone behind the plugin's back (as a site's tools would)."""
    from usher.plugins.dns.keyfile import read_key_file
    key = read_key_file(bind.key_file)
    message = dns.update.UpdateMessage(zone, keyring=key.keyring, keyname=key.name,
                                       keyalgorithm=key.algorithm)
    for op, name, rdtype, value in lines:
        if op == "add":
            message.add(name, 300, rdtype, value)
        else:
            message.delete(name, rdtype, value)
    answer = dns.query.tcp(message, bind.address, port=bind.port, timeout=5)
    assert answer.rcode() == 0, answer


@pytest_twisted.ensureDeferred
async def test_after_a_controller_restart_the_zones_match_the_vms_that_came_back(
        tmp_path, bind):
    grid, plugin = await dns_grid(tmp_path, bind, lnms=1)
    restarted = None
    try:
        addresses = await start(grid, 2, cluster="rec")
        await plugin.queue.flushed()
        back, gone = sorted(addresses)
        # Meanwhile: the VM that comes back lost its PTR; foreign records
        # (the site's) sit beside Usher's.
        nsupdate(bind, REVERSE_V4, ("delete", bind_reverse(addresses[back]), "PTR", back + "."))
        nsupdate(bind, DOMAIN, ("add", f"www.{DOMAIN}.", "A", "192.0.2.80"),
                 ("add", full("rec") + ".", "TXT", '"site note"'),
                 ("add", f"host.{DOMAIN}.", "AAAA", "2001:db8::80"))
        before_ns = bind.values(DOMAIN, "NS")
        grid.controller.plugins.unregister_all()

        # A restarted controller: only ``back`` came back (adopted from its
        # LNM, without its arguments: the plugin keeps the address its name has).
        from usher.config import load_plugin_config
        from usher.controller.core import Controller
        from usher.controller.plugins import PluginRegistry
        restarted = Controller(domain=DOMAIN, clock=reactor, admins=["root"])
        restarted.plugins = PluginRegistry(restarted.chains, restarted.api,
                                           load_config=load_plugin_config)
        restarted.api.run_in_thread = grid.controller.api.run_in_thread
        old = grid.controller.state.vms[back]
        restarted.state.add(restarted.state.new_record(
            old["name"], state=old["state"], lnm=old["lnm"], cluster=old["cluster"],
            memory_mib=old["memory_mib"], vcpus=old["vcpus"], uuid=old["uuid"]))
        again = restarted.plugins.register("dns", "vm_removed", dns_config(tmp_path, bind))
        added, removed = await again.reconciled
        await again.queue.flushed()
        assert (added, removed) == (1, 3)   # back's PTR; gone's A, PTR and cluster address
        assert bind.values(back, "A") == [addresses[back]]
        assert bind.values(addresses[back], "PTR") == [back]
        assert bind.values(gone, "A") == [] and bind.values(addresses[gone], "PTR") == []
        assert bind.values(full("rec"), "A") == [addresses[back]]
        # Never the site's records, the SOA or the NS.
        assert bind.values(f"www.{DOMAIN}", "A") == ["192.0.2.80"]
        assert bind.values(f"host.{DOMAIN}", "AAAA") == ["2001:db8::80"]
        assert bind.values(full("rec"), "TXT") == ['"site note"']
        assert bind.values(DOMAIN, "NS") == before_ns
    finally:
        if restarted is not None:
            restarted.plugins.unregister_all()
        await grid.stop()


def bind_reverse(address):
    import dns.reversename
    return dns.reversename.from_address(address).to_text()


IPV6_PLUGIN = '''"""Test plugin: IPv6 addresses, as an address-management plugin sets them."""

DEFAULT_ORDER = 60
ADDRESSES = {"1.six.carol.usher.test": "2001:db8:1::21",
             "2.six.carol.usher.test": "2001:db8:2::22"}


class Plugin:
    def __init__(self, config, api):
        pass

    def entry_point(self, event):
        for vm in event.request.vms:
            if vm in ADDRESSES:
                event.request.set_vm_arg(vm, "ip_address", ADDRESSES[vm])
                event.request.set_vm_arg(vm, "ip_prefix", "64")
'''


@pytest_twisted.ensureDeferred
async def test_ipv6_addresses_get_aaaa_and_a_ptr_only_in_a_reverse_zone_they_are_in(
        tmp_path, bind):
    plugin_dir = tmp_path / "thirdparty"
    plugin_dir.mkdir()
    (plugin_dir / "six.py").write_text(IPV6_PLUGIN, encoding="utf-8")
    from usher.settings import default_plugin_registrations
    registrations = default_plugin_registrations()
    registrations["six"] = {"plugin": "six", "events": ["start_request"], "config": None,
                            "order": None}
    registrations["dns"] = {"plugin": "dns", "events": DNS_EVENTS,
                            "config": dns_config(tmp_path, bind), "order": None}
    grid = with_plugin_pool(Grid(reactor, tmp_path, lnms=1, plugin_dir=str(plugin_dir),
                                 vmm_options=net_args_allowed, registrations=registrations))
    await grid.start()
    try:
        plugin = plugin_instance(grid, "dns")
        await plugin.reconciled
        result = await grid.controller.start("carol", False, [], [], {"cluster": "six",
                                                                      "count": 2})
        assert not result["failed"], result
        await plugin.queue.flushed()
        one, two = full("1.six", "carol"), full("2.six", "carol")
        assert bind.values(one, "AAAA") == ["2001:db8:1::21"]
        assert bind.values(two, "AAAA") == ["2001:db8:2::22"]
        assert bind.values("2001:db8:1::21", "PTR") == [one]
        # 2001:db8:2::/48 is in no reverse zone (the zone is 2001:db8:1::/48): no PTR.
        assert bind.values("2001:db8:2::22", "PTR") == []
        assert bind.values(full("six", "carol"), "AAAA") == ["2001:db8:1::21",
                                                             "2001:db8:2::22"]
        await grid.controller.op_on("carol", False, "delete", Selection(names=[one, two]),
                                    {"force": True})
        await plugin.queue.flushed()
        assert bind.values(one, "AAAA") == [] and bind.values(full("six", "carol"), "AAAA") == []
        assert bind.values("2001:db8:1::21", "PTR") == []
    finally:
        grid.controller.plugins.unregister_all()
        await grid.stop()


def test_the_test_server_listens_where_it_is_told_and_restarts_on_its_port(tmp_path):
    from tests.bindserver import BindServer
    server = BindServer(str(tmp_path), zone="other.test", listen=("::1",))
    try:
        server.start()
        port = server.port
        assert server.values("other.test", "NS") == ["ns.invalid"]
        conf = open(server.conf_file).read()
        assert "listen-on port %d { none; };" % port in conf
        assert "listen-on-v6 port %d { ::1; };" % port in conf and "recursion no;" in conf
        server.stop()
        assert not server.running
        server.start()
        assert server.port == port and server.values("other.test", "SOA")
    finally:
        server.destroy()
