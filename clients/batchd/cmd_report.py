"""usher-batch report: utilisation and hosts in use against one job per host."""

import json

from .accounting import format_report
from .spool import Spool


def run(args, settings):
    status = Spool(settings.queue_dir, settings.state_dir).read_status()
    if status is None:
        print("usher-batch: no report yet (is usherbatchd running?)")
        return 1
    print(json.dumps(status["report"], indent=1) if args.json else format_report(status["report"]))
    return 0
