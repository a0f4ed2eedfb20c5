"""usher-batch: submit, status, cancel and report of usherbatchd's jobs.

The command table is declared here; each command's work is in its own
``cmd_<name>.py`` (``run(args, settings) -> exit code``). The command works
on the spool and the daemon's status file only: it needs neither the
controller nor the daemon's password, and the owner of a job is whoever
runs ``submit`` (the job file's owner).
"""

import argparse
import sys

from usher.cliargs import duration_seconds
from usher.errors import ConfigError, InvalidRequest

from . import cmd_cancel, cmd_report, cmd_status, cmd_submit


def walltime(text):
    """``1h``, ``30m``, ``90s``, ``1d``, ``1h30m`` or plain seconds."""
    try:
        seconds = duration_seconds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} ({e})") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("a walltime must be more than 0 seconds")
    return float(seconds)


def key_value(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, value


def parser():
    top = argparse.ArgumentParser(prog="usher-batch",
                                  description="Submit batch jobs to usherbatchd and follow them.")
    top.add_argument("--config", metavar="FILE",
                     help="read only this batchd configuration (queue_dir, state_dir, limits)")
    top.add_argument("--json", action="store_true", help="print JSON")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", help="queue a job",
                                 description="Queue a job: it runs in its own VM with these "
                                             "resources guaranteed, until the VM shuts off or "
                                             "the walltime ends.")
    submit.add_argument("--vcpus", type=int, required=True, help="vCPUs the job needs")
    submit.add_argument("--memory", type=int, required=True, metavar="MIB",
                        help="memory the job needs, in MiB")
    submit.add_argument("--walltime", type=walltime, required=True, metavar="DURATION",
                        help="longest run, e.g. 1h, 30m, 90s")
    submit.add_argument("--name", help="a name to show (a DNS label)")
    submit.add_argument("--arg", type=key_value, action="append", default=[],
                        metavar="KEY=VALUE", help="an argument for the job's VM (repeatable)")
    submit.set_defaults(run=cmd_submit.run)

    status = commands.add_parser("status", help="show jobs",
                                 description="Show the jobs (all, or those named) as the "
                                             "daemon last saw them.")
    status.add_argument("jobs", nargs="*", metavar="JOB")
    status.add_argument("--all", action="store_true", help="include ended jobs")
    status.set_defaults(run=cmd_status.run)

    cancel = commands.add_parser("cancel", help="cancel jobs",
                                 description="Cancel your jobs: queued ones never start, "
                                             "running ones are shut down.")
    cancel.add_argument("jobs", nargs="+", metavar="JOB")
    cancel.set_defaults(run=cmd_cancel.run)

    report = commands.add_parser("report", help="utilisation against one job per host",
                                 description="Utilisation, hosts in use and waits so far, "
                                             "against the one-job-per-host baseline.")
    report.set_defaults(run=cmd_report.run)
    return top


def load_settings(path):
    from usher.config import load_config

    from .settings import BATCHD, BatchSettings
    config = load_config(BATCHD, extra_files=[path] if path else [], isolated=bool(path))
    return BatchSettings.from_config(config)


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        return args.run(args, settings)
    except (ConfigError, InvalidRequest) as e:
        print(f"usher-batch: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"usher-batch: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
