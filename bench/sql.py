"""``make bench-sql`` (``python -m bench.sql``): what the SQL plugin costs a start.

The issue's figure: starts of 1,000 VMs with the SQL plugin on PostgreSQL
(request log, one address reserved per VM, the mirror, the results) against
the same starts without it. Each side is its own fresh system, as
``bench.run``'s figure 1 builds it: a real controller process (``usherctrl``,
default settings and plugins), a fleet of real LNMs in this process, a real
client; a start is timed from the request sent until every VM is ``run`` in
the client's cache; the figure is the median of ``repeats`` starts (a new
cluster each). The plugin's database is a private PostgreSQL server started
here (``tests.pgserver``: ``initdb``/``pg_ctl`` as the ``postgres`` user on a
loopback port), with one subnet (a /16) whose one range belongs to the
benchmark user.

Prints both figures and their ratio (with SQL / without); ``--quick`` runs
the same at toy scale (the test suite does); its numbers mean nothing.
"""

import dataclasses
import os
import statistics
import sys
import time
import traceback

from bench import cli as bench_cli
from bench import run as run_scale
from bench.run import RunWatcher, full_name
from bench.system import USER, BenchSystem, sleep, wait_for
from usher import states

# The SQL plugin's registration: every event it follows (plugins/sql).
SQL_EVENTS = ("start_request", "register_vm", "start_complete", "vm_state_changed",
              "vm_removed", "op_complete", "migrate_complete", "vm_lost", "vm_missing",
              "vm_adopted")


# The scale is figure 1's (bench.run.Scale): ``start_vms`` per start over
# ``start_lnms`` LNMs, ``repeats`` starts; QUICK is the test suite's.
FULL = run_scale.FULL
QUICK = run_scale.QUICK


def seed_database(url, user, addresses_needed):
    """Schema and one range of the benchmark user's, big enough -> the
    subnet's CIDR. Blocking (runs before the controller starts)."""
    from usher.plugins.sql import ipam
    from usher.plugins.sql.store import Store
    if addresses_needed > 65000:
        raise ValueError("one /16 holds the benchmark's addresses")
    store = Store.open(url)
    try:
        store.migrate()
        with store.transaction() as tx:
            ipam.add_subnet(tx, "bench", "10.64.0.0/16", gateway="10.64.0.1")
            ipam.add_range(tx, "bench", "10.64.0.10", "10.64.255.250", owner=user)
    finally:
        store.close()
    return "10.64.0.0/16"


def count_leases(url):
    from usher.plugins.sql import ipam
    from usher.plugins.sql.store import Store
    store = Store.open(url)
    try:
        with store.transaction() as tx:
            return len(ipam.leases(tx))
    finally:
        store.close()


def add_sql_registration(ctrl_config, plugin_config):
    """Put the SQL plugin on its events, after the defaults: the generated
    ctrl.config ends with its [[plugins]] section."""
    with open(ctrl_config, "a", encoding="utf-8") as f:
        f.write(f"[[[sql]]]\nplugin = sql\nevents = {', '.join(SQL_EVENTS)}\n"
                f"config = {plugin_config}\n")

NETWORK_ARGS = "mac, ip_address, ip_prefix, ip_gateway, ip_dns, vlan"


class Side:
    """One fresh system: its starts, timed."""

    def __init__(self, reactor, scale, directory, progress, *, database_url=None):
        self.reactor = reactor
        self.scale = scale
        self.progress = progress
        self.database_url = database_url
        # Both systems' LNMs let plugins set a VM's network arguments, as a
        # site running the SQL plugin configures them (README "Network
        # arguments"): the same configuration with and without the plugin.
        lnm_settings = dict(scale.lnm_settings, plugin_args=NETWORK_ARGS)
        self.system = BenchSystem(reactor, directory, lnms=scale.start_lnms,
                                  ctrl_settings=scale.ctrl_settings,
                                  lnm_settings=lnm_settings)
        self.runs = []
        self.client = None

    async def run(self):
        try:
            await self._set_up()
            for run in range(1, self.scale.repeats + 1):
                self.runs.append(await self._start(f"burst{run}"))
                self.progress(f"  start {run}: {self.scale.start_vms:,} VMs in "
                              f"{self.runs[-1]:.3f} s")
        finally:
            await self.system.shutdown()
        return statistics.median(self.runs)

    async def _set_up(self):
        system = self.system
        system.prepare()
        if self.database_url is not None:
            plugin_config = os.path.join(system.dir, "sql.config")
            with open(plugin_config, "w", encoding="utf-8") as f:
                # A start of 1,000 VMs reserves 1,000 addresses in one
                # transaction: more than the default plugin timeout allows
                # on a loaded machine.
                f.write(f"database = {self.database_url}\ntimeout = {self.scale.patience}\n")
            add_sql_registration(system.ctrl_config, plugin_config)
        system.start_controller()
        await system.wait_controller()
        system.start_fleet()
        await system.fleet.add(range(1, self.scale.start_lnms + 1))
        self.client = await system.connected_client(timeout=self.scale.patience)

        async def connected():
            return sum(1 for lnm in await self.client.list_lnm() if lnm["connected"])
        started = time.monotonic()
        while await connected() < self.scale.start_lnms:
            if time.monotonic() - started > self.scale.patience:
                raise TimeoutError("the fleet did not attach")
            await sleep(self.reactor, 0.2)

    async def _start(self, cluster):
        names = [full_name(f"{i}.{cluster}") for i in range(1, self.scale.start_vms + 1)]
        watch = RunWatcher(self.client, names, states.RUN)
        started = time.monotonic()
        result = await self.client.start(cluster=cluster, count=self.scale.start_vms)
        answered = time.monotonic()
        if result["failed"]:
            raise RuntimeError(f"{len(result['failed'])} VMs failed to start: "
                               f"{result['failed'][:3]}")
        await wait_for(self.reactor, lambda: watch.done, self.scale.patience,
                       what="every VM run in the client's cache")
        watch.close()
        if self.database_url is not None:
            without = [n for n in names
                       if not self.client.vms[n].get("args", {}).get("ip_address")]
            if without:
                raise RuntimeError(f"{len(without)} VMs have no address: {without[:3]}")
        return max(answered, watch.done_at) - started


