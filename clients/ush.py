"""ush, the Usher shell.

Interactive (``ush``): a command line for the Usher controller that looks
like the paper's Figure 3. Commands that talk to the controller print
``<Command N result pending...>`` and, whenever the answer arrives,
``Command N result:`` followed by the result; ``list`` answers from the
client's cache at once. Changes to the user's VMs are printed as
``[notice]`` lines as they happen.

One-shot (``ush [--config FILE] [--json] COMMAND ARGS...``): connect, run one
command, print its result (as JSON with ``--json``) and exit with 0 (success),
1 (the command failed, or failed for some VMs), 2 (usage or configuration
error) or 3 (cannot connect or log in), in the manner of virsh.

Layout:

- pure formatting functions (records and results -> text);
- per-command argparse parsers that raise ``UsageError`` rather than exit;
- ``Shell``: runs command lines against an ``UsherClient``-like object on the
  reactor thread; all terminal I/O goes through the streams and the password
  prompter it is given, so tests drive it with in-memory doubles;
- ``Console``: the terminal side of interactive mode. Readline and getpass
  need the main thread (that is where Python delivers Ctrl-C as
  KeyboardInterrupt, which clears the line), so the reactor runs in a
  background thread and the two meet through ``callFromThread`` and a queue;
- ``run``/``main``: the command-line entry point (``usher.clients.ush:main``).
"""

import argparse
import dataclasses
import getpass
import json
import os
import queue
import re
import shlex
import sys
import threading
from collections.abc import Mapping

from twisted.internet import defer, error as net_error, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from usher import naming, states
from usher.errors import (AuthenticationFailed, ConfigError, InvalidRequest, Unavailable,
                          UsherError, from_failure)
from usher.vmset import Selection, compile_regex, expand_ranges

from . import ush_help, ush_monitor

log = Logger()

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3

PROMPT = "ush> "
# Home the cursor and clear the screen (top's redraw).
CLEAR_SCREEN = "\x1b[H\x1b[2J"
SEPARATOR = "-----"
# Seconds ush waits for the controller to acknowledge a logout when leaving.
CLOSE_TIMEOUT = 5.0


def version():
    try:
        from usher import __version__
        return __version__
    except ImportError:
        return "unknown"


def banner():
    return (f"Usher Shell {version()}\n"
            "Type '?' or 'help' for help\n"
            "Use: help <command> for command specific help")


# --- Formatting ----------------------------------------------------------------

