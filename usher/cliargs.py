"""What Usher's command-line programs (``usher``, ``ush``) share: the usage
error they raise for a command line they cannot accept, and the argparse
argument types that check numbers, times and IP addresses before anything
is done."""

import argparse
import datetime
import ipaddress
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


def ip_address(text):
    """argparse type: one IPv4 or IPv6 address -> its text in canonical form."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def ip_network(text):
    """argparse type: a CIDR network (``10.1.0.0/24``, ``2001:db8::/64``) with
    no host bits set -> its text in canonical form."""
    text = text.strip()
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        network = None
    if network is None or "/" not in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a network in CIDR notation (such as 10.1.0.0/24)")
    if ipaddress.ip_interface(text).ip != network.network_address:
        raise argparse.ArgumentTypeError(f"{text!r} has host bits set: the network is {network}")
    return str(network)


def ip_address_list(text):
    """argparse type: comma-separated IP addresses -> a tuple of them."""
    return tuple(ip_address(part) for part in _parts(text))


def ip_address_spans(text):
    """argparse type: comma-separated addresses or ``FIRST-LAST`` spans of
    one family -> a tuple of strings, each an address or ``FIRST-LAST``."""
    spans = []
    for part in _parts(text):
        first, dash, last = part.partition("-")
        if not dash:
            spans.append(ip_address(part))
            continue
        low, high = ipaddress.ip_address(ip_address(first)), ipaddress.ip_address(ip_address(last))
        if low.version != high.version or low > high:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not a span FIRST-LAST of one family with FIRST <= LAST")
        spans.append(f"{low}-{high}")
    return tuple(spans)


def vlan_id(text):
    """argparse type: an IEEE 802.1Q VLAN id, 1 to 4094."""
    value = integer(text)
    if not 1 <= value <= 4094:
        raise argparse.ArgumentTypeError(f"{text!r} is not a VLAN id (1 to 4094)")
    return value


def _parts(text):
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty entry")
    return parts
