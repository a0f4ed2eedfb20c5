"""usher-batch cancel: ask the daemon to cancel jobs (it checks that they
are the caller's)."""

import json

from .spool import Spool


def run(args, settings):
    spool = Spool(settings.queue_dir)
    for job_id in args.jobs:
        spool.request_cancel(job_id)
    if args.json:
        print(json.dumps({"cancel_requested": args.jobs}))
    else:
        print(f"cancellation requested: {' '.join(args.jobs)}")
    return 0