def natural_key(name):
    """Sort key that orders the numbers inside names numerically
    (2.sneetch before 10.sneetch)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _by_name(items):
    return sorted(items, key=lambda item: natural_key(str(item.get("name", ""))))


def plural(count, noun):
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_duration(seconds):
    if seconds is None:
        return ""
    if seconds < 1:
        return f" in {seconds:.1f} seconds"
    whole = round(seconds)
    return f" in {plural(whole, 'second')}"


def format_memory(mib):
    if mib is None:
        return "-"
    return f"{mib} MiB"


def format_value(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return str(len(value))
    return str(value)


@dataclasses.dataclass(frozen=True)
class Column:
    title: str
    render: object  # record -> str
    min_width: int = 0
    key: str | None = None  # set: shown only when some row has this key


def _field(key, render=format_value):
    return lambda record: render(record.get(key))


# Figure 3's VM table; the VM and state columns keep its widths.
VM_COLUMNS = (
    Column("VM", _field("name", str), 39),
    Column("state", _field("state"), 9),
    Column("VMM", _field("vmm")),
)
VM_STATUS_COLUMNS = (
    Column("cluster", _field("cluster")),
    Column("memory", _field("memory_mib", format_memory)),
    Column("vcpus", _field("vcpus")),
)
OWNER_COLUMN = Column("owner", _field("owner"))
# Record keys never shown as extra status columns: shown already, or internal.
VM_HIDDEN_KEYS = {"name", "state", "vmm", "cluster", "memory_mib", "vcpus", "owner",
                  "uuid", "managed", "version", "args"}

LNM_COLUMNS = (
    Column("LNM", _field("name", str), 24),
    Column("VMs", _field("vms")),
    Column("CPUs", _field("cpus")),
    Column("memory", _field("memory_mib", format_memory)),
    Column("connected", _field("connected")),
)
LNM_STATUS_COLUMNS = (
    Column("free memory", _field("free_memory_mib", format_memory), key="free_memory_mib"),
)
LNM_HIDDEN_KEYS = {"name", "vms", "cpus", "memory_mib", "connected", "free_memory_mib"}
# Monitoring figures (list -s, list_lnm -s, top): the three CPU averages, then
# the 1-minute rates and memory (--json has every average).
FIGURE_COLUMNS = tuple(
    Column(title, lambda record, window=window: ush_monitor.cpu_cell(record, window))
    for window, title in enumerate(ush_monitor.CPU_TITLES)) + (
    Column(ush_monitor.NET_TITLE, ush_monitor.net_cell),
    Column(ush_monitor.DISK_TITLE, ush_monitor.disk_cell),
    Column(ush_monitor.MEMORY_TITLE, ush_monitor.memory_cell),
)
SOURCE_COLUMN = Column(ush_monitor.SOURCE_TITLE, ush_monitor.source_cell)
# Status queries may nest their figures in a dict under this key.
STATUS_KEY = "status"


def _title(key):
    return key.replace("_", " ")


def flatten_status(record):
    """The record with the scalar entries of a nested ``status`` dict lifted
    to the top level (without replacing fields the record has)."""
    nested = record.get(STATUS_KEY)
    if not isinstance(nested, Mapping):
        return record
    flat = {key: value for key, value in record.items() if key != STATUS_KEY}
    for key, value in nested.items():
        flat.setdefault(key, value)
    return flat


def present(columns, rows):
    return [column for column in columns
            if column.key is None or any(column.key in row for row in rows)]


def extra_columns(records, hidden):
    """Columns for the scalar fields that only status queries carry (the
    monitoring figures), so new figures show up without code changes."""
    keys = []
    for record in records:
        for key, value in record.items():
            if key not in hidden and key not in keys and (
                    value is None or isinstance(value, (str, int, float, bool))):
                keys.append(key)
    return tuple(Column(_title(key), _field(key)) for key in sorted(keys))


def format_table(columns, rows):
    """Header, separator and rows as in Figure 3; the last column is not
    padded."""
    cells = [[column.render(row) for column in columns] for row in rows]
    widths = []
    for index, column in enumerate(columns):
        longest = max([len(column.title)] + [len(line[index]) for line in cells])
        widths.append(max(column.min_width, longest + 2))

    def line(values):
        padded = [value.ljust(width) for value, width in zip(values[:-1], widths)]
        return "".join(padded) + values[-1]
    return [line([column.title for column in columns]), SEPARATOR] + [line(c) for c in cells]


def format_vm_list(records, status=False):
    records = _by_name(records)
    if not records:
        return "0 VMs."
    columns = list(VM_COLUMNS)
    if len({record.get("owner") for record in records}) > 1:
        columns.insert(1, OWNER_COLUMN)
    if status:
        records = [flatten_status(record) for record in records]
        columns += present(VM_STATUS_COLUMNS, records)
        columns += figure_columns(records)
        columns += extra_columns(records, VM_HIDDEN_KEYS | ush_monitor.HIDDEN_KEYS)
    lines = [f"{plural(len(records), 'VM')}:", SEPARATOR] + format_table(columns, records)
    if status and ush_monitor.any_simulated(records):
        lines.append(ush_monitor.SIMULATED_NOTE)
    return "\n".join(lines)


def figure_columns(records, source=False):
    """The monitoring columns, when some record has figures."""
    if not any(ush_monitor.has_figures(record) for record in records):
        return ()
    return FIGURE_COLUMNS + ((SOURCE_COLUMN,) if source else ())


def format_lnm_list(lnms, status=False):
    lnms = _by_name(lnms)
    if not lnms:
        return "0 LNMs."
    columns = list(LNM_COLUMNS)
    if status:
        lnms = [flatten_status(lnm) for lnm in lnms]
        columns += present(LNM_STATUS_COLUMNS, lnms)
        columns += figure_columns(lnms, source=True)
        columns += extra_columns(lnms, LNM_HIDDEN_KEYS | ush_monitor.HIDDEN_KEYS)
    lines = [f"{plural(len(lnms), 'LNM')}:", SEPARATOR] + format_table(columns, lnms)
    if status and ush_monitor.any_simulated(lnms):
        lines.append(ush_monitor.SIMULATED_NOTE)
    return "\n".join(lines)


TOP_LNM_COLUMNS = (
    Column("LNM", _field("name", str), 12),
    Column("VMs", _field("vms")),
    Column("CPUs", _field("cpus")),
) + FIGURE_COLUMNS + (
    Column("free memory", _field("free_memory_mib", format_memory)),
    SOURCE_COLUMN,
)
TOP_VM_COLUMNS = (
    Column("VM", _field("name", str), 24),
    Column("VMM", _field("vmm")),
    Column("state", _field("state")),
) + FIGURE_COLUMNS


def format_top(view, count):
    """``top``'s answer ({"lnms", "vms"}) as a screen: hosts, then the
    busiest VMs."""
    lnms = [flatten_status(lnm) for lnm in _by_name(view.get("lnms") or [])]
    vms = [flatten_status(vm) for vm in ush_monitor.busiest_first(view.get("vms") or [])]
    connected = sum(1 for lnm in lnms if lnm.get("connected"))
    lines = [f"{plural(len(lnms), 'LNM')} ({connected} connected); averages over 1, 5 "
             "and 15 minutes; rates per second over 1 minute", SEPARATOR]
    lines += format_table(TOP_LNM_COLUMNS, lnms) if lnms else ["0 LNMs."]
    lines += ["", f"Busiest VMs (top {count} by 1-minute CPU):", SEPARATOR]
    lines += format_table(TOP_VM_COLUMNS, vms) if vms else ["No VM has figures yet."]
    if ush_monitor.any_simulated(lnms + vms):
        lines.append(ush_monitor.SIMULATED_NOTE)
    return "\n".join(lines)


def _failure_lines(verb, failed):
    if not failed:
        return []
    lines = [f"Could not {verb} {plural(len(failed), 'VM')}:"]
    lines += [f"{item.get('name')}: {item.get('error')}" for item in _by_name(failed)]
    return lines


def _note_lines(result):
    return [f"Note: {note}" for note in result.get("notes") or ()]


def format_start_result(result):
    started = _by_name(result.get("started") or [])
    failed = result.get("failed") or []
    lines = []
    if started or not failed:
        lines.append(f"Controller started {plural(len(started), 'VM')}"
                     f"{format_duration(result.get('elapsed'))}" + (":" if started else "."))
        lines += [f"{item['name']} started on {item.get('vmm')}" for item in started]
    lines += _failure_lines("start", failed)
    lines += _note_lines(result)
    return "\n".join(lines)


PAST_TENSE = {
    "pause": "paused", "resume": "resumed", "shutdown": "shut down", "reboot": "rebooted",
    "hibernate": "hibernated", "restore": "restored", "destroy": "destroyed",
    "cycle": "cycled",
}


def format_operation_result(operation, result):
    done = _by_name(result.get("done") or [])
    failed = result.get("failed") or []
    past = PAST_TENSE[operation]
    lines = []
    if done:
        lines.append(f"Controller {past} {plural(len(done), 'VM')}:")
        for item in done:
            state = item.get("state")
            lines.append(f"{item['name']} -> {state}" if state else f"{item['name']} {past}")
    lines += _failure_lines(operation, failed)
    if not done and not failed:
        lines.append("No VMs matched.")
    lines += _note_lines(result)
    return "\n".join(lines)


def format_migrate_result(result):
    moved = _by_name(result.get("migrated") or [])
    failed = result.get("failed") or []
    lines = []
    if moved:
        lines.append(f"Controller migrated {plural(len(moved), 'VM')}:")
        lines += [f"{item['name']} moved from {item.get('from')} to {item.get('to')}"
                  for item in moved]
    lines += _failure_lines("migrate", failed)
    if not moved and not failed:
        lines.append("No VMs matched.")
    lines += _note_lines(result)
    return "\n".join(lines)


def _seconds(value):
    return "-" if value is None else f"{value:g} s"


PLUGIN_COLUMNS = (
    Column("event", _field("event", str), 20),
    Column("order", _field("order")),
    Column("plugin", _field("plugin", str)),
    Column("config", _field("config")),
    Column("timeout", _field("timeout", _seconds)),
    Column("interval", _field("interval", _seconds), key="interval"),
)


def format_plugins(description, events=None):
    """``plugins``' answer (the controller's description of its plugins) as
    text; ``events`` limits the chains shown."""
    available = description.get("available") or []
    about = description.get("about") or {}
    lines = [f"{plural(len(available), 'available plugin')}:"]
    width = max((len(name) for name in available), default=0) + 2
    lines += [f"  {name:<{width}}{about.get(name) or ''}".rstrip() for name in available]
    lines += ["", format_chains(description, events)]
    return "\n".join(lines)


def format_chains(description, events=None):
    """The registrations of a plugin description (only ``events``' chains if given)."""
    registered = [r for r in description.get("registered") or []
                  if events is None or r.get("event") in events]
    if not registered:
        return "No plugin is registered" + (" for these events." if events else ".")
    lines = ["Event chains (each runs from the lowest order up):"]
    lines += format_table(present(PLUGIN_COLUMNS, registered), registered)
    return "\n".join(lines)


def describe_change(name, old, new):
    """A notice for one VM going from ``old`` to ``new`` ((state, vmm) pairs;
    ``old`` None for a VM not seen before); None if nothing visible changed."""
    state, vmm = new
    if old is None:
        where = f" on {vmm}" if vmm else ""
        return f"{name}: new VM, {state}{where}"
    old_state, old_vmm = old
    moved = None
    if vmm != old_vmm:
        if old_vmm and vmm:
            moved = f"moved {old_vmm} -> {vmm}"
        elif vmm:
            moved = f"on {vmm}"
        else:
            moved = f"no longer on {old_vmm}"
    if state != old_state:
        return f"{name}: {old_state} -> {state}" + (f" ({moved})" if moved else "")
    if moved:
        return f"{name}: {moved}"
    return None


# --- Outcomes and errors --------------------------------------------------------

class UsageError(Exception):
    """A command line ush cannot accept; nothing was sent."""

    def __init__(self, message, command=None, usage=None):
        super().__init__(message)
        self.message = message
        self.command = command
        self.usage = usage

    def render(self):
        lines = []
        if self.usage:
            lines.append(f"usage: {self.usage}")
        lines.append(f"{self.command}: {self.message}" if self.command else self.message)
        if self.usage and self.command:
            lines.append(f"(type 'help {self.command}' for details)")
        return "\n".join(lines)


class Cancelled(Exception):
    """The user gave up at the password prompt."""


@dataclasses.dataclass
class Outcome:
    """A command's result: text for people, data for --json, an exit code."""
    text: str
    data: object = None
    exit_code: int = EXIT_OK
    error: bool = False  # an error message rather than a (partial) result


@dataclasses.dataclass
class Call:
    """A remote step: ``run`` is an async function returning an Outcome.

    ``immediate`` calls (list from the cache) get no number when they finish
    without waiting, as in Figure 3."""
    run: object
    immediate: bool = False


_CONNECTION_ERRORS = (Unavailable, AuthenticationFailed, net_error.ConnectError,
                      net_error.ConnectionClosed, ConnectionError, defer.TimeoutError)


def exit_code_for(exc):
    if isinstance(exc, _CONNECTION_ERRORS):
        return EXIT_CONNECTION
    if isinstance(exc, (InvalidRequest, ConfigError)):
        return EXIT_USAGE
    return EXIT_FAILED


def error_outcome(exc):
    if isinstance(exc, UsherError):
        message = str(exc)
    elif isinstance(exc, _CONNECTION_ERRORS):
        message = f"connection problem: {exc}"
    else:
        message = str(from_failure(Failure(exc)))
    return Outcome(f"Error: {message}", {"error": message}, exit_code_for(exc), error=True)


# --- Command parsing ---------------------------------------------------------------

class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of exiting."""

    def __init__(self, name):
        super().__init__(prog=name, usage=ush_help.COMMANDS[name].usage, add_help=False,
                         allow_abbrev=False)
        self.add_argument("-h", "--help", action="store_true")

    def format_usage(self):
        return self.usage

    def error(self, message):
        raise UsageError(message, self.prog, self.usage)

    def exit(self, status=0, message=None):
        raise UsageError((message or "invalid arguments").strip(), self.prog)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _integer(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


PLUGIN_WORD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_plugin_words(plugin, events, command):
    """Check a plugin name and a comma-separated event list -> (name, [events])."""
    if not PLUGIN_WORD_RE.match(plugin):
        raise UsageError(f"{plugin!r} is not a plugin name", command)
    names = [] if events is None else [e.strip() for e in events.split(",") if e.strip()]
    for event in names:
        if not PLUGIN_WORD_RE.match(event):
            raise UsageError(f"{event!r} is not an event name", command)
    if events is not None and not names:
        raise UsageError("no event given", command)
    return plugin, names


def _positive_seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _add_selection(parser, positional=True):
    parser.add_argument("-n", "--cluster", action="append", default=[], metavar="CLUSTER")
    parser.add_argument("-r", "--regex", metavar="REGEX")
    if positional:
        parser.add_argument("vms", nargs="*", metavar="VM")


def _build_parsers():
    parsers = {}

    def new(name):
        parsers[name] = CommandParser(name)
        return parsers[name]

    new("connect").add_argument("target", nargs="?")
    new("disconnect")
    new("reconnect")
    parser = new("list")
    parser.add_argument("-s", "--status", action="store_true")
    parser.add_argument("-a", "--all", action="store_true")
    _add_selection(parser)
    parser = new("list_lnm")
    parser.add_argument("-s", "--status", action="store_true")
    parser.add_argument("lnms", nargs="*", metavar="LNM")
    parser = new("start")
    parser.add_argument("-n", "--cluster")
    parser.add_argument("-c", "--count", type=_positive_int)
    parser.add_argument("-l", "--lnm", action="append", default=[])
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("words", nargs="*")
    for operation in states.OPERATIONS:
        _add_selection(new(operation))
    parser = new("migrate")
    _add_selection(parser)
    parser.add_argument("--to", nargs="+", metavar="LNM")
    parser = new("top")
    parser.add_argument("-c", "--count", type=_positive_int, default=10)
    parser.add_argument("-i", "--interval", type=_positive_seconds, default=2.0)
    parser.add_argument("--iterations", type=_positive_int)
    parser.add_argument("lnms", nargs="*", metavar="LNM")
    new("plugins")
    parser = new("register_plugin")
    parser.add_argument("-o", "--order", type=_integer)
    parser.add_argument("plugin")
    parser.add_argument("events")
    parser.add_argument("config", nargs="?")
    parser = new("unregister_plugin")
    parser.add_argument("plugin")
    parser.add_argument("events", nargs="?")
    new("forget_lnm").add_argument("lnm")
    new("help").add_argument("topic", nargs="?")
    new("quit")
    return parsers


ALIASES = {"?": "help", "exit": "quit"}
# Commands meaningful only at the interactive prompt.
INTERACTIVE_ONLY = {"disconnect", "reconnect", "quit"}
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


def check_lnm_patterns(patterns, command):
    """LNM names, ranges, /regex/ or ~regex: check the syntax before sending."""
    for pattern in patterns:
        try:
            if pattern.startswith("~"):
                compile_regex(pattern[1:])
            elif len(pattern) > 1 and pattern[0] == pattern[-1] == "/":
                compile_regex(pattern[1:-1])
            else:
                expand_ranges(pattern)
        except InvalidRequest as exc:
            raise UsageError(str(exc), command) from None
    return list(patterns)


def check_cluster(cluster, command):
    try:
        return naming.check_label(cluster, "cluster name")
    except InvalidRequest as exc:
        raise UsageError(str(exc), command) from None


def make_selection(args, command, required=True):
    """A Selection from names/ranges, -n and -r; None when nothing was given
    and ``required`` is false. Malformed ranges and regexes are usage errors."""
    for cluster in args.cluster:
        check_cluster(cluster, command)
    if not (args.vms or args.cluster or args.regex is not None):
        if required:
            raise UsageError("nothing selected: name VMs, or use -n CLUSTER or -r REGEX",
                             command)
        return None
    try:
        return Selection(names=args.vms, regex=args.regex, clusters=args.cluster)
    except InvalidRequest as exc:
        raise UsageError(str(exc), command) from None


def parse_target(target, settings):
    """``[user@]host[:port]`` -> (user or None, host, port), falling back to
    the configuration."""
    user, host, port = None, settings.controller_host, settings.controller_port
    if target:
        if "@" in target:
            user, _, target = target.rpartition("@")
            if not user:
                raise UsageError("empty user name before '@'", "connect")
        if target.startswith("["):  # [ipv6]:port
            inside, bracket, rest = target[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise UsageError(f"malformed address {target!r}", "connect")
            host, port_text = inside, rest[1:] or None
        else:
            host, colon, port_text = target.partition(":")
            port_text = port_text if colon else None
        if port_text is not None:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise UsageError(f"invalid port {port_text!r}", "connect")
            port = int(port_text)
        if not host:
            raise UsageError("missing host name", "connect")
    if not host:
        raise UsageError("no controller host: give one ('connect HOST') or set "
                         "controller_host in the [ush] section", "connect")
    if not port:
        raise UsageError("no controller port: give one ('connect HOST:PORT') or set "
                         "controller_port in the [ush] section", "connect")
    return user, host, port


# --- Settings ------------------------------------------------------------------------

@dataclasses.dataclass
class UshSettings:
    """The [ush] options ush uses (see usher.settings.USH_SPEC)."""
    controller_host: str | None = "localhost"
    controller_port: int | None = 7390
    controller_tls_name: str | None = None
    ssl_ca_file: str | None = None
    username: str | None = None
    password: str | None = None
    history_file: str | None = None
    clusters: list = dataclasses.field(default_factory=list)
    call_timeout: float = 60.0

    @classmethod
    def from_config(cls, config):
        """From the dict load_config returns (its "ush" section, or the
        section itself)."""
        if isinstance(config, Mapping) and isinstance(config.get("ush"), Mapping):
            config = config["ush"]
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names})

    @property
    def login_name(self):
        return self.username or getpass.getuser()


def load_settings(config_file=None):
    """Read ush's configuration files (raises usher.errors.ConfigError)."""
    from usher import config, settings
    extra = [config_file] if config_file else []
    return UshSettings.from_config(config.load_config(settings.USH, extra_files=extra))


# --- The shell ---------------------------------------------------------------------------

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
        self._prompter = prompter
        self._clock = clock
        self.json_output = json_output
        self.wait_for_results = wait_for_results
        self._parsers = _build_parsers()
        self.client = None
        self._unsubscribe = []
        self._next_number = 0
        self.pending = {}
        # (state, vmm) of every VM notices have reported, to word the next one.
        self._known = {}
        self._syncing = False
        self._starts_in_flight = 0
        self._user_disconnected = False
        self.show_notices = True
        # Output is a terminal that ``top`` may redraw (one-shot mode).
        self.live_output = False

    # -- output ---------------------------------------------------------------

    def write(self, text):
        self._out.write(text + "\n")

    def notice(self, text):
        if self.show_notices:
            self.write(f"[notice] {text}")

    def _print_outcome(self, outcome):
        if self.json_output:
            stream = self._out if outcome.data is not None else self._err
            if outcome.data is not None:
                stream.write(json.dumps(outcome.data, indent=2, default=str) + "\n")
            elif outcome.text:
                stream.write(outcome.text + "\n")
        elif outcome.text:
            (self._err if outcome.error else self._out).write(outcome.text + "\n")

    def _print_usage_error(self, exc):
        if self.json_output:
            self._out.write(json.dumps({"error": exc.render()}) + "\n")
        else:
            self._err.write(exc.render() + "\n")

    @property
    def prompt(self):
        client = self.client
        if client is not None and client.connected and client.user:
            return f"{client.user}:{PROMPT}"
        return PROMPT

    # -- parsing ------------------------------------------------------------------

    def parse(self, words):
        """words -> (command name, argparse namespace); raises UsageError."""
        if not words:
            raise UsageError("no command given")
        name = ALIASES.get(words[0], words[0])
        parser = self._parsers.get(name)
        if parser is None:
            raise UsageError(f"unknown command {words[0]!r}; type 'help' for the list "
                             "of commands")
        return name, parser.parse_args(words[1:])

    def complete(self, text, line):
        """Readline completion candidates for ``text`` in ``line``."""
        words = line.split()
        first = not words or (len(words) == 1 and not line.endswith(" "))
        if first:
            candidates = [*self._parsers, *ALIASES]
        elif words[0] in ("help", "?"):
            candidates = [*ush_help.COMMANDS, *ush_help.TOPICS]
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
                self.write(ush_help.render(name))
                return True
            if name == "quit":
                return await self._leave()
            step = await self._prepare(name, args)
        except UsageError as exc:
            self._print_usage_error(exc)
            return True
        except Cancelled:
            self._err.write(f"{words[0]}: cancelled\n")
            return True
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
        return outcome

    async def _guarded(self, call):
        try:
            return await call.run()
        except Exception as exc:
            return error_outcome(exc)

    async def _leave(self):
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
        if self._clock is not None:
            d.addTimeout(CLOSE_TIMEOUT, self._clock)
        d.addErrback(lambda failure: None)
        return d

    # -- one-shot mode ----------------------------------------------------------------------

    async def run_once(self, words):
        """Connect, run one command, print its result; -> exit code."""
        try:
            name, args = self.parse(words)
            if name in INTERACTIVE_ONLY:
                raise UsageError("only available in the interactive shell", name)
        except UsageError as exc:
            self._print_usage_error(exc)
            return EXIT_USAGE
        if args.help or name == "help":
            topic = name if args.help else args.topic
            try:
                text = ush_help.render(topic) if topic else ush_help.overview()
            except KeyError:
                self._print_usage_error(UsageError(f"no help on {topic!r}", "help"))
                return EXIT_USAGE
            self._print_outcome(Outcome(text, {"help": text}))
            return EXIT_OK
        # Notices would only get in the way of the result (and of --json).
        self.show_notices = False
        try:
            # Check the command before asking for a password or connecting.
            step = await self._prepare(name, args, check_connection=False)
            if name != "connect":
                connected = await self._guarded(await self._prepare("connect", None))
                if connected.exit_code != EXIT_OK:
                    self._print_outcome(connected)
                    await self.close()
                    return connected.exit_code
            outcome = step if isinstance(step, Outcome) else await self._guarded(step)
        except UsageError as exc:
            self._print_usage_error(exc)
            await self.close()
            return EXIT_USAGE
        except Cancelled:
            self._print_outcome(Outcome("Error: no password given",
                                        {"error": "no password given"}, EXIT_CONNECTION,
                                        error=True))
            return EXIT_CONNECTION
        self._print_outcome(outcome)
        await self.close()
        return outcome.exit_code

    # -- commands -------------------------------------------------------------------------

    async def _prepare(self, name, args, check_connection=True):
        """Check a parsed command and return either its Outcome (local
        commands) or the Call that will run it remotely. Raises UsageError
        for anything wrong, before anything is sent."""
        if name == "help":
            return self._cmd_help(args)
        if name == "connect":
            return await self._cmd_connect(args)
        if name == "disconnect":
            return self._cmd_disconnect()
        if name == "reconnect":
            return self._cmd_reconnect()
        if name == "list":
            call = self._cmd_list(args)
        elif name == "list_lnm":
            call = self._cmd_list_lnm(args)
        elif name == "start":
            call = self._cmd_start(args)
        elif name == "migrate":
            call = self._cmd_migrate(args)
        elif name == "top":
            call = self._cmd_top(args)
        elif name == "plugins":
            call = self._cmd_plugins()
        elif name == "register_plugin":
            call = self._cmd_register_plugin(args)
        elif name == "unregister_plugin":
            call = self._cmd_unregister_plugin(args)
        elif name == "forget_lnm":
            call = self._cmd_forget_lnm(args)
        else:
            call = self._cmd_operation(name, args)
        if check_connection and (self.client is None or not self.client.connected):
            reconnecting = self.client is not None and not self._user_disconnected
            raise UsageError("not connected" + (" (reconnecting)" if reconnecting else "")
                             + "; use 'connect' first", name)
        return call

    def _live_client(self):
        client = self.client
        if client is None or not client.connected:
            raise Unavailable("not connected to the controller")
        return client

    def _cmd_help(self, args):
        topic = args.topic if args is not None else None
        if not topic:
            text = ush_help.overview()
        else:
            try:
                text = ush_help.render(topic)
            except KeyError:
                raise UsageError(f"no help on {topic!r}; type 'help' for the list of "
                                 "commands and topics", "help") from None
        return Outcome(text, {"help": text})

    async def _cmd_connect(self, args):
        target = args.target if args is not None else None
        if self.client is not None and self.client.connected:
            raise UsageError(f"already connected as {self.client.user}; use 'disconnect' "
                             "first", "connect")
        user, host, port = parse_target(target, self.settings)
        configured_user = self.settings.login_name
        username = user or configured_user
        password = self.settings.password if username == configured_user else None
        if password is None:
            if self._prompter is None:
                raise UsageError("no password configured and no terminal to ask for one",
                                 "connect")
            password = await self._prompter.ask_password("Password: ")

        async def connect():
            await self._drop_client()
            client = self._client_factory(host=host, port=port, username=username,
                                          password=password)
            self.client = client
            self._subscribe(client)
            info = await self._syncing_call(client.connect)
            self._user_disconnected = False
            return Outcome("Connected", dict(info or {}))
        return Call(connect)

    def _cmd_disconnect(self):
        if self.client is None:
            raise UsageError("not connected", "disconnect")
        client = self.client

        async def disconnect():
            self._user_disconnected = True
            await client.disconnect()
            return Outcome("Disconnected", {"disconnected": True})
        return Call(disconnect)

    def _cmd_reconnect(self):
        if self.client is None:
            raise UsageError("never connected; use 'connect'", "reconnect")
        client = self.client

        async def reconnect():
            # The client's own disconnect is not news; VM changes found on
            # logging in again are (the client reports them as a diff).
            self._user_disconnected = True
            info = await client.reconnect()
            self._user_disconnected = False
            return Outcome("Connected", dict(info or {}))
        return Call(reconnect)

    def _cmd_list(self, args):
        selection = make_selection(args, "list", required=False)
        status, remote = args.status, args.all

        async def list_vms():
            records = await self._live_client().list(selection=selection, status=status,
                                                     remote=remote)
            records = _by_name(records)
            return Outcome(format_vm_list(records, status), records)
        return Call(list_vms, immediate=not (status or remote))

    def _cmd_list_lnm(self, args):
        patterns = check_lnm_patterns(args.lnms, "list_lnm")
        status = args.status

        async def list_lnms():
            lnms = _by_name(await self._live_client().list_lnm(patterns=patterns, status=status))
            return Outcome(format_lnm_list(lnms, status), lnms)
        return Call(list_lnms)

    def _cmd_start(self, args):
        extra = parse_extra_args(args.arg)
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

        async def start():
            client = self._live_client()
            self._starts_in_flight += 1
            try:
                result = await client.start(names=names, cluster=cluster, count=count,
                                            lnms=lnms, args=extra)
            finally:
                self._starts_in_flight -= 1
            started = result.get("started") or []
            failed = result.get("failed") or []
            data = ([{"name": item["name"], "vmm": item.get("vmm")} for item in _by_name(started)]
                    + [{"name": item.get("name"), "error": item.get("error")}
                       for item in _by_name(failed)])
            return Outcome(format_start_result(result), data,
                           EXIT_FAILED if failed else EXIT_OK)
        return Call(start)

    def _cmd_operation(self, operation, args):
        selection = make_selection(args, operation)

        async def operate():
            result = await self._live_client().op_on(operation, selection)
            return Outcome(format_operation_result(operation, result), result,
                           EXIT_FAILED if result.get("failed") else EXIT_OK)
        return Call(operate)

    def _cmd_migrate(self, args):
        if args.to is None:
            if args.cluster or args.regex is not None or len(args.vms) != 2:
                raise UsageError("give one VM and one LNM ('migrate VM LNM'), or a "
                                 "selection followed by --to LNM [LNM ...]", "migrate")
            vm, lnm = args.vms
            try:
                selection = Selection(names=[vm])
            except InvalidRequest as exc:
                raise UsageError(str(exc), "migrate") from None
            lnms = check_lnm_patterns([lnm], "migrate")
        else:
            selection = make_selection(args, "migrate")
            lnms = check_lnm_patterns(args.to, "migrate")
        async def migrate():
            result = await self._live_client().migrate(selection, lnms)
            return Outcome(format_migrate_result(result), result,
                           EXIT_FAILED if result.get("failed") else EXIT_OK)
        return Call(migrate)

    def _cmd_plugins(self):
        async def plugins():
            description = await self._live_client().plugins()
            return Outcome(format_plugins(description), description)
        return Call(plugins)

    def _cmd_register_plugin(self, args):
        plugin, events = parse_plugin_words(args.plugin, args.events, "register_plugin")
        config = args.config
        if config is not None and not config.startswith("/"):
            raise UsageError(f"the configuration file must be an absolute path on the "
                             f"controller's host, not {config!r}", "register_plugin")
        order = args.order

        async def register():
            client = self._live_client()
            done = []
            description = None
            try:
                for event in events:
                    description = await client.register_plugin(plugin, event, config, order)
                    done.append(event)
            except UsherError as exc:
                if not done:
                    raise
                message = (f"registered {plugin} for {', '.join(done)}, but not for "
                           f"{events[len(done)]}: {exc}")
                # Partly done: a failure, not a usage error.
                return Outcome(f"Error: {message}", {"error": message, "registered": done},
                               EXIT_FAILED, error=True)
            text = (f"Plugin {plugin} registered for {', '.join(events)}.\n"
                    + format_chains(description, set(events)))
            return Outcome(text, description)
        return Call(register)

    def _cmd_unregister_plugin(self, args):
        plugin, events = parse_plugin_words(args.plugin, args.events, "unregister_plugin")

        async def unregister():
            client = self._live_client()
            done = []
            description = None
            try:
                for event in events or [None]:
                    description = await client.unregister_plugin(plugin, event)
                    done.append(event)
            except UsherError as exc:
                if not done:
                    raise
                message = (f"unregistered {plugin} from {', '.join(done)}, but not from "
                           f"{events[len(done)]}: {exc}")
                return Outcome(f"Error: {message}", {"error": message, "unregistered": done},
                               EXIT_FAILED, error=True)
            where = ", ".join(events) if events else "every event"
            return Outcome(f"Plugin {plugin} unregistered from {where}.", description)
        return Call(unregister)

    def _cmd_forget_lnm(self, args):
        lnm = args.lnm

        async def forget():
            result = await self._live_client().forget_lnm(lnm)
            lines = [f"LNM {lnm} forgotten, with {len(result['forgotten'])} VMs:"]
            lines.extend(sorted(result["forgotten"], key=natural_key))
            return Outcome("\n".join(lines), result)
        return Call(forget)

    def _cmd_top(self, args):
        patterns = check_lnm_patterns(args.lnms, "top")
        count, interval = args.count, args.interval
        # Refresh until interrupted only on a terminal in one-shot mode; at the
        # interactive prompt (and with --json) one view unless --iterations.
        live = self.live_output and not self.json_output
        iterations = args.iterations or (None if live else 1)
        if self.json_output:
            iterations = 1

        async def top():
            client = self._live_client()
            shown = 0
            while True:
                view = await client.top(patterns=patterns, count=count)
                shown += 1
                text = format_top(view, count)
                if iterations is not None and shown >= iterations:
                    return Outcome(text, view)
                self._out.write((CLEAR_SCREEN if live else "") + text + "\n"
                                + ("" if live else "\n"))
                if self._clock is None:
                    raise UsageError("top needs a clock to refresh", "top")
                await task.deferLater(self._clock, interval, lambda: None)
        return Call(top)

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
            self._known = {name: (rec.get("state"), rec.get("vmm"))
                           for name, rec in client.vms.items()}
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
        for record in _by_name(changed):
            name = record["name"]
            new = (record.get("state"), record.get("vmm"))
            old = self._known.get(name)
            self._known[name] = new
            if self._syncing:
                continue
            # What our own start creates is reported in its result (Figure 3).
            if self._starts_in_flight and (old is None or old[0] == states.STARTING):
                continue
            text = describe_change(name, old, new)
            if text:
                self.notice(text)
        for name in sorted(removed, key=natural_key):
            if self._known.pop(name, None) is not None and not self._syncing:
                self.notice(f"{name}: removed")

    def _on_connection(self, state, detail):
        if self._syncing or (self._user_disconnected and state != "notice"):
            return
        defaults = {"connected": "connected to the controller",
                    "disconnected": "disconnected from the controller",
                    "reconnecting": "lost the controller; reconnecting"}
        self.notice(detail or defaults.get(state, state))


# --- The terminal ------------------------------------------------------------------------

class PasswordPrompter:
    """Asks with getpass right away; for one-shot mode, before the reactor
    runs (so the blocking prompt stops nothing)."""

    def __init__(self, getpass_fn=getpass.getpass):
        self._getpass = getpass_fn

    def ask_password(self, prompt):
        try:
            return defer.succeed(self._getpass(prompt))
        except (EOFError, KeyboardInterrupt):
            return defer.fail(Cancelled())


class Console:
    """Interactive mode's terminal: readline and getpass in the main thread,
    the Shell on the reactor thread.

    The main thread reads a line, hands it to the reactor thread and waits
    for the shell to ask for the next one (or for a password, or to stop).
    Output produced while a prompt is showing (results, notices) is written
    over the prompt line, which is then drawn again with what was typed so
    far.
    """

    def __init__(self, reactor, *, stdout=None, input_fn=input, getpass_fn=getpass.getpass,
                 interactive=None, readline_module=None):
        self._reactor = reactor
        self._stdout = stdout if stdout is not None else sys.stdout
        self._input = input_fn
        self._getpass = getpass_fn
        self.interactive = (sys.stdin.isatty() and self._stdout.isatty()
                            if interactive is None else interactive)
        self._readline = readline_module
        self._lock = threading.Lock()
        self._requests = queue.Queue()
        self._reading_prompt = None
        self.shell = None

    # Called on any thread.
    def write(self, text):
        with self._lock:
            prompt = self._reading_prompt
            if prompt is not None and self.interactive:
                typed = self._readline.get_line_buffer() if self._readline else ""
                current = self.shell.prompt if self.shell is not None else prompt
                self._stdout.write("\r\x1b[K" + text + current + typed)
            else:
                self._stdout.write(text)
            self._stdout.flush()

    # Called on the reactor thread by the Shell.
    def ask_password(self, prompt):
        d = Deferred()
        self._requests.put(("password", prompt, d))
        return d

    def _dispatch(self, line):
        d = self.shell.handle_line(line)

        def next_step(keep_going):
            self._requests.put(("read",) if keep_going else ("stop",))

        def crashed(failure):
            log.failure("ush command failed", failure)
            self.write(f"internal error: {failure.getErrorMessage()}\n")
            self._requests.put(("read",))
        d.addCallbacks(next_step, crashed)

    def _read_line(self):
        prompt = self.shell.prompt if self.interactive else ""
        with self._lock:
            self._reading_prompt = prompt
        try:
            return self._input(prompt)
        finally:
            with self._lock:
                self._reading_prompt = None

    def _ask_password(self, prompt, d):
        try:
            password = self._getpass(prompt)
        except (EOFError, KeyboardInterrupt):
            self.write("\n")
            self._reactor.callFromThread(d.errback, Failure(Cancelled()))
        else:
            self._reactor.callFromThread(d.callback, password)

    def loop(self, shell):
        """Read and dispatch lines until quit/EOF; runs in the main thread."""
        self.shell = shell
        self._requests.put(("read",))
        while True:
            try:
                request = self._requests.get()
            except KeyboardInterrupt:
                # Only while leaving with commands pending: leave at once.
                self.write("\n")
                return
            if request[0] == "stop":
                return
            if request[0] == "password":
                self._ask_password(request[1], request[2])
                continue
            try:
                line = self._read_line()
            except KeyboardInterrupt:
                self.write("\n")
                self._requests.put(("read",))
                continue
            except EOFError:
                if self.interactive:
                    self.write("\n")
                line = None
            self._reactor.callFromThread(self._dispatch, line)


def _setup_readline(history_file, shell):
    try:
        import readline
    except ImportError:
        return None
    if history_file:
        try:
            readline.read_history_file(history_file)
        except OSError:
            pass
    readline.set_history_length(1000)

    def completer(text, state):
        try:
            line = readline.get_line_buffer()[:readline.get_begidx()]
            matches = shell.complete(text, line)
        except Exception:
            return None
        return matches[state] if state < len(matches) else None
    readline.set_completer(completer)
    readline.set_completer_delims(" \t")
    readline.parse_and_bind("tab: complete")
    return readline


def _save_history(readline, history_file):
    if readline is None or not history_file:
        return
    try:
        directory = os.path.dirname(history_file)
        if directory:
            os.makedirs(directory, exist_ok=True)
        readline.write_history_file(history_file)
    except OSError as exc:
        sys.stderr.write(f"ush: cannot save history to {history_file}: {exc}\n")


def default_client_factory(reactor, settings):
    def factory(host, port, username, password):
        from usher.client import UsherClient
        return UsherClient(reactor, host, port, ca_file=settings.ssl_ca_file,
                           tls_name=settings.controller_tls_name, username=username,
                           password=password, clusters=settings.clusters or None,
                           timeout=settings.call_timeout)
    return factory


def run_interactive(settings, reactor, client_factory=None):
    """The interactive shell: reactor in a background thread, terminal here."""
    from twisted.internet import threads
    console = Console(reactor)
    shell = Shell(client_factory or default_client_factory(reactor, settings), settings,
                  out=console, prompter=console, clock=reactor,
                  wait_for_results=not console.interactive)
    readline = _setup_readline(settings.history_file, shell) if console.interactive else None
    console._readline = readline
    reactor_thread = threading.Thread(target=reactor.run,
                                      kwargs={"installSignalHandlers": False},
                                      name="ush-reactor", daemon=True)
    reactor_thread.start()
    if console.interactive:
        console.write(banner() + "\n")
    try:
        console.loop(shell)
    finally:
        _save_history(readline, settings.history_file)
        try:
            threads.blockingCallFromThread(reactor, shell.close)
        except Exception:
            pass
        reactor.callFromThread(reactor.stop)
        reactor_thread.join(CLOSE_TIMEOUT)
    return EXIT_OK


def _wait_for(reactor, d):
    """Run the reactor until ``d`` fires (not at all if it has) -> its result."""
    box = []
    running = []

    def done(result):
        box.append(result)
        if running:
            reactor.stop()
    d.addBoth(done)
    if not box:
        running.append(True)
        reactor.run()
    if not box:  # the reactor was stopped (Ctrl-C) before the command finished
        return 130
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


# --- Entry point -----------------------------------------------------------------------------

def command_line_parser():
    parser = argparse.ArgumentParser(
        prog="ush", description="The Usher shell. Without a command, an interactive "
        "shell; with one, run it and exit (type 'ush help' for the commands).",
        epilog="Exit status: 0 success, 1 command failed, 2 usage or configuration "
        "error, 3 cannot connect or log in.")
    parser.add_argument("--config", metavar="FILE",
                        help="read this configuration file after the usual ones")
    parser.add_argument("--json", action="store_true",
                        help="print results as JSON (one-shot mode)")
    parser.add_argument("--version", action="version", version=f"ush {version()}")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="COMMAND [ARGUMENTS...]")
    return parser


