"""What the controller persists of its LNMs: the ones it has known (and,
in each entry, the holds on them: ``usher.controller.holds``).

After a crash the controller announces itself to each of them (paper,
"Failures"), and they reconnect and hand over their VMs, from which the
global state is rebuilt. The file is rewritten atomically (temp file, fsync,
rename, fsync of the directory) so a ``kill -9`` at any moment leaves either
the old or the new list.
"""

import json

from twisted.logger import Logger

from usher.persist import remove_leftovers, write_json_atomic

log = Logger()


class KnownLNMs:
    """``path``: today's file (single controller); or ``store``, an
    ``usher.controller.store.IStateStore`` (the HA database), under the
    name ``lnms``."""

    def __init__(self, path=None, *, store=None):
        self.path = path
        self.store = store
        self.entries = {}
        if store is not None:
            self._load_store()
        else:
            self._load()

    def _load_store(self):
        from usher.controller.store import LNMS
        try:
            data = self.store.load(LNMS)
        except (OSError, ValueError) as e:
            log.error("ignoring an unreadable LNM list: {error}", error=e)
            return
        if isinstance(data, dict):
            self.entries = {str(k): v for k, v in data.items() if isinstance(v, dict)}

    def _load(self):
        self._remove_leftovers()
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.error("ignoring unreadable LNM list {path}: {error}", path=self.path, error=e)
            return
        if isinstance(data, dict):
            self.entries = {str(k): v for k, v in data.items() if isinstance(v, dict)}

    def _remove_leftovers(self):
        """Temporary files of writes a crash interrupted (never the list)."""
        remove_leftovers(self.path, prefix=".lnms.")

    def remember(self, name, **fields):
        entry = dict(self.entries.get(name, {}))
        entry.update(fields)
        if entry != self.entries.get(name):
            self.entries[name] = entry
            self._save()

    def forget(self, name):
        if self.entries.pop(name, None) is not None:
            self._save()

    def _save(self):
        if self.store is not None:
            from usher.controller.store import LNMS
            # Write-behind; a failure is logged (and, fenced, steps down).
            self.store.save(LNMS, self.entries).addErrback(lambda _f: None)
            return
        write_json_atomic(self.path, self.entries, prefix=".lnms.")
