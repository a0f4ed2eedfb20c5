"""ush's plugin commands: plugins, register_plugin, unregister_plugin, and
query (any query a plugin answers, e.g. the DNS plugin's ``dns.status``).

One command may name several events; the controller takes them one call at
a time, so a failure after the first is reported as what was done and what
was not."""

import json
import re

from usher.cliargs import UsageError, integer
from usher.errors import UsherError

from .format import Column, SEPARATOR, format_chains, format_plugins, format_table, format_value
from .outcome import EXIT_FAILED, Call, Outcome

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


async def _each_event(events, call, plugin, past, preposition):
    """``call(event)`` for each event in turn -> (the last description, None),
    or (None, a failure Outcome) when a later event fails after earlier ones
    were done; the first event's error is raised."""
    done = []
    description = None
    try:
        for event in events:
            description = await call(event)
            done.append(event)
    except UsherError as exc:
        if not done:
            raise
        message = (f"{past} {plugin} {preposition} {', '.join(done)}, but not "
                   f"{preposition} {events[len(done)]}: {exc}")
        # Partly done: a failure, not a usage error.
        return None, Outcome(f"Error: {message}", {"error": message, past: done},
                             EXIT_FAILED, error=True)
    return description, None


async def cmd_plugins(shell, args):
    async def plugins():
        description = await shell.live_client().plugins()
        return Outcome(format_plugins(description), description)
    return Call(plugins)


async def cmd_register_plugin(shell, args):
    plugin, events = parse_plugin_words(args.plugin, args.events, "register_plugin")
    config = args.config
    if config is not None and not config.startswith("/"):
        raise UsageError(f"the configuration file must be an absolute path on the "
                         f"controller's host, not {config!r}", "register_plugin")
    order = args.order

    async def register_events():
        client = shell.live_client()
        description, failure = await _each_event(
            events, lambda event: client.register_plugin(plugin, event, config, order),
            plugin, "registered", "for")
        if failure is not None:
            return failure
        text = (f"Plugin {plugin} registered for {', '.join(events)}.\n"
                + format_chains(description, set(events)))
        return Outcome(text, description)
    return Call(register_events)


async def cmd_unregister_plugin(shell, args):
    plugin, events = parse_plugin_words(args.plugin, args.events, "unregister_plugin")

    async def unregister_events():
        client = shell.live_client()
        description, failure = await _each_event(
            events or [None], lambda event: client.unregister_plugin(plugin, event),
            plugin, "unregistered", "from")
        if failure is not None:
            return failure
        where = ", ".join(events) if events else "every event"
        return Outcome(f"Plugin {plugin} unregistered from {where}.", description)
    return Call(unregister_events)


QUERY_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


def parse_query_args(words, command):
    """KEY=VALUE words -> the query's arguments; a VALUE that reads as JSON
    (a number, true, null, a list …) is that, otherwise the text itself."""
    args = {}
    for word in words:
        key, equals, value = word.partition("=")
        if not equals or not PLUGIN_WORD_RE.match(key):
            raise UsageError(f"{word!r} is not KEY=VALUE", command)
        if key in args:
            raise UsageError(f"{key} given twice", command)
        try:
            args[key] = json.loads(value)
        except ValueError:
            args[key] = value
    return args


def format_query_rows(name, rows):
    """A query's answer as a table of its rows' fields (in the order they
    first appear), or one value a line for rows that are not objects."""
    if not rows:
        return f"{name}: nothing."
    if not all(isinstance(row, dict) for row in rows):
        return "\n".join(format_value(row) for row in rows)
    keys = list(dict.fromkeys(key for row in rows for key in row))
    columns = [Column(key, lambda row, key=key: format_value(row.get(key))) for key in keys]
    return "\n".join([f"{name}:", SEPARATOR, *format_table(columns, rows)])


async def cmd_query(shell, args):
    if not QUERY_NAME_RE.match(args.name):
        raise UsageError(f"{args.name!r} is not a query name", "query")
    query_args = parse_query_args(args.args, "query")

    async def ask():
        rows = await shell.live_client().query(args.name, **query_args)
        return Outcome(format_query_rows(args.name, rows), rows)
    return Call(ask)


def register(declare):
    parser = declare("query", cmd_query)
    parser.add_argument("name")
    parser.add_argument("args", nargs="*", metavar="KEY=VALUE")
    declare("plugins", cmd_plugins)
    parser = declare("register_plugin", cmd_register_plugin)
    parser.add_argument("-o", "--order", type=integer)
    parser.add_argument("plugin")
    parser.add_argument("events")
    parser.add_argument("config", nargs="?")
    parser = declare("unregister_plugin", cmd_unregister_plugin)
    parser.add_argument("plugin")
    parser.add_argument("events", nargs="?")
