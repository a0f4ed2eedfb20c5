"""IP address management over the SQL plugin's store: plain functions of an
open transaction (``store.Transaction``), no Twisted, no threads.

- A *subnet* is a CIDR (IPv4 or IPv6) with an optional VLAN id, gateway, DNS
  servers, excluded addresses and the site's bridge or libvirt network its
  VMs attach to.
- A *range* is an interval of one subnet's addresses, owned by a user (and
  optionally reserved to one of their virtual clusters), or by nobody: open
  to every user. Ranges of a subnet never overlap.
- An address is never given twice: ``addresses.address`` is the primary key
  and ``addresses.vm`` is unique. A lease is ``reserved`` when the start is
  asked for, ``used`` once it succeeded, and deleted when the VM goes.

Never given: a subnet's network address, its IPv4 broadcast address (not in
a /31 or /32), the gateway, DNS servers inside the subnet and the excluded
addresses. Allocation never enumerates a range (an IPv6 /64 holds 2^64
addresses): it walks the gaps between the addresses already held, in the
order of their ``sort_key`` (the address as 32 hex digits), in SQL.

A request's VMs of one cluster get addresses from one range (all or none:
``Exhausted`` otherwise, naming the user, the cluster and what is free),
after the cluster's addresses already held there where there is room. Ranges
are tried: the user's for that cluster, then the user's for any cluster,
then the open ones; among equals, one the cluster already uses, then the
oldest.

The MAC of a VM is derived from its address alone (``mac_for``): the locally
administered prefix ``02`` and the first 5 bytes of the SHA-256 of the
packed address, so a VM keeps its MAC as long as its address.
"""

import hashlib
import ipaddress
import json
import re
from dataclasses import asdict, dataclass

from usher.plugins.sql.store import Conflict, TryAgain

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")
# Held addresses read per query while walking a range's gaps.
WALK_BATCH = 512
RESERVED, USED = "reserved", "used"


class IpamError(ValueError):
    """A request the address management refuses (bad input, a conflict)."""


class Exhausted(IpamError):
    """No range has room for the VMs asked for."""


@dataclass(frozen=True)
class Lease:
    address: str
    prefix: int
    gateway: str | None
    dns: tuple
    vlan: int | None
    mac: str
    subnet: str
    bridge: str | None
    network: str | None

    def vm_args(self):
        """The VM arguments (all strings) the LNM's domain template uses."""
        args = {"ip_address": self.address, "ip_prefix": str(self.prefix), "mac": self.mac}
        if self.gateway:
            args["ip_gateway"] = self.gateway
        if self.dns:
            args["ip_dns"] = ",".join(self.dns)
        if self.vlan is not None:
            args["vlan"] = str(self.vlan)
        if self.bridge:
            args["bridge"] = self.bridge
        elif self.network:
            args["network"] = self.network
        return args

    def to_json(self):
        return dict(asdict(self), dns=list(self.dns))


def mac_for(address):
    """The MAC of the VM holding ``address``: ``02`` (locally administered,
    unicast) and the first 5 bytes of SHA-256(packed address)."""
    digest = hashlib.sha256(ipaddress.ip_address(address).packed).digest()
    return ":".join(f"{b:02x}" for b in (0x02,) + tuple(digest[:5]))


def sort_key(value):
    """An address (or its integer) as 32 hex digits: SQL orders them."""
    return f"{int(value):032x}"


# -- validation -----------------------------------------------------------------------

def _name(value, what):
    if not isinstance(value, str) or not NAME.match(value):
        raise IpamError(f"invalid {what} {str(value)[:64]!r}: letters, digits, '_', '.', "
                        "'-', at most 64")
    return value


def _optional_name(value, what):
    return None if value in (None, "") else _name(value, what)


def _address(text, what):
    try:
        return ipaddress.ip_address(str(text).strip())
    except ValueError:
        raise IpamError(f"invalid {what} {str(text)[:64]!r}") from None


