"""What DNS records a VM needs, and which records in a zone are Usher's: pure
functions, no I/O.

A managed VM ``1.sneetch.alice.usher.local`` at address ``10.201.0.11``
needs (``Record`` = zone, owner name, type, value):

- ``1.sneetch.alice.usher.local A 10.201.0.11`` (AAAA for IPv6) in the
  forward zone;
- ``11.0.201.10.in-addr.arpa PTR 1.sneetch.alice.usher.local`` in the
  longest configured reverse zone holding the address (none: no PTR);
- with ``cluster_names``, ``sneetch.alice.usher.local A 10.201.0.11``: the
  cluster's round-robin name, one record per VM.

Every name is checked again here (``usher.naming``) and every address with
``ipaddress``; a VM that fails is skipped with the reason (``Skipped``).
Owner names are Usher user names, which may hold ``_``: not a host name
character, so BIND's ``check-names`` refuses such records -- skipped too.

``Contributions`` counts which VMs want each record, so a record two VMs
share (a name both a VM's and a cluster's) goes only with the last of them.
"""

import ipaddress
from collections import namedtuple

import dns.name
import dns.reversename

from usher import naming
from usher.errors import InvalidRequest

FORWARD_TYPES = ("A", "AAAA")
REVERSE_ROOTS = ("in-addr.arpa", "ip6.arpa")
MAX_NAME = 253

Record = namedtuple("Record", "zone name rdtype value")
# One VM as the records need it: its checked names and address.
Identity = namedtuple("Identity", "fqdn owner cluster address")


class Skipped(ValueError):
    """A VM the plugin gives no records (the message says why)."""


class Layout:
    """Where records go: the Usher ``domain``, the forward ``zone`` (the
    domain or a parent of it), the ``reverse_zones`` and whether clusters
    get a round-robin name. Names are lower case without the final dot."""

    def __init__(self, domain, zone, reverse_zones=(), cluster_names=True):
        self.domain = normal_name(domain)
        self.zone = normal_name(zone)
        self.reverse_zones = tuple(normal_name(z) for z in reverse_zones)
        self.cluster_names = bool(cluster_names)

    @property
    def zones(self):
        return (self.zone, *self.reverse_zones)


def normal_name(name):
    return name.strip().rstrip(".").lower()


def under(name, zone):
    return name == zone or name.endswith("." + zone)


def check_zone_name(zone):
    """-> the zone name, normalised; ValueError saying what is wrong."""
    if not isinstance(zone, str) or not zone.strip():
        raise ValueError("empty zone name")
    zone = normal_name(zone)
    if len(zone) > MAX_NAME:
        raise ValueError(f"zone name {zone[:60]!r}... is longer than {MAX_NAME} characters")
    for label in zone.split("."):
        if not naming.LABEL_RE.fullmatch(label):
            raise ValueError(f"zone name {zone[:80]!r}: label {label[:63]!r} is not a DNS "
                             "label (letters, digits and hyphens)")
    return zone


def check_reverse_zone(zone):
    """-> the reverse zone, normalised; ValueError unless it is
    ``in-addr.arpa`` / ``ip6.arpa`` or under one, with decimal octets
    (at most 4) or single hexadecimal nibbles (at most 32)."""
    zone = check_zone_name(zone)
    root = next((r for r in REVERSE_ROOTS if under(zone, r)), None)
    if root is None:
        raise ValueError(f"reverse zone {zone!r} is not under in-addr.arpa or ip6.arpa")
    labels = zone[: -len(root)].rstrip(".").split(".") if zone != root else []
    if root == "in-addr.arpa":
        if len(labels) > 4 or any(not lab.isdigit() or int(lab) > 255 or
                                  (lab != "0" and lab.startswith("0")) for lab in labels):
            raise ValueError(f"reverse zone {zone!r}: in-addr.arpa labels are at most four "
                             "octets 0-255")
    elif len(labels) > 32 or any(len(lab) != 1 or lab not in "0123456789abcdef"
                                 for lab in labels):
        raise ValueError(f"reverse zone {zone!r}: ip6.arpa labels are at most 32 single "
                         "hexadecimal digits")
    return zone


def check_address(text):
    """-> ipaddress object of an address text; ValueError otherwise (a
    scoped IPv6 address has no place in DNS)."""
    if not isinstance(text, str) or "%" in text or len(text) > 64:
        raise ValueError(f"not an IP address: {str(text)[:64]!r}")
    return ipaddress.ip_address(text.strip())


def reverse_name(address):
    return dns.reversename.from_address(str(address)).to_text(omit_final_dot=True)


def longest_zone(name, zones):
    """The longest of ``zones`` holding ``name`` (None: none does)."""
    holding = [z for z in zones if under(name, z)]
    return max(holding, key=len) if holding else None


