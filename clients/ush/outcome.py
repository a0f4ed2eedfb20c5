"""What a ush command comes to: its Outcome (text, data for --json, exit
status) or the Call that will produce one remotely, and how errors turn into
outcomes and exit statuses (0 success, 1 failed, 2 usage or configuration,
3 connection, in the manner of virsh)."""

import dataclasses

from twisted.internet import defer, error as net_error
from twisted.python.failure import Failure

from usher.cliargs import UsageError
from usher.errors import (AuthenticationFailed, ConfigError, InvalidRequest, Unavailable,
                          UsherError, from_failure)

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_CONNECTION", "Outcome", "Call",
           "Cancelled", "UsageError", "LEAVE", "exit_code_for", "error_outcome"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3


class Cancelled(Exception):
    """The user gave up at the password prompt."""


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