def _inside(address, net, what):
    if address.version != net.version or address not in net:
        raise IpamError(f"{what} {address} is not in {net}")
    return address


def _intervals(items, net):
    """Excluded addresses ``A`` or ``A-B`` -> merged [(lo, hi)] of integers."""
    found = []
    for item in items:
        first, dash, last = str(item).strip().partition("-")
        lo = _inside(_address(first, "excluded address"), net, "excluded address")
        hi = _inside(_address(last, "excluded address"), net, "excluded address") if dash else lo
        if int(hi) < int(lo):
            raise IpamError(f"excluded range {item}: {hi} comes before {lo}")
        found.append((int(lo), int(hi)))
    return _merged(found)


def _merged(intervals):
    merged = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


# -- subnets --------------------------------------------------------------------------

_SUBNET_COLUMNS = "name, cidr, family, vlan, gateway, dns, excluded, bridge, network"


def _subnet_row(row):
    name, cidr, family, vlan, gateway, dns, excluded, bridge, network = row
    return {"name": name, "cidr": cidr, "family": family, "vlan": vlan, "gateway": gateway,
            "dns": tuple(json.loads(dns)), "excluded": tuple(json.loads(excluded)),
            "bridge": bridge, "network": network}


def _checked_subnet(name, cidr, vlan, gateway, dns, excluded, bridge, network):
    _name(name, "subnet name")
    try:
        net = ipaddress.ip_network(str(cidr).strip(), strict=True)
    except ValueError as e:
        raise IpamError(f"subnet {name}: invalid CIDR {str(cidr)[:64]!r} ({e})") from None
    if vlan is not None and (isinstance(vlan, bool) or not isinstance(vlan, int)
                             or not 1 <= vlan <= 4094):
        raise IpamError(f"subnet {name}: a VLAN id is 1 to 4094, not {vlan!r}")
    if gateway not in (None, ""):
        gateway = str(_inside(_address(gateway, "gateway"), net, "gateway"))
    else:
        gateway = None
    if isinstance(dns, str):
        dns = [d for d in dns.split(",") if d.strip()]
    dns = [str(_address(d, "DNS server")) for d in dns]
    if isinstance(excluded, str):
        excluded = [e for e in excluded.split(",") if e.strip()]
    excluded = [str(e).strip() for e in excluded]
    _intervals(excluded, net)
    bridge = None if bridge in (None, "") else bridge
    network = None if network in (None, "") else network
    if bridge is not None and network is not None:
        raise IpamError(f"subnet {name}: give a bridge or a network, not both")
    for device, what in ((bridge, "bridge"), (network, "network")):
        if device is not None and (not isinstance(device, str) or not DEVICE.match(device)):
            raise IpamError(f"subnet {name}: invalid {what} name {str(device)[:64]!r}")
    return {"name": name, "cidr": str(net), "family": net.version, "vlan": vlan,
            "gateway": gateway, "dns": tuple(dns), "excluded": tuple(excluded),
            "bridge": bridge, "network": network}


def check_subnet(name, cidr, *, vlan=None, gateway=None, dns=(), excluded=(), bridge=None,
                 network=None):
    """Check a subnet's definition (IpamError) -> it, normalized."""
    return _checked_subnet(name, cidr, vlan, gateway, dns, excluded, bridge, network)


