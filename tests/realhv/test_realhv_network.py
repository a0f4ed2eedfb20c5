"""The address reaches the VM, on real QEMU (issue 12): a guest started
through Usher comes up with the network arguments a controller plugin set,
and answers at that address.

A tiny plugin in the controller's ``plugin_dir`` (``NETARGS_PLUGIN``) does
on ``start_request`` what the SQL plugin does with the addresses it
allocates: ``request.set_vm_arg`` of ``mac``, ``ip_address``, ``ip_prefix``,
``ip_gateway``, ``ip_dns`` and ``bridge`` for each VM (IPv4 for the first,
IPv6 for the second). The LNM admits them only as plugin-set
(``plugin_args``; its ``request_args`` stay empty, and a user's own
``--arg ip_address=`` is refused). The test makes a bridge in the first host's
namespace, with private addresses (10.201.0.254/24, fd00:201::fe/64) on it;
the guests' virtio NICs join it with the plugin's MACs; their init reads the
address from the kernel command line (ip= / usher.ip6=), configures eth0 and
serves a page naming the address, MAC and host name it has. The test fetches that page
from each guest at its address, from the host's namespace.

The second test runs the SQL plugin itself (on SQLite), its subnet the
test bridge's: the guest answers at the address the plugin allocated.

Everything lives in namespaces the cluster removes; skips as test_realhv.py.
"""

import json
import os
import sys
import time

import pytest

from tests.realhv import hosts
from tests.realhv.test_realhv import BOOT_TIMEOUT, running, ush, wait_for, wait_ticking
# The fixtures: timed steps, the guest (skips where the machine cannot run it).
from tests.realhv.test_realhv import guest, steps  # noqa: F401

CLUSTER = "net"
VM1 = f"1.{CLUSTER}.{hosts.USHER_USER}.{hosts.USHER_DOMAIN}"
VM2 = f"2.{CLUSTER}.{hosts.USHER_USER}.{hosts.USHER_DOMAIN}"
BRIDGE = "ushbr0"
HOST_SIDE = ("10.201.0.254/24", "fd00:201::fe/64")
# What the plugin gives each VM (as the SQL plugin would from its subnets).
LEASES = {
    VM1: {"ip_address": "10.201.0.11", "ip_prefix": "24", "ip_gateway": "10.201.0.254",
          "ip_dns": "10.201.0.254", "mac": "02:0a:c9:00:0b:01", "bridge": BRIDGE},
    VM2: {"ip_address": "fd00:201::12", "ip_prefix": "64", "ip_gateway": "fd00:201::fe",
          "mac": "02:fd:00:02:01:12", "bridge": BRIDGE},
}
NETARGS_PLUGIN = f'''"""Test plugin: the network args an address-management plugin sets."""

DEFAULT_ORDER = 60
LEASES = {json.dumps(LEASES)}


class Plugin:
    def __init__(self, config, api):
        pass

    def entry_point(self, event):
        request = event.request
        for vm in request.vms:
            for key, value in LEASES.get(vm, {{}}).items():
                request.set_vm_arg(vm, key, value)
'''
NETWORK_ARGS = "mac, ip_address, ip_prefix, ip_gateway, ip_dns, vlan, bridge"
PLUGINS = """\
[[plugins]]
[[[open_authz]]]
events = start_request, list_request, destroy_request, shutdown_request, delete_request
[[[roundrobin]]]
events = start_request
[[[netargs]]]
events = start_request
"""


@pytest.fixture
def cluster(guest, steps, tmp_path):
    directory = tmp_path / "realhv"
    plugin_dir = directory / "plugins"
    plugin_dir.mkdir(parents=True)
    (plugin_dir / "netargs.py").write_text(NETARGS_PLUGIN)
    with running(hosts.Cluster(directory, guest,
                               ctrl_options=f"plugin_dir = {plugin_dir}\n{PLUGINS}",
                               lnm_options=f"plugin_args = {NETWORK_ARGS}\n"
                                           f"bridges = {BRIDGE}\n"), steps) as cluster:
        yield cluster


def in_host(host, *argv, check=True, timeout=30):
    return hosts.run(["ip", "netns", "exec", host.namespace, *argv], check=check,
                     timeout=timeout)


# Fetch a URL from inside a host's namespace (the machine has no ping).
FETCH = ("import sys, urllib.request; "
         "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())")


def fetch(host, url):
    """The page at ``url`` as seen from the host's namespace, or None."""
    result = in_host(host, sys.executable, "-c", FETCH, url, check=False)
    return result.stdout if result.returncode == 0 else None


def make_bridge(host):
    """The guests' bridge in the host's namespace (removed with it)."""
    hosts.run(["ip", "-n", host.namespace, "link", "add", BRIDGE, "type", "bridge"])
    for address in HOST_SIDE:
        # nodad: the host side's IPv6 address is usable at once.
        extra = ["nodad"] if ":" in address else []
        hosts.run(["ip", "-n", host.namespace, "addr", "add", address, "dev", BRIDGE, *extra])
    hosts.run(["ip", "-n", host.namespace, "link", "set", BRIDGE, "up"])