def identify(vm, domain):
    """The checked names and address of a VM record -> Identity;
    Skipped saying why it gets no records."""
    name = vm.get("name")
    parts = naming.split(name, domain) if isinstance(name, str) else None
    if parts is None:
        raise Skipped(f"{str(name)[:80]!r} is not an Usher VM name of domain {domain}")
    short, owner = parts
    try:
        naming.check_short_name(short)
        naming.check_user(owner)
        cluster = naming.check_label(vm.get("cluster") or naming.cluster_of(short), "cluster")
    except InvalidRequest as e:
        raise Skipped(str(e)) from None
    if vm.get("owner") not in (None, owner):
        raise Skipped(f"its owner {vm.get('owner')!r} is not the one its name says")
    if "_" in owner:
        raise Skipped(f"its owner {owner!r} has '_', which is not valid in a host name: "
                      "BIND's check-names refuses it (no DNS records for this user's VMs)")
    if len(name) > MAX_NAME:
        raise Skipped("its name is too long for DNS")
    raw = (vm.get("args") or {}).get("ip_address")
    if raw is None:
        raise Skipped("it has no ip_address (no address management plugin gave it one)")
    try:
        address = check_address(raw)
    except ValueError as e:
        raise Skipped(f"its ip_address: {e}") from None
    return Identity(name, owner, cluster, address)


def cluster_name(identity, domain):
    return f"{identity.cluster}.{identity.owner}.{domain}"


def records_for(identity, layout):
    """-> the Records a VM needs (a list; possibly without the PTR, see
    ``reverse_zone_of``)."""
    rdtype = "A" if identity.address.version == 4 else "AAAA"
    value = identity.address.compressed
    found = []
    if under(identity.fqdn, layout.zone):
        found.append(Record(layout.zone, identity.fqdn, rdtype, value))
        if layout.cluster_names:
            cluster = cluster_name(identity, layout.domain)
            if len(cluster) <= MAX_NAME:
                found.append(Record(layout.zone, cluster, rdtype, value))
    reverse = reverse_name(identity.address)
    zone = longest_zone(reverse, layout.reverse_zones)
    if zone is not None:
        found.append(Record(zone, reverse, "PTR", identity.fqdn))
    return found


def is_usher_name(name, domain):
    """Whether ``name`` is one Usher gives records: a VM's full name or a
    cluster's round-robin name (``<labels>.<user>.<domain>``), the user a
    valid host name label."""
    parts = naming.split(name, domain)
    if parts is None:
        return False
    short, owner = parts
    try:
        naming.check_short_name(short)
        naming.check_user(owner)
    except InvalidRequest:
        return False
    return "_" not in owner


def usher_records(zone, found, layout):
    """Of the records of a zone transfer (``found``: (name, rdtype, value)
    with names normalised), those Usher manages -> set of Records: A/AAAA at
    Usher names in the forward zone, PTRs to Usher names in reverse zones
    (never SOA, NS or anything else; never other names)."""
    ours = set()
    for name, rdtype, value in found:
        if zone == layout.zone and rdtype in FORWARD_TYPES:
            if is_usher_name(name, layout.domain) and under(name, layout.domain):
                ours.add(Record(zone, name, rdtype, value))
        elif zone in layout.reverse_zones and rdtype == "PTR":
            if is_usher_name(value, layout.domain):
                ours.add(Record(zone, name, rdtype, value))
    return ours


def learned_address(identity_fqdn, forward):
    """The address a VM's own name has in the forward zone's Usher records
    (``forward``: Records), for a VM that came back without its arguments;
    None unless there is exactly one."""
    addresses = sorted(r.value for r in forward if r.name == identity_fqdn)
    if len(addresses) != 1:
        return None
    try:
        return check_address(addresses[0])
    except ValueError:
        return None


class Contributions:
    """Which VMs want each record. ``set(vm, records)`` -> (records now
    wanted that were not, records no longer wanted)."""

    def __init__(self):
        self._by_record = {}   # Record -> set of VM names
        self._by_vm = {}       # VM name -> tuple of Records

    def records_of(self, vm):
        return self._by_vm.get(vm, ())

    def __contains__(self, record):
        return record in self._by_record

    def wanted(self):
        return set(self._by_record)

    def vms(self):
        return set(self._by_vm)

    def set(self, vm, records):
        old = set(self._by_vm.get(vm, ()))
        new = set(records)
        added, dropped = [], []
        for record in old - new:
            holders = self._by_record[record]
            holders.discard(vm)
            if not holders:
                del self._by_record[record]
                dropped.append(record)
        for record in new - old:
            holders = self._by_record.setdefault(record, set())
            if not holders:
                added.append(record)
            holders.add(vm)
        if new:
            self._by_vm[vm] = tuple(sorted(new))
        else:
            self._by_vm.pop(vm, None)
        return added, dropped

    def remove(self, vm):
        return self.set(vm, ())
