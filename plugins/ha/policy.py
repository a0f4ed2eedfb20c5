"""The HA plugin's policy in plain Python: which lost VMs to restart first,
and how many per minute (no network, no controller: unit-tested alone).

Priority: the VM argument ``ha_priority`` (0-1000; 0 = never restart it),
else the site's ``default_priority``; higher first, then the longest
waiting, then by name. At most ``per_minute`` restarts are asked in any
sliding minute; the rest wait their turn. A VM whose restart failed (no
host with room ...) waits ``retry_after`` seconds before it is tried again.
"""

import collections

MAX_PRIORITY = 1000
WINDOW = 60.0


def priority_of(record, default, user_max=MAX_PRIORITY):
    """-> the VM's priority (0-1000) from its ``ha_priority`` argument. A
    value the user's request set is capped at ``user_max`` (users must not
    push everybody else's restarts back); one a site plugin set (the
    record's ``plugin_args``) is not."""
    value = (record.get("args") or {}).get("ha_priority")
    if value is None:
        return default
    try:
        priority = int(str(value).strip())
    except ValueError:
        return default
    if not 0 <= priority <= MAX_PRIORITY:
        return default
    if "ha_priority" not in (record.get("plugin_args") or ()):
        priority = min(priority, user_max)
    return priority


class RestartQueue:
    def __init__(self, *, per_minute, retry_after):
        self.per_minute = per_minute
        self.retry_after = retry_after
        self._waiting = {}      # name -> {"priority", "since", "lnm", "retry_at", "error"}
        self._recent = collections.deque()   # times of the restarts asked

    def __contains__(self, name):
        return name in self._waiting

    def __len__(self):
        return len(self._waiting)

    def add(self, name, lnm, priority, now):
        if name not in self._waiting:
            self._waiting[name] = {"priority": priority, "since": now, "lnm": lnm,
                                   "retry_at": now, "error": None}

    def discard(self, name):
        self._waiting.pop(name, None)

    def names(self):
        return list(self._waiting)

    def failed(self, name, error, now):
        entry = self._waiting.get(name)
        if entry is not None:
            entry["error"] = str(error)[:500]
            entry["retry_at"] = now + self.retry_after

    def _forget_old(self, now):
        while self._recent and self._recent[0] <= now - WINDOW:
            self._recent.popleft()

    def room(self, now):
        """-> how many restarts may be asked now."""
        self._forget_old(now)
        return max(0, self.per_minute - len(self._recent))

    def take(self, now):
        """-> the names to restart now (highest priority first), counted
        against the rate; they stay queued until ``discard``/``failed``."""
        ready = [(-e["priority"], e["since"], name) for name, e in self._waiting.items()
                 if e["retry_at"] <= now]
        ready.sort()
        chosen = [name for _p, _s, name in ready[:self.room(now)]]
        self._recent.extend([now] * len(chosen))
        return chosen

    def recent(self, now):
        self._forget_old(now)
        return len(self._recent)

    def describe(self, now):
        ordered = sorted(self._waiting.items(),
                         key=lambda item: (-item[1]["priority"], item[1]["since"], item[0]))
        return [{"name": name, "lnm": e["lnm"], "priority": e["priority"],
                 "waiting": round(now - e["since"], 1), "error": e["error"],
                 "retry_in": max(0.0, round(e["retry_at"] - now, 1))}
                for name, e in ordered]
