"""How ush shows things: records and results as Figure 3's columns and
tables, change notices, usage errors, and the JSON of ``--json``.

Pure functions of the data the client library returns (plus the two writers
at the end, which only choose a stream). The monitoring cells themselves are
in ``monitor``.
"""

import dataclasses
import json
import re
import textwrap
from collections.abc import Mapping

from usher.errors import USAGE

from . import monitor

# The record key (and its column's title) naming the LNM that hosts a VM.
HOST_KEY, HOST_TITLE = "lnm", "LNM"

SEPARATOR = "-----"


def host_of(record):
    return record.get(HOST_KEY)


def placement(record):
    """(state, host LNM) of a VM record: what change notices compare."""
    return record.get("state"), host_of(record)



# --- Formatting ----------------------------------------------------------------

def natural_key(name):
    """Sort key that orders the numbers inside names numerically
    (2.sneetch before 10.sneetch)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def by_name(items):
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
    # Left out, lowest first, when the table is wider than the terminal
    # (None: always shown).
    priority: int | None = None


def _field(key, render=format_value):
    return lambda record: render(record.get(key))


# Figure 3's VM table; the VM and state columns keep its widths.
VM_COLUMNS = (
    Column("VM", _field("name", str), 39),
    Column("state", _field("state"), 9),
    Column(HOST_TITLE, _field(HOST_KEY)),
)
VM_STATUS_COLUMNS = (
    Column("cluster", _field("cluster")),
    Column("memory", _field("memory_mib", format_memory)),
    Column("vcpus", _field("vcpus")),
)
OWNER_COLUMN = Column("owner", _field("owner"))
# The address a plugin (IP address management) gave the VM: its args.
ADDRESS_ARG = "ip_address"


def address_of(record):
    args = record.get("args")
    address = args.get(ADDRESS_ARG) if isinstance(args, Mapping) else None
    return address if isinstance(address, str) else ""


ADDRESS_COLUMN = Column("address", address_of)
# Record keys never shown as extra status columns: shown already, or internal.
VM_HIDDEN_KEYS = {"name", "state", HOST_KEY, "cluster", "memory_mib", "vcpus", "owner",
                  "uuid", "managed", "version", "args"}
# Two memory figures that must not be confused: "committed" is what placement
# counts (the configured memory of the VMs placed on the host), "measured
# free" what the host's LNM last measured free (list_lnm -s).
COMMITTED_TITLE, MEASURED_FREE_TITLE = "committed", "measured free"
LNM_COLUMNS = (
    Column("LNM", _field("name", str), 24),
    Column("VMs", _field("vms")),
    Column("CPUs", _field("cpus"), priority=50),
    Column("memory", _field("memory_mib", format_memory)),
    Column(COMMITTED_TITLE, _field("committed_memory_mib", format_memory),
           key="committed_memory_mib", priority=88),
    Column("connected", _field("connected")),
)
LNM_STATUS_COLUMNS = (
    Column(MEASURED_FREE_TITLE, _field("free_memory_mib", format_memory),
           key="free_memory_mib", priority=87),
)
# Marks a simulated host (libvirt's test driver): shown when some LNM is one;
# on a narrow terminal it goes before the figures and their age do.
TEST_HOST_COLUMN = Column("test", lambda lnm: "TEST" if lnm.get("test_host") else "",
                          priority=70)
LNM_HIDDEN_KEYS = {"name", "vms", "cpus", "memory_mib", "connected", "free_memory_mib",
                   "holds", "committed_memory_mib", "committed_vcpus", "test_host"}
# Monitoring figures (list -s, list_lnm -s, top): the three CPU averages, then
# the 1-minute rates and memory (--json has every average).
FIGURE_COLUMNS = tuple(
    Column(title, lambda record, window=window: monitor.cpu_cell(record, window),
           priority=priority)
    for (window, title), priority in zip(enumerate(monitor.CPU_TITLES), (86, 30, 20))) + (
    Column(monitor.NET_TITLE, monitor.net_cell, priority=40),
    Column(monitor.DISK_TITLE, monitor.disk_cell, priority=35),
    Column(monitor.MEMORY_TITLE, monitor.memory_cell, priority=45),
)
SOURCE_COLUMN = Column(monitor.SOURCE_TITLE, monitor.source_cell, priority=60)
# How old an LNM's figures are ("stale": old, or its LNM is not connected).
AGE_COLUMN = Column(monitor.AGE_TITLE, monitor.age_cell, priority=84)
# Extra columns (fields only status queries carry) go first.
EXTRA_PRIORITY = 10
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
    return tuple(Column(_title(key), _field(key), priority=EXTRA_PRIORITY)
                 for key in sorted(keys))


def _widths(columns, cells, padded=True):
    widths = []
    for index, column in enumerate(columns):
        longest = max([len(column.title)] + [len(line[index]) for line in cells])
        widths.append(max(column.min_width if padded else 0, longest + 2))
    return widths


def format_table(columns, rows, width=None):
    """Header, separator and rows as in Figure 3; the last column is not
    padded. With ``width`` (the terminal's), a table wider than that loses
    its minimum widths, then its columns of lowest priority (the rightmost
    first among equals), with a line naming those left out."""
    cells = [[column.render(row) for column in columns] for row in rows]
    widths = _widths(columns, cells)
    keep = list(range(len(columns)))

    def total():
        return sum(widths[i] for i in keep[:-1]) + widths[keep[-1]] - 2

    left_out = []
    if width is not None and keep and total() > width:
        widths = _widths(columns, cells, padded=False)
        for _priority, negative in sorted((c.priority, -i) for i, c in enumerate(columns)
                                          if c.priority is not None):
            if total() <= width:
                break
            keep.remove(-negative)
            left_out.append(-negative)

    def line(values):
        shown = [values[i] for i in keep]
        padded = [value.ljust(widths[i]) for value, i in zip(shown[:-1], keep)]
        return "".join(padded) + shown[-1]
    lines = [line([column.title for column in columns]), SEPARATOR] + [line(c) for c in cells]
    if left_out:
        names = ", ".join(columns[i].title for i in sorted(left_out))
        lines.append(fit_note(f"(left out to fit {width} columns: {names}; a wider "
                              "terminal, COLUMNS=N or --json shows them)", width))
    return lines


def fit_note(text, width=None):
    """A note under a table, wrapped to ``width`` (None: one line)."""
    return textwrap.fill(text, width) if width else text


def format_vm_list(records, status=False, width=None):
    records = by_name(records)
    if not records:
        return "0 VMs."
    columns = list(VM_COLUMNS)
    if len({record.get("owner") for record in records}) > 1:
        columns.insert(1, OWNER_COLUMN)
    # Where the site manages addresses (blank for a VM without one).
    if any(address_of(record) for record in records):
        columns.append(ADDRESS_COLUMN)
    if status:
        records = [flatten_status(record) for record in records]
        columns += present(VM_STATUS_COLUMNS, records)
        columns += figure_columns(records)
        columns += extra_columns(records, VM_HIDDEN_KEYS | monitor.HIDDEN_KEYS)
    lines = [f"{plural(len(records), 'VM')}:", SEPARATOR] + format_table(columns, records,
                                                                         width)
    if status and monitor.any_simulated(records):
        lines.append(fit_note(monitor.SIMULATED_NOTE, width))
    return "\n".join(lines)


def figure_columns(records, source=False):
    """The monitoring columns, when some record has figures (for LNMs:
    where they come from and how old they are)."""
    if not any(monitor.has_figures(record) for record in records):
        return ()
    return FIGURE_COLUMNS + ((SOURCE_COLUMN, AGE_COLUMN) if source else ())


def format_lnm_list(lnms, status=False, width=None):
    lnms = by_name(lnms)
    if not lnms:
        return "0 LNMs."
    columns = present(LNM_COLUMNS, lnms)
    if any(lnm.get("test_host") for lnm in lnms):
        columns.append(TEST_HOST_COLUMN)
    # Why a host takes no new VMs (maintenance, fenced ...): only when one has.
    if any(lnm.get("holds") for lnm in lnms):
        columns.append(Column("holds", lambda lnm: ", ".join(sorted(lnm.get("holds") or ()))))
    if status:
        lnms = [flatten_status(lnm) for lnm in lnms]
        columns += present(LNM_STATUS_COLUMNS, lnms)
        columns += figure_columns(lnms, source=True)
        columns += extra_columns(lnms, LNM_HIDDEN_KEYS | monitor.HIDDEN_KEYS)
    lines = [f"{plural(len(lnms), 'LNM')}:", SEPARATOR] + format_table(columns, lnms, width)
    if status and monitor.any_simulated(lnms):
        lines.append(fit_note(monitor.SIMULATED_NOTE, width))
    if status and any(monitor.stale(lnm) for lnm in lnms):
        lines.append(fit_note(monitor.STALE_NOTE, width))
    return "\n".join(lines)


TOP_LNM_COLUMNS = (
    Column("LNM", _field("name", str), 12),
    Column("VMs", _field("vms")),
    Column("CPUs", _field("cpus"), priority=50),
) + FIGURE_COLUMNS + LNM_STATUS_COLUMNS + (SOURCE_COLUMN, AGE_COLUMN)
TOP_VM_COLUMNS = (
    Column("VM", _field("name", str), 24),
    Column(HOST_TITLE, _field(HOST_KEY)),
    Column("state", _field("state")),
) + FIGURE_COLUMNS


def format_top(view, count, width=None):
    """``top``'s answer ({"lnms", "vms"}) as a screen: hosts, then the
    busiest VMs."""
    lnms = [flatten_status(lnm) for lnm in by_name(view.get("lnms") or [])]
    vms = [flatten_status(vm) for vm in monitor.busiest_first(view.get("vms") or [])]
    connected = sum(1 for lnm in lnms if lnm.get("connected"))
    lines = [f"{plural(len(lnms), 'LNM')} ({connected} connected); averages over 1, 5 "
             "and 15 minutes; rates per second over 1 minute", SEPARATOR]
    lines += format_table(TOP_LNM_COLUMNS, lnms, width) if lnms else ["0 LNMs."]
    lines += ["", f"Busiest VMs (top {count} by 1-minute CPU):", SEPARATOR]
    lines += format_table(TOP_VM_COLUMNS, vms, width) if vms else ["No VM has figures yet."]
    if monitor.any_simulated(lnms + vms):
        lines.append(fit_note(monitor.SIMULATED_NOTE, width))
    if any(monitor.stale(lnm) for lnm in lnms):
        lines.append(fit_note(monitor.STALE_NOTE, width))
    return "\n".join(lines)


# Results of more VMs than this are summarised (identical reasons grouped,
# names as ranges); --verbose lists each VM.
DETAIL_LIMIT = 10
# Name groups shown in one summary line before "and N more".
MAX_NAME_GROUPS = 8
_NUMBERED = re.compile(r"^(\D*)(\d+)(.*)$")


def _same(name):
    return name


def compact_names(names, short=_same, limit=MAX_NAME_GROUPS):
    """Names as ranges in ush's own syntax: 1.big .. 128.big, 130.big ->
    "[1-128,130].big" (a range may be pasted into a command). ``short``
    shortens each name first (your own VMs: their short names)."""
    groups, others = {}, []
    for name in (short(str(n)) for n in names):
        match = _NUMBERED.match(name)
        if match is None:
            others.append(name)
            continue
        prefix, digits, suffix = match.groups()
        width = len(digits) if digits.startswith("0") and len(digits) > 1 else 0
        groups.setdefault((prefix, suffix, width), []).append(int(digits))
    parts = []
    for (prefix, suffix, width), numbers in groups.items():
        numbers = sorted(set(numbers))
        spans, first, last = [], numbers[0], numbers[0]
        for number in numbers[1:] + [None]:
            if number is not None and number == last + 1:
                last = number
                continue
            spans.append((first, last))
            if number is not None:
                first = last = number

        def text(n):
            return str(n).zfill(width)
        first_name = f"{prefix}{text(numbers[0])}{suffix}"
        if len(spans) == 1 and spans[0][0] == spans[0][1]:
            parts.append((first_name, first_name))
            continue
        inside = ",".join(text(a) if a == b else f"{text(a)}-{text(b)}" for a, b in spans)
        parts.append((first_name, f"{prefix}[{inside}]{suffix}"))
    parts += [(name, name) for name in others]
    parts = [text for _, text in sorted(parts, key=lambda part: natural_key(part[0]))]
    if len(parts) > limit:
        return ", ".join(parts[:limit]) + f" and {len(parts) - limit} more"
    return ", ".join(parts)


def group_by(items, key):
    """[(key value, [names])] of items sharing a key, the largest group first."""
    groups = {}
    for item in by_name(items):
        groups.setdefault(key(item), []).append(str(item.get("name")))
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), natural_key(kv[1][0])))


def _reason(item):
    """A failure's reason without the VM's own name, so that equal reasons group."""
    error, name = str(item.get("error")), str(item.get("name"))
    return error.replace(name, "the VM") if name else error


def _detailed(items, verbose):
    return verbose or len(items) <= DETAIL_LIMIT


def _failure_lines(verb, failed, verbose=False, short=_same):
    if not failed:
        return []
    if _detailed(failed, verbose):
        lines = [f"Could not {verb} {plural(len(failed), 'VM')}:"]
        lines += [f"{item.get('name')}: {item.get('error')}" for item in by_name(failed)]
        return lines
    groups = group_by(failed, _reason)
    lines = [f"Could not {verb} {plural(len(failed), 'VM')}"
             + (":" if len(groups) > 1 else "")]
    if len(groups) == 1:
        reason, names = groups[0]
        return [f"{lines[0]} ({compact_names(names, short)}): {reason}"]
    lines += [f"  {plural(len(names), 'VM')} ({compact_names(names, short)}): {reason}"
              for reason, names in groups]
    return lines


def _more_hint(*lists, verbose=False):
    if verbose or all(len(items) <= DETAIL_LIMIT for items in lists):
        return []
    return ["(-v lists each VM)"]


def _note_lines(result):
    return [f"Note: {note}" for note in result.get("notes") or ()]


def _per_host(groups):
    return ", ".join(f"{len(names)} on {host}" for host, names in
                     sorted(groups, key=lambda kv: natural_key(str(kv[0]))))


def format_start_result(result, verbose=False, short=_same):
    started = by_name(result.get("started") or [])
    failed = result.get("failed") or []
    lines = []
    if started or not failed:
        head = (f"Controller started {plural(len(started), 'VM')}"
                f"{format_duration(result.get('elapsed'))}")
        if _detailed(started, verbose):
            lines.append(head + (":" if started else "."))
            lines += [f"{item['name']} already running on {host_of(item)}" if item.get("already")
                      else f"{item['name']} started on {host_of(item)}" for item in started]
        else:
            already = sum(1 for item in started if item.get("already"))
            lines.append(f"{head}: {compact_names([i['name'] for i in started], short)} "
                         f"({_per_host(group_by(started, host_of))}"
                         + (f"; {already} already running" if already else "") + ")")
    lines += _failure_lines("start", failed, verbose, short)
    lines += _note_lines(result)
    lines += _more_hint(started, failed, verbose=verbose)
    return "\n".join(lines)


PAST_TENSE = {
    "pause": "paused", "resume": "resumed", "shutdown": "shut down", "reboot": "rebooted",
    "hibernate": "hibernated", "restore": "restored", "destroy": "destroyed",
    "cycle": "cycled", "delete": "deleted",
}


# How "already <state>" reads.
ALREADY_WORD = {"run": "running", "shutoff": "shut off"}


def format_operation_result(operation, result, verbose=False, short=_same):
    done = by_name(result.get("done") or [])
    failed = result.get("failed") or []
    past = PAST_TENSE[operation]
    lines = []
    if done and _detailed(done, verbose):
        lines.append(f"Controller {past} {plural(len(done), 'VM')}:")
        for item in done:
            state = item.get("state")
            if item.get("already"):
                lines.append(f"{item['name']} already {ALREADY_WORD.get(state, state)}")
            else:
                lines.append(f"{item['name']} -> {state}" if state
                             else f"{item['name']} {past}")
    elif done:
        def outcome(item):
            state = item.get("state")
            if item.get("already"):
                return f" already {ALREADY_WORD.get(state, state)}"
            return f" -> {state}" if state else ""
        groups = group_by(done, outcome)
        lines.append(f"Controller {past} {plural(len(done), 'VM')}: " + "; ".join(
            compact_names(names, short) + label for label, names in groups))
    lines += _failure_lines(operation, failed, verbose, short)
    if not done and not failed:
        lines.append("No VMs matched.")
    lines += _note_lines(result)
    lines += _more_hint(done, failed, verbose=verbose)
    return "\n".join(lines)


def format_migrate_result(result, verbose=False, short=_same):
    moved = by_name(result.get("migrated") or [])
    failed = result.get("failed") or []
    lines = []
    if moved and _detailed(moved, verbose):
        lines.append(f"Controller migrated {plural(len(moved), 'VM')}:")
        lines += [f"{item['name']} already on {item.get('to')}" if item.get("already")
                  else f"{item['name']} moved from {item.get('from')} to {item.get('to')}"
                  for item in moved]
    elif moved:
        groups = group_by(moved, lambda item: (str(item.get("from")), str(item.get("to"))))
        lines.append(f"Controller migrated {plural(len(moved), 'VM')}:")
        lines += [f"  {plural(len(names), 'VM')} ({compact_names(names, short)}) from "
                  f"{where[0]} to {where[1]}" for where, names in groups]
    lines += _failure_lines("migrate", failed, verbose, short)
    if not moved and not failed:
        lines.append("No VMs matched.")
    lines += _note_lines(result)
    lines += _more_hint(moved, failed, verbose=verbose)
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
    """A notice for one VM going from ``old`` to ``new`` ((state, host LNM)
    pairs; ``old`` None for a VM not seen before); None if nothing visible
    changed."""
    state, host = new
    if old is None:
        where = f" on {host}" if host else ""
        return f"{name}: new VM, {state}{where}"
    old_state, old_host = old
    moved = None
    if host != old_host:
        if old_host and host:
            moved = f"moved {old_host} -> {host}"
        elif host:
            moved = f"on {host}"
        else:
            moved = f"no longer on {old_host}"
    if state != old_state:
        return f"{name}: {old_state} -> {state}" + (f" ({moved})" if moved else "")
    if moved:
        return f"{name}: {moved}"
    return None


def usage_error_text(exc):
    """A UsageError as ush shows it: the command's usage line, the message,
    and where to read more."""
    lines = []
    if exc.usage:
        lines.append(f"usage: {exc.usage}")
    lines.append(f"{exc.command}: {exc.message}" if exc.command else exc.message)
    if exc.usage and exc.command:
        lines.append(f"(type 'help {exc.command}' for details)")
    return "\n".join(lines)


# --- Output: text for people, or JSON with --json --------------------------------

def error_json(message, code):
    """An error as one line of JSON (what --json prints instead of text):
    the message and its code (usher.errors.ERROR_CODES)."""
    return json.dumps({"error": message, "code": code})


def write_outcome(outcome, *, json_output, out, err):
    """An Outcome's data as JSON on ``out`` (its text on ``err`` if it has no
    data) with --json; else its text, on ``err`` for an error."""
    if json_output:
        if outcome.data is not None:
            indent = None if outcome.json_lines else 2
            out.write(json.dumps(outcome.data, indent=indent, default=str) + "\n")
        elif outcome.text:
            err.write(outcome.text + "\n")
    elif outcome.text:
        (err if outcome.error else out).write(outcome.text + "\n")


def write_usage_error(exc, *, json_output, out, err):
    if json_output:
        out.write(error_json(usage_error_text(exc), USAGE) + "\n")
    else:
        err.write(usage_error_text(exc) + "\n")
