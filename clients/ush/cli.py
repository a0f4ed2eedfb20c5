"""ush's command table: every command's parser, each carrying the handler
that runs it (argparse ``set_defaults(handler=...)``, as ``usher.admin``
does). Each ``cmd_*`` module declares its group of commands in its
``register(declare)``; the shell parses a line here and calls
``args.handler(shell, args)``, which checks the arguments and returns an
Outcome (local commands) or the Call that will run remotely.
"""

from usher.cliargs import UsageError

from . import cmd_hosts, cmd_ipam, cmd_lnms, cmd_plugins, cmd_session, cmd_vms, help_text
from .parsing import CommandParser

ALIASES = help_text.ALIASES

# Registration functions of the command groups.
GROUPS = (
    cmd_session.register,
    cmd_vms.register,
    cmd_lnms.register,
    cmd_plugins.register,
    cmd_ipam.register,
    cmd_hosts.register,
)


def build_parsers(groups=GROUPS):
    """-> {command name: CommandParser} for every command of ``groups``."""
    parsers = {}

    def declare(name, handler, *, remote=True, interactive_only=False):
        """A new command: ``handler(shell, args)`` is a coroutine function
        returning an Outcome or a Call; ``remote`` commands need a connection
        (checked after their arguments); ``interactive_only`` ones mean
        nothing in one-shot mode."""
        parser = CommandParser(name)
        parser.set_defaults(command=name, handler=handler, remote=remote,
                            interactive_only=interactive_only)
        parsers[name] = parser
        return parser

    for register in groups:
        register(declare)
    return parsers


def parse(parsers, words):
    """words -> (command name, argparse namespace); raises UsageError."""
    if not words:
        raise UsageError("no command given")
    name = ALIASES.get(words[0], words[0])
    parser = parsers.get(name)
    if parser is None:
        raise UsageError(f"unknown command {words[0]!r}; type 'help' for the list "
                         "of commands")
    return name, parser.parse_args(words[1:])
