"""SQL: logs every request and event, mirrors the global state and manages IP addresses.

The paper's UCSD deployment ("Plugins", "UCSD SysNet" -> "SQL Server"). On
SQLite (embedded, the default) or PostgreSQL (``database`` URL). In the
paper's order:

- ``start_request`` (order 60: after authorization and placement): the
  request is logged and an address reserved for each VM, all or none, in
  one transaction; the VM arguments ``ip_address``, ``ip_prefix``,
  ``ip_gateway``, ``ip_dns``, ``vlan``, ``mac`` and ``bridge`` or
  ``network`` are set (plugin-set: users cannot set them). No free address,
  or the database unavailable: the request is refused, nothing starts.
- ``register_vm``: the VM enters the mirror (``vms``).
- ``start_complete``: the outcome is logged; the address is in use (it
  stays reserved for a VM whose outcome is unknown, and is freed when the
  VM goes).
- ``vm_state_changed``: an ``events`` row; the mirror follows the changes
  an LNM reported (``origin`` "lnm"), not the controller's own conclusions.
- ``vm_removed`` (delete, forget, missing then removed): the address is
  freed and the VM leaves the mirror.
- ``op_complete``, ``migrate_complete`` (the mirror's LNM), ``vm_lost``,
  ``vm_missing``, ``vm_adopted`` (the mirror): ``events`` rows.

After the controller's recovery has settled, leases are reconciled with the
VMs that came back (they keep their addresses; reservations of starts cut
short are released). Every query runs on the plugin's database thread
(``worker``); writes that may wait are queued while the database is down
and caught up when it is back. Sample configuration: ``etc/plugins/sql.config``.
"""

from twisted.internet import defer
from twisted.logger import Logger

from usher.controller.state import ORIGIN_LNM
from usher.errors import ConfigError
from usher.naming import DEFAULT_CLUSTER, cluster_of, split
from usher.plugins.sql import ipam
from usher.plugins.sql import log as sqllog
from usher.plugins.sql.store import DatabaseError, DatabaseUnavailable, Store
from usher.plugins.sql.user_queries import UserQueries
from usher.plugins.sql.worker import DatabaseWorker

logger = Logger()

DEFAULT_ORDER = 60
DEFAULT_DATABASE = "sqlite:////var/lib/usher/sql.db"

CONFIG_SPEC = f"""
order = integer(default={DEFAULT_ORDER})
database = string(default='{DEFAULT_DATABASE}')
ipam = option('auto', 'on', 'off', default='auto')
call_timeout = float(gt=0, default=5.0)
max_queue = integer(min=1, default=10000)
retry_initial = float(gt=0, default=1.0)
retry_max = float(gt=0, default=60.0)
orphan_grace = float(gt=0, default=120.0)
[subnets]
[[__many__]]
cidr = string
vlan = integer(min=1, max=4094, default=None)
gateway = string(default=None)
dns = list(default=list())
exclude = list(default=list())
bridge = string(default=None)
network = string(default=None)
[ranges]
[[__many__]]
subnet = string
first = string
last = string
owner = string(default=None)
cluster = string(default=None)
"""

# Seconds between checks of a start's reservations for VMs that were never
# registered (a later plugin refused or dropped them, or placement failed).
SWEEP_INTERVAL = 1.0
# Seconds between attempts to prepare the database at start-up.
PREPARE_RETRY = 5.0


class _Start:
    """What the plugin remembers of one start request until its VMs are settled."""

    def __init__(self, request, logged, leases, at):
        self.request = request
        self.logged = logged           # {"id": request id} once the requests row exists
        self.leases = dict(leases)     # vm -> Lease reserved by this request
        self.pending = set(request.vms)
        self.registered = set()
        self.failures = {}
        self.at = at
        self.finished = False


def _subnet_options(section):
    return {"vlan": section.get("vlan"), "gateway": section.get("gateway"),
            "dns": list(section.get("dns") or ()), "excluded": list(section.get("exclude") or ()),
            "bridge": section.get("bridge"), "network": section.get("network")}


def _logged_id(logged):
    return logged.get("id") if logged else None