def add_subnet(tx, name, cidr, *, vlan=None, gateway=None, dns=(), excluded=(), bridge=None,
               network=None):
    """A new subnet (refused if its name is taken or it overlaps another)."""
    subnet = _checked_subnet(name, cidr, vlan, gateway, dns, excluded, bridge, network)
    net = ipaddress.ip_network(subnet["cidr"])
    for other in list_subnets(tx):
        if other["name"] == name:
            raise IpamError(f"subnet {name} exists ({other['cidr']})")
        other_net = ipaddress.ip_network(other["cidr"])
        if other_net.version == net.version and other_net.overlaps(net):
            raise IpamError(f"subnet {name} ({net}) overlaps subnet {other['name']} "
                            f"({other_net})")
    try:
        tx.execute(f"INSERT INTO subnets ({_SUBNET_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   _subnet_params(subnet))
    except Conflict as e:
        raise IpamError(f"subnet {name}: {e}") from None
    return subnet


def _subnet_params(subnet):
    return (subnet["name"], subnet["cidr"], subnet["family"], subnet["vlan"],
            subnet["gateway"], json.dumps(list(subnet["dns"])),
            json.dumps(list(subnet["excluded"])), subnet["bridge"], subnet["network"])


def define_subnet(tx, name, cidr, **options):
    """A subnet the plugin's configuration declares: added, left alone if
    the database has it so, or updated (not its CIDR). -> "added",
    "unchanged" or "updated"."""
    wanted = _checked_subnet(name, cidr, options.get("vlan"), options.get("gateway"),
                             options.get("dns", ()), options.get("excluded", ()),
                             options.get("bridge"), options.get("network"))
    current = subnet(tx, name)
    if current is None:
        add_subnet(tx, name, cidr, **options)
        return "added"
    if current["cidr"] != wanted["cidr"]:
        raise IpamError(f"subnet {name} is {current['cidr']} in the database, not "
                        f"{wanted['cidr']}: remove it first (usher ipam subnet remove)")
    if current == wanted:
        return "unchanged"
    tx.execute("UPDATE subnets SET vlan = ?, gateway = ?, dns = ?, excluded = ?, bridge = ?, "
               "network = ? WHERE name = ?", _subnet_params(wanted)[3:] + (name,))
    return "updated"


def subnet(tx, name):
    rows = tx.query(f"SELECT {_SUBNET_COLUMNS} FROM subnets WHERE name = ?", (name,))
    return _subnet_row(rows[0]) if rows else None


def list_subnets(tx):
    return [_subnet_row(row) for row in
            tx.query(f"SELECT {_SUBNET_COLUMNS} FROM subnets ORDER BY name")]


def remove_subnet(tx, name):
    """Remove a subnet and its ranges; refused while an address is held."""
    if subnet(tx, name) is None:
        raise IpamError(f"no subnet {name}")
    held = tx.query("SELECT COUNT(*) FROM addresses WHERE subnet = ?", (name,))[0][0]
    if held:
        raise IpamError(f"subnet {name}: {held} addresses are held by VMs; it stays")
    tx.execute("DELETE FROM ranges WHERE subnet = ?", (name,))
    tx.execute("DELETE FROM subnets WHERE name = ?", (name,))


def has_subnets(tx):
    return bool(tx.query("SELECT 1 FROM subnets LIMIT 1"))


# -- ranges ---------------------------------------------------------------------------

_RANGE_COLUMNS = "id, subnet, first_address, last_address, owner, cluster"


def _range_row(row):
    rid, subnet_name, first, last, owner, cluster = row
    return {"id": rid, "subnet": subnet_name, "first": first, "last": last, "owner": owner,
            "cluster": cluster}


def _checked_range(tx, subnet_name, first, last, owner, cluster):
    found = subnet(tx, subnet_name)
    if found is None:
        raise IpamError(f"no subnet {subnet_name}")
    net = ipaddress.ip_network(found["cidr"])
    lo = _inside(_address(first, "first address"), net, "first address")
    hi = _inside(_address(last, "last address"), net, "last address")
    if int(hi) < int(lo):
        raise IpamError(f"range {lo}-{hi}: {hi} comes before {lo}")
    owner = _optional_name(owner, "owner")
    cluster = _optional_name(cluster, "cluster")
    if cluster is not None and owner is None:
        raise IpamError("a range reserved to a cluster needs its owner (--owner)")
    return found, lo, hi, owner, cluster


def _overlapping(tx, subnet_name, lo, hi, but=None):
    for other in _ranges_where(tx, "subnet = ?", (subnet_name,)):
        if other["id"] == but:
            continue
        if int(ipaddress.ip_address(other["first"])) <= int(hi) and int(lo) <= int(
                ipaddress.ip_address(other["last"])):
            return other
    return None


def add_range(tx, subnet_name, first, last, *, owner=None, cluster=None):
    """A new range of ``subnet_name`` -> its id (refused if it overlaps another)."""
    _found, lo, hi, owner, cluster = _checked_range(tx, subnet_name, first, last, owner,
                                                    cluster)
    other = _overlapping(tx, subnet_name, lo, hi)
    if other is not None:
        raise IpamError(f"range {lo}-{hi} overlaps range {other['id']} "
                        f"({other['first']}-{other['last']})")
    return tx.insert("INSERT INTO ranges (subnet, first_address, last_address, owner, cluster) "
                     "VALUES (?, ?, ?, ?, ?) RETURNING id",
                     (subnet_name, str(lo), str(hi), owner, cluster))


def define_range(tx, subnet_name, first, last, *, owner=None, cluster=None):
    """A range the plugin's configuration declares (found by its subnet and
    bounds; its owner and cluster updated) -> (id, "added" | "unchanged" |
    "updated")."""
    _found, lo, hi, owner, cluster = _checked_range(tx, subnet_name, first, last, owner,
                                                    cluster)
    for current in _ranges_where(tx, "subnet = ? AND first_address = ? AND last_address = ?",
                                 (subnet_name, str(lo), str(hi))):
        if (current["owner"], current["cluster"]) == (owner, cluster):
            return current["id"], "unchanged"
        tx.execute("UPDATE ranges SET owner = ?, cluster = ? WHERE id = ?",
                   (owner, cluster, current["id"]))
        return current["id"], "updated"
    return add_range(tx, subnet_name, first, last, owner=owner, cluster=cluster), "added"


def _ranges_where(tx, where, params):
    return [_range_row(row) for row in tx.query(
        f"SELECT {_RANGE_COLUMNS} FROM ranges WHERE {where} ORDER BY id", params)]


def get_range(tx, range_id):
    rows = _ranges_where(tx, "id = ?", (range_id,))
    return rows[0] if rows else None


def remove_range(tx, range_id):
    if get_range(tx, range_id) is None:
        raise IpamError(f"no range {range_id}")
    held = tx.query("SELECT COUNT(*) FROM addresses WHERE range_id = ?", (range_id,))[0][0]
    if held:
        raise IpamError(f"range {range_id}: {held} addresses are held by VMs; it stays")
    tx.execute("DELETE FROM ranges WHERE id = ?", (range_id,))


def list_ranges(tx, owner=None, *, shared=False):
    """Ranges (all, or ``owner``'s; ``shared``: and the open ones), each with
    ``size`` (addresses that may be given) and ``free``."""
    if owner is None:
        found = _ranges_where(tx, "1 = 1", ())
    elif shared:
        found = _ranges_where(tx, "owner = ? OR owner IS NULL", (owner,))
    else:
        found = _ranges_where(tx, "owner = ?", (owner,))
    subnets = {}
    for rng in found:
        geometry = _geometry(tx, rng, subnets)
        rng["size"] = geometry.usable
        rng["free"] = _free_count(tx, rng["id"], geometry)
    return found


def free_in_range(tx, range_id):
    rng = get_range(tx, range_id)
    if rng is None:
        raise IpamError(f"no range {range_id}")
    return _free_count(tx, range_id, _geometry(tx, rng, {}))


class _Geometry:
    """A range's bounds (integers) and what in it is never given."""

    def __init__(self, subnet_row, rng):
        net = ipaddress.ip_network(subnet_row["cidr"])
        self.subnet = subnet_row
        self.net = net
        self.lo = int(ipaddress.ip_address(rng["first"]))
        self.hi = int(ipaddress.ip_address(rng["last"]))
        never = []
        if not (net.version == 4 and net.prefixlen >= 31):
            never.append((int(net.network_address),) * 2)
            if net.version == 4:
                never.append((int(net.broadcast_address),) * 2)
        for address in (subnet_row["gateway"],) + tuple(subnet_row["dns"]):
            if address and ipaddress.ip_address(address) in net:
                never.append((int(ipaddress.ip_address(address)),) * 2)
        never.extend(_intervals(subnet_row["excluded"], net))
        self.blocked = [(max(lo, self.lo), min(hi, self.hi)) for lo, hi in _merged(never)
                        if hi >= self.lo and lo <= self.hi]
        self.usable = (self.hi - self.lo + 1) - sum(hi - lo + 1 for lo, hi in self.blocked)


def _geometry(tx, rng, subnets):
    if rng["subnet"] not in subnets:
        subnets[rng["subnet"]] = subnet(tx, rng["subnet"])
    return _Geometry(subnets[rng["subnet"]], rng)


def _free_count(tx, range_id, geometry):
    held = tx.query("SELECT COUNT(*) FROM addresses WHERE range_id = ?", (range_id,))[0][0]
    for lo, hi in geometry.blocked:
        held -= tx.query("SELECT COUNT(*) FROM addresses WHERE range_id = ? AND sort_key >= ? "
                         "AND sort_key <= ?", (range_id, sort_key(lo), sort_key(hi)))[0][0]
    return max(0, geometry.usable - held)


def _take_gap(lo, hi, blocked, want, found):
    """Append to ``found`` the integers of [lo, hi] not ``blocked``, up to ``want``."""
    x = lo
    for b_lo, b_hi in blocked:
        if b_hi < x:
            continue
        if b_lo > hi:
            break
        while x < b_lo and len(found) < want:
            found.append(x)
            x += 1
        if len(found) >= want:
            return
        x = max(x, b_hi + 1)
        if x > hi:
            return
    while x <= hi and len(found) < want:
        found.append(x)
        x += 1


def _free_between(tx, range_id, lo, hi, blocked, want, found):
    """Walk the gaps between held addresses in [lo, hi], in SQL order."""
    cursor = lo
    while cursor <= hi and len(found) < want:
        rows = tx.query("SELECT sort_key FROM addresses WHERE range_id = ? AND sort_key >= ? "
                        "AND sort_key <= ? ORDER BY sort_key LIMIT ?",
                        (range_id, sort_key(cursor), sort_key(hi), WALK_BATCH))
        for (key,) in rows:
            held = int(key, 16)
            _take_gap(cursor, held - 1, blocked, want, found)
            cursor = held + 1
            if len(found) >= want:
                return
        if len(rows) < WALK_BATCH:
            _take_gap(cursor, hi, blocked, want, found)
            return


# -- leases ----------------------------------------------------------------------------

_ADDRESS_COLUMNS = ("address, sort_key, subnet, range_id, vm, owner, cluster, state, "
                    "reserved_at, request_id")


def _lease_of_row(address, subnet_row):
    net = ipaddress.ip_network(subnet_row["cidr"])
    return Lease(address=address, prefix=net.prefixlen, gateway=subnet_row["gateway"],
                 dns=tuple(subnet_row["dns"]), vlan=subnet_row["vlan"], mac=mac_for(address),
                 subnet=subnet_row["name"], bridge=subnet_row["bridge"],
                 network=subnet_row["network"])


def _candidates(tx, owner, cluster):
    """The ranges ``owner``'s cluster may take addresses from, best first."""
    found = _ranges_where(tx, "(owner = ? AND (cluster = ? OR cluster IS NULL)) "
                              "OR owner IS NULL", (owner, cluster))
    used = {rid for (rid,) in tx.query(
        "SELECT DISTINCT range_id FROM addresses WHERE owner = ? AND cluster = ?",
        (owner, cluster))}

    def rank(rng):
        tier = 0 if rng["cluster"] is not None else (1 if rng["owner"] is not None else 2)
        return (tier, rng["id"] not in used, rng["id"])
    return sorted(found, key=rank)


def reserve(tx, owner, cluster, vms, *, request_id=None, now):
    """Reserve an address for each of ``vms`` (of ``owner``'s ``cluster``),
    all in one range, all or none -> {vm: Lease}. A VM that holds an address
    already keeps it. Raises ``Exhausted``. Start the transaction with
    ``tx.lock("addresses")`` when other processes may reserve at once (else
    PostgreSQL runs it again, ``TryAgain``, until it sees their addresses)."""
    result = {}
    need = []
    for vm in vms:
        lease = lease_of(tx, vm)
        if lease is not None:
            result[vm] = lease
        else:
            need.append(vm)
    if not need:
        return result
    candidates = _candidates(tx, owner, cluster)
    if not candidates:
        raise Exhausted(f"user {owner} has no address range (cluster {cluster}): an "
                        "administrator gives one with 'usher ipam range add'")
    subnets = {}
    most_free = 0
    for rng in candidates:
        geometry = _geometry(tx, rng, subnets)
        free = _free_count(tx, rng["id"], geometry)
        most_free = max(most_free, free)
        if free < len(need):
            continue
        last = tx.query("SELECT MAX(sort_key) FROM addresses WHERE range_id = ? AND owner = ? "
                        "AND cluster = ?", (rng["id"], owner, cluster))[0][0]
        start = geometry.lo if last is None else min(int(last, 16) + 1, geometry.hi)
        found = []
        _free_between(tx, rng["id"], start, geometry.hi, geometry.blocked, len(need), found)
        if len(found) < len(need) and start > geometry.lo:
            _free_between(tx, rng["id"], geometry.lo, start - 1, geometry.blocked,
                          len(need), found)
        if len(found) < len(need):
            continue
        for vm, value in zip(need, found):
            address = str(ipaddress.ip_address(value))
            try:
                tx.execute(f"INSERT INTO addresses ({_ADDRESS_COLUMNS}) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (address, sort_key(value), rng["subnet"], rng["id"], vm, owner,
                            cluster, RESERVED, now, request_id))
            except Conflict as e:
                # Taken by another transaction since it was read: run again.
                raise TryAgain(str(e)) from None
            result[vm] = _lease_of_row(address, geometry.subnet)
        return result
    raise Exhausted(
        f"no address range of user {owner} has {len(need)} free addresses for cluster "
        f"{cluster} (a cluster's VMs get addresses from one range): at most {most_free} "
        f"free in one of {len(candidates)} ranges")


