"""What Usher's command-line programs (``usher``, ``ush``) share: the usage
error they raise for a command line they cannot accept, and the argparse
argument types that check numbers before anything is done."""

import argparse


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
