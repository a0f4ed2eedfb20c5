"""Shell completion for ``ush`` and ``usher``, generated from their argparse
parsers by ``shtab`` (static scripts: a TAB never starts Python or logs in).

``ush --completion bash`` and ``usher completion bash`` print the script (zsh
too); the same scripts are shipped in ``etc/completion/`` and installed by
``initscripts/install.sh`` into bash-completion's directory. Completed: the
commands, their options and ``--config``-style file arguments; VM and LNM
names are not (they would need a controller login per TAB).
"""

import argparse

import shtab

SHELLS = ("bash", "zsh")
FILE_OPTIONS = ("--config", "--plugin-config", "--passwd-file", "--ldap-config", "--out", "--dir")


def _mark_files(parser):
    """Options naming files or directories complete as such."""
    for action in parser._actions:
        if any(option in FILE_OPTIONS for option in action.option_strings):
            action.complete = shtab.DIRECTORY if "--dir" in action.option_strings \
                else shtab.FILE
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _mark_files(child)
    return parser


def script(parser, shell="bash"):
    """The completion script of ``parser`` for ``shell`` (bash or zsh)."""
    if shell not in SHELLS:
        raise ValueError(f"no completion for shell {shell!r}; choose {', '.join(SHELLS)}")
    return shtab.complete(_mark_files(parser), shell=shell)


def ush_parser():
    """ush as one argparse tree for completion: its program options, then
    each command of the command table (``usher.clients.ush.cli``) and alias
    with that command's own options."""
    from usher.clients.ush import cli, help_text, program

    top = program.command_line_parser()
    parser = argparse.ArgumentParser(prog="ush", description=top.description)
    for action in top._actions:
        if action.option_strings and "--help" not in action.option_strings:
            parser._add_action(action)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    table = cli.build_parsers()
    names = list(table) + [alias for alias in cli.ALIASES if alias.isidentifier()]
    for name in names:
        command = table[cli.ALIASES.get(name, name)]
        child = commands.add_parser(name, add_help=False,
                                    help=help_text.COMMANDS[command.prog].summary)
        for action in command._actions:
            child._add_action(action)
    return parser
