"""usher-batch status: the jobs as the daemon last wrote them."""

import json

from .jobs import ENDED
from .spool import Spool

COLUMNS = ("id", "name", "owner", "state", "vcpus", "memory_mib", "walltime", "lnm")


def run(args, settings):
    status = Spool(settings.queue_dir, settings.state_dir).read_status()
    if status is None:
        print("usher-batch: no status yet (is usherbatchd running?)")
        return 1
    wanted = set(args.jobs)
    shown = [j for j in status["jobs"]
             if (j["id"] in wanted if wanted else args.all or j["state"] not in ENDED)]
    if args.json:
        print(json.dumps({"jobs": shown, "hosts": status.get("hosts", {}),
                          "error": status.get("error")}, indent=1))
        return 0
    rows = [COLUMNS] + [tuple("-" if j.get(c) is None else
                              f"{j[c]:g}" if isinstance(j.get(c), float) else str(j[c])
                              for c in COLUMNS) for j in shown]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    if status.get("error"):
        print(f"daemon: {status['error']}")
    return 0
