"""How ush shows monitoring figures (``list -s``, ``list_lnm -s``, ``top``).

Pure text functions over the figures of ``usher.protocol`` (Monitoring):
each figure is [1-minute, 5-minute, 15-minute] averages, or None when the
hypervisor does not report it. A record without any figures (a shut-off VM,
an LNM that has not reported yet) shows "-"; a figure its hypervisor does
not report shows "n/a": never a number that was not measured.
"""

from collections.abc import Mapping

from usher.protocol import FIGURES

UNAVAILABLE = "n/a"
NO_FIGURES = "-"
# One column per CPU average: "cpu% 1m", "5m", "15m".
CPU_TITLES = ("cpu% 1m", "5m", "15m")
NET_TITLE = "net in/out"
DISK_TITLE = "disk r/w"
MEMORY_TITLE = "mem used"
SOURCE_TITLE = "figures"
AGE_TITLE = "stats age"
# An LNM's figures older than this (seconds), or from an LNM that is not
# connected, are marked stale: the last it reported, not the host now.
STALE_AFTER = 60.0
STALE_NOTE = (f"(stale: figures older than {STALE_AFTER:.0f} s or from an LNM that is not "
              "connected: the last it reported, not the host now)")
SIMULATED_NOTE = ("(figures marked simulated come from the LNM's simulated_load option, "
                  "not from its hypervisor)")

# Keys the monitoring columns show (or deliberately leave to --json), so the
# generic extra-column logic does not repeat them.
HIDDEN_KEYS = frozenset(FIGURES) | {"age", "sampled_at", "sample_interval", "source",
                                    "simulated_load"}


def has_figures(record):
    return any(figure in record for figure in FIGURES)


def format_rate(value):
    """Bytes per second, short: 0, 512, 1.5K, 12M, 1.2G (powers of 1024)."""
    if value is None:
        return UNAVAILABLE
    for unit, size in (("G", 1024 ** 3), ("M", 1024 ** 2), ("K", 1024)):
        if value >= size:
            scaled = value / size
            return f"{scaled:.1f}{unit}" if scaled < 10 else f"{scaled:.0f}{unit}"
    return f"{value:.0f}"


def _one_minute(record, figure):
    averages = record.get(figure)
    return averages[0] if averages else None


def cpu_cell(record, window=0):
    """One CPU average (window 0, 1, 2: 1, 5, 15 minutes) in percent."""
    if not has_figures(record):
        return NO_FIGURES
    averages = record.get("cpu")
    if averages is None:
        return UNAVAILABLE
    return f"{averages[window]:.1f}"


def _pair_cell(record, first, second):
    if not has_figures(record):
        return NO_FIGURES
    a, b = _one_minute(record, first), _one_minute(record, second)
    if a is None and b is None:
        return UNAVAILABLE
    return f"{format_rate(a)}/{format_rate(b)}"


def net_cell(record):
    """1-minute network receive/transmit rates."""
    return _pair_cell(record, "net_rx", "net_tx")


def disk_cell(record):
    """1-minute disk read/write rates."""
    return _pair_cell(record, "disk_read", "disk_write")


def memory_cell(record):
    """1-minute average of memory in use."""
    if not has_figures(record):
        return NO_FIGURES
    value = _one_minute(record, "memory_used")
    return UNAVAILABLE if value is None else f"{value:.0f} MiB"


def source_cell(record):
    if not has_figures(record):
        return NO_FIGURES
    return record.get("source") or "none"


def format_age(seconds):
    """5s, 4m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


def stale(record):
    """Figures that describe the host as it was, not as it is."""
    if not has_figures(record):
        return False
    age = record.get("age")
    return record.get("connected") is False or (
        isinstance(age, (int, float)) and age > STALE_AFTER)


def age_cell(record):
    """How old a record's figures are ("12s", "4m stale")."""
    if not has_figures(record):
        return NO_FIGURES
    age = record.get("age")
    text = format_age(age) if isinstance(age, (int, float)) and age >= 0 else "?"
    return f"{text} stale" if stale(record) else text


def any_simulated(records):
    return any("simulated" in str(r.get("source") or "") for r in records)


def figures_of(record):
    """A record's figures, from its nested ``status`` or its top level."""
    status = record.get("status")
    return status if isinstance(status, Mapping) else record


def busiest_first(records):
    """VM records by 1-minute CPU average, highest first (no figures last)."""
    def key(record):
        value = _one_minute(figures_of(record), "cpu")
        return (value is None, -(value or 0.0), str(record.get("name")))
    return sorted(records, key=key)
