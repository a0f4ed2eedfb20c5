"""DNS: forward, reverse and round-robin cluster records for every VM, by dynamic update.

The paper's UCSD deployment ("Support Services": "DNS"): users reach their
VMs by name. For each managed VM with an address (``ip_address``, from IP
management: the SQL plugin), on ``register_vm`` and ``vm_adopted``:

- ``A``/``AAAA`` at the VM's name (``1.sneetch.alice.usher.local``),
- ``PTR`` at its reverse name, in the longest configured reverse zone,
- with ``cluster_names``, its address at the cluster's round-robin name
  (``sneetch.alice.usher.local``),

sent to an authoritative server (BIND) as RFC 2136 updates signed with a
TSIG key; ``vm_removed`` deletes them (the PTR only while it still points
at the VM, the cluster name only this VM's address). Migration changes
nothing. Updates never block a start and are never lost: they go to a
per-name coalescing queue (``queue``) drained in the plugin thread pool,
retried with backoff while the server is down or refuses, logged at the
first failure and at recovery; ``register_vm`` waits at most
``register_wait`` seconds for the VM's records. After the controller's
recovery has settled, the zones are transferred (AXFR) and Usher's records
made to match the VMs that came back. The admin query ``dns.status``
reports the queue. Sample configuration: ``etc/plugins/dns.config``.
"""

import ipaddress
import os

from twisted.internet import defer, task
from twisted.logger import Logger

from usher.errors import ConfigError, InvalidRequest, PermissionDenied
from usher.plugins.dns import records
from usher.plugins.dns.keyfile import KeyFileError, read_key_file
from usher.plugins.dns.queue import UpdateQueue
from usher.plugins.dns.updates import DnsServer, DnsUnavailable

log = Logger()

DEFAULT_ORDER = 70
STATUS_QUERY = "dns.status"

CONFIG_SPEC = f"""
order = integer(default={DEFAULT_ORDER})
server = string(default='127.0.0.1')
port = integer(min=1, max=65535, default=53)
zone = string(default=None)
reverse_zones = list(default=list())
tsig_key_file = string(default=None)
ttl = integer(min=0, max=2147483647, default=300)
cluster_names = boolean(default=True)
call_timeout = float(gt=0, default=5.0)
timeout = float(gt=0, default=None)
retry_initial = float(gt=0, default=1.0)
retry_max = float(gt=0, default=300.0)
register_wait = float(min=0, default=2.0)
reconcile = boolean(default=True)
max_batch = integer(min=1, max=1000, default=64)
"""


class Settings:
    """The plugin's configuration, checked: ConfigError naming the file
    (``source``) and the key for anything wrong."""

    def __init__(self, config, domain, source=None):
        self.source = source or "dns plugin configuration"

        def bad(key, problem):
            return ConfigError(f"{self.source}: {key}: {problem}")
        server = str(config.get("server") or "").strip()
        try:
            self.server = ipaddress.ip_address(server).compressed
        except ValueError:
            raise bad("server", f"{server[:80]!r} is not an IP address (give the "
                      "server's address, not a host name: resolving it would need DNS)") \
                from None
        self.port = config.get("port", 53)
        try:
            self.zone = records.check_zone_name(config.get("zone") or domain)
        except ValueError as e:
            raise bad("zone", e) from None
        try:
            self.domain = records.check_zone_name(domain)
        except ValueError as e:
            raise bad("zone", f"the Usher domain: {e}") from None
        if not records.under(self.domain, self.zone):
            raise bad("zone", f"{self.zone!r} does not hold the Usher domain {self.domain!r} "
                      "(VM names end with the domain: the zone must be it or a parent)")
        reverse = []
        for zone in config.get("reverse_zones") or ():
            try:
                zone = records.check_reverse_zone(zone)
            except ValueError as e:
                raise bad("reverse_zones", e) from None
            if zone not in reverse:
                reverse.append(zone)
        self.reverse_zones = reverse
        path = config.get("tsig_key_file")
        if not path:
            raise bad("tsig_key_file", "not set: updates must be signed (a key file as "
                      "tsig-keygen writes it)")
        if not os.path.isabs(path):
            raise bad("tsig_key_file", f"{path!r} is not an absolute path")
        try:
            self.key = read_key_file(path)
        except KeyFileError as e:
            raise bad("tsig_key_file", f"{path}: {e}") from None
        self.key_file = path
        self.ttl = config.get("ttl", 300)
        self.call_timeout = config.get("call_timeout", 5.0)
        # The plugin's time on event chains (None: the controller's plugin_timeout).
        self.chain_timeout = config.get("timeout")
        self.retry_initial = config.get("retry_initial", 1.0)
        self.retry_max = config.get("retry_max", 300.0)
        if self.retry_max < self.retry_initial:
            raise bad("retry_max", f"{self.retry_max:g} is less than retry_initial "
                      f"({self.retry_initial:g})")
        self.register_wait = config.get("register_wait", 2.0)
        if self.chain_timeout is not None and self.register_wait >= self.chain_timeout:
            raise bad("register_wait", f"{self.register_wait:g} s is not less than timeout "
                      f"({self.chain_timeout:g} s), the plugin's time on the register_vm chain")
        self.reconcile = config.get("reconcile", True)
        self.max_batch = config.get("max_batch", 64)
        self.layout = records.Layout(self.domain, self.zone, self.reverse_zones,
                                     config.get("cluster_names", True))


