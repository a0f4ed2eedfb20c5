"""ush's LNM commands: list_lnm, top (the monitoring view, refreshed on a
terminal) and forget_lnm."""

import json

from twisted.internet import defer, task

from usher.cliargs import UsageError, positive_int, positive_seconds

from .format import by_name, format_lnm_list, format_top, natural_key, plural
from .outcome import EXIT_NO_MATCH, EXIT_OK, Call, Outcome
from .parsing import check_lnm_patterns

# Home the cursor and clear the screen (top's redraw).
CLEAR_SCREEN = "\x1b[H\x1b[2J"


async def cmd_list_lnm(shell, args):
    patterns = check_lnm_patterns(args.lnms, "list_lnm")
    status = args.status

    async def list_lnms():
        lnms = by_name(await shell.live_client().list_lnm(patterns=patterns, status=status))
        # LNMs asked for and none matched (a pattern; an unknown name is NoSuchLNM).
        empty = EXIT_NO_MATCH if patterns and not lnms else EXIT_OK
        return Outcome(format_lnm_list(lnms, status, shell.width()), lnms, empty)
    return Call(list_lnms)


async def cmd_top(shell, args):
    patterns = check_lnm_patterns(args.lnms, "top")
    count, interval = args.count, args.interval
    # On a terminal (one-shot 'ush top', or at the ush> prompt) top redraws
    # the screen until Ctrl-C (at the prompt also an empty line) or N views;
    # elsewhere (scripts, --json) one view, or N views with --iterations N.
    live = shell.live_output and not shell.json_output
    iterations = args.iterations or (None if live else 1)

    async def top():
        client = shell.live_client()
        if shell.clock is None:
            raise UsageError("top needs a clock to refresh", "top")
        shown, stopped, sleeping = 0, [], []
        hint = (f"(every {interval:g} s; "
                + ("Enter or Ctrl-C gives the prompt back)" if shell.at_prompt else
                   "Ctrl-C stops)"))

        def stop():
            stopped.append(True)
            for d in sleeping:
                d.cancel()
        unregister = shell.live_view(stop)
        try:
            while True:
                view = await client.top(patterns=patterns, count=count)
                shown += 1
                last = iterations is not None and shown >= iterations
                if shell.json_output:
                    # One JSON object per line and view (JSON lines).
                    if last:
                        return Outcome("", view, json_lines=True)
                    shell.write(json.dumps(view, default=str))
                elif live:
                    shell.write(CLEAR_SCREEN + format_top(view, count, shell.width()) + "\n"
                                + hint)
                    if last:
                        return Outcome(f"top: {plural(shown, 'view')}.", view)
                else:
                    text = format_top(view, count, shell.width())
                    if last:
                        return Outcome(text, view)
                    shell.write(text + "\n")
                sleep = task.deferLater(shell.clock, interval, lambda: None)
                sleeping[:] = [sleep]
                try:
                    await sleep
                except defer.CancelledError:
                    pass
                if stopped:
                    return Outcome(f"top stopped after {plural(shown, 'view')}.", view)
        finally:
            unregister()
    return Call(top)


async def cmd_forget_lnm(shell, args):
    lnm = args.lnm

    async def forget():
        result = await shell.live_client().forget_lnm(lnm)
        lines = [f"LNM {lnm} forgotten, with {len(result['forgotten'])} VMs:"]
        lines.extend(sorted(result["forgotten"], key=natural_key))
        return Outcome("\n".join(lines), result)
    return Call(forget)


def register(declare):
    parser = declare("list_lnm", cmd_list_lnm)
    parser.add_argument("-s", "--status", action="store_true")
    parser.add_argument("lnms", nargs="*", metavar="LNM")
    parser = declare("top", cmd_top)
    parser.add_argument("-c", "--count", type=positive_int, default=10)
    parser.add_argument("-i", "--interval", type=positive_seconds, default=2.0)
    parser.add_argument("--iterations", type=positive_int)
    parser.add_argument("lnms", nargs="*", metavar="LNM")
    declare("forget_lnm", cmd_forget_lnm).add_argument("lnm")
