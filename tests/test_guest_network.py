"""The address reaches the VM (issue 12): a VM's network args in its domain.

The controller's address-management plugin sets ``mac``, ``ip_address``,
``ip_prefix``, ``ip_gateway``, ``ip_dns``, ``vlan`` and ``bridge`` per VM
(``usher.lnm.guest_network``); the LNM's ArgPolicy admits them from plugins
only where ``plugin_args`` lists them, checks every value and their fit, and
the built-in QEMU template puts the MAC (and, with ``vlan_tags``, the VLAN)
on the interface and the address on the kernel command line. The guest
coming up with the address on real QEMU: tests/realhv/test_realhv_network.py.
"""

import xml.etree.ElementTree as ET

import pytest

from usher import settings as usher_settings
from usher.config import load_config
from usher.errors import InvalidRequest
from usher.lnm import domain_xml, guest_network, service

from tests.test_security_domain_args import make_site, policy_for, vm_spec

NETWORK_ARGS = ["mac", "ip_address", "ip_prefix", "ip_gateway", "ip_dns", "vlan", "bridge"]
V4 = {"mac": "02:0A:01:00:05:01", "ip_address": "10.1.0.5", "ip_prefix": "24",
      "ip_gateway": "10.1.0.1", "ip_dns": "10.1.0.53, 10.1.0.54", "vlan": "101",
      "bridge": "br0"}
V6 = {"mac": "02:20:01:0d:b8:05", "ip_address": "2001:DB8::5", "ip_prefix": "64",
      "ip_gateway": "2001:db8::1", "ip_dns": "2001:db8::53", "bridge": "br0"}


@pytest.fixture
def site(tmp_path):
    site = make_site(tmp_path)
    site["state"] = str(tmp_path / "state")
    return site


def build(site, args, *, plugin_set=True, template=None, **policy_changes):
    options = {"request_args": ["cmdline"], "plugin_args": NETWORK_ARGS}
    options.update(policy_changes)
    policy = policy_for(site, site["state"], **options)
    spec = vm_spec(args=args, plugin_args=list(args) if plugin_set else None)
    return domain_xml.build_domain_xml(spec, driver="qemu", state_dir=site["state"],
                                       template=template, defaults=site["defaults"],
                                       policy=policy)


def test_plugin_set_ipv4_args_give_the_mac_and_the_kernel_ip_argument(site):
    root = ET.fromstring(build(site, V4))
    nic = root.find("devices/interface[@type='bridge']")
    assert nic.find("mac").get("address") == "02:0a:01:00:05:01"
    assert nic.find("source").get("bridge") == "br0"
    assert nic.find("vlan") is None             # vlan_tags is off by default
    assert root.findtext("os/cmdline") == (
        "console=ttyS0 ip=10.1.0.5::10.1.0.1:255.255.255.0:q1:eth0:off:10.1.0.53:10.1.0.54")
    # With vlan_tags on, the interface is tagged.
    tagged = ET.fromstring(build(site, V4, vlan_tags=True))
    assert tagged.find("devices/interface/vlan/tag").get("id") == "101"


def test_ipv6_args_are_passed_as_usher_words_for_the_init(site):
    root = ET.fromstring(build(site, V6))
    assert root.find("devices/interface/mac").get("address") == "02:20:01:0d:b8:05"
    assert root.findtext("os/cmdline") == (
        "console=ttyS0 usher.ip6=2001:db8::5/64 usher.gw6=2001:db8::1 usher.dns=2001:db8::53 "
        "usher.hostname=q1")


def test_without_a_gateway_or_dns_the_fields_stay_empty(site):
    args = {"ip_address": "192.168.7.9", "ip_prefix": "30"}
    root = ET.fromstring(build(site, args))
    assert root.findtext("os/cmdline").endswith(" ip=192.168.7.9:::255.255.255.252:q1:eth0:off")
    # No address: the command line is the site's, untouched.
    plain = ET.fromstring(build(site, {"mac": "02:00:00:00:00:01", "bridge": "br0"}))
    assert plain.findtext("os/cmdline") == "console=ttyS0"


