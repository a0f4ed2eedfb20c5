"""ush's lease commands (the leases plugin's queries ``leases.list`` and
``leases.renew``): ``lease [NAMES | -n CLUSTER]`` shows when VMs' leases
end, ``lease renew NAMES | -n CLUSTER DURATION`` renews them. ``start
--lease DURATION`` asks for one (``cmd_vms``)."""

import datetime

from usher import naming
from usher.cliargs import UsageError, duration_seconds, format_duration
from usher.errors import InvalidRequest
from usher.vmset import expand_ranges

from .format import SEPARATOR, Column, format_table, natural_key, plural
from .outcome import Call, Outcome

LIST_QUERY = "leases.list"
RENEW_QUERY = "leases.renew"


def _when(row):
    expires = row.get("expires")
    if expires is None:
        return "no lease"
    moment = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _left(row):
    remaining = row.get("remaining")
    if remaining is None:
        return "-"
    return format_duration(remaining) if remaining > 0 else "ended"


COLUMNS = (
    Column("VM", lambda row: str(row.get("name")), 24),
    Column("owner", lambda row: str(row.get("owner")), key="owner"),
    Column("state", lambda row: str(row.get("state") or "-")),
    Column("ends", _when),
    Column("left", _left),
    Column("then", lambda row: str(row.get("action") or "-")),
)


def format_leases(rows, caller, heading=None):
    if not rows:
        return "None of your VMs has a lease." if caller else "No VM has a lease."
    rows = sorted(rows, key=lambda row: natural_key(str(row.get("name", ""))))
    columns = list(COLUMNS)
    if caller is not None and all(row.get("owner") == caller for row in rows):
        columns = [column for column in columns if column.title != "owner"]
    leased = sum(1 for row in rows if row.get("expires") is not None)
    lines = [heading or f"{plural(leased, 'lease')} ({plural(len(rows), 'VM')}):", SEPARATOR]
    return "\n".join(lines + format_table(columns, rows))


def _names(words, command):
    names = []
    try:
        for pattern in words:
            for name in expand_ranges(pattern):
                names.append(name)
    except InvalidRequest as exc:
        raise UsageError(str(exc), command) from None
    return names


def _selection(args, words, command):
    query = {}
    if args.owner is not None:
        try:
            query["owner"] = naming.check_user(args.owner)
        except InvalidRequest as exc:
            raise UsageError(str(exc), command) from None
    if args.cluster is not None:
        if words:
            raise UsageError("give VM names or -n CLUSTER, not both", command)
        try:
            query["cluster"] = naming.check_label(args.cluster, "cluster name")
        except InvalidRequest as exc:
            raise UsageError(str(exc), command) from None
    elif words:
        query["vms"] = _names(words, command)
    return query


async def cmd_lease(shell, args):
    words = list(args.words)
    if words and words[0] == "renew":
        return _renew(shell, args, words[1:])
    query = _selection(args, words, "lease")

    async def show():
        client = shell.live_client()
        rows = await client.query(LIST_QUERY, **query)
        caller = None if client.admin and "owner" not in query else client.user
        return Outcome(format_leases(rows, caller), rows)
    return Call(show)


def _renew(shell, args, words):
    if not words:
        raise UsageError("lease renew needs VM names or -n CLUSTER, then a DURATION "
                         "(e.g. 'lease renew 3.web 2h')", "lease")
    duration = words[-1]
    try:
        seconds = duration_seconds(duration)
    except ValueError as exc:
        raise UsageError(f"lease renew: {exc}", "lease") from None
    query = _selection(args, words[:-1], "lease")
    if "vms" not in query and "cluster" not in query:
        raise UsageError("lease renew needs VM names or -n CLUSTER before the DURATION",
                         "lease")
    query["duration"] = format_duration(seconds)

    async def renew():
        client = shell.live_client()
        rows = await client.query(RENEW_QUERY, **query)
        caller = None if client.admin else client.user
        heading = (f"Renewed {plural(len(rows), 'lease')} for {format_duration(seconds)}:")
        return Outcome(format_leases(rows, caller, heading), rows)
    return Call(renew)


def register(declare):
    parser = declare("lease", cmd_lease)
    parser.add_argument("-n", "--cluster")
    parser.add_argument("-o", "--owner", metavar="USER")
    parser.add_argument("words", nargs="*")
    # 'lease renew -n web 2h': options between the words.
    parser.parse_args = parser.parse_intermixed_args
