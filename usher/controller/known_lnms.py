"""The one thing the controller persists: the LNMs it has known.

After a crash the controller announces itself to each of them (paper,
"Failures"), and they reconnect and hand over their VMs, from which the
global state is rebuilt. The file is rewritten atomically (temp file, fsync,
rename, fsync of the directory) so a ``kill -9`` at any moment leaves either
the old or the new list.
"""

import json
import os
import tempfile

from twisted.logger import Logger

log = Logger()


class KnownLNMs:
    def __init__(self, path):
        self.path = path
        self.entries = {}
        self._load()

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
        directory = os.path.dirname(self.path) or "."
        try:
            names = os.listdir(directory)
        except OSError:
            return
        for name in names:
            if name.startswith(".lnms."):
                try:
                    os.unlink(os.path.join(directory, name))
                except OSError:
                    pass

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
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lnms.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.entries, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
