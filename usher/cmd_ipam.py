"""``usher ipam``: the SQL plugin's IP address management for administrators
— subnets, the ranges users (and clusters) own, what is free, who holds an
address. The logic is the plugin's (``usher.plugins.sql.ipam``); this module
parses, runs one transaction and prints.

    usher ipam subnet add NAME CIDR [--vlan N] [--gateway A] [--dns A,B]
                          [--exclude A,B|A-B] [--bridge BR | --network NET]
    usher ipam subnet list | remove NAME
    usher ipam range add SUBNET FIRST LAST [--owner U] [--cluster C]
    usher ipam range list [--owner U] | remove ID
    usher ipam free [SUBNET]
    usher ipam who ADDRESS
    usher ipam leases [--owner U] [--subnet S]

Each also takes --plugin-config FILE and --json.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from usher import sqladmin
from usher.cliargs import ip_address, ip_address_list, ip_address_spans, ip_network, \
    positive_int, vlan_id
from usher.errors import InvalidRequest


def _ipam():
    from usher.plugins.sql import ipam
    return ipam


def _plain(item) -> dict:
    """An ipam result (dataclass, mapping or named tuple) as a dict."""
    if dataclasses.is_dataclass(item):
        return dataclasses.asdict(item)
    if hasattr(item, "_asdict"):
        return dict(item._asdict())
    return dict(item)


def _change(args, function, *values, **options):
    """``function(tx, *values, **options)`` of ipam in one writing
    transaction; its refusals (ValueError, ipam's errors) -> InvalidRequest."""
    ipam = _ipam()
    refusals = (ValueError, LookupError) + tuple(getattr(ipam, "REFUSALS", ()))

    def change(tx):
        try:
            return function(tx, *values, **options)
        except refusals as e:
            raise InvalidRequest(f"{_text(e)}; nothing changed") from None
    return sqladmin.run(args.plugin_config, change, write=True)


def _read(args, function):
    ipam = _ipam()
    refusals = (ValueError, LookupError) + tuple(getattr(ipam, "REFUSALS", ()))

    def read(tx):
        try:
            return function(tx)
        except refusals as e:
            raise InvalidRequest(_text(e)) from None
    return sqladmin.run(args.plugin_config, read, write=False)


def _text(error) -> str:
    # KeyError's str() is the repr of its argument.
    return error.args[0] if isinstance(error, KeyError) and error.args else str(error)


# -- subnets ---------------------------------------------------------------------------

def _subnet_add(args, context) -> int:
    _change(args, _ipam().add_subnet, args.name, args.cidr, vlan=args.vlan,
            gateway=args.gateway, dns=args.dns, excluded=args.exclude, bridge=args.bridge,
            network=args.network)
    if args.json:
        sqladmin.print_json({"added": args.name})
    else:
        print(f"Added subnet {args.name} {args.cidr}")
    return 0


SUBNET_COLUMNS = ("name", "cidr", "vlan", "gateway", "dns", "excluded", "bridge", "network")


def _subnet_list(args, context) -> int:
    subnets = [_plain(s) for s in _read(args, _ipam().list_subnets)]
    if args.json:
        sqladmin.print_json(subnets)
    else:
        sqladmin.print_table(SUBNET_COLUMNS,
                             [[s.get(key) for key in SUBNET_COLUMNS] for s in subnets])
    return 0


def _subnet_remove(args, context) -> int:
    _change(args, _ipam().remove_subnet, args.name)
    if args.json:
        sqladmin.print_json({"removed": args.name})
    else:
        print(f"Removed subnet {args.name}")
    return 0


# -- ranges ----------------------------------------------------------------------------

RANGE_COLUMNS = ("id", "subnet", "first", "last", "owner", "cluster", "free")


def _range_add(args, context) -> int:
    range_id = _change(args, _ipam().add_range, args.subnet, args.first, args.last,
                       owner=args.owner, cluster=args.cluster)
    if args.json:
        sqladmin.print_json({"added": range_id})
    else:
        whose = "".join(f", {what} {value}" for what, value in
                        (("owner", args.owner), ("cluster", args.cluster)) if value)
        print(f"Added range {range_id}: {args.first} to {args.last} of {args.subnet}{whose}")
    return 0


def _ranges_with_free(tx, owner=None, subnet=None):
    ipam = _ipam()
    if subnet is not None and subnet not in {_plain(s)["name"] for s in ipam.list_subnets(tx)}:
        raise InvalidRequest(f"no subnet {subnet!r}")
    ranges = []
    for item in ipam.list_ranges(tx, owner=owner):
        row = _range_row(_plain(item))
        if subnet is None or row["subnet"] == subnet:
            row["free"] = ipam.free_in_range(tx, row["id"])
            ranges.append(row)
    return ranges


def _range_row(item: dict) -> dict:
    """One range with the column names of RANGE_COLUMNS."""
    return {"id": item["id"], "subnet": item["subnet"],
            "first": item.get("first", item.get("first_address")),
            "last": item.get("last", item.get("last_address")),
            "owner": item.get("owner"), "cluster": item.get("cluster")}


def _print_ranges(args, ranges) -> None:
    if args.json:
        sqladmin.print_json(ranges)
    else:
        sqladmin.print_table(RANGE_COLUMNS, [[r[key] for key in RANGE_COLUMNS] for r in ranges])


def _range_list(args, context) -> int:
    _print_ranges(args, _read(args, lambda tx: _ranges_with_free(tx, owner=args.owner)))
    return 0


def _range_remove(args, context) -> int:
    _change(args, _ipam().remove_range, args.id)
    if args.json:
        sqladmin.print_json({"removed": args.id})
    else:
        print(f"Removed range {args.id}")
    return 0


def _free(args, context) -> int:
    ranges = _read(args, lambda tx: _ranges_with_free(tx, subnet=args.subnet))
    if args.json:
        sqladmin.print_json({"ranges": ranges, "free": sum(r["free"] for r in ranges)})
        return 0
    _print_ranges(args, ranges)
    print(f"{sum(r['free'] for r in ranges)} addresses free in {len(ranges)} ranges")
    return 0


# -- addresses ---------------------------------------------------------------------------

LEASE_COLUMNS = ("address", "vm", "owner", "cluster", "state", "subnet")


def _leases(args, context) -> int:
    leases = [_plain(item) for item in _read(
        args, lambda tx: _ipam().leases(tx, owner=args.owner, subnet=args.subnet))]
    if args.json:
        sqladmin.print_json(leases)
    else:
        sqladmin.print_table(LEASE_COLUMNS, [[item.get(key) for key in LEASE_COLUMNS]
                                             for item in leases])
    return 0


def _holder(tx, address):
    """-> {"address", "held", the lease's fields if held, else "subnet",
    "range" (id or None)}."""
    ipam = _ipam()
    held = [_plain(item) for item in ipam.leases(tx) if _plain(item).get("address") == address]
    if held:
        return {"address": address, "held": True, **held[0]}
    wanted = ipaddress.ip_address(address)
    for subnet in map(_plain, ipam.list_subnets(tx)):
        if wanted in ipaddress.ip_network(subnet["cidr"]):
            in_range = [r for r in map(_range_row, map(_plain, ipam.list_ranges(tx)))
                        if r["subnet"] == subnet["name"] and
                        ipaddress.ip_address(r["first"]) <= wanted <= ipaddress.ip_address(r["last"])]
            return {"address": address, "held": False, "subnet": subnet["name"],
                    "range": in_range[0]["id"] if in_range else None,
                    "owner": in_range[0]["owner"] if in_range else None}
    return {"address": address, "held": False, "subnet": None, "range": None, "owner": None}


def _who(args, context) -> int:
    found = _read(args, lambda tx: _holder(tx, args.address))
    if args.json:
        sqladmin.print_json(found)
    elif found["held"]:
        print(f"{args.address} is {found.get('state')} by VM {found.get('vm')} of "
              f"{found.get('owner')} (cluster {found.get('cluster') or '-'}, "
              f"subnet {found.get('subnet')})")
    elif found["subnet"] is None:
        print(f"{args.address} is in no subnet")
    elif found["range"] is None:
        print(f"{args.address} is free, in subnet {found['subnet']} but in no range")
    else:
        print(f"{args.address} is free, in range {found['range']} of subnet {found['subnet']}"
              + (f" (owner {found['owner']})" if found["owner"] else ""))
    return 0


# -- registration ------------------------------------------------------------------------

def register_ipam_commands(subparsers) -> None:
    common = sqladmin.common_options()
    ipam = subparsers.add_parser(
        "ipam", help="the SQL plugin's IP address management: subnets, ranges, leases")
    objects = ipam.add_subparsers(dest="object", required=True, metavar="WHAT")

    subnet = objects.add_parser("subnet", help="the subnets addresses come from")
    subnet_actions = subnet.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = subnet_actions.add_parser("add", parents=[common], help="add a subnet")
    add.add_argument("name", metavar="NAME")
    add.add_argument("cidr", metavar="CIDR", type=ip_network,
                     help="its network, such as 10.1.0.0/24 or 2001:db8:1::/64")
    add.add_argument("--vlan", type=vlan_id, default=None, metavar="N",
                     help="its 802.1Q VLAN id (1 to 4094)")
    add.add_argument("--gateway", type=ip_address, default=None, metavar="A")
    add.add_argument("--dns", type=ip_address_list, default=(), metavar="A,B",
                     help="DNS servers, comma-separated")
    add.add_argument("--exclude", type=ip_address_spans, default=(), metavar="A,B|A-B",
                     help="addresses never given out: comma-separated addresses or FIRST-LAST")
    device = add.add_mutually_exclusive_group()
    device.add_argument("--bridge", default=None, metavar="BR",
                        help="the host bridge VMs on this subnet attach to")
    device.add_argument("--network", default=None, metavar="NET",
                        help="the libvirt network VMs on this subnet attach to")
    add.set_defaults(handler=_subnet_add)
    listing = subnet_actions.add_parser("list", parents=[common], help="list the subnets")
    listing.set_defaults(handler=_subnet_list)
    remove = subnet_actions.add_parser(
        "remove", parents=[common], help="remove a subnet (refused while it has ranges "
                                         "or addresses are held)")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(handler=_subnet_remove)

    ranges = objects.add_parser("range", help="ranges of a subnet owned by users or clusters")
    range_actions = ranges.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = range_actions.add_parser("add", parents=[common], help="add a range")
    add.add_argument("subnet", metavar="SUBNET")
    add.add_argument("first", metavar="FIRST", type=ip_address)
    add.add_argument("last", metavar="LAST", type=ip_address)
    add.add_argument("--owner", default=None, metavar="U", help="the user it belongs to")
    add.add_argument("--cluster", default=None, metavar="C",
                     help="the virtual cluster of the owner it is kept for")
    add.set_defaults(handler=_range_add)
    listing = range_actions.add_parser("list", parents=[common],
                                       help="list ranges with their free addresses")
    listing.add_argument("--owner", default=None, metavar="U")
    listing.set_defaults(handler=_range_list)
    remove = range_actions.add_parser("remove", parents=[common],
                                      help="remove a range (refused while addresses are held)")
    remove.add_argument("id", metavar="ID", type=positive_int)
    remove.set_defaults(handler=_range_remove)

    free = objects.add_parser("free", parents=[common],
                              help="free addresses per range (of one subnet)")
    free.add_argument("subnet", metavar="SUBNET", nargs="?", default=None)
    free.set_defaults(handler=_free)
    who = objects.add_parser("who", parents=[common], help="which VM and user hold an address")
    who.add_argument("address", metavar="ADDRESS", type=ip_address)
    who.set_defaults(handler=_who)
    leases = objects.add_parser("leases", parents=[common], help="the addresses held")
    leases.add_argument("--owner", default=None, metavar="U")
    leases.add_argument("--subnet", default=None, metavar="S")
    leases.set_defaults(handler=_leases)
