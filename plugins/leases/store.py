"""The leases, in memory and in ``leases.json`` of the controller's state
directory: loaded off the reactor when the plugin starts, rewritten
atomically (``usher.persist``) after every change, one write at a time
(changes made meanwhile go in the next write)."""

import math
import os

from twisted.internet import defer
from twisted.logger import Logger

from usher.persist import read_json, remove_leftovers, write_json_atomic

log = Logger()

FILE_NAME = "leases.json"
STORE_NAME = "leases"
VERSION = 1


def _valid(name, entry):
    """A lease read back from the file -> the lease, or None if malformed
    (the file is the controller's own, but a hand edit must not break it)."""
    if not isinstance(name, str) or not isinstance(entry, dict):
        return None
    owner, expires = entry.get("owner"), entry.get("expires")
    warned = entry.get("warned", [])
    if not isinstance(owner, str) or isinstance(expires, bool) or not isinstance(
            expires, (int, float)) or not math.isfinite(expires):
        return None
    if not isinstance(warned, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in warned):
        return None
    return {"owner": owner, "expires": float(expires), "warned": sorted(set(warned))}


def _parse(data):
    leases = data.get("leases", {}) if isinstance(data, dict) else {}
    if not isinstance(leases, dict):
        return {}
    return {name: lease for name, lease in
            ((name, _valid(name, entry)) for name, entry in leases.items())
            if lease is not None}


def _load(path):
    """(plugin thread) -> {name: lease}; an unreadable file is moved aside
    (``leases.json.unreadable``) for the administrator and nothing is loaded."""
    remove_leftovers(path)
    try:
        data = read_json(path, {})
    except (OSError, ValueError) as e:
        aside = path + ".unreadable"
        try:
            os.replace(path, aside)
        except OSError:
            aside = None
        raise ValueError(f"{path} cannot be read ({e}); "
                         + (f"moved to {aside}" if aside else "left where it is")) from None
    return _parse(data)


class LeaseStore:
    """``leases``: VM name -> ``{"owner", "expires" (epoch s), "warned":
    [thresholds already told]}``. ``api`` runs the file work off the
    reactor; with no state directory nothing is persisted. With a standby
    controller (``api.store``, the HA database) the leases are kept there
    under the name ``leases``, not in a file."""

    def __init__(self, api):
        self.api = api
        self.leases = {}
        self.store = getattr(api, "store", None)
        self.path = (os.path.join(api.state_dir, FILE_NAME)
                     if api.state_dir is not None and self.store is None else None)
        self._writing = None
        self._dirty = False
        self.writes = 0
        if self.store is not None:
            self.path = "the HA database"
            self.loaded = defer.succeed(None)
            try:
                self._merge(_parse(self.store.load(STORE_NAME)))
            except (OSError, ValueError) as e:
                log.error("leases: the saved leases could not be loaded: {error}", error=e)
        elif self.path is None:
            self.loaded = defer.succeed(None)
        else:
            self.loaded = api.run_blocking(_load, self.path)
            self.loaded.addCallbacks(self._merge, self._unreadable)

    def _merge(self, loaded):
        # Leases set while the file was read are newer than the file's.
        self.leases = {**loaded, **self.leases}
        log.info("leases: {count} leases loaded from {path}", count=len(loaded),
                 path=self.path)

    def _unreadable(self, failure):
        log.failure("leases: the saved leases could not be loaded", failure)

    def set(self, name, owner, expires, warned=()):
        self.leases[name] = {"owner": owner, "expires": float(expires),
                             "warned": sorted(set(warned))}
        self.save()
        return self.leases[name]

    def drop(self, names):
        dropped = [name for name in names if self.leases.pop(name, None) is not None]
        if dropped:
            self.save()
        return dropped

    def save(self):
        """Write the leases soon (one write at a time)."""
        if self.path is None:
            return
        self._dirty = True
        if self._writing is None:
            self._write_next()

    def _write_next(self):
        self._dirty = False
        snapshot = {"version": VERSION,
                    "leases": {name: dict(lease) for name, lease in self.leases.items()}}
        if self.store is not None:
            d = self.store.save(STORE_NAME, snapshot)
        else:
            d = self.api.run_blocking(write_json_atomic, self.path, snapshot)
        self._writing = d

        def written(_):
            self.writes += 1

        def failed(failure):
            log.failure("leases: {path} could not be written (retried with the next change)",
                        failure, path=self.path)

        def next_one(_):
            self._writing = None
            if self._dirty:
                self._write_next()
        d.addCallbacks(written, failed)
        d.addBoth(next_one)

    async def flushed(self):
        """Wait until every change so far is on disk (tests, stop)."""
        while self._writing is not None:
            await self._writing
