"""ush's address commands: ranges and addresses, a user's view of the
site's IP address management (the SQL plugin's queries ``ipam.ranges`` and
``ipam.addresses``; administrators manage subnets and ranges with
``usher ipam``)."""

from usher import naming
from usher.cliargs import UsageError
from usher.errors import InvalidRequest

from .format import (SEPARATOR, Column, format_table, format_value, natural_key, plural,
                     present)
from .outcome import Call, Outcome

RANGES_QUERY = "ipam.ranges"
ADDRESSES_QUERY = "ipam.addresses"


def _cell(*keys):
    """The first of ``keys`` a row has, formatted (rows of older plugins may
    name a field differently)."""
    def render(row):
        for key in keys:
            if key in row:
                return format_value(row[key])
        return "-"
    return render


def _owner(row):
    """A range without an owner is open to every user."""
    return "anyone" if row.get("owner") is None else format_value(row["owner"])


RANGE_COLUMNS = (
    Column("range", _cell("id")),
    Column("subnet", _cell("subnet")),
    Column("first", _cell("first", "first_address")),
    Column("last", _cell("last", "last_address")),
    Column("owner", _owner, key="owner"),
    Column("cluster", _cell("cluster")),
    Column("free", _cell("free")),
)
ADDRESS_COLUMNS = (
    Column("address", _cell("address"), 16),
    Column("VM", _cell("vm"), 24),
    Column("state", _cell("state")),
    Column("owner", _cell("owner"), key="owner"),
    Column("cluster", _cell("cluster")),
    Column("subnet", _cell("subnet")),
    Column("VLAN", _cell("vlan"), key="vlan"),
    Column("MAC", _cell("mac")),
)


def _shown_columns(columns, rows, caller):
    """The columns of ``rows``; the owner column only when some row is not
    the caller's own (``caller`` None: an administrator's view)."""
    columns = present(columns, rows)
    if caller is not None and all(row.get("owner") == caller for row in rows):
        columns = [column for column in columns if column.title != "owner"]
    return columns


def _address_key(row):
    return natural_key(str(row.get("address", "")))


def _addresses(count):
    return f"{count} address" if count == 1 else f"{count} addresses"


def format_ranges(rows, caller):
    if not rows:
        return "No address range is assigned to you." if caller else "0 address ranges."
    rows = sorted(rows, key=lambda row: (str(row.get("subnet", "")),
                                         natural_key(str(row.get("first",
                                                                 row.get("first_address", ""))))))
    free = sum(row["free"] for row in rows if isinstance(row.get("free"), int))
    lines = [f"{plural(len(rows), 'address range')}, {_addresses(free)} free:", SEPARATOR]
    return "\n".join(lines + format_table(_shown_columns(RANGE_COLUMNS, rows, caller), rows))


def format_addresses(rows, caller):
    if not rows:
        return "No address is held by your VMs." if caller else "0 addresses."
    rows = sorted(rows, key=_address_key)
    lines = [f"{_addresses(len(rows))}:", SEPARATOR]
    return "\n".join(lines + format_table(_shown_columns(ADDRESS_COLUMNS, rows, caller), rows))


def _owner_args(args, command):
    if args.owner is None:
        return {}
    try:
        return {"owner": naming.check_user(args.owner)}
    except InvalidRequest as exc:
        raise UsageError(str(exc), command) from None


def _query_command(command, query, render):
    async def handler(shell, args):
        query_args = _owner_args(args, command)

        async def ask():
            client = shell.live_client()
            rows = await client.query(query, **query_args)
            # An administrator sees others' rows: owners shown, no "you".
            caller = None if client.admin or query_args else client.user
            return Outcome(render(rows, caller), rows)
        return Call(ask)
    return handler


cmd_ranges = _query_command("ranges", RANGES_QUERY, format_ranges)
cmd_addresses = _query_command("addresses", ADDRESSES_QUERY, format_addresses)


def register(declare):
    for name, handler in (("ranges", cmd_ranges), ("addresses", cmd_addresses)):
        declare(name, handler).add_argument("-o", "--owner", metavar="USER")
