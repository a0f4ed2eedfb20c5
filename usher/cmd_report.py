"""``usher report usage``: VM-hours, vCPU-hours and memory-GiB-hours per user
and virtual cluster over a period, from the SQL plugin's log (what accrues
is in ``usher.plugins.sql.usage``).

    usher report usage --since DATE [--until DATE] [--by owner|cluster|owner,cluster]
                       [--json] [--plugin-config FILE]
"""

from __future__ import annotations

import argparse
import datetime
import time

from usher import sqladmin
from usher.cliargs import UsageError, timestamp

USAGE_COLUMNS = (("VMs", "vms"), ("VM-hours", "vm_hours"), ("vCPU-hours", "vcpu_hours"),
                 ("memory GiB-hours", "memory_gib_hours"))


def _by(text):
    from usher.plugins.sql.usage import parse_by
    try:
        return parse_by(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _usage(args, context) -> int:
    from usher.plugins.sql import usage
    until = time.time() if args.until is None else args.until
    if not args.since < until:
        raise UsageError(f"--since ({_iso(args.since)}) must be before --until ({_iso(until)})")
    rows = sqladmin.run(args.plugin_config, usage.usage_report, args.since, until, args.by,
                        write=False)
    total = usage.total(rows)
    if args.json:
        sqladmin.print_json({"since": args.since, "until": until, "by": list(args.by),
                             "rows": rows, "total": total})
        return 0
    print(f"Usage from {_iso(args.since)} to {_iso(until)} (UTC)")
    titles = list(args.by) + [title for title, _ in USAGE_COLUMNS]
    cells = [[row[field] for field in args.by] + [row[key] for _, key in USAGE_COLUMNS]
             for row in rows]
    cells.append(["total"] + [""] * (len(args.by) - 1) + [total[key] for _, key in USAGE_COLUMNS])
    sqladmin.print_table(titles, cells)
    return 0


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S")


def register_report_commands(subparsers) -> None:
    report = subparsers.add_parser("report", help="reports from the SQL plugin's log")
    kinds = report.add_subparsers(dest="action", required=True, metavar="REPORT")
    usage = kinds.add_parser(
        "usage", parents=[sqladmin.common_options()],
        help="VM-, vCPU- and memory-GiB-hours per user and cluster over a period",
        description="VM-hours, vCPU-hours and memory-GiB-hours per user and cluster over "
                    "[--since, --until), from the SQL plugin's request and state-change "
                    "log. A VM accrues while it runs, is paused or migrates.")
    usage.add_argument("--since", type=timestamp, required=True, metavar="DATE",
                       help="start of the period: YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] "
                            "(UTC unless a zone such as +01:00 follows)")
    usage.add_argument("--until", type=timestamp, default=None, metavar="DATE",
                       help="end of the period, excluded (default: now)")
    usage.add_argument("--by", type=_by, default=("owner", "cluster"),
                       metavar="owner|cluster|owner,cluster",
                       help="group by user, cluster or both (default owner,cluster)")
    usage.set_defaults(handler=_usage)