class SqlBench:
    """Both sides -> ``results`` (seconds, VMs/s, ratio) and ``errors``."""

    def __init__(self, reactor, scale, directory, progress, postgres=None):
        self.reactor = reactor
        self.scale = scale
        self.dir = directory
        self.progress = progress
        self.postgres = postgres        # a started tests.pgserver.PostgresServer, or None
        self.results = {}
        self.errors = {}
        self.leases = None

    async def run(self):
        scale = self.scale
        own_server = None
        try:
            self.progress(f"without the SQL plugin: {scale.start_lnms} LNMs, {scale.repeats} "
                          f"starts of {scale.start_vms:,} VMs")
            plain = await Side(self.reactor, scale, os.path.join(self.dir, "plain"),
                               self.progress).run()
            server = self.postgres
            if server is None:
                from tests.pgserver import PostgresServer
                self.progress("starting a private PostgreSQL server")
                server = own_server = PostgresServer().start()
            url = server.create_database(f"bench_{int(time.time() * 1000) % 10 ** 9}")
            seed_database(url, USER, scale.start_vms * scale.repeats)
            self.progress(f"with the SQL plugin on PostgreSQL ({url})")
            with_sql = await Side(self.reactor, scale, os.path.join(self.dir, "sql"),
                                  self.progress, database_url=url).run()
            self.leases = count_leases(url)
            if self.leases != scale.start_vms * scale.repeats:
                raise RuntimeError(f"{self.leases} leases in the database, not "
                                   f"{scale.start_vms * scale.repeats}")
            self.results = {"vms": scale.start_vms, "lnms": scale.start_lnms, "repeats": scale.repeats,
                            "without_sql_s": plain, "with_sql_s": with_sql,
                            "without_sql_vms_per_s": scale.start_vms / plain,
                            "with_sql_vms_per_s": scale.start_vms / with_sql,
                            "ratio": with_sql / plain}
        except Exception as e:
            self.errors["sql bench"] = f"{e.__class__.__name__}: {e}"
            self.progress(f"FAILED: {self.errors['sql bench']}")
            traceback.print_exc()
        finally:
            if own_server is not None:
                own_server.destroy()

    def summary(self):
        r = self.results
        if not r:
            return f"not measured: {self.errors}"
        return (f"starts of {r['vms']:,} VMs over {r['lnms']} LNMs (median of {r['repeats']}):\n"
                f"  without the SQL plugin:          {r['without_sql_s']:.3f} s "
                f"({r['without_sql_vms_per_s']:,.0f} VMs/s)\n"
                f"  with the SQL plugin, PostgreSQL: {r['with_sql_s']:.3f} s "
                f"({r['with_sql_vms_per_s']:,.0f} VMs/s)\n"
                f"  ratio (with / without):          {r['ratio']:.2f}x")


def main(argv=None):
    options = bench_cli.parser("python -m bench.sql", __doc__, "VMs per start (default 1000)").parse_args(argv)
    scale = QUICK if options.quick else FULL
    if options.vms:
        scale = dataclasses.replace(scale, start_vms=options.vms)
    return bench_cli.run(options, lambda reactor, directory, progress: SqlBench(reactor, scale, directory, progress), "usher-bench-sql-")

if __name__ == "__main__":
    sys.exit(main())