@pytest.mark.parametrize("changes, complaint", [
    ({"mac": "01:00:5e:00:00:01"}, "not a unicast address"),            # multicast
    ({"mac": "ff:ff:ff:ff:ff:ff"}, "not a unicast address"),
    ({"mac": "00:00:00:00:00:00"}, "not a unicast address"),
    ({"mac": "02:00:00:00:00"}, "must be a MAC address"),
    ({"mac": "02-00-00-00-00-01"}, "must be a MAC address"),
    ({"mac": "02:00:00:00:00:01'/><hostdev"}, "must be a MAC address"),
    ({"ip_address": "10.1.0.5 init=/bin/sh"}, "not an IP address"),      # cmdline injection
    ({"ip_address": "10.1.0.5:10.1.0.9"}, "not an IP address"),
    ({"ip_gateway": "10.1.0.1::::eth1"}, "not an IP address"),
    ({"ip_dns": "10.1.0.53 rdinit=/bin/sh"}, "not an IP address"),
    ({"ip_dns": "10.1.0.53,10.1.0.54,10.1.0.55,10.1.0.56,10.1.0.57"}, "1 to 4 servers"),
    ({"ip_address": "010.001.000.005"}, "not an IP address"),
    ({"ip_address": "fe80::1%eth0", "ip_gateway": None}, "has a scope"),
    ({"ip_address": "224.0.0.1"}, "not a host's address"),
    ({"ip_address": "0.0.0.0"}, "not a host's address"),
    ({"ip_address": "10.1.0.0"}, "the network's own address"),
    ({"ip_address": "10.1.0.255"}, "the network's own address"),
    ({"ip_prefix": "33"}, "out of range for IPv4"),
    ({"ip_prefix": "0"}, "a number from 1 to 128"),
    ({"ip_prefix": "24 ip=1.2.3.4"}, "a number from 1 to 128"),
    ({"ip_prefix": None}, "needs ip_prefix"),
    ({"ip_address": None}, "'ip_prefix' needs ip_address"),
    ({"ip_gateway": "10.2.0.1"}, "is not in 10.1.0.0/24"),
    ({"ip_gateway": "2001:db8::1"}, "is not in 10.1.0.0/24"),              # family mismatch
    ({"ip_gateway": "10.1.0.5"}, "the VM's own address"),
    ({"vlan": "0"}, "from 1 to 4094"),
    ({"vlan": "4095"}, "from 1 to 4094"),
    ({"vlan": "+5"}, "from 1 to 4094"),
    ({"bridge": "mgmt0"}, "'mgmt0' is not one this host offers"),
])
def test_hostile_values_are_refused(site, changes, complaint):
    args = {k: v for k, v in (V4 | changes).items() if v is not None}
    with pytest.raises(InvalidRequest, match=complaint):
        build(site, args)


def test_ipv6_prefix_in_range_and_mismatches(site):
    with pytest.raises(InvalidRequest, match="a number from 1 to 128"):
        build(site, V6 | {"ip_prefix": "129"})
    with pytest.raises(InvalidRequest, match="is not in 2001:db8::/64"):
        build(site, V6 | {"ip_gateway": "2001:db9::1"})
    root = ET.fromstring(build(site, {k: v for k, v in V6.items() if k != "ip_gateway"}
                               | {"ip_prefix": "128"}))
    assert "usher.ip6=2001:db8::5/128" in root.findtext("os/cmdline")


def test_users_cannot_set_them_plugins_can(site):
    # The same values from the request itself are the user's: refused.
    with pytest.raises(InvalidRequest, match=r"'(mac|ip_\w+|vlan|bridge)' may not be set by "
                                             r"a request on this host"):
        build(site, V4, plugin_set=False, request_args=["bridge"])
    # By default (empty plugin_args) plugins cannot set them either.
    with pytest.raises(InvalidRequest, match="may not be set by a plugin on this host "
                                             r"\(its plugin_args: none\)"):
        build(site, V4, plugin_args=[])
    defaults = load_config(usher_settings.LNM, [], isolated=True)["lnm"]
    assert (defaults["request_args"], defaults["plugin_args"], defaults["vlan_tags"]) == (
        [], [], False)


