"""How ush reads a command's arguments: an argparse parser that raises
UsageError instead of exiting, and the checks shared by several commands
(VM selections, LNM patterns, cluster names). Everything here runs before
anything is sent: a malformed name, range or regular expression is a usage
error."""

import argparse

from usher import naming
from usher.cliargs import UsageError
from usher.errors import InvalidRequest
from usher.vmset import Selection, compile_regex, expand_ranges

from . import help_text


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of exiting; its
    usage line is the one of the command's help entry."""

    def __init__(self, name):
        super().__init__(prog=name, usage=help_text.COMMANDS[name].usage, add_help=False,
                         allow_abbrev=False)
        self.add_argument("-h", "--help", action="store_true")

    def format_usage(self):
        return self.usage

    def error(self, message):
        raise UsageError(message, self.prog, self.usage)

    def exit(self, status=0, message=None):
        raise UsageError((message or "invalid arguments").strip(), self.prog)


def add_selection(parser, positional=True):
    """The VM selection options: names and ranges, -n CLUSTER, -r REGEX,
    --lnm PATTERN (only the VMs on those LNMs; alone, every VM on them)."""
    parser.add_argument("-n", "--cluster", action="append", default=[], metavar="CLUSTER")
    parser.add_argument("-r", "--regex", metavar="REGEX")
    parser.add_argument("--lnm", action="append", default=[], metavar="LNM", dest="on_lnm")
    if positional:
        parser.add_argument("vms", nargs="*", metavar="VM")


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
    lnms = check_lnm_patterns(getattr(args, "on_lnm", None) or [], command)
    if not (args.vms or args.cluster or args.regex is not None or lnms):
        if required:
            raise UsageError("nothing selected: name VMs, or use -n CLUSTER, -r REGEX or "
                             "--lnm LNM", command)
        return None
    return selection_of(command, names=args.vms, regex=args.regex, clusters=args.cluster,
                        lnms=lnms)


def selection_of(command, **parts):
    """Selection(**parts), its InvalidRequest a usage error of ``command``."""
    try:
        return Selection(**parts)
    except InvalidRequest as exc:
        raise UsageError(str(exc), command) from None
