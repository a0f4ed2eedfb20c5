"""ush's shell: runs command lines against an Usher client, on the reactor
thread.

Interactive lines are numbered as in the paper's Figure 3: a command that
talks to the controller prints ``<Command N result pending...>`` and, when
the answer arrives, ``Command N result:`` and the result; ``list`` answers
from the client's cache at once. Changes to the user's VMs come as
``[notice]`` lines. One-shot mode (``run_once``) connects, runs one command
and returns its exit status.

The commands themselves are in the ``cmd_*`` modules (found through the
table of ``cli``); the shell owns the session they share: the client, its
callbacks and what the notices have reported. All terminal I/O goes through
the streams and the password prompter it is given, so tests drive it with
in-memory doubles.
"""

import contextlib
import os
import shlex
import shutil

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from usher import naming
from usher.cliargs import UsageError
from usher.errors import NoSuchLNM, NoSuchVM, Unavailable

from . import cli, help_text
from .format import (by_name, describe_change, natural_key, placement, plural,
                     write_outcome, write_usage_error)
from .progress import OwnCommands
from .outcome import EXIT_OK, EXIT_USAGE, LEAVE, Cancelled, Outcome, error_outcome

log = Logger()

PROMPT = "ush> "
# Seconds ush waits for the controller to acknowledge a logout when leaving.
CLOSE_TIMEOUT = 5.0


# VM names a confirmation shows (the first ones and the last).
CONFIRM_SHOWN = 3


def confirmation_prompt(operation, names, client, owners=None):
    """"destroy 12 VMs of alice (1.web, 2.web, 3.web … 12.web)? [y/N] ".
    ``owners``: VM name -> owner (default: the cache's)."""
    domain = getattr(client, "domain", None)
    if owners is None:
        records = getattr(client, "vms", {})
        owners = {n: (records.get(n) or {}).get("owner") for n in names}
    owners = sorted({owners.get(n) or "?" for n in names})
    short = [naming.short_name(n, domain) if domain else n for n in names]
    shown = ", ".join(short[:CONFIRM_SHOWN])
    if len(short) > CONFIRM_SHOWN:
        shown += (", " if len(short) == CONFIRM_SHOWN + 1 else " … ") + short[-1]
    return (f"{operation} {plural(len(names), 'VM')} of {' and '.join(owners)} "
            f"({shown})? [y/N] ")


