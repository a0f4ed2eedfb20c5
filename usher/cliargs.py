"""What Usher's command-line programs (``usher``, ``ush``) share: the usage
error they raise for a command line they cannot accept, and the argparse
argument types that check numbers and times before anything is done."""

import argparse
import datetime
import time


class UsageError(Exception):
    """A command line that cannot be accepted (exit status 2); nothing was done.

    ``command`` names the (sub)command at fault and ``usage`` is its usage
    line, when the program shows them."""

    def __init__(self, message, command=None, usage=None):
        super().__init__(message)
        self.message = message
        self.command = command
        self.usage = usage


def integer(text):
    """argparse type: a whole number, negative ones included."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text):
    """argparse type: a whole number of at least 1."""
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def positive_seconds(text):
    """argparse type: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def timestamp(text):
    """argparse type: an ISO 8601 date or date and time (``2026-11-01``,
    ``2026-11-01T08:30``, ``2026-11-01 08:30:00+01:00``), UTC unless it names
    a zone, or ``now`` -> UNIX seconds."""
    if text.strip().lower() == "now":
        return time.time()
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date (YYYY-MM-DD) or date and time (YYYY-MM-DDTHH:MM, "
            "UTC unless it ends with a zone such as +01:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()