def run(argv=None, *, stdout=None, stderr=None, settings_loader=load_settings,
        client_factory=None, reactor=None, getpass_fn=getpass.getpass):
    """The whole program; -> exit status. Arguments exist for tests."""
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    options = command_line_parser().parse_args(argv)

    def fail(message, code):
        if options.json:
            stdout.write(json.dumps({"error": message}) + "\n")
        else:
            stderr.write(f"ush: {message}\n")
        return code

    try:
        settings = settings_loader(options.config)
    except ConfigError as exc:
        return fail(str(exc), EXIT_USAGE)
    if reactor is None:
        from twisted.internet import reactor
    if not options.command:
        if options.json:
            return fail("--json needs a command (one-shot mode)", EXIT_USAGE)
        return run_interactive(settings, reactor, client_factory)
    shell = Shell(client_factory or default_client_factory(reactor, settings), settings,
                  out=stdout, err=stderr, prompter=PasswordPrompter(getpass_fn),
                  clock=reactor, json_output=options.json)
    shell.live_output = bool(getattr(stdout, "isatty", lambda: False)())
    # Starts synchronously: a password prompt happens before the reactor runs.
    return _wait_for(reactor, Deferred.fromCoroutine(shell.run_once(options.command)))


def main():
    try:
        sys.exit(run())
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