class Shell:
    """Runs ush commands against an Usher client; call it on the reactor thread.

    ``client_factory(host=, port=, username=, password=)`` builds an
    UsherClient-like object (one per connect, since connect may name another
    controller or user). ``out``/``err`` have ``write(str)``. ``prompter``
    has ``ask_password(prompt) -> Deferred[str]`` (failing with Cancelled to
    give up); None when no one can be asked. ``clock`` bounds the wait for a
    logout when leaving. With ``wait_for_results`` (input from a script) each
    remote command finishes before the next line is read.
    """

    def __init__(self, client_factory, settings, *, out, err=None, prompter=None,
                 clock=None, json_output=False, wait_for_results=False):
        self._client_factory = client_factory
        self.settings = settings
        self._out = out
        self._err = err if err is not None else out
        self.prompter = prompter
        self.clock = clock
        self.json_output = json_output
        self.wait_for_results = wait_for_results
        self._parsers = cli.build_parsers()
        self.client = None
        self._unsubscribe = []
        self._next_number = 0
        self.pending = {}
        # (state, host LNM) of every VM notices have reported, to word the next one.
        self._known = {}
        self._syncing = False
        self._user_disconnected = False
        # [notice] lines: 'notices on|off', the notices option, ush --no-notices.
        self.show_notices = getattr(settings, "notices", True)
        # The user's commands in flight: their VMs' notices held, their progress.
        self.own = OwnCommands(self.notice, out, clock)
        # Who asks before a destructive operation on several VMs: the
        # interactive console on a terminal (``confirm(prompt)`` ->
        # Deferred[bool]); None (one-shot mode, scripts) never asks.
        self.confirmer = None
        # Output is a terminal that ``top`` may redraw; at_prompt: the
        # interactive shell's (an empty line or Ctrl-C ends a live view).
        self.live_output = False
        self.at_prompt = False
        # quit or end of input: waiting for pending commands, then leaving.
        self.leaving = False
        # Set by Ctrl-C in one-shot mode: nothing more is printed.
        self.interrupted = False
        # Stop functions of the live views (top) running at the prompt.
        self._live = {}

    # -- output ---------------------------------------------------------------

    def write(self, text):
        if not self.interrupted:
            self._out.write(text + "\n")

    def width(self):
        """The width tables fit: $COLUMNS if set, else the terminal's; None
        (no limit) when output is not a terminal (a pipe, a file)."""
        columns = os.environ.get("COLUMNS", "").strip()
        if columns.isdigit() and int(columns) > 0:
            return int(columns)
        if self.live_output:
            return shutil.get_terminal_size().columns
        return None

    def interrupt(self):
        """Ctrl-C in one-shot mode: the reactor stops, and what its
        connections say as they close is not the command's outcome."""
        self.interrupted = True

    # -- live views (top) ----------------------------------------------------------

    def live_view(self, stop):
        """Register a live view's ``stop()``; -> the function unregistering it."""
        key = object()
        self._live[key] = stop
        return lambda: self._live.pop(key, None)

    def stop_live_views(self):
        """Stop the live views (Ctrl-C or an empty line at the prompt). -> how many."""
        stops = list(self._live.values())
        self._live.clear()
        for stop in stops:
            stop()
        return len(stops)

    def notice(self, text):
        if self.show_notices:
            self.write(f"[notice] {text}")

    def _print_outcome(self, outcome):
        if self.interrupted:
            return
        write_outcome(outcome, json_output=self.json_output, out=self._out, err=self._err)

    def _print_usage_error(self, exc):
        write_usage_error(exc, json_output=self.json_output, out=self._out, err=self._err)

    @property
    def prompt(self):
        client = self.client
        if client is not None and client.connected and client.user:
            return f"{client.user}:{PROMPT}"
        return PROMPT

    # -- parsing ------------------------------------------------------------------

    def parse(self, words):
        """words -> (command name, argparse namespace); raises UsageError."""
        return cli.parse(self._parsers, words)

    def complete(self, text, line):
        """Readline completion candidates for ``text`` in ``line``."""
        words = line.split()
        first = not words or (len(words) == 1 and not line.endswith(" "))
        if first:
            candidates = [*self._parsers, *cli.ALIASES]
        elif words[0] in ("help", "?"):
            candidates = [*help_text.COMMANDS, *help_text.TOPICS]
        else:
            client = self.client
            names = list(client.vms) if client is not None else []
            domain = getattr(client, "domain", None)
            previous = words[-1] if line.endswith(" ") else (words[-2] if len(words) > 1 else "")
            if previous in ("-n", "--cluster"):
                candidates = sorted({client.vms[n].get("cluster") or "" for n in names})
            else:
                candidates = [naming.short_name(n, domain) if domain else n for n in names]
        return sorted(c for c in set(candidates) if c and c.startswith(text))

    # -- interactive mode -------------------------------------------------------------

    def handle_line(self, line):
        """Run one line typed at the prompt (None: end of input). -> Deferred
        firing True when ready for the next line, False to leave."""
        return Deferred.fromCoroutine(self._handle_line(line))

    async def _handle_line(self, line):
        if line is None:
            return await self._leave()
        line = line.strip()
        # An empty line (or Ctrl-C) ends a live top and gives the prompt back.
        if not line and self.stop_live_views():
            return True
        if not line or line.startswith("#"):
            return True
        if line.startswith("?"):
            line = "help " + line[1:]
        try:
            words = shlex.split(line)
        except ValueError as exc:
            self._err.write(f"cannot split the line: {exc}\n")
            return True
        try:
            name, args = self.parse(words)
            if args.help:
                self.write(help_text.render(name))
                return True
            step = await self._prepare(name, args)
        except UsageError as exc:
            self._print_usage_error(exc)
            return True
        except Cancelled as exc:
            self._err.write(f"{words[0]}: {exc if exc.args else 'cancelled'}\n")
            return True
        if step is LEAVE:
            return await self._leave()
        if isinstance(step, Outcome):
            self._print_outcome(step)
            return True
        d = self._launch(step)
        if self.wait_for_results:
            await d
        return True

    def _launch(self, call):
        """Start a remote step; number it and report the result when it comes
        (Figure 3). -> Deferred firing when the result has been printed."""
        number = None if call.immediate else self._announce()
        d = Deferred.fromCoroutine(self._guarded(call))
        finished = []
        d.addCallback(lambda outcome: finished.append(outcome) or outcome)
        if number is None:
            if finished:
                self._print_outcome(finished[0])
                return d
            number = self._announce()
        self.pending[number] = d
        d.addCallback(self._report, number)
        return d

    def _announce(self):
        number = self._next_number
        self._next_number += 1
        self.write(f"<Command {number} result pending...>")
        return number

    def _report(self, outcome, number):
        self.pending.pop(number, None)
        # One write, so the console redraws the prompt once, after it all.
        self.write(f"Command {number} result:" + (f"\n{outcome.text}" if outcome.text else ""))
        self.own.flush()
        return outcome

    async def _guarded(self, call):
        try:
            return await call.run()
        except Exception as exc:
            return error_outcome(exc)

    async def _leave(self):
        self.leaving = True
        waiting = list(self.pending.values())
        if waiting:
            self.write(f"Waiting for {plural(len(waiting), 'pending command')} "
                       "(Ctrl-C to leave at once)...")
            await defer.DeferredList(waiting)
        return False

    def close(self):
        """Log out (if connected) and drop the callbacks. -> Deferred."""
        client, self.client = self.client, None
        self._drop_callbacks()
        if client is None:
            return defer.succeed(None)
        d = defer.maybeDeferred(client.disconnect)
        if self.clock is not None:
            d.addTimeout(CLOSE_TIMEOUT, self.clock)
        d.addErrback(lambda failure: None)
        return d

    # -- one-shot mode ----------------------------------------------------------------------

    async def run_once(self, words):
        """Connect, run one command, print its result; -> exit code."""
        try:
            name, args = self.parse(words)
            if args.interactive_only:
                raise UsageError("only available in the interactive shell", name)
        except UsageError as exc:
            self._print_usage_error(exc)
            return EXIT_USAGE
        if args.help or name == "help":
            topic = name if args.help else args.topic
            try:
                text = help_text.render(topic) if topic else help_text.overview()
            except KeyError:
                self._print_usage_error(UsageError(f"no help on {topic!r}", "help"))
                return EXIT_USAGE
            self._print_outcome(Outcome(text, {"help": text}))
            return EXIT_OK
        # Notices would only get in the way of the result (and of --json);
        # a line of progress on a terminal does not stay.
        self.show_notices = False
        self.own.show_progress = self.live_output and not self.json_output
        try:
            # Check the command before asking for a password or connecting.
            step = await self._prepare(name, args, check_connection=False)
            if name != "connect":
                connect = await self._prepare(*self.parse(["connect"]))
                connected = await self._guarded(connect)
                if connected.exit_code != EXIT_OK:
                    self._print_outcome(connected)
                    await self.close()
                    return connected.exit_code
            outcome = step if isinstance(step, Outcome) else await self._guarded(step)
        except UsageError as exc:
            self._print_usage_error(exc)
            await self.close()
            return EXIT_USAGE
        except Cancelled as exc:
            outcome = error_outcome(exc)
            self._print_outcome(outcome)
            return outcome.exit_code
        self._print_outcome(outcome)
        await self.close()
        return outcome.exit_code

    async def _prepare(self, name, args, check_connection=True):
        """Check a parsed command and return either its Outcome (local
        commands) or the Call that will run it remotely (through the handler
        the command table gave it). Raises UsageError for anything wrong,
        before anything is sent."""
        step = await args.handler(self, args)
        if args.remote and check_connection and not self.connected:
            reconnecting = self.client is not None and not self._user_disconnected
            raise UsageError("not connected" + (" (reconnecting)" if reconnecting else "")
                             + "; use 'connect' first", name)
        return step

    # -- the session the commands share ---------------------------------------------------

    @property
    def connected(self):
        return self.client is not None and self.client.connected

    def live_client(self):
        """The client, connected (else Unavailable): for a Call as it runs."""
        client = self.client
        if client is None or not client.connected:
            raise Unavailable("not connected to the controller")
        return client

    async def open_session(self, host, port, username, password):
        """Replace the client by a new one logged in there. -> the login's info."""
        await self._drop_client()
        client = self._client_factory(host=host, port=port, username=username,
                                      password=password)
        self.client = client
        self._subscribe(client)
        info = await self._syncing_call(client.connect)
        self._user_disconnected = False
        return info

    async def end_session(self, client):
        """The user's disconnect: not news, and no reconnecting notices."""
        self._user_disconnected = True
        await client.disconnect()

    async def renew_session(self, client):
        """The user's reconnect. -> the login's info."""
        # The client's own disconnect is not news; VM changes found on
        # logging in again are (the client reports them as a diff).
        self._user_disconnected = True
        info = await client.reconnect()
        self._user_disconnected = False
        return info

    async def confirm_operation(self, operation, selection):
        """Before ``operation`` on several VMs: ask the confirmer (if any) to
        go ahead, naming how many VMs and whose; raise Cancelled if not. The
        VMs are counted from the cache, as the names sent are; a selection by
        LNM goes unresolved and the controller picks its VMs (for an
        administrator, every user's), so it lists them first; if it cannot,
        the question says so, and is asked all the same."""
        client = self.client
        if self.confirmer is None or client is None or not client.connected:
            return
        if selection.lnms:
            try:
                # What op_on picks: managed VMs, only your own unless admin.
                records = [r for r in await client.list(selection, remote=True)
                           if r.get("managed", True)
                           and (client.admin or r.get("owner") == client.user)]
            except (NoSuchVM, NoSuchLNM):
                return      # sent, it fails the same way: nothing happens
            except Exception as exc:
                prompt = (f"{operation} every VM of the selection on LNM "
                          f"{', '.join(selection.lnms)} (they could not be listed: "
                          f"{exc})? [y/N] ")
                records = None
        else:
            try:
                records = client.select(selection)
            except Exception:
                return      # sent, it fails the same way: nothing happens
        if records is not None:
            names = sorted((r["name"] for r in records), key=natural_key)
            if len(names) < 2:
                return
            owners = ({r["name"]: r.get("owner") for r in records} if selection.lnms
                      else None)
            prompt = confirmation_prompt(operation, names, client, owners)
        if not await self.confirmer.confirm(prompt):
            raise Cancelled()

    @contextlib.contextmanager
    def own_command(self, kind, total=None):
        """While our own start, operation or migration runs: the VMs it
        changes are reported in its result (Figure 3), not as notices too;
        -> its OwnCommand (``report(result)`` before the block ends)."""
        command = self.own.begin(kind, total)
        try:
            yield command
        finally:
            self.own.end(command)

    def short(self, name):
        """A VM name as results show it in summaries: short for your own VMs."""
        client = self.client
        domain, user = getattr(client, "domain", None), getattr(client, "user", None)
        parts = naming.split(name, domain) if domain else None
        return parts[0] if parts and parts[1] == user else name

    # -- the client's callbacks -----------------------------------------------------------

    async def _syncing_call(self, method):
        """Log in with notices off: the initial VM list is not news."""
        self._syncing = True
        try:
            info = await method()
        finally:
            self._syncing = False
        client = self.client
        if client is not None:
            self._known = {name: placement(rec) for name, rec in client.vms.items()}
        return info

    def _subscribe(self, client):
        self._unsubscribe = [client.on_change(self._on_change),
                             client.on_connection(self._on_connection)]

    def _drop_callbacks(self):
        for unsubscribe in self._unsubscribe:
            try:
                unsubscribe()
            except Exception:
                log.failure("removing a client callback failed")
        self._unsubscribe = []

    async def _drop_client(self):
        client, self.client = self.client, None
        self._drop_callbacks()
        self._known = {}
        if client is not None:
            try:
                await client.disconnect()
            except Exception:
                log.failure("disconnecting the previous client failed")

    def _on_change(self, changed, removed):
        for record in by_name(changed):
            name = record["name"]
            new = placement(record)
            old = self._known.get(name)
            self._known[name] = new
            if self._syncing:
                continue
            text = describe_change(name, old, new)
            # What our own commands change is reported in their results.
            if not self.own.changed(name, old, new, text) and text:
                self.notice(text)
        for name in sorted(removed, key=natural_key):
            if self._known.pop(name, None) is not None and not self._syncing:
                text = f"{name}: removed"
                if not self.own.removed(name, text):
                    self.notice(text)

    def _on_connection(self, state, detail):
        if self._syncing or (self._user_disconnected and state != "notice"):
            return
        defaults = {"connected": "connected to the controller",
                    "disconnected": "disconnected from the controller",
                    "reconnecting": "lost the controller; reconnecting"}
        self.notice(detail or defaults.get(state, state))