def mark_used(tx, vm):
    """The start of ``vm`` succeeded: its address is in use. -> whether it had one."""
    return tx.execute("UPDATE addresses SET state = ? WHERE vm = ?", (USED, vm)) > 0


def release(tx, vm):
    """``vm`` is gone: free its address. -> the address (None: it had none)."""
    rows = tx.query("SELECT address FROM addresses WHERE vm = ?", (vm,))
    if not rows:
        return None
    tx.execute("DELETE FROM addresses WHERE vm = ?", (vm,))
    return rows[0][0]


def release_reserved(tx, vm, request_id):
    """Free what request ``request_id`` reserved for ``vm`` and never used
    (a start refused or failed after the reservation); an address the VM
    held before that request stays. -> the address, or None."""
    if request_id is None:
        rows = tx.query("SELECT address FROM addresses WHERE vm = ? AND state = ? "
                        "AND request_id IS NULL", (vm, RESERVED))
    else:
        rows = tx.query("SELECT address FROM addresses WHERE vm = ? AND state = ? "
                        "AND request_id = ?", (vm, RESERVED, request_id))
    if not rows:
        return None
    tx.execute("DELETE FROM addresses WHERE address = ?", (rows[0][0],))
    return rows[0][0]


def lease_of(tx, vm):
    rows = tx.query("SELECT a.address, " + ", ".join(f"s.{c}" for c in _SUBNET_COLUMNS.split(", "))
                    + " FROM addresses a JOIN subnets s ON s.name = a.subnet WHERE a.vm = ?",
                    (vm,))
    if not rows:
        return None
    return _lease_of_row(rows[0][0], _subnet_row(rows[0][1:]))


