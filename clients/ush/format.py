"""How ush shows things: records and results as Figure 3's columns and
tables, change notices, usage errors, and the JSON of ``--json``.

Pure functions of the data the client library returns (plus the two writers
at the end, which only choose a stream). The monitoring cells themselves are
in ``monitor``.
"""

import dataclasses
import json
import re
from collections.abc import Mapping

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
# Marks a simulated host (libvirt's test driver): shown when some LNM is one.
TEST_HOST_COLUMN = Column("test host", lambda lnm: "TEST" if lnm.get("test_host") else "")
LNM_HIDDEN_KEYS = {"name", "vms", "cpus", "memory_mib", "connected", "free_memory_mib",
                   "holds", "test_host"}
# Monitoring figures (list -s, list_lnm -s, top): the three CPU averages, then
# the 1-minute rates and memory (--json has every average).
FIGURE_COLUMNS = tuple(
    Column(title, lambda record, window=window: monitor.cpu_cell(record, window))
    for window, title in enumerate(monitor.CPU_TITLES)) + (
    Column(monitor.NET_TITLE, monitor.net_cell),
    Column(monitor.DISK_TITLE, monitor.disk_cell),
    Column(monitor.MEMORY_TITLE, monitor.memory_cell),
)
SOURCE_COLUMN = Column(monitor.SOURCE_TITLE, monitor.source_cell)
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
    lines = [f"{plural(len(records), 'VM')}:", SEPARATOR] + format_table(columns, records)
    if status and monitor.any_simulated(records):
        lines.append(monitor.SIMULATED_NOTE)
    return "\n".join(lines)


def figure_columns(records, source=False):
    """The monitoring columns, when some record has figures."""
    if not any(monitor.has_figures(record) for record in records):
        return ()
    return FIGURE_COLUMNS + ((SOURCE_COLUMN,) if source else ())


def format_lnm_list(lnms, status=False):
    lnms = by_name(lnms)
    if not lnms:
        return "0 LNMs."
    columns = list(LNM_COLUMNS)
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
    lines = [f"{plural(len(lnms), 'LNM')}:", SEPARATOR] + format_table(columns, lnms)
    if status and monitor.any_simulated(lnms):
        lines.append(monitor.SIMULATED_NOTE)
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
    Column(HOST_TITLE, _field(HOST_KEY)),
    Column("state", _field("state")),
) + FIGURE_COLUMNS


def format_top(view, count):
    """``top``'s answer ({"lnms", "vms"}) as a screen: hosts, then the
    busiest VMs."""
    lnms = [flatten_status(lnm) for lnm in by_name(view.get("lnms") or [])]
    vms = [flatten_status(vm) for vm in monitor.busiest_first(view.get("vms") or [])]
    connected = sum(1 for lnm in lnms if lnm.get("connected"))
    lines = [f"{plural(len(lnms), 'LNM')} ({connected} connected); averages over 1, 5 "
             "and 15 minutes; rates per second over 1 minute", SEPARATOR]
    lines += format_table(TOP_LNM_COLUMNS, lnms) if lnms else ["0 LNMs."]
    lines += ["", f"Busiest VMs (top {count} by 1-minute CPU):", SEPARATOR]
    lines += format_table(TOP_VM_COLUMNS, vms) if vms else ["No VM has figures yet."]
    if monitor.any_simulated(lnms + vms):
        lines.append(monitor.SIMULATED_NOTE)
    return "\n".join(lines)


def _failure_lines(verb, failed):
    if not failed:
        return []
    lines = [f"Could not {verb} {plural(len(failed), 'VM')}:"]
    lines += [f"{item.get('name')}: {item.get('error')}" for item in by_name(failed)]
    return lines


def _note_lines(result):
    return [f"Note: {note}" for note in result.get("notes") or ()]


def format_start_result(result):
    started = by_name(result.get("started") or [])
    failed = result.get("failed") or []
    lines = []
    if started or not failed:
        lines.append(f"Controller started {plural(len(started), 'VM')}"
                     f"{format_duration(result.get('elapsed'))}" + (":" if started else "."))
        lines += [f"{item['name']} started on {host_of(item)}" for item in started]
    lines += _failure_lines("start", failed)
    lines += _note_lines(result)
    return "\n".join(lines)


PAST_TENSE = {
    "pause": "paused", "resume": "resumed", "shutdown": "shut down", "reboot": "rebooted",
    "hibernate": "hibernated", "restore": "restored", "destroy": "destroyed",
    "cycle": "cycled",
}


def format_operation_result(operation, result):
    done = by_name(result.get("done") or [])
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
    moved = by_name(result.get("migrated") or [])
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

def error_json(message):
    """An error as one line of JSON (what --json prints instead of text)."""
    return json.dumps({"error": message})


def write_outcome(outcome, *, json_output, out, err):
    """An Outcome's data as JSON on ``out`` (its text on ``err`` if it has no
    data) with --json; else its text, on ``err`` for an error."""
    if json_output:
        if outcome.data is not None:
            out.write(json.dumps(outcome.data, indent=2, default=str) + "\n")
        elif outcome.text:
            err.write(outcome.text + "\n")
    elif outcome.text:
        (err if outcome.error else out).write(outcome.text + "\n")


def write_usage_error(exc, *, json_output, out, err):
    if json_output:
        out.write(error_json(usage_error_text(exc)) + "\n")
    else:
        err.write(usage_error_text(exc) + "\n")