# -- what runs on the database thread ---------------------------------------------------

def _prepare(tx, subnets, ranges):
    """Load the configuration's subnets and ranges -> whether the database has subnets."""
    for name, section in subnets.items():
        outcome = ipam.define_subnet(tx, name, section["cidr"], **_subnet_options(section))
        if outcome != "unchanged":
            logger.info("SQL plugin: subnet {subnet} {outcome} from the configuration",
                        subnet=name, outcome=outcome)
    for name, section in ranges.items():
        rid, outcome = ipam.define_range(tx, section["subnet"], section["first"], section["last"],
                                         owner=section.get("owner"),
                                         cluster=section.get("cluster"))
        if outcome != "unchanged":
            logger.info("SQL plugin: range {range} (id {id}) {outcome} from the configuration",
                        range=name, id=rid, outcome=outcome)
    return ipam.has_subnets(tx)


def _log_request(tx, logged, summary):
    logged["id"] = sqllog.log_request(tx, **summary)
    sqllog.log_event(tx, at=summary["at"], event="start_request", owner=summary["user"],
                     detail=f"request {logged['id']}: {len(summary['vms'])} VMs")


def _request_and_reserve(tx, logged, summary, groups, mode):
    """Log a start and reserve its addresses -> (leases, whether IPAM is active)."""
    tx.lock("addresses")
    _log_request(tx, logged, summary)
    active = mode == "on" or (mode == "auto" and ipam.has_subnets(tx))
    if not active:
        return {}, False
    leases = {}
    for (owner, cluster), vms in groups.items():
        leases.update(ipam.reserve(tx, owner, cluster, vms, request_id=logged["id"],
                                   now=summary["at"]))
    for vm, lease in leases.items():
        sqllog.log_event(tx, at=summary["at"], event="address_reserved", vm=vm,
                         detail=lease.address)
    return leases, True


def _refused(tx, logged, summary, reason):
    _log_request(tx, logged, summary)
    sqllog.log_result(tx, logged["id"], at=summary["at"], ok=False, detail=reason)


def _result(tx, logged, at, ok, detail):
    if logged.get("id") is not None:
        sqllog.log_result(tx, logged["id"], at=at, ok=ok, detail=detail)


def _release_reserved(tx, logged, vms, at, why):
    for vm in vms:
        address = ipam.release_reserved(tx, vm, _logged_id(logged))
        if address is not None:
            sqllog.log_event(tx, at=at, event="address_released", vm=vm,
                             detail=f"{address}: {why}")


def _mark_used(tx, vm, at):
    if ipam.mark_used(tx, vm):
        sqllog.log_event(tx, at=at, event="address_used", vm=vm)


def _removed(tx, record, at):
    address = ipam.release(tx, record["name"])
    sqllog.mirror_remove(tx, record["name"])
    if address is not None:
        sqllog.log_event(tx, at=at, event="address_released", vm=record["name"],
                         detail=address)


def _event(tx, values):
    sqllog.log_event(tx, **values)


def _reconcile(tx, live, owners, connected, at):
    released = ipam.reconcile(tx, live, at, owners, connected=connected)
    for row in released:
        sqllog.log_event(tx, at=at, event="address_released", vm=row["vm"], owner=row["owner"],
                         cluster=row["cluster"], detail=f"{row['address']}: reconciled after "
                         "recovery")
    return released, {vm: ipam.lease_of(tx, vm) for vm in live}