def _address_row(row):
    (address, _key, subnet_name, range_id, vm, owner, cluster, state, reserved_at,
     request_id) = row
    return {"address": address, "subnet": subnet_name, "range_id": range_id, "vm": vm,
            "owner": owner, "cluster": cluster, "state": state, "reserved_at": reserved_at,
            "request_id": request_id, "mac": mac_for(address)}


def leases(tx, owner=None, subnet=None):
    """Held addresses (all, or of ``owner`` / in ``subnet``), in address order."""
    where, params = [], []
    if owner is not None:
        where.append("owner = ?")
        params.append(owner)
    if subnet is not None:
        where.append("subnet = ?")
        params.append(subnet)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return [_address_row(row) for row in tx.query(
        f"SELECT {_ADDRESS_COLUMNS} FROM addresses{clause} ORDER BY subnet, sort_key",
        tuple(params))]


def holder_of(tx, address):
    """Which VM (and user) holds ``address`` -> a lease row, or None."""
    text = str(_address(address, "address"))
    rows = tx.query(f"SELECT {_ADDRESS_COLUMNS} FROM addresses WHERE address = ?", (text,))
    return _address_row(rows[0]) if rows else None


def reconcile(tx, live, now, owners=None, connected=None):
    """After the controller's recovery: ``live`` maps every VM it manages to
    the address its record names (or None); ``owners`` maps VMs to their
    (owner, cluster). Their leases stay (a reserved one is in use now: its
    VM came back); a VM that came back naming a free address of a range gets
    it again; every other lease is an orphan (a start cut short, a release
    the controller could not write before it stopped) and is released --
    unless ``connected`` (the LNMs attached now) is given and the mirror
    places the VM on an LNM that is not back: it may still run there, and
    its address stays. -> the released lease rows."""
    released = []
    held = {}
    where = {}
    if connected is not None:
        where = dict(tx.query("SELECT name, lnm FROM vms WHERE lnm IS NOT NULL"))
    for row in leases(tx):
        lnm = where.get(row["vm"])
        if row["vm"] not in live and lnm is not None and lnm not in connected:
            continue
        if row["vm"] in live:
            held[row["vm"]] = row
            if row["state"] == RESERVED:
                tx.execute("UPDATE addresses SET state = ? WHERE address = ?",
                           (USED, row["address"]))
        else:
            tx.execute("DELETE FROM addresses WHERE address = ?", (row["address"],))
            released.append(row)
    for vm, address in sorted(live.items()):
        if vm not in held and address:
            _readopt(tx, vm, address, now, (owners or {}).get(vm, (None, None)))
    return released


