"""What a ush command comes to: its Outcome (text, data for --json, exit
status) or the Call that will produce one remotely, and how errors turn into
outcomes, codes and exit statuses (the table is ``usher.errors.EXIT_STATUSES``
and ``ERROR_CODES``; ``ush help exit-codes`` shows it)."""

import dataclasses

from twisted.internet import defer, error as net_error
from twisted.python.failure import Failure

from usher import errors
from usher.cliargs import UsageError
from usher.errors import (EXIT_CONNECTION, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NO_MATCH,
                          EXIT_OK, EXIT_USAGE, UsherError, from_failure)

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_CONNECTION", "EXIT_NO_MATCH",
           "EXIT_INTERRUPTED", "Outcome", "Call", "Cancelled", "UsageError", "LEAVE",
           "exit_code_for", "error_code", "error_outcome", "results_exit_code"]


class Cancelled(Exception):
    """The user gave up at the password prompt (no message), or no one can
    be asked (the message says what to do instead)."""

    def __str__(self):
        return self.args[0] if self.args else "no password given"


@dataclasses.dataclass
class Outcome:
    """A command's result: text for people, data for --json, an exit code."""
    text: str
    data: object = None
    exit_code: int = EXIT_OK
    error: bool = False  # an error message rather than a (partial) result
    json_lines: bool = False  # --json prints data on one line (top's views)


@dataclasses.dataclass
class Call:
    """A remote step: ``run`` is an async function returning an Outcome.

    ``immediate`` calls (list from the cache) get no number when they finish
    without waiting, as in Figure 3."""
    run: object
    immediate: bool = False


# What ``quit`` comes to: leave the shell once the pending commands finish.
LEAVE = object()

_CONNECTION_ERRORS = (net_error.ConnectError, net_error.ConnectionClosed, ConnectionError,
                      defer.TimeoutError)


def error_code(exc):
    """The stable code (usher.errors.ERROR_CODES) of an exception."""
    if isinstance(exc, UsherError):
        return exc.code
    if isinstance(exc, UsageError):
        return errors.USAGE
    if isinstance(exc, Cancelled):
        return errors.NO_PASSWORD
    if isinstance(exc, _CONNECTION_ERRORS):
        return errors.UNAVAILABLE
    return errors.INTERNAL


def exit_code_for(exc):
    return errors.exit_status_of_code(error_code(exc))


def error_outcome(exc):
    if isinstance(exc, (UsherError, Cancelled)):
        message = str(exc)
    elif isinstance(exc, _CONNECTION_ERRORS):
        message = f"connection problem: {exc}"
    else:
        message = str(from_failure(Failure(exc)))
    return Outcome(f"Error: {message}", {"error": message, "code": error_code(exc)},
                   exit_code_for(exc), error=True)


def results_exit_code(failed):
    """The exit status of a command whose VMs ``failed`` (entries with a
    "code"): 0 if none, 3 if one's code comes to 3 (its LNM unavailable, its
    outcome unknown: retry or check), else 1."""
    if not failed:
        return EXIT_OK
    if any(errors.exit_status_of_code(item.get("code")) == EXIT_CONNECTION
           for item in failed):
        return EXIT_CONNECTION
    return EXIT_FAILED