class Plugin:
    name = "sql"

    def __init__(self, config, api, *, worker=None):
        self.api = api
        self.clock = api.clock
        self.config = dict(config)
        self.mode = config.get("ipam", "auto")
        self.subnets = dict(config.get("subnets") or {})
        self.ranges = dict(config.get("ranges") or {})
        for name, section in self.subnets.items():
            try:
                ipam.check_subnet(name, section["cidr"], **_subnet_options(section))
            except ipam.IpamError as e:
                raise ConfigError(f"sql: [subnets] [[{name}]]: {e}") from None
        url = config.get("database", DEFAULT_DATABASE)
        try:
            Store(url)   # the URL's form, checked now (no connection yet)
        except DatabaseError as e:
            raise ConfigError(f"sql: database: {e}") from None
        # Whether starts need an address: the database had subnets when last
        # asked (or the configuration declares some).
        self.ipam_active = self.mode == "on" or (self.mode == "auto" and bool(self.subnets))
        self.worker = worker or DatabaseWorker(
            lambda: _opened(url), reactor=self.clock, call_timeout=config.get("call_timeout", 5.0),
            max_queue=config.get("max_queue", 10000),
            retry_initial=config.get("retry_initial", 1.0),
            retry_max=config.get("retry_max", 60.0))
        self.orphan_grace = config.get("orphan_grace", 120.0)
        self._starts = {}          # vm -> _Start, from start_request until settled
        self._reserving = set()    # VMs whose reservation is being made
        self._stopped = False
        self._prepare_call = None
        self.prepared = defer.Deferred()
        self.reconciled = defer.Deferred()
        # ush ranges / ush addresses (they go when the plugin is unregistered;
        # a second SQL plugin is refused here, its thread not left behind).
        try:
            UserQueries(self.worker).register(api, owner=self)
        except Exception:
            self.worker.stop()
            raise
        self._prepare()

    # -- start-up -----------------------------------------------------------------------

    def _prepare(self):
        self._prepare_call = None
        d = self.worker.call(_prepare, self.subnets, self.ranges)
        d.addCallbacks(self._prepared, self._prepare_failed)

    def _prepared(self, has_subnets):
        if self.mode == "auto":
            self.ipam_active = has_subnets
        defer.Deferred.fromCoroutine(self._reconcile_after_recovery()).addErrback(
            lambda f: logger.failure("SQL plugin: reconciling leases after recovery failed", f))
        if not self.prepared.called:
            self.prepared.callback(None)

    def _prepare_failed(self, failure):
        if self._stopped:
            return
        if failure.check(ipam.IpamError):
            logger.error("SQL plugin: the configuration's subnets and ranges cannot be loaded: "
                         "{error}; fix the configuration (or the database with usher ipam)",
                         error=str(failure.value))
        elif failure.check(DatabaseUnavailable):
            logger.error("SQL plugin: the database is unavailable ({error}); trying again in "
                         "{delay} s", error=str(failure.value), delay=PREPARE_RETRY)
        else:
            logger.failure("SQL plugin: preparing the database failed", failure)
        self._prepare_call = self.clock.callLater(PREPARE_RETRY, self._prepare)

    async def _reconcile_after_recovery(self):
        await self.api.settled()
        state = self.api.state
        live = {name: (rec.get("args") or {}).get("ip_address")
                for name, rec in state.vms.items()}
        owners = {name: (rec.get("owner"), rec.get("cluster")) for name, rec in state.vms.items()}
        # Starts under way (their reservations are not orphans) -- the
        # reconciliation is queued after the reservations they made.
        for vm in list(self._starts) + list(self._reserving):
            live.setdefault(vm, None)
        connected = {lnm.name for lnm in state.connected_lnms()}
        released, leases = await self.worker.call(_reconcile, live, owners, connected,
                                                  self.clock.seconds())
        if released:
            logger.info("SQL plugin: {count} addresses of VMs that did not come back released "
                        "after recovery", count=len(released))
        for vm, lease in leases.items():
            record = state.vms.get(vm)
            if lease is None or record is None:
                continue
            args = dict(record.get("args") or {})
            wanted = lease.vm_args()
            if any(args.get(k) != v for k, v in wanted.items()):
                args.update(wanted)
                state.update(vm, args=args)
                record["plugin_args"] = sorted(set(record.get("plugin_args") or ())
                                               | set(wanted))
        if not self.reconciled.called:
            self.reconciled.callback(released)

    def stop(self):
        self._stopped = True
        if self._prepare_call is not None and self._prepare_call.active():
            self._prepare_call.cancel()
        self.worker.stop()

    # -- events --------------------------------------------------------------------------

    def entry_point(self, event):
        handler = getattr(self, "_on_" + event.name, None)
        if handler is None:
            return None
        return handler(event)

    def _now(self):
        return self.clock.seconds()

    def _owner_cluster(self, vm, request):
        record = request.records.get(vm) or {}
        parts = split(vm, self.api.state.domain)
        owner = record.get("owner") or (parts[1] if parts else request.user)
        cluster = (record.get("cluster") or request.args.get("cluster")
                   or (cluster_of(parts[0]) if parts else DEFAULT_CLUSTER))
        return owner, cluster

    async def _on_start_request(self, event):
        request = event.request
        if request.kind != "start" or not request.vms:
            return
        now = self._now()
        summary = {"at": now, "user": request.user, "kind": request.kind,
                   "vms": list(request.vms), "lnms": list(request.lnms),
                   "args": dict(request.args, placement=dict(request.placement))}
        logged = {}
        if self.mode == "off":
            self.worker.enqueue_log(_log_request, logged, summary)
            self._remember(request, logged, {}, now)
            return
        groups = {}
        for vm in request.vms:
            groups.setdefault(self._owner_cluster(vm, request), []).append(vm)

        def undo(outcome):
            # Reserved after the request was given up on: free it again.
            leases, _active = outcome
            self.worker.enqueue_log(_release_reserved, logged, list(leases), self._now(),
                                    "the start was refused")
        asked = list(request.vms)
        self._reserving.update(asked)
        try:
            leases, active = await self.worker.call(_request_and_reserve, logged, summary,
                                                    groups, self.mode, on_late=undo)
        except ipam.IpamError as e:    # Exhausted among them
            request.reject(str(e))
            # (The reservation's transaction, request row included, was
            # rolled back: the refusal is a row of its own.)
            self.worker.enqueue_log(_refused, {}, summary, str(e))
            return
        except DatabaseUnavailable as e:
            if not self.ipam_active:
                self.worker.enqueue_log(_log_request, logged, summary)
                self._remember(request, logged, {}, now)
                return
            reason = f"the address database is unavailable: {e}"
            request.reject(reason)
            self.worker.enqueue_log(_refused, {}, summary, reason)
            return
        finally:
            self._reserving.difference_update(asked)
        if self.mode == "auto":
            self.ipam_active = active
        for vm, lease in leases.items():
            for key, value in lease.vm_args().items():
                request.set_vm_arg(vm, key, value)
        self._remember(request, logged, leases, now)

    def _remember(self, request, logged, leases, now):
        start = _Start(request, logged, leases, now)
        for vm in request.vms:
            self._starts[vm] = start
        self.clock.callLater(SWEEP_INTERVAL, self._sweep, start)

    def _sweep(self, start):
        """Free what a start reserved for VMs that will never be registered:
        the request was refused after this plugin, the VM dropped, or it
        could not be placed (then other VMs of the request are registered,
        or ``orphan_grace`` passed)."""
        if self._stopped:
            return
        request = start.request
        placed_any = bool(start.registered) or any(
            vm in self.api.state.vms for vm in start.pending)
        overdue = self._now() - start.at >= self.orphan_grace
        orphans = [vm for vm in sorted(start.pending - start.registered)
                   if request.rejected is not None or vm not in request.vms
                   or ((placed_any or overdue) and vm not in self.api.state.vms)]
        for vm in orphans:
            start.pending.discard(vm)
            if self._starts.get(vm) is start:
                del self._starts[vm]
            start.failures[vm] = (request.dropped.get(vm) or request.rejected
                                  or "not placed")
        if orphans and start.leases:
            self.worker.enqueue_log(_release_reserved, start.logged,
                                    [vm for vm in orphans if vm in start.leases], self._now(),
                                    "the VM was never started")
        self._finish_if_done(start)
        if start.pending - start.registered and not overdue:
            self.clock.callLater(SWEEP_INTERVAL, self._sweep, start)

    def _finish_if_done(self, start):
        if start.pending or start.finished:
            return
        start.finished = True
        if start.request.rejected is not None:
            detail = f"refused: {start.request.rejected}"
        else:
            detail = "; ".join(f"{vm}: {why}" for vm, why in sorted(start.failures.items()))
        self.worker.enqueue_log(_result, start.logged, self._now(), not start.failures,
                                detail or None)

    def _vm_event(self, event, name, record, **extra):
        values = {"at": self._now(), "event": name, "vm": record.get("name"),
                  "owner": record.get("owner"), "cluster": record.get("cluster"),
                  "lnm": record.get("lnm"), "memory_mib": record.get("memory_mib"),
                  "vcpus": record.get("vcpus")}
        values.update(extra)
        return values

    def _on_register_vm(self, event):
        record = event.vm
        start = self._starts.get(record["name"])
        if start is not None:
            start.registered.add(record["name"])
        now = self._now()
        self.worker.enqueue_log(sqllog.mirror_upsert, record, now)
        self.worker.enqueue_log(_event, self._vm_event(event, "register_vm", record,
                                                       new_state=record.get("state")))

    def _on_start_complete(self, event):
        record = event.vm
        name = record["name"]
        now = self._now()
        ok = bool(event.data.get("ok"))
        error = event.data.get("error")
        self.worker.enqueue_log(_event, self._vm_event(
            event, "start_complete", record, new_state=record.get("state"),
            detail="ok" if ok else f"failed: {error}"))
        if ok:
            self.worker.enqueue_log(_mark_used, name, now)
        start = self._starts.pop(name, None)
        if start is not None:
            start.pending.discard(name)
            if not ok:
                start.failures[name] = error or "failed"
            self._finish_if_done(start)

    def _on_vm_state_changed(self, event):
        record = event.vm
        origin = event.data.get("origin", ORIGIN_LNM)
        now = self._now()
        self.worker.enqueue_log(_event, self._vm_event(
            event, "vm_state_changed", record, old_state=event.data.get("old_state"),
            new_state=event.data.get("new_state"), detail=f"origin {origin}"))
        if origin == ORIGIN_LNM:
            self.worker.enqueue_log(sqllog.mirror_update, record["name"], now,
                                    state=record.get("state"), lnm=record.get("lnm"),
                                    uuid=record.get("uuid"))

    def _on_vm_removed(self, event):
        record = event.vm
        now = self._now()
        self.worker.enqueue_log(_removed, record, now)
        self.worker.enqueue_log(_event, self._vm_event(event, "vm_removed", record))

    def _on_vm_adopted(self, event):
        record = event.vm
        now = self._now()
        self.worker.enqueue_log(sqllog.mirror_upsert, record, now)
        self.worker.enqueue_log(_event, self._vm_event(event, "vm_adopted", record,
                                                       new_state=record.get("state")))

    def _on_op_complete(self, event):
        record = event.vm
        ok = bool(event.data.get("ok"))
        self.worker.enqueue_log(_event, self._vm_event(
            event, "op_complete", record, new_state=record.get("state"),
            detail=f"{event.data.get('operation')}: "
                   + ("ok" if ok else f"failed: {event.data.get('error')}")))

    def _on_migrate_complete(self, event):
        record = event.vm
        ok = bool(event.data.get("ok"))
        now = self._now()
        if ok:
            self.worker.enqueue_log(sqllog.mirror_update, record["name"], now,
                                    lnm=event.data.get("target") or record.get("lnm"))
        self.worker.enqueue_log(_event, self._vm_event(
            event, "migrate_complete", record,
            detail=f"{event.data.get('source')} -> {event.data.get('target')}: "
                   + ("ok" if ok else f"failed: {event.data.get('error')}")))

    def _on_vm_lost(self, event):
        self.worker.enqueue_log(_event, self._vm_event(event, "vm_lost", event.vm,
                                                       new_state=event.vm.get("state")))

    def _on_vm_missing(self, event):
        self.worker.enqueue_log(_event, self._vm_event(event, "vm_missing", event.vm,
                                                       new_state=event.vm.get("state")))


def _opened(url):
    """Open and migrate (run on the database thread)."""
    store = Store.open(url)
    try:
        store.migrate()
    except Exception:
        store.close()
        raise
    return store
