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



# -- durations (issue 15, part D: leases; shared by every part) ---------------------------

_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
# A year: no lease, grace or interval of Usher's is longer, and a bound keeps
# a typo (``2000000h``) from becoming "for ever".
MAX_DURATION = 366 * 86400


def duration_seconds(text, *, minimum=1, maximum=MAX_DURATION):
    """A duration -> whole seconds: ``90s``, ``30m``, ``2h``, ``1d``,
    ``1h30m``, or a plain number of seconds (``600``); between ``minimum``
    and ``maximum`` seconds. ValueError (saying what is accepted) for
    anything else; ``duration`` is the argparse type built on it."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"a duration must be text such as 2h or 30m, not "
                         f"{type(text).__name__}")
    spelled = str(text).strip().lower()
    if len(spelled) > 32:
        raise ValueError("a duration of more than 32 characters")
    if spelled.isascii() and spelled.isdigit():
        seconds = int(spelled)
    else:
        seconds, rest, seen = 0, spelled, []
        while rest:
            digits = len(rest) - len(rest.lstrip("0123456789"))
            unit = rest[digits:digits + 1]
            if digits == 0 or unit not in _DURATION_UNITS or unit in seen or (
                    seen and "dhms".index(unit) < "dhms".index(seen[-1])):
                raise ValueError(f"{text!r} is not a duration (such as 90s, 30m, 2h, 1d, "
                                 "1h30m)")
            seen.append(unit)
            seconds += int(rest[:digits]) * _DURATION_UNITS[unit]
            rest = rest[digits + 1:]
        if not seen:
            raise ValueError(f"{text!r} is not a duration (such as 90s, 30m, 2h, 1d, 1h30m)")
    if seconds < minimum:
        raise ValueError(f"{text!r} is shorter than {format_duration(minimum)}")
    if seconds > maximum:
        raise ValueError(f"{text!r} is longer than {format_duration(maximum)}")
    return seconds


def format_duration(seconds):
    """Whole seconds -> the shortest spelling ``duration_seconds`` reads
    back (``1h30m``, ``2d``, ``45s``; ``0s``)."""
    seconds = max(0, int(seconds))
    parts = []
    for unit, size in _DURATION_UNITS.items():
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


def duration(text):
    """argparse type: a duration (``duration_seconds``) -> seconds."""
    try:
        return duration_seconds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
