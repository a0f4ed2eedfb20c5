"""Small JSON files the controller and its plugins persist in their state
directory (the LNMs known, holds on hosts, leases ...).

Each file is rewritten atomically (a temporary file in the same directory,
fsync, rename, fsync of the directory), so a ``kill -9`` at any moment leaves
either the old or the new content, never a mix.
"""

import json
import os
import tempfile


def write_json_atomic(path, data, *, prefix=None):
    """Replace ``path`` with ``data`` as JSON. The temporary file's name
    starts with ``prefix`` (default ``.<file name>.``) so that
    ``remove_leftovers`` can find what a crash left."""
    directory = os.path.dirname(path) or "."
    prefix = prefix or f".{os.path.basename(path)}."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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


def remove_leftovers(path, *, prefix=None):
    """Delete the temporary files of writes of ``path`` a crash interrupted."""
    directory = os.path.dirname(path) or "."
    prefix = prefix or f".{os.path.basename(path)}."
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


def read_json(path, default=None):
    """-> the JSON content of ``path``, ``default`` if there is no such file.
    Raises OSError or ValueError for a file that cannot be read or parsed
    (the caller decides whether that is fatal)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default
