"""A VM's network arguments: checking them, and how the guest is given them.

The controller's address-management plugin (the SQL plugin) sets, per VM,
``mac``, ``ip_address``, ``ip_prefix`` and optionally ``ip_gateway``,
``ip_dns`` (comma-separated) and ``vlan``, with ``bridge`` or ``network``
(checked by ``ArgPolicy`` against the LNM's ``bridges``/``networks``). They
are template variables like the others: the LNM's ``plugin_args`` must list
them, and its ``request_args`` should not (users would choose their own
addresses). Each value is checked here (``check_value``) and the set of them
together (``GuestNetwork.from_values``: prefix in range for the family,
gateway inside the address's network, ...); values are canonical
(``02:ab:..`` in lower case, ``2001:db8::5``) so that nothing but an address
reaches the XML or the kernel's command line.

What the built-in QEMU template does with them:

- ``<mac address=.../>`` on the VM's interface (its bridge or network);
- ``vlan``: ``<vlan><tag id=.../></vlan>`` on the interface, only where the
  LNM's ``vlan_tags`` option is on (Open vSwitch, or a libvirt network that
  supports tags); a plain Linux bridge ignores the element, so by default
  the VLAN is the site's wiring (the bridge the subnet names);
- for direct kernel boot, words appended to the kernel command line
  (``kernel_args``). IPv4: the kernel's own
  ``ip=<address>::<gateway>:<netmask>:<hostname>:eth0:off[:<dns0>[:<dns1>]]``
  (the VM's name as its host name -- the name the DNS plugin publishes --
  and the first two IPv4 DNS servers), which a kernel built with
  CONFIG_IP_PNP applies itself and an initramfs can read from /proc/cmdline
  otherwise. IPv6: the kernel has no such argument, so Usher passes
  ``usher.ip6=<address>/<prefix>``, ``usher.gw6=<gateway>``,
  ``usher.dns=<a>,<b>`` and ``usher.hostname=<name>`` for the guest's init
  to apply. The guest's device is assumed to be ``eth0`` (the first NIC
  without udev renaming).

A site template gets the same variables (``${mac}``, ``${ip_address}``, ...)
and two the LNM derives, which args cannot set: ``${ip_netmask}`` (IPv4's
dotted mask, else empty) and ``${ip_kernel_args}`` (the words above, empty
without an address).
"""

import ipaddress
import re
import xml.etree.ElementTree as ET

from usher.errors import InvalidRequest

NETWORK_VARIABLES = ("mac", "ip_address", "ip_prefix", "ip_gateway", "ip_dns", "vlan")
# Derived by the LNM for site templates; reserved (no arg may set them).
DERIVED_VARIABLES = ("ip_netmask", "ip_kernel_args")
GUEST_DEVICE = "eth0"
# Words of a request's own cmdline that would compete with the address a
# plugin gives (the kernel's ip= and its old name, Usher's IPv6 words).
ADDRESS_WORDS = ("ip=", "nfsaddrs=", "usher.ip6=", "usher.gw6=", "usher.dns=",
                 "usher.hostname=")
MAX_DNS = 4

_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}\Z")
_NUMBER = re.compile(r"[0-9]{1,4}\Z")


def _address(key, value):
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidRequest(f"argument {key!r} is not an IP address: {value[:64]!r}") from None
    if getattr(address, "scope_id", None):
        raise InvalidRequest(f"argument {key!r}: {value[:64]!r} has a scope (%...): "
                             "give the address alone")
    if address.is_multicast or address.is_unspecified:
        raise InvalidRequest(f"argument {key!r}: {address} is not a host's address")
    return address


def check_value(key, value):
    """One network argument's value -> its canonical form; InvalidRequest
    saying why not."""
    if key == "mac":
        if not _MAC.match(value):
            raise InvalidRequest(f"argument 'mac' must be a MAC address xx:xx:xx:xx:xx:xx, "
                                 f"not {value[:64]!r}")
        first = int(value[:2], 16)
        if first & 1 or value.replace(":", "").strip("0") == "":
            raise InvalidRequest(f"argument 'mac': {value} is not a unicast address")
        return value.lower()
    if key in ("ip_address", "ip_gateway"):
        return str(_address(key, value))
    if key == "ip_dns":
        servers = [s.strip() for s in value.split(",")]
        if not 1 <= len(servers) <= MAX_DNS:
            raise InvalidRequest(f"argument 'ip_dns' names 1 to {MAX_DNS} servers, "
                                 f"not {len(servers)}")
        return ",".join(str(_address(key, s)) for s in servers)
    if key in ("ip_prefix", "vlan"):
        highest = 128 if key == "ip_prefix" else 4094
        if not _NUMBER.match(value) or not 1 <= int(value) <= highest:
            raise InvalidRequest(f"argument {key!r} must be a number from 1 to {highest}, "
                                 f"not {value[:64]!r}")
        return str(int(value))
    raise KeyError(key)