@pytest.mark.parametrize("word", ["ip=10.9.9.9::::eth0:off", "usher.hostname=1.x.bob.usher.local"])
def test_a_users_cmdline_cannot_compete_with_the_address(site, word):
    spec = vm_spec(args=V4 | {"cmdline": f"console=ttyS0 {word}"}, plugin_args=list(V4))
    policy = policy_for(site, site["state"], request_args=["cmdline"], plugin_args=NETWORK_ARGS)
    with pytest.raises(InvalidRequest, match="must not set the guest's address"):
        domain_xml.build_domain_xml(spec, driver="qemu", state_dir=site["state"],
                                    defaults=site["defaults"], policy=policy)
    # A user's cmdline without address words is kept, the address appended last.
    spec["args"]["cmdline"] = "console=ttyS0 quiet"
    root = ET.fromstring(domain_xml.build_domain_xml(
        spec, driver="qemu", state_dir=site["state"], defaults=site["defaults"],
        policy=policy))
    assert root.findtext("os/cmdline").startswith("console=ttyS0 quiet ip=10.1.0.5::")
    # Derived variables are reserved: no arg may set them.
    with pytest.raises(InvalidRequest, match="'ip_kernel_args' is reserved"):
        vm_spec(args={"ip_kernel_args": "init=/bin/sh"})


def test_site_templates_get_the_variables_and_the_derived_ones(site, tmp_path):
    path = tmp_path / "net.xml"
    path.write_text(
        "<domain type='qemu'><name>${name}</name><memory unit='KiB'>${memory_kib}</memory>"
        "<os><cmdline>console=ttyS0 ${ip_kernel_args}</cmdline></os>"
        "<devices><interface type='bridge'><mac address='${mac}'/>"
        "<source bridge='${bridge}'/><vlan><tag id='${vlan}'/></vlan></interface></devices>"
        "<description>${ip_address}/${ip_prefix} mask ${ip_netmask}</description></domain>")
    template = domain_xml.DomainTemplate.from_file(path)
    root = ET.fromstring(build(site, V4, template=template))
    assert root.find("devices/interface/mac").get("address") == "02:0a:01:00:05:01"
    assert root.find("devices/interface/vlan/tag").get("id") == "101"
    assert root.findtext("description") == "10.1.0.5/24 mask 255.255.255.0"
    assert root.findtext("os/cmdline") == (
        "console=ttyS0 ip=10.1.0.5::10.1.0.1:255.255.255.0:q1:eth0:off:10.1.0.53:10.1.0.54")
    # The site template's values are checked the same way.
    with pytest.raises(InvalidRequest, match="not a unicast address"):
        build(site, V4 | {"mac": "03:00:00:00:00:01"}, template=template)


def test_the_lnm_option_and_defaults_are_checked(site, tmp_path):
    path = tmp_path / "lnm.config"
    path.write_text(f"[lnm]\nstate_dir = {site['state']}\nplugin_args = mac, ip_address, "
                    "ip_prefix, ip_gateway, ip_dns, vlan, bridge\nbridges = br0\n"
                    "vlan_tags = yes\n")
    lnm = load_config(usher_settings.LNM, [str(path)], isolated=True)["lnm"]
    policy = service.arg_policy(lnm)
    assert policy.vlan_tags is True and set(NETWORK_ARGS) <= policy.plugin_args
    # The site's own [[domain]] defaults are not the policy's, but an address
    # in them must still be one.
    defaults = dict(site["defaults"], ip_address="10.1.0.300", ip_prefix="24")
    with pytest.raises(InvalidRequest, match="not an IP address"):
        domain_xml.build_domain_xml(vm_spec(), driver="qemu", state_dir=site["state"],
                                    defaults=defaults, policy=policy)


def test_kernel_args_of_a_guest_network():
    network = guest_network.GuestNetwork.from_values(
        {"ip_address": "10.1.0.5", "ip_prefix": "16", "ip_dns": "2001:db8::53,10.0.0.53"})
    # Only IPv4 servers fit the kernel's ip= fields.
    assert network.kernel_args() == ["ip=10.1.0.5:::255.255.0.0::eth0:off:10.0.0.53"]
    assert guest_network.derived_values(None) == {"ip_netmask": "", "ip_kernel_args": ""}
