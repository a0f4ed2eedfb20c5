"""ush's VM commands: list, start, the operations of Table 3 (pause,
resume, shutdown, ...) and migrate."""

import re

from usher import naming, states
from usher.cliargs import UsageError, duration, format_duration, positive_int
from usher.errors import OPERATION_FAILED, InvalidRequest
from usher.vmset import expand_ranges

from .format import (HOST_KEY, by_name, format_migrate_result, format_operation_result,
                     format_start_result, format_vm_list, host_of)
from .outcome import EXIT_NO_MATCH, EXIT_OK, Call, Outcome, results_exit_code
from .parsing import (add_selection, check_cluster, check_lnm_patterns, make_selection,
                      selection_of)

KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
INT_RE = re.compile(r"^-?[0-9]+$")


def parse_extra_args(items):
    """``--arg key=value`` items -> dict (None if there are none)."""
    extra = {}
    for item in items:
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not KEY_RE.match(key):
            raise UsageError(f"--arg needs KEY=VALUE, not {item!r}", "start")
        if key in extra:
            raise UsageError(f"--arg {key} given twice", "start")
        # Whole numbers travel as numbers: memory_mib=1024, vcpus=2.
        extra[key] = int(value) if INT_RE.match(value.strip()) else value
    return extra or None


def _failed_if_any(result):
    return results_exit_code(result.get("failed") or [])


async def cmd_list(shell, args):
    selection = make_selection(args, "list", required=False)
    status, remote = args.status, args.all

    async def list_vms():
        records = await shell.live_client().list(selection=selection, status=status,
                                                 remote=remote)
        records = by_name(records)
        # VMs asked for (names, -n, -r, --lnm) and none there: nothing matched,
        # as for an operation; a plain list of no VMs is no error.
        empty = EXIT_NO_MATCH if selection is not None and not records else EXIT_OK
        return Outcome(format_vm_list(records, status, shell.width()), records, empty)
    return Call(list_vms, immediate=not (status or remote))


async def cmd_start(shell, args):
    extra = parse_extra_args(args.arg)
    if args.affinity is not None:
        # -- affinity (issue 15): the cluster's rule, set by the controller --
        extra = dict(extra or {}, affinity=args.affinity)
    if args.lease is not None:      # issue 15, leases: the leases plugin reads it
        if extra and "lease" in extra:
            raise UsageError("--lease and --arg lease= given both", "start")
        extra = dict(extra or {}, lease=format_duration(args.lease))
    lnms = list(args.lnm)
    names = []
    if args.count is not None:
        if args.cluster is None:
            raise UsageError("-c COUNT needs -n CLUSTER", "start")
        cluster = check_cluster(args.cluster, "start")
        lnms = list(args.words) + lnms
    else:
        if args.cluster is not None:
            raise UsageError("-n CLUSTER needs -c COUNT (to start VMs by name, give "
                             "their names instead)", "start")
        if not args.words:
            raise UsageError("nothing to start: give -n CLUSTER -c COUNT, or VM names",
                             "start")
        cluster = None
        for pattern in args.words:
            try:
                for name in expand_ranges(pattern):
                    naming.check_short_name(name.strip().lower().rstrip("."))
            except InvalidRequest as exc:
                raise UsageError(str(exc), "start") from None
        names = list(args.words)
    check_lnm_patterns(lnms, "start")
    count = args.count

    total = count if count is not None else len(names) or None
    verbose = args.verbose

    async def start():
        client = shell.live_client()
        with shell.own_command("start", total) as own:
            result = await client.start(names=names, cluster=cluster, count=count,
                                        lnms=lnms, args=extra)
            own.report(result)
        started = result.get("started") or []
        failed = result.get("failed") or []
        data = ([{"name": item["name"], HOST_KEY: host_of(item),
                  **({"already": True} if item.get("already") else {})}
                 for item in by_name(started)]
                + [{"name": item.get("name"), "error": item.get("error"),
                    "code": item.get("code") or OPERATION_FAILED}
                   for item in by_name(failed)])
        return Outcome(format_start_result(result, verbose, shell.short), data,
                       _failed_if_any(result))
    return Call(start)


async def cmd_operation(shell, args):
    operation = args.command
    selection = make_selection(args, operation)
    extra = {"force": True} if getattr(args, "force", False) else None
    if operation in states.DESTRUCTIVE_OPERATIONS and not args.yes:
        # Interactive only: one-shot mode and scripts have no confirmer.
        await shell.confirm_operation(operation, selection)

    verbose = args.verbose

    async def operate():
        client = shell.live_client()
        with shell.own_command(operation) as own:
            result = await client.op_on(operation, selection, extra)
            own.report(result)
        return Outcome(format_operation_result(operation, result, verbose, shell.short),
                       result, _failed_if_any(result))
    return Call(operate)


async def cmd_migrate(shell, args):
    if args.to is None and not args.on_lnm:
        if args.cluster or args.regex is not None or len(args.vms) != 2:
            raise UsageError("give one VM and one LNM ('migrate VM LNM'), a "
                             "selection followed by --to LNM [LNM ...], or --from LNM",
                             "migrate")
        vm, lnm = args.vms
        selection = selection_of("migrate", names=[vm])
        lnms = check_lnm_patterns([lnm], "migrate")
    elif args.to is None:
        # --from alone: placement chooses where each VM goes.
        selection = make_selection(args, "migrate")
        lnms = []
    else:
        selection = make_selection(args, "migrate")
        lnms = check_lnm_patterns(args.to, "migrate")

    verbose = args.verbose

    async def migrate():
        client = shell.live_client()
        with shell.own_command("migrate") as own:
            result = await client.migrate(selection, lnms)
            own.report(result)
        return Outcome(format_migrate_result(result, verbose, shell.short), result,
                       _failed_if_any(result))
    return Call(migrate)


def _verbose(parser):
    """-v: list each VM in the result (else more than 10 are summed up)."""
    parser.add_argument("-v", "--verbose", action="store_true")


def register(declare):
    parser = declare("list", cmd_list)
    parser.add_argument("-s", "--status", action="store_true")
    parser.add_argument("-a", "--all", action="store_true")
    add_selection(parser)
    parser = declare("start", cmd_start)
    parser.add_argument("-n", "--cluster")
    parser.add_argument("-c", "--count", type=positive_int)
    parser.add_argument("-l", "--lnm", action="append", default=[])
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--affinity", choices=("apart", "together"))
    parser.add_argument("--lease", type=duration, metavar="DURATION")  # issue 15, leases
    parser.add_argument("words", nargs="*")
    _verbose(parser)
    for operation in states.OPERATIONS:
        parser = declare(operation, cmd_operation)
        if operation in states.DESTRUCTIVE_OPERATIONS:
            parser.add_argument("-y", "--yes", action="store_true")
        if operation == "delete":
            parser.add_argument("--force", action="store_true")
        add_selection(parser)
        _verbose(parser)
    parser = declare("migrate", cmd_migrate)
    add_selection(parser)
    _verbose(parser)
    # --from LNM is --lnm: the VMs on those LNMs.
    parser.add_argument("--from", action="append", default=[], metavar="LNM", dest="on_lnm")
    parser.add_argument("--to", nargs="+", metavar="LNM")
