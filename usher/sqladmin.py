"""What the ``usher ipam`` and ``usher report`` commands share: the SQL
plugin's database, opened as its configuration file names it, and their
output (tables for people, JSON for scripts).

The commands use the database directly through the plugin's ``Store``
(no controller needed), one transaction per command: a command that fails
changes nothing. The plugin is imported only when such a command runs, so
the other ``usher`` commands do not load it (and Twisted).
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from urllib.parse import urlsplit

from usher.config import load_plugin_config
from usher.errors import InvalidRequest, UsherError

DEFAULT_PLUGIN_CONFIG = "/etc/usher/plugins/sql.config"


class DatabaseProblem(UsherError):
    """The database cannot be opened or used; nothing was changed."""


def common_options() -> argparse.ArgumentParser:
    """The parent parser of every command on the database: --plugin-config, --json."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--plugin-config", metavar="FILE", default=DEFAULT_PLUGIN_CONFIG,
        help=f"the SQL plugin's configuration file, which names the database "
             f"(default {DEFAULT_PLUGIN_CONFIG})")
    parent.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    return parent


def database_url(config_path: str) -> str:
    """The database URL the SQL plugin's configuration file names."""
    from usher.controller.plugins import _with_common_options
    from usher.plugins import sql as plugin
    if not os.path.isfile(config_path):
        raise InvalidRequest(f"{config_path}: no such file (name the SQL plugin's "
                             "configuration file with --plugin-config)")
    config = load_plugin_config(_with_common_options(plugin.CONFIG_SPEC), config_path)
    return config["database"]


@contextmanager
def opened(config_path: str, *, write: bool):
    """The database as a ``Store``, closed afterwards. ``write``: create or
    upgrade its schema first (as the plugin does when it starts); else a
    database that does not exist yet is an error, and none is created."""
    from usher.plugins.sql.store import Conflict, DatabaseError, Store
    url = database_url(config_path)
    try:
        store = Store.open(url)
    except DatabaseError as e:
        raise DatabaseProblem(f"{config_path}: {e}") from None
    try:
        if not write:
            _check_exists(store, url)
        try:
            if write:
                store.migrate()
            elif store.version() == 0:
                raise DatabaseProblem(f"{store.describe()}: the SQL plugin has not created "
                                      "its tables there yet")
            yield store
        except Conflict as e:
            raise InvalidRequest(f"refused by the database, nothing changed: {e}") from None
        except DatabaseError as e:
            raise DatabaseProblem(f"the database cannot be used: {e}") from None
    finally:
        store.close()


def _check_exists(store, url):
    """A SQLite file that is not there: sqlite3 would create it."""
    if store.engine != "sqlite" or urlsplit(url).path.startswith("/:memory:"):
        return
    if not os.path.exists(url[len("sqlite://"):]):
        raise DatabaseProblem(f"{store.describe()}: no such database (the SQL plugin creates "
                              "it when the controller starts)")


def run(config_path: str, function, *args, write: bool):
    """``function(tx, *args)`` in one transaction of the database -> its result."""
    with opened(config_path, write=write) as store:
        return store.run(function, *args)


def print_json(data) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def print_table(titles, rows) -> None:
    """``rows`` (sequences of cells) under ``titles``, as ush prints tables."""
    from usher.clients.ush.format import Column, format_table
    columns = [Column(title, lambda row, index=index: _cell(row[index]))
               for index, title in enumerate(titles)]
    for line in format_table(columns, rows):
        print(line)


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value) or "-"
    return str(value)