class GuestNetwork:
    """A VM's checked network settings (``from_values``)."""

    def __init__(self, interface, gateway=None, dns=(), mac=None, vlan=None):
        self.interface = interface            # ipaddress.IPv4Interface / IPv6Interface
        self.gateway = gateway
        self.dns = tuple(dns)
        self.mac = mac
        self.vlan = vlan

    @classmethod
    def from_values(cls, values):
        """The template values (already canonical) -> a GuestNetwork, or None
        without ``ip_address``; InvalidRequest if they do not fit together."""
        # The LNM's [[domain]] defaults are not checked by ArgPolicy.
        values = {k: check_value(k, values[k]) for k in NETWORK_VARIABLES if values.get(k)}
        if not values.get("ip_address"):
            stray = [k for k in ("ip_prefix", "ip_gateway", "ip_dns") if values.get(k)]
            if stray:
                raise InvalidRequest(f"argument {stray[0]!r} needs ip_address")
            return None
        address = ipaddress.ip_address(values["ip_address"])
        if not values.get("ip_prefix"):
            raise InvalidRequest(f"ip_address {address} needs ip_prefix (the network's "
                                 "prefix length)")
        prefix = int(values["ip_prefix"])
        if prefix > address.max_prefixlen:
            raise InvalidRequest(f"ip_prefix {prefix} is out of range for IPv{address.version} "
                                 f"(1 to {address.max_prefixlen})")
        interface = ipaddress.ip_interface(f"{address}/{prefix}")
        network = interface.network
        if network.num_addresses > 2 and address in (network.network_address,
                                                      network.broadcast_address):
            raise InvalidRequest(f"ip_address {address} is the network's own address "
                                 f"in {network}, not a host's")
        gateway = None
        if values.get("ip_gateway"):
            gateway = ipaddress.ip_address(values["ip_gateway"])
            if gateway.version != address.version or gateway not in network:
                raise InvalidRequest(f"ip_gateway {gateway} is not in {network} "
                                     f"(ip_address {address}/{prefix})")
            if gateway == address:
                raise InvalidRequest(f"ip_gateway {gateway} is the VM's own address")
        dns = [ipaddress.ip_address(s) for s in (values.get("ip_dns") or "").split(",") if s]
        return cls(interface, gateway, dns, values.get("mac"), values.get("vlan"))

    def netmask(self):
        return str(self.interface.netmask) if self.interface.version == 4 else ""

    def kernel_args(self, hostname=None):
        """Words for the guest kernel's command line (see the module
        docstring); ``hostname``: the VM's name (the LNM checked it: DNS
        labels, no colon or space)."""
        address = self.interface.ip
        gateway = str(self.gateway) if self.gateway else ""
        if address.version == 4:
            dns = [str(s) for s in self.dns if s.version == 4][:2]
            fields = [str(address), "", gateway, self.netmask(), hostname or "", GUEST_DEVICE,
                      "off", *dns]
            return ["ip=" + ":".join(fields)]
        words = [f"usher.ip6={self.interface.with_prefixlen}"]
        if gateway:
            words.append(f"usher.gw6={gateway}")
        if self.dns:
            words.append("usher.dns=" + ",".join(str(s) for s in self.dns))
        if hostname:
            words.append(f"usher.hostname={hostname}")
        return words


def derived_values(network, hostname=None):
    """The variables a site template gets from the LNM (DERIVED_VARIABLES)."""
    if network is None:
        return dict.fromkeys(DERIVED_VARIABLES, "")
    return {"ip_netmask": network.netmask(),
            "ip_kernel_args": " ".join(network.kernel_args(hostname))}


def check_request_cmdline(cmdline):
    """A request's own cmdline, where a plugin gives the VM its address:
    refused if it carries address words of its own."""
    for word in cmdline.split():
        if word.startswith(ADDRESS_WORDS):
            raise InvalidRequest(f"argument 'cmdline' must not set the guest's address "
                                 f"({word[:64]!r}): the site gives it")


def guest_cmdline(cmdline, network, hostname=None):
    """The kernel command line with the address words appended (last: they win)."""
    if network is None:
        return cmdline
    return " ".join([cmdline, *network.kernel_args(hostname)]).strip()


def add_interfaces(devices, values, *, vlan_tags=False):
    """The VM's interfaces (its ``network`` and/or ``bridge``) under
    ``devices``; the first gets its MAC and, with ``vlan_tags``, its VLAN tag
    (the address is for one interface)."""
    mac, vlan = values.get("mac"), values.get("vlan") if vlan_tags else None
    for kind in ("network", "bridge"):
        if values.get(kind):
            nic = ET.SubElement(devices, "interface", {"type": kind})
            if mac:
                ET.SubElement(nic, "mac", {"address": mac})
            ET.SubElement(nic, "source", {kind: values[kind]})
            if vlan:
                ET.SubElement(ET.SubElement(nic, "vlan"), "tag", {"id": vlan})
            ET.SubElement(nic, "model", {"type": "virtio"})
            mac = vlan = None