def _readopt(tx, vm, address, now, owner_cluster):
    """A VM that came back naming an address the database does not hold
    for it: given it again when a range has it free."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if holder_of(tx, str(ip)) is not None:
        return False
    for rng in _ranges_where(tx, "1 = 1", ()):
        geometry = _geometry(tx, rng, {})
        value = int(ip)
        if (ip.version == geometry.net.version and geometry.lo <= value <= geometry.hi
                and not any(lo <= value <= hi for lo, hi in geometry.blocked)):
            owner, cluster = owner_cluster
            tx.execute(f"INSERT INTO addresses ({_ADDRESS_COLUMNS}) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (str(ip), sort_key(value), rng["subnet"], rng["id"], vm, owner,
                        cluster, USED, now, None))
            return True
    return False


# -- what users may see (the plugin's queries) ---------------------------------------------

def _whose(user, admin, owner):
    if admin:
        return owner
    if owner not in (None, user):
        raise IpamError("only administrators may see other users' addresses")
    return user


def ranges_for(tx, user, admin, owner=None):
    """The ranges a caller may see, with free counts: an administrator all
    (or ``owner``'s), a user their own and the open ones."""
    whose = _whose(user, admin, owner)
    return list_ranges(tx, whose, shared=not admin)


def leases_for(tx, user, admin, owner=None):
    """The leases a caller may see: an administrator all (or ``owner``'s),
    a user their own."""
    return leases(tx, owner=_whose(user, admin, owner))
