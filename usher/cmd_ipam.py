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

import ipaddress

from usher import sqladmin
from usher.cliargs import integer, positive_int
from usher.errors import InvalidRequest


def _ipam():
    from usher.plugins.sql import ipam
    return ipam


def _in_transaction(args, function, *values, write, **options):
    """``function(tx, *values, **options)`` in one transaction of the
    database -> its result; ipam's refusals -> InvalidRequest (the
    transaction is rolled back: nothing changed)."""
    ipam = _ipam()

    def call(tx):
        try:
            return function(tx, *values, **options)
        except ipam.IpamError as e:
            raise InvalidRequest(f"{e}; nothing changed" if write else str(e)) from None
    return sqladmin.run(args.plugin_config, call, write=write)


def _done(args, message, **data) -> int:
    if args.json:
        sqladmin.print_json(data)
    else:
        print(message)
    return 0


def _listed(args, columns, items) -> None:
    if args.json:
        sqladmin.print_json(items)
    else:
        sqladmin.print_table(columns, [[item.get(key) for key in columns] for item in items])


# -- subnets ---------------------------------------------------------------------------

SUBNET_COLUMNS = ("name", "cidr", "vlan", "gateway", "dns", "excluded", "bridge", "network")


def _subnet_add(args, context) -> int:
    subnet = _in_transaction(
        args, _ipam().add_subnet, args.name, args.cidr, vlan=args.vlan, gateway=args.gateway,
        dns=args.dns, excluded=args.exclude, bridge=args.bridge, network=args.network,
        write=True)
    return _done(args, f"Added subnet {subnet['name']} {subnet['cidr']}", added=subnet)


def _subnet_list(args, context) -> int:
    _listed(args, SUBNET_COLUMNS, _in_transaction(args, _ipam().list_subnets, write=False))
    return 0


def _subnet_remove(args, context) -> int:
    _in_transaction(args, _ipam().remove_subnet, args.name, write=True)
    return _done(args, f"Removed subnet {args.name} and its ranges", removed=args.name)


# -- ranges ----------------------------------------------------------------------------

RANGE_COLUMNS = ("id", "subnet", "first", "last", "owner", "cluster", "size", "free")


def _range_add(args, context) -> int:
    range_id = _in_transaction(args, _ipam().add_range, args.subnet, args.first, args.last,
                               owner=args.owner, cluster=args.cluster, write=True)
    whose = "".join(f", {what} {value}" for what, value in
                    (("owner", args.owner), ("cluster", args.cluster)) if value)
    return _done(args, f"Added range {range_id}: {args.first} to {args.last} of "
                       f"{args.subnet}{whose or ', open to every user'}", added=range_id)


def _range_list(args, context) -> int:
    _listed(args, RANGE_COLUMNS,
            _in_transaction(args, _ipam().list_ranges, args.owner, write=False))
    return 0


def _range_remove(args, context) -> int:
    _in_transaction(args, _ipam().remove_range, args.id, write=True)
    return _done(args, f"Removed range {args.id}", removed=args.id)


def _ranges_of_subnet(tx, subnet):
    ipam = _ipam()
    if subnet is not None and ipam.subnet(tx, subnet) is None:
        raise ipam.IpamError(f"no subnet {subnet}")
    return [r for r in ipam.list_ranges(tx) if subnet is None or r["subnet"] == subnet]


def _free(args, context) -> int:
    ranges = _in_transaction(args, _ranges_of_subnet, args.subnet, write=False)
    free = sum(r["free"] for r in ranges)
    if args.json:
        sqladmin.print_json({"ranges": ranges, "free": free})
        return 0
    _listed(args, RANGE_COLUMNS, ranges)
    print(f"{free} free addresses in {len(ranges)} ranges")
    return 0


# -- addresses ---------------------------------------------------------------------------

LEASE_COLUMNS = ("address", "vm", "owner", "cluster", "state", "subnet", "mac")


def _leases(args, context) -> int:
    _listed(args, LEASE_COLUMNS, _in_transaction(args, _ipam().leases, owner=args.owner,
                                                 subnet=args.subnet, write=False))
    return 0


def _holder(tx, address):
    """-> the lease holding ``address`` with ``held`` True, else
    {"address", "held": False, "subnet": the subnet it is in or None}."""
    ipam = _ipam()
    lease = ipam.holder_of(tx, address)
    if lease is not None:
        return {**lease, "held": True}
    wanted = ipaddress.ip_address(address)
    inside = [s["name"] for s in ipam.list_subnets(tx)
              if wanted in ipaddress.ip_network(s["cidr"])]
    return {"address": str(wanted), "held": False, "subnet": inside[0] if inside else None}


def _who(args, context) -> int:
    found = _in_transaction(args, _holder, args.address, write=False)
    if args.json:
        sqladmin.print_json(found)
    elif found["held"]:
        print(f"{found['address']}: {found['state']} by VM {found['vm']} of {found['owner']} "
              f"(cluster {found['cluster'] or '-'}, subnet {found['subnet']}, "
              f"MAC {found['mac']})")
    elif found["subnet"] is None:
        print(f"{found['address']}: in no subnet")
    else:
        print(f"{found['address']}: held by no VM (subnet {found['subnet']})")
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
    add.add_argument("cidr", metavar="CIDR",
                     help="its network, such as 10.1.0.0/24 or 2001:db8:1::/64")
    add.add_argument("--vlan", type=integer, default=None, metavar="N",
                     help="its 802.1Q VLAN id (1 to 4094)")
    add.add_argument("--gateway", default=None, metavar="A")
    add.add_argument("--dns", default="", metavar="A,B",
                     help="DNS servers, comma-separated")
    add.add_argument("--exclude", default="", metavar="A,B|A-B",
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
        "remove", parents=[common], help="remove a subnet and its ranges (refused while "
                                         "addresses are held)")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(handler=_subnet_remove)

    ranges = objects.add_parser("range", help="ranges of a subnet owned by users or clusters")
    range_actions = ranges.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = range_actions.add_parser("add", parents=[common], help="add a range")
    add.add_argument("subnet", metavar="SUBNET")
    add.add_argument("first", metavar="FIRST")
    add.add_argument("last", metavar="LAST")
    add.add_argument("--owner", default=None, metavar="U", help="the user it belongs to")
    add.add_argument("--cluster", default=None, metavar="C",
                     help="the owner's virtual cluster it is kept for (needs --owner)")
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
    who.add_argument("address", metavar="ADDRESS")
    who.set_defaults(handler=_who)
    leases = objects.add_parser("leases", parents=[common], help="the addresses held")
    leases.add_argument("--owner", default=None, metavar="U")
    leases.add_argument("--subnet", default=None, metavar="S")
    leases.set_defaults(handler=_leases)
