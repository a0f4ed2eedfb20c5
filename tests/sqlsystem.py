"""A real sandbox (tests.e2e.RunningSandbox: controller and LNMs as processes
over TLS on 127.0.0.1) with the SQL plugin configured from the start, on
SQLite (a file in the sandbox) or on the session's private PostgreSQL server
(tests.pgserver); and the test's own look into the plugin's database.

The database is seeded (schema, subnets, ranges) through the plugin's own
``Store`` and ``ipam`` before the controller starts; the tests read it the
same way, in a thread (``query``), never on the reactor.
"""

import itertools
import os
import textwrap

from twisted.internet import threads

from usher import settings

from tests.e2e import RunningSandbox

# The SQL plugin's registration: every event it follows (plugins/sql).
SQL_EVENTS = ("start_request", "register_vm", "start_complete", "vm_state_changed",
              "vm_removed", "op_complete", "migrate_complete", "vm_lost", "vm_missing",
              "vm_adopted")
# The VM arguments the plugin sets (SQL_SPEC: the contract with the LNM).
PLUGIN_ARGS = ("ip_address", "ip_prefix", "ip_gateway", "ip_dns", "vlan", "mac")

_databases = itertools.count(1)


def database_url(engine, directory, postgres=None):
    """A new empty database of ``engine`` -> its URL for the plugin."""
    if engine == "sqlite":
        return f"sqlite:///{os.path.join(os.path.abspath(directory), 'usher-sql.db')}"
    return postgres.create_database(f"e2e_{os.getpid()}_{next(_databases)}")


def open_store(url):
    from usher.plugins.sql.store import Store
    return Store.open(url)


def run_in_store(url, function, *args, **kwargs):
    """``function(tx, *args, **kwargs)`` in one transaction (blocking)."""
    store = open_store(url)
    try:
        with store.transaction() as tx:
            return function(tx, *args, **kwargs)
    finally:
        store.close()


def seed(url, subnets=(), ranges=()):
    """Schema, then ``subnets`` ((name, cidr, {options})) and ``ranges``
    ((subnet, first, last, {owner, cluster})) -> the range ids in order."""
    from usher.plugins.sql import ipam
    store = open_store(url)
    try:
        store.migrate()
        with store.transaction() as tx:
            for name, cidr, options in subnets:
                ipam.add_subnet(tx, name, cidr, **options)
            return [ipam.add_range(tx, subnet, first, last, **options)
                    for subnet, first, last, options in ranges]
    finally:
        store.close()


def query(url, function, *args, **kwargs):
    """-> Deferred of ``run_in_store`` computed in a thread."""
    return threads.deferToThread(run_in_store, url, function, *args, **kwargs)


def select(url, sql, params=()):
    """-> Deferred of the rows of one query."""
    return query(url, lambda tx: tx.query(sql, params))


def plugins_section(plugin_config):
    """A [[plugins]] section: the defaults, then the SQL plugin on its events."""
    lines = ["[[plugins]]"]
    registrations = settings.default_plugin_registrations()
    registrations["sql"] = {"plugin": "sql", "events": list(SQL_EVENTS),
                            "config": plugin_config, "order": None}
    for name, registration in registrations.items():
        lines.append(f"[[[{name}]]]")
        for key, value in registration.items():
            if value is not None:
                lines.append(f"{key} = {', '.join(value) if isinstance(value, list) else value}")
    return "\n".join(lines) + "\n"


class SqlSandbox(RunningSandbox):
    """``engine``: "sqlite" or "postgresql" (then ``postgres``: the session's
    tests.pgserver.PostgresServer). ``seed()`` before ``start()``."""

    def __init__(self, directory, engine, postgres=None, *, lnms=3, plugin_options=None,
                 settings=None):
        lnm_settings = {"plugin_args": ", ".join(PLUGIN_ARGS)}
        merged = dict(settings or {})
        merged["lnm"] = dict(lnm_settings, **merged.get("lnm", {}))
        # Room for every test's VMs on three hosts, whatever the overcommit.
        super().__init__(directory, lnms=lnms, settings=merged, host_cpus=128,
                         host_memory=131072)
        self.engine = engine
        self.postgres = postgres
        self.url = database_url(engine, self.dir, postgres)
        self.plugin_config = os.path.join(self.dir, "sql.config")
        options = {"database": self.url}
        options.update(plugin_options or {})
        with open(self.plugin_config, "w", encoding="utf-8") as f:
            f.write("".join(f"{key} = {value}\n" for key, value in options.items()))
        with open(self.description["configs"]["ctrl"], "a", encoding="utf-8") as f:
            f.write(plugins_section(self.plugin_config))

    def seed(self, subnets=(), ranges=()):
        return seed(self.url, subnets, ranges)

    def query(self, function, *args, **kwargs):
        return query(self.url, function, *args, **kwargs)

    def select(self, sql, params=()):
        return select(self.url, sql, params)

    def write_plugin(self, name, source):
        """A test plugin in the sandbox's plugin directory."""
        path = os.path.join(self.dir, "plugins", f"{name}.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(source).lstrip("\n"))
        return path

    def log_text(self, name="usherctrl"):
        with open(os.path.join(self.dir, "logs", f"{name}.log"), encoding="utf-8",
                  errors="replace") as f:
            return f.read()