def test_a_guest_comes_up_with_the_address_a_plugin_set(cluster, steps):
    h1 = cluster.hosts[0]
    make_bridge(h1)
    # A user cannot choose an address: the LNM's request_args are empty.
    refused = ush(cluster, "start", "-n", "mine", "-c", "1", "--arg", "ip_address=10.201.0.99",
                  "--arg", "ip_prefix=24", "lnm1", expect=1)
    assert "may not be set by a request" in json.dumps(refused)
    assert in_host(h1, "virsh", "-q", "-c", h1.uri, "list", "--all").stdout.strip() == ""

    with steps("start 2 guests with plugin-set addresses, until both answer"):
        started = ush(cluster, "start", "-n", CLUSTER, "-c", "2", "lnm1")
        assert sorted(vm["name"] for vm in started) == [VM1, VM2]
        consoles = [os.path.join(cluster.dir, "lnm1-state", "consoles", f"{vm}.log")
                    for vm in (VM1, VM2)]
        for path in consoles:
            wait_ticking(path, boots=1, timeout=BOOT_TIMEOUT)
        for vm, url in ((VM1, "http://10.201.0.11/"), (VM2, "http://[fd00:201::12]/")):
            lease = LEASES[vm]
            pages = []
            wait_for(lambda: pages.append(fetch(h1, url)) or pages[-1] is not None,
                     30, f"{vm} to answer at {url}")
            assert pages[-1].split() == ["usher-guest", lease["ip_address"], lease["mac"], vm]

    # What Usher gave libvirt, and what the guest saw.
    xml = hosts.run(["virsh", "-q", "-c", h1.uri, "dumpxml", VM1]).stdout
    assert "<mac address='02:0a:c9:00:0b:01'/>" in xml and f"bridge='{BRIDGE}'" in xml
    assert (f"ip=10.201.0.11::10.201.0.254:255.255.255.0:{VM1}:eth0:off:10.201.0.254"
            in xml)
    assert "usher.ip6=fd00:201::12/64 usher.gw6=fd00:201::fe" in hosts.run(
        ["virsh", "-q", "-c", h1.uri, "dumpxml", VM2]).stdout
    lines = hosts.console_lines(consoles[0])
    assert any(hosts.NETWORK_MARKER in line and "10.201.0.11/24" in line for line in lines)
    # The record keeps the args (what list's address column shows).
    records = {vm["name"]: vm for vm in ush(cluster, "list", "-n", CLUSTER)}
    assert records[VM1]["args"]["ip_address"] == "10.201.0.11"

    with steps("delete both"):
        ush(cluster, "delete", "--force", "-n", CLUSTER)
    deadline = time.monotonic() + 30
    while fetch(h1, "http://10.201.0.11/") is not None:
        assert time.monotonic() < deadline, "10.201.0.11 still answers after delete"
        time.sleep(0.2)
    hosts.run(["ip", "-n", h1.namespace, "link", "del", BRIDGE])


# The SQL plugin itself (issue 12): its subnet is the test bridge's, its range
# alice's; the address it allocates is the one the guest answers at.
SQL_EVENTS = ("start_request, register_vm, start_complete, vm_state_changed, vm_removed, "
              "op_complete, migrate_complete, vm_lost, vm_missing, vm_adopted")
SQL_PLUGINS = f"""\
[[plugins]]
[[[open_authz]]]
events = start_request, list_request, destroy_request, shutdown_request, delete_request
[[[roundrobin]]]
events = start_request
[[[sql]]]
events = {SQL_EVENTS}
config = {{config}}
"""


@pytest.fixture
def sql_cluster(guest, steps, tmp_path):  # noqa: F811
    directory = tmp_path / "realhv"
    directory.mkdir(parents=True)
    config = tmp_path / "sql.config"
    config.write_text(f"""\
database = sqlite:///{tmp_path / "usher-sql.db"}
[subnets]
[[guests]]
cidr = 10.201.0.0/24
gateway = 10.201.0.254
dns = 10.201.0.254
bridge = {BRIDGE}
[ranges]
[[alice]]
subnet = guests
first = 10.201.0.40
last = 10.201.0.49
owner = {hosts.USHER_USER}
""")
    with running(hosts.Cluster(directory, guest,
                               ctrl_options=SQL_PLUGINS.format(config=config),
                               lnm_options=f"plugin_args = {NETWORK_ARGS}\n"
                                           f"bridges = {BRIDGE}\n"), steps) as cluster:
        yield cluster


def test_a_guest_answers_at_the_address_the_sql_plugin_allocated(sql_cluster, steps):  # noqa: F811
    h1 = sql_cluster.hosts[0]
    make_bridge(h1)
    with steps("start a guest with an address from the SQL plugin, until it answers"):
        started = ush(sql_cluster, "start", "-n", "sql", "-c", "1", "lnm1")
        [vm] = [entry["name"] for entry in started]
        record = {r["name"]: r for r in ush(sql_cluster, "list", "-n", "sql")}[vm]
        address, mac = record["args"]["ip_address"], record["args"]["mac"]
        assert address.startswith("10.201.0.4") and record["args"]["bridge"] == BRIDGE
        wait_ticking(os.path.join(sql_cluster.dir, "lnm1-state", "consoles", f"{vm}.log"),
                     boots=1, timeout=BOOT_TIMEOUT)
        pages = []
        wait_for(lambda: pages.append(fetch(h1, f"http://{address}/")) or pages[-1] is not None,
                 30, f"{vm} to answer at {address}")
        assert pages[-1].split() == ["usher-guest", address, mac, vm]
    with steps("delete it"):
        ush(sql_cluster, "delete", "--force", "-n", "sql")
    hosts.run(["ip", "-n", h1.namespace, "link", "del", BRIDGE])
