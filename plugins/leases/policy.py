"""The site's lease policy (the plugin's configuration file) and what it
makes of a start request's ``lease`` argument."""

from usher.cliargs import duration_seconds, format_duration
from usher.errors import ConfigError

ACTIONS = ("shutdown", "hibernate", "destroy", "delete")
# What each action leaves a VM in: a VM already there when its lease ends
# has nothing left to do (it is not an error). destroy powers off hard and
# keeps the VM; delete removes it, running or not (a forced delete).
AT_REST = {"shutdown": {"shutoff", "hibernated"}, "hibernate": {"shutoff", "hibernated"},
           "destroy": {"shutoff", "hibernated"}, "delete": set()}
# The op_on arguments of each action.
ACTION_ARGS = {"delete": {"force": True}}


def _duration(config, key, default=None):
    value = config.get(key, default)
    if value in (None, "", "none", "None"):
        return None
    try:
        return duration_seconds(value)
    except ValueError as e:
        raise ConfigError(f"leases: {key}: {e}") from None


class LeasePolicy:
    """``default_lease`` (seconds or None: no lease unless asked for),
    ``max_lease`` (None: no bound), ``required``, ``warn_before`` (seconds,
    longest first), ``action``."""

    def __init__(self, config):
        self.default_lease = _duration(config, "default_lease")
        self.max_lease = _duration(config, "max_lease")
        self.required = bool(config.get("required", False))
        action = config.get("action", "shutdown")
        if action not in ACTIONS:
            raise ConfigError(f"leases: action: {action!r} is not one of "
                              + ", ".join(ACTIONS))
        self.action = action
        warn = config.get("warn_before", ["1h", "10m"])
        if isinstance(warn, str):
            warn = [warn]
        thresholds = set()
        for text in warn:
            try:
                thresholds.add(duration_seconds(text))
            except ValueError as e:
                raise ConfigError(f"leases: warn_before: {e}") from None
        self.warn_before = sorted(thresholds, reverse=True)
        if (self.default_lease is not None and self.max_lease is not None
                and self.default_lease > self.max_lease):
            raise ConfigError(f"leases: default_lease: {format_duration(self.default_lease)} "
                              f"is longer than max_lease ({format_duration(self.max_lease)})")

    def check(self, seconds):
        """-> why a lease of ``seconds`` may not be had, or None."""
        if self.max_lease is not None and seconds > self.max_lease:
            return (f"a lease of {format_duration(seconds)} is longer than this site allows "
                    f"(max_lease {format_duration(self.max_lease)})")
        return None

    def of_request(self, raw):
        """A start's ``lease`` argument (None: not given) -> (seconds or
        None for no lease, why it is refused or None)."""
        if raw is None:
            if self.default_lease is not None:
                return self.default_lease, None
            if self.required:
                bound = (f" (at most {format_duration(self.max_lease)})"
                         if self.max_lease is not None else "")
                return None, ("this site requires a lease on every VM: start with --lease "
                              f"DURATION{bound}, e.g. --lease 2h")
            return None, None
        try:
            seconds = duration_seconds(raw)
        except ValueError as e:
            return None, f"lease: {e}"
        return seconds, self.check(seconds)

    def already_warned(self, seconds):
        """The warnings a lease of ``seconds`` starts past (a 5-minute lease
        is not warned of as ending within the hour)."""
        return [t for t in self.warn_before if t >= seconds]

    def describe(self):
        return {"default_lease": self.default_lease, "max_lease": self.max_lease,
                "required": self.required, "warn_before": list(self.warn_before),
                "action": self.action}