class Plugin:
    name = "dns"

    def __init__(self, config, api, *, source=None, server=None):
        self.api = api
        self.clock = api.clock
        self.settings = Settings(config, api.state.domain, source)
        self.layout = self.settings.layout
        self.server = server or DnsServer(self.settings.server, self.settings.port,
                                          self.settings.key, timeout=self.settings.call_timeout,
                                          ttl=self.settings.ttl)
        self.queue = UpdateQueue(self._send, self.clock,
                                 retry_initial=self.settings.retry_initial,
                                 retry_max=self.settings.retry_max,
                                 max_batch=self.settings.max_batch, server=str(self.server))
        self.contributions = records.Contributions()
        self.skipped = {}             # VM name -> why it has no records (logged once)
        self._no_reverse_logged = False
        self._stopped = False
        self.reconciled = defer.Deferred()    # (added, removed) counts; None: not done
        self.reconcile_outcome = None
        api.register_query(STATUS_QUERY, self.status)
        log.info("DNS plugin: server {server}, zone {zone}, reverse zones {reverse}, key "
                 "{key}", server=str(self.server), zone=self.settings.zone,
                 reverse=", ".join(self.settings.reverse_zones) or "none",
                 key=self.settings.key.name.to_text(omit_final_dot=True))
        if self.settings.reconcile:
            self._reconciling = defer.Deferred.fromCoroutine(self._reconcile_after_recovery())
            self._reconciling.addErrback(self._reconcile_failed)
        else:
            self.reconciled.callback(None)

    # -- events --------------------------------------------------------------------------

    def entry_point(self, event):
        if self._stopped:
            return None
        if event.name in ("register_vm", "vm_adopted"):
            keys = self._want(event.vm)
            if event.name == "register_vm" and keys and self.settings.register_wait > 0:
                return self._wait_applied(event.vm["name"], keys)
        elif event.name == "vm_removed":
            self._drop(event.vm)
        # migrate_complete and the rest: nothing (names and addresses stay).
        return None

    def _want(self, vm):
        """Queue the records of ``vm`` -> the (zone, name) keys it touches."""
        try:
            identity = records.identify(vm, self.layout.domain)
        except records.Skipped as e:
            self._skip(vm.get("name"), str(e))
            return []
        return self._set(identity.fqdn, records.records_for(identity, self.layout),
                         identity.address)

    def _set(self, vm_name, wanted, address=None):
        self.skipped.pop(vm_name, None)
        if address is not None and not any(r.rdtype == "PTR" for r in wanted):
            self._note_no_reverse(address)
        added, dropped = self.contributions.set(vm_name, wanted)
        for record in dropped:
            self.queue.put(record.zone, record.name, record.rdtype, record.value, False)
        for record in added:
            self.queue.put(record.zone, record.name, record.rdtype, record.value, True)
        return {(r.zone, r.name) for r in wanted}

    def _drop(self, vm):
        name = vm.get("name")
        self.skipped.pop(name, None)
        if isinstance(name, str):
            self._set(name, ())

    def _skip(self, name, why):
        name = str(name)[:253]
        logged = self.skipped.get(name)
        # A VM that had records and lost what they need loses them.
        self._set(name, ())
        if logged != why:
            log.warn("DNS plugin: no records for VM {vm}: {why}", vm=name, why=why)
        self.skipped[name] = why

    def _note_no_reverse(self, address):
        if not self._no_reverse_logged:
            self._no_reverse_logged = True
            log.info("DNS plugin: no reverse zone holds {address} (reverse_zones: {zones}): "
                     "such VMs get no PTR (said once)", address=str(address),
                     zones=", ".join(self.layout.reverse_zones) or "none")

    async def _wait_applied(self, vm, keys):
        done = await self.queue.wait_clean(keys, timeout=self.settings.register_wait)
        if not done:
            log.info("DNS plugin: records of {vm} not yet applied after {wait:g} s; the "
                     "start goes on and the update is retried", vm=vm,
                     wait=self.settings.register_wait)

    def _send(self, zone, changes):
        return self.api.run_blocking(self.server.update, zone, changes)

    # -- reconciliation ------------------------------------------------------------------

    async def _reconcile_after_recovery(self):
        await self.api.settled()
        found = await self._transfer_all()
        if found is None:
            return
        outcome = self.reconcile(found)
        self.reconcile_outcome = outcome
        log.info("DNS plugin: zones reconciled with {vms} VMs: {added} records added, "
                 "{removed} removed", vms=len(self.contributions.vms()), added=outcome[0],
                 removed=outcome[1])
        self.reconciled.callback(outcome)

    async def _transfer_all(self):
        """-> {zone: set of Usher Records} from AXFRs, retried with backoff
        while the server is down (None if the plugin stops meanwhile)."""
        attempt = 0
        while not self._stopped:
            try:
                found = {}
                for zone in self.layout.zones:
                    transferred = await self.api.run_blocking(self.server.transfer, zone)
                    found[zone] = records.usher_records(zone, transferred, self.layout)
                if attempt:
                    log.info("DNS plugin: zone transfers work again after {attempts} failed "
                             "attempts", attempts=attempt)
                return found
            except DnsUnavailable as e:
                attempt += 1
                if attempt == 1:
                    log.warn("DNS plugin: cannot transfer the zones to reconcile them: "
                             "{error}; retrying with backoff", error=str(e))
                delay = min(self.settings.retry_max,
                            self.settings.retry_initial * 2 ** (attempt - 1))
                await task.deferLater(self.clock, delay, lambda: None)
        return None

    def reconcile(self, found):
        """Make Usher's records in the zones (``found``: zone -> set of
        Records) match the VMs in the state -> (added, removed) counts."""
        forward = found.get(self.layout.zone, set())
        live = {}
        for name, vm in list(self.api.state.vms.items()):
            try:
                identity = records.identify(vm, self.layout.domain)
            except records.Skipped as e:
                address = None
                if "no ip_address" in str(e):
                    # Back without its arguments (adopted): keep the address
                    # its name has in the zone.
                    address = records.learned_address(name, forward)
                if address is None:
                    self._skip(name, str(e))
                    continue
                identity = records.identify(
                    dict(vm, args={**(vm.get("args") or {}), "ip_address": str(address)}),
                    self.layout.domain)
            live[identity.fqdn] = records.records_for(identity, self.layout)
        for vm in self.contributions.vms() - set(live):
            self._set(vm, ())
        for vm, wanted in live.items():
            self._set(vm, wanted)
        present = set().union(*found.values()) if found else set()
        wanted = self.contributions.wanted()
        added = removed = 0
        for record in wanted:
            pending = self.queue.pending_change(*record)
            if record not in present or pending is False:
                self.queue.put(*record, True)
                added += 1
        for record in present - wanted:
            self.queue.put(*record, False)
            removed += 1
        return added, removed

    def _reconcile_failed(self, failure):
        if failure.check(defer.CancelledError) and self._stopped:
            return None
        log.failure("DNS plugin: reconciling the zones failed", failure)
        if not self.reconciled.called:
            self.reconciled.callback(None)
        return None

    # -- the admin query -----------------------------------------------------------------

    async def status(self, user, admin, args):
        if not admin:
            raise PermissionDenied(f"{STATUS_QUERY} is for administrators")
        if args:
            raise InvalidRequest(f"{STATUS_QUERY} takes no arguments")
        state = self.queue.status()
        return [{"server": str(self.server), "zones": list(self.layout.zones),
                 "pending": state["pending"], "failing_since": state["failing_since"],
                 "failures": state["failures"], "last_error": state["last_error"],
                 "last_success": state["last_success"], "applied": state["applied"],
                 "vms": len(self.contributions.vms()), "skipped": len(self.skipped),
                 "reconciled": self.reconciled.called}]

    def stop(self):
        self._stopped = True
        self.queue.stop()
        reconciling = getattr(self, "_reconciling", None)
        if reconciling is not None and not reconciling.called:
            reconciling.cancel()
