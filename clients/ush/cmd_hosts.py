"""ush's host commands for administrators (issue 15, part A): maintenance,
evacuate and evacuation. The controller refuses them to others.

``--wait`` polls the evacuation's progress (``evacuation LNM``) every
``--interval`` seconds, printing a line of counts when they change, until it
is done; then the summary: what moved, and each VM that could not move with
the reason."""

from twisted.internet import task

from usher.cliargs import UsageError, positive_int, positive_seconds

from .format import DETAIL_LIMIT, compact_names, group_by, natural_key, plural
from .outcome import EXIT_FAILED, EXIT_OK, Call, Outcome

MAX_CONCURRENCY = 64


def concurrency(text):
    value = positive_int(text)
    if value > MAX_CONCURRENCY:
        raise ValueError(f"at most {MAX_CONCURRENCY}")
    return value


def progress_line(status):
    """One line of counts: how far the evacuation of an LNM is."""
    return (f"{status['lnm']}: {len(status.get('moved') or ())} of {status.get('total', 0)} "
            f"moved, {len(status.get('failed') or ())} could not move, "
            f"{len(status.get('running') or ())} moving, {status.get('waiting', 0)} waiting")


def format_status(status):
    """An LNM's maintenance and its last evacuation, for people."""
    lnm = status["lnm"]
    if status.get("maintenance"):
        head = f"LNM {lnm} is in maintenance"
        if status.get("reason"):
            head += f" ({status['reason']})"
        if status.get("by"):
            head += f", set by {status['by']}"
        head += ": it takes no new VMs."
    else:
        head = f"LNM {lnm} is not in maintenance."
    lines = [head]
    total = status.get("total", 0)
    moved = status.get("moved") or []
    failed = status.get("failed") or []
    if status.get("evacuating"):
        lines.append("Evacuation under way: " + progress_line(status))
    elif status.get("done"):
        stopped = " (stopped: maintenance was left)" if status.get("stopped") else ""
        lines.append(f"Evacuation done{stopped}: {len(moved)} of {total} VMs moved"
                     + (f", {len(failed)} could not move." if failed else "."))
    else:
        lines.append("No evacuation since the controller started.")
    if moved and not status.get("evacuating"):
        lines.append("Moved:")
        lines += _vm_lines(moved, lambda m: f" -> {m.get('to')}")
    if failed:
        lines.append("Could not move:")
        lines += _vm_lines(failed, lambda f: f": {f.get('error')}")
    if len(moved) > DETAIL_LIMIT or len(failed) > DETAIL_LIMIT:
        lines.append("(ush --json evacuation LNM lists each VM)")
    return "\n".join(lines)


def _vm_lines(items, outcome):
    """One line per VM, or per group of VMs with the same ``outcome(item)``
    when there are many."""
    if len(items) <= DETAIL_LIMIT:
        return [f"  {item['name']}{outcome(item)}"
                for item in sorted(items, key=lambda item: natural_key(item["name"]))]
    return [f"  {plural(len(names), 'VM')} ({compact_names(names)}){text}"
            for text, names in group_by(items, outcome)]


def _exit(status):
    return EXIT_FAILED if status.get("failed") else EXIT_OK


async def _until_done(shell, client, status, interval):
    """Poll the evacuation until it is done, printing progress -> its status."""
    last = None
    while status.get("evacuating"):
        line = progress_line(status)
        # On a terminal one line, redrawn; elsewhere a line when counts change.
        if line != last and not shell.json_output and not shell.own.show(line):
            shell.write(line + "\n")
        last = line
        if shell.clock is None:
            raise UsageError("--wait needs a clock to poll", "evacuation")
        await task.deferLater(shell.clock, interval, lambda: None)
        status = await client.evacuation(status["lnm"])
    shell.own.clear()
    return status


def _run(shell, request, wait, interval):
    async def run():
        client = shell.live_client()
        status = await request(client)
        if wait:
            status = await _until_done(shell, client, status, interval)
        return Outcome(format_status(status), status, _exit(status))
    return Call(run)


async def cmd_maintenance(shell, args):
    lnm, mode = args.lnm, args.mode
    if mode not in ("on", "off"):
        raise UsageError(f"say on or off, not {mode!r}", "maintenance")
    on = mode == "on"
    if not on and (args.evacuate or args.concurrency is not None or args.reason):
        raise UsageError("--evacuate, --concurrency and --reason go with 'on'",
                         "maintenance")
    if args.concurrency is not None and not args.evacuate:
        raise UsageError("--concurrency goes with --evacuate", "maintenance")
    if args.wait and not args.evacuate:
        raise UsageError("--wait goes with --evacuate", "maintenance")
    return _run(shell, lambda client: client.maintenance(
        lnm, on, reason=args.reason, evacuate=args.evacuate, concurrency=args.concurrency),
        args.wait, args.interval)


async def cmd_evacuate(shell, args):
    lnm = args.lnm
    return _run(shell, lambda client: client.maintenance(
        lnm, True, reason=args.reason, evacuate=True, concurrency=args.concurrency),
        args.wait, args.interval)


async def cmd_evacuation(shell, args):
    lnm = args.lnm
    return _run(shell, lambda client: client.evacuation(lnm), args.wait, args.interval)


def _waiting(parser):
    parser.add_argument("--wait", action="store_true")
    parser.add_argument("--interval", type=positive_seconds, default=2.0)


def register(declare):
    parser = declare("maintenance", cmd_maintenance)
    parser.add_argument("lnm", metavar="LNM")
    parser.add_argument("mode", metavar="on|off")
    parser.add_argument("--reason")
    parser.add_argument("--evacuate", action="store_true")
    parser.add_argument("--concurrency", type=concurrency)
    _waiting(parser)
    parser = declare("evacuate", cmd_evacuate)
    parser.add_argument("lnm", metavar="LNM")
    parser.add_argument("--reason")
    parser.add_argument("--concurrency", type=concurrency)
    _waiting(parser)
    parser = declare("evacuation", cmd_evacuation)
    parser.add_argument("lnm", metavar="LNM")
    _waiting(parser)
