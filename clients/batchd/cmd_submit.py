"""usher-batch submit: write one job file into the spool."""

import json

from .spool import Spool


def run(args, settings):
    fields = {"vcpus": args.vcpus, "memory_mib": args.memory, "walltime": args.walltime,
              "name": args.name, "args": dict(args.arg)}
    job_id = Spool(settings.queue_dir).submit(fields, settings)
    print(json.dumps({"job": job_id}) if args.json else job_id)
    return 0
