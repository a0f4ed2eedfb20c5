"""Rebalancer: migrates VMs away from overloaded hosts, evens out hosts when
they join or leave, and drains hosts for maintenance.

Register on ``timer`` (it runs every ``interval`` seconds) and, to rebalance
when hosts or VMs come and go, on ``lnm_connected``, ``lnm_disconnected``
and ``vm_removed``. Every pass, in this order:

Held hosts (``usher.controller.holds``: maintenance, fenced, powered down)
are left alone: no VM is moved off one (an evacuation or the HA plugin
owns them) nor onto one.

1. **drain**: VMs on the hosts listed in ``drain`` move to other hosts;
2. **load**: a host whose CPU utilisation (the LNMs' ``window``-minute
   average, see ``usher.controller.capacity.host_load``; figures older than
   ``max_age`` seconds do not count) stays above
   ``high_load`` for ``sustain`` passes in a row sends its busiest VM (by
   the VM's own figure; without one, its smallest) to the least loaded host
   whose load is below ``target_load`` and that has room; one VM per host
   per pass, then the host must be overloaded for ``sustain`` passes again;
3. **balance** (after a host joined or left, or a VM was removed, once the
   changes settle for ``settle`` seconds; or every pass with
   ``balance = always``): while the fullest and the emptiest host differ by
   more than ``tolerance`` in committed capacity, move the smallest VM whose
   move narrows the gap (sites using ``pack`` set ``balance = never``).

Migrations go through the controller like an administrator's (the
``migrate_request`` chain, so placement checks the target again). At most
``max_concurrent`` run at once and at most ``max_per_pass`` start per pass;
each is independent, so one that fails or hangs never blocks the others:
after ``migration_timeout`` seconds its slot is given back (the migration
itself is left to finish or fail), and a VM whose migration failed is left
alone for ``retry_after`` seconds. Capacity options as in
``usher.controller.capacity``; sample configuration:
``etc/plugins/rebalancer.config``.
"""

from collections import Counter

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from usher import states
from usher.controller.capacity import (CAPACITY_SPEC, CapacityPolicy, Ledger, host_load,
                                      vm_cpus)

CONFIG_SPEC = """
order = integer(default=90)
interval = float(gt=0, default=60)
window = option('1', '5', '15', default='5')
high_load = float(min=0, default=0.85)
sustain = integer(min=1, default=3)
target_load = float(min=0, default=0.6)
balance = option('on_change', 'always', 'never', default='on_change')
tolerance = float(min=0, default=0.25)
settle = float(min=0, default=5)
drain = list(default=list())
avoid = list(default=list())
max_concurrent = integer(min=1, default=2)
max_per_pass = integer(min=1, default=4)
migration_timeout = float(gt=0, default=600)
retry_after = float(min=0, default=600)
max_age = float(gt=0, default=300)
""" + CAPACITY_SPEC
DEFAULT_ORDER = 90
DEFAULT_INTERVAL = 60

log = Logger()

MOVABLE_STATES = (states.RUN, states.PAUSED)
HISTORY = 1000          # recent moves kept for inspection
MEMBERSHIP_EVENTS = ("lnm_connected", "lnm_disconnected", "vm_removed")


class Move:
    __slots__ = ("vm", "source", "target", "reason", "outcome", "error", "demand")

    def __init__(self, vm, source, target, reason, demand):
        self.vm = vm
        self.source = source
        self.target = target
        self.reason = reason
        self.demand = demand
        self.outcome = None     # "migrated", "failed", "timed out"
        self.error = None

    def to_dict(self):
        return {"vm": self.vm, "from": self.source, "to": self.target, "reason": self.reason,
                "outcome": self.outcome, "error": self.error}


class Plugin:
    name = "rebalancer"

    def __init__(self, config, api):
        self.api = api
        self.clock = api.clock
        self.interval = config.get("interval", DEFAULT_INTERVAL)
        self.window = int(config.get("window") or 5)
        self.high_load = config.get("high_load", 0.85)
        self.sustain = config.get("sustain", 3)
        self.target_load = config.get("target_load", 0.6)
        self.balance = config.get("balance", "on_change")
        self.tolerance = config.get("tolerance", 0.25)
        self.settle = config.get("settle", 5)
        self.drain = set(config.get("drain") or ())
        self.avoid = set(config.get("avoid") or ())
        self.max_concurrent = config.get("max_concurrent", 2)
        self.max_per_pass = config.get("max_per_pass", 4)
        self.migration_timeout = config.get("migration_timeout", 600)
        self.retry_after = config.get("retry_after", 600)
        self.max_age = config.get("max_age", 300)
        self.capacity = CapacityPolicy(config)
        self.streaks = Counter()       # host -> passes in a row above high_load
        self.in_flight = {}            # VM name -> Move (slot held)
        self.unfinished = {}           # VM name -> Move (timed out, still running)
        self.cooldown = {}             # VM name -> time before which it is left alone
        self.history = []              # the last HISTORY Moves, finished or not
        self.passes = 0
        self._dirty = False
        self._settling = None
        self._planned = set()
        self._idle_waiters = []

    # -- events ----------------------------------------------------------------------

    def entry_point(self, event):
        if event.name == "timer":
            self.run_pass()
        elif event.name in MEMBERSHIP_EVENTS:
            self.changed()

    def changed(self):
        """Hosts or VMs came or went: balance once things settle."""
        if self.balance == "never":
            return
        self._dirty = True
        if self._settling is not None and self._settling.active():
            self._settling.cancel()
        self._settling = self.clock.callLater(self.settle, self._settled)

    def _settled(self):
        self._settling = None
        self.run_pass(count_load=False)

    def stop(self):
        if self._settling is not None and self._settling.active():
            self._settling.cancel()
        self._settling = None

    # -- one pass ---------------------------------------------------------------------

    def run_pass(self, count_load=True):
        """Plan and start migrations; -> the Moves started (not awaited)."""
        self.passes += 1
        state = self.api.state
        now = self.clock.seconds()
        self.cooldown = {vm: until for vm, until in self.cooldown.items() if until > now}
        if count_load:
            self._update_streaks(state)
        slots = min(self.max_concurrent - len(self.in_flight), self.max_per_pass)
        if slots <= 0:
            return []
        ledger = self._ledger(state)
        self._planned = set()
        planned = []
        planned += self._plan_drain(state, ledger, slots - len(planned))
        if count_load:
            planned += self._plan_load(state, ledger, slots - len(planned))
        if self.balance == "always" or (self._dirty and self.balance == "on_change"):
            planned += self._plan_balance(state, ledger, slots - len(planned))
            if len(planned) < slots:
                self._dirty = False   # balanced as far as it goes
        for move in planned:
            self._launch(move)
        return planned

    def _update_streaks(self, state):
        for lnm_info in state.connected_lnms():
            load = host_load(self.api, lnm_info.name, self.window, self.max_age)
            if load is not None and load > self.high_load:
                self.streaks[lnm_info.name] += 1
            else:
                self.streaks[lnm_info.name] = 0
        for host in list(self.streaks):
            lnm_info = state.lnms.get(host)
            if lnm_info is None or not lnm_info.connected:
                del self.streaks[host]

    def _ledger(self, state):
        ledger = Ledger(state, self.capacity, default_memory=self.api.default_memory,
                        default_vcpus=self.api.default_vcpus)
        # Moves under way: their VMs still count on the source until the
        # controller records the new host; count them on the target too.
        for move in list(self.in_flight.values()) + list(self.unfinished.values()):
            record = state.vms.get(move.vm)
            if record is not None and record.get("lnm") == move.source and \
                    move.target in ledger.hosts:
                ledger.commit(move.target, move.demand)
        return ledger

    def _held(self, host):
        """Is ``host`` held (maintenance, fenced, powered down)? Its VMs are
        its owner's business (an evacuation, the HA plugin): the rebalancer
        moves nothing off it, and the ledger nothing onto it."""
        holds = getattr(self.api, "holds", None)
        return holds is not None and holds.held(host)

    def _movable(self, state, host):
        if self._held(host):
            return []
        now = self.clock.seconds()
        result = []
        for name in sorted(state.lnms[host].vms):
            record = state.vms.get(name)
            if (record is None or record["state"] not in MOVABLE_STATES
                    or name in self.in_flight or name in self.unfinished
                    or name in self._planned
                    or self.cooldown.get(name, 0) > now):
                continue
            result.append(record)
        return result

    def _targets(self, ledger, source):
        return [h for h in sorted(ledger.hosts)
                if h != source and h not in self.drain and h not in self.avoid
                and h not in ledger.held]

    def _plan_drain(self, state, ledger, slots):
        planned = []
        for host in sorted(h for h in self.drain & set(ledger.hosts) if not self._held(h)):
            for record in sorted(self._movable(state, host), key=lambda r: r["name"]):
                if len(planned) >= slots:
                    return planned
                demand = ledger.demand(record)
                targets = sorted(self._targets(ledger, host),
                                 key=lambda h: (ledger.hosts[h].fill(), h))
                target = next((h for h in targets if ledger.refusal(h, demand) is None), None)
                if target is None:
                    log.warn("rebalancer: cannot drain {vm} from {host}: no host has room",
                             vm=record["name"], host=host)
                    continue
                planned.append(self._plan(ledger, record, host, target,
                                          f"draining {host}", demand))
        return planned

    def _plan_load(self, state, ledger, slots):
        planned = []
        loads = {h: host_load(self.api, h, self.window, self.max_age) for h in ledger.hosts}
        overloaded = sorted((h for h in ledger.hosts if self.streaks[h] >= self.sustain
                             and not self._held(h)),
                            key=lambda h: (-(loads[h] or 0), h))
        for host in overloaded:
            if len(planned) >= slots:
                break
            candidates = self._movable(state, host)
            busy = {r["name"]: vm_cpus(self.api, r["name"], self.window, self.max_age)
                    for r in candidates}
            # The busiest VM when VMs report their own load; else the smallest
            # (cheapest to move), assumed to keep all its vCPUs busy.
            if any(v is not None for v in busy.values()):
                order = sorted((r for r in candidates if busy[r["name"]] is not None),
                               key=lambda r: (-busy[r["name"]], r["name"]))
            else:
                order = sorted(candidates, key=lambda r: (r.get("memory_mib") or 0, r["name"]))
            move = None
            for record in order:
                demand = ledger.demand(record)
                cpus_busy = busy[record["name"]]
                if cpus_busy is None:
                    cpus_busy = float(record.get("vcpus") or 1)
                targets = []
                for target in self._targets(ledger, host):
                    load = loads.get(target)
                    if load is None:
                        continue
                    projected = load + cpus_busy / (ledger.hosts[target].cpus or 1)
                    if projected < self.target_load and ledger.refusal(target, demand) is None:
                        targets.append((projected, target))
                if targets:
                    projected, target = min(targets)
                    loads[target] = projected
                    move = self._plan(ledger, record, host, target,
                                      f"{host} load {loads[host]:.2f} above {self.high_load:.2f}"
                                      f" for {self.streaks[host]} passes", demand)
                    break
            if move is None:
                log.warn("rebalancer: {host} is overloaded but no host below load {target} "
                         "can take one of its VMs", host=host, target=self.target_load)
                continue
            planned.append(move)
            # Let the figures show the effect before moving more from this host.
            self.streaks[host] = 0
        return planned

    def _plan_balance(self, state, ledger, slots):
        planned = []
        hosts = self._targets(ledger, None)
        while len(planned) < slots and len(hosts) > 1:
            fullest = max(hosts, key=lambda h: (ledger.hosts[h].fill(), h))
            emptiest = min(hosts, key=lambda h: (ledger.hosts[h].fill(), h))
            gap = ledger.hosts[fullest].fill() - ledger.hosts[emptiest].fill()
            if gap <= self.tolerance:
                break
            choice = None
            for record in sorted(self._movable(state, fullest),
                                 key=lambda r: (r.get("memory_mib") or 0, r["name"])):
                demand = ledger.demand(record)
                if ledger.refusal(emptiest, demand) is not None:
                    continue
                narrower = abs(ledger.hosts[fullest].fill_after(demand, -1)
                               - ledger.hosts[emptiest].fill_after(demand))
                if narrower < gap:
                    choice = (record, demand)
                    break
            if choice is None:
                break
            record, demand = choice
            planned.append(self._plan(ledger, record, fullest, emptiest,
                                      f"balancing {fullest} ({ledger.hosts[fullest].fill():.0%}"
                                      f" committed) and {emptiest} "
                                      f"({ledger.hosts[emptiest].fill():.0%})", demand))
        return planned

    def _plan(self, ledger, record, source, target, reason, demand):
        self._planned.add(record["name"])
        ledger.release(source, demand)
        ledger.commit(target, demand)
        return Move(record["name"], source, target, reason, demand)

    # -- running migrations -----------------------------------------------------------

    def _launch(self, move):
        self.in_flight[move.vm] = move
        self.history.append(move)
        del self.history[:-HISTORY]
        log.info("rebalancer: migrating {vm} from {source} to {target}: {reason}",
                 vm=move.vm, source=move.source, target=move.target, reason=move.reason)
        try:
            d = self.api.migrate([move.vm], [move.target])
        except Exception as e:
            d = defer.fail(e)
        give_up = self.clock.callLater(self.migration_timeout, self._timed_out, move)

        def finished(result):
            if give_up.active():
                give_up.cancel()
            self._finished(move, result)
        d.addBoth(finished)

    def _timed_out(self, move):
        if self.in_flight.pop(move.vm, None) is None:
            return
        move.outcome = "timed out"
        self.unfinished[move.vm] = move
        log.error("rebalancer: migrating {vm} to {target} takes longer than {timeout} s; "
                  "freeing its slot", vm=move.vm, target=move.target,
                  timeout=self.migration_timeout)
        self._check_idle()

    def _finished(self, move, result):
        self.in_flight.pop(move.vm, None)
        self.unfinished.pop(move.vm, None)
        error = None
        if isinstance(result, Failure):
            error = result.getErrorMessage()
        elif isinstance(result, dict):
            failed = [f for f in result.get("failed") or () if f.get("name") == move.vm]
            if failed:
                error = failed[0].get("error")
            elif not any(m.get("name") == move.vm for m in result.get("migrated") or ()):
                error = "the controller did not migrate it"
        else:
            error = f"unexpected result {result!r}"
        if error is None:
            move.outcome = "migrated"
        else:
            move.outcome = "failed"
            move.error = error
            self.cooldown[move.vm] = self.clock.seconds() + self.retry_after
            log.warn("rebalancer: migrating {vm} to {target} failed: {error}",
                     vm=move.vm, target=move.target, error=error)
        self._check_idle()

    def idle(self):
        """-> Deferred firing when no migration holds a slot."""
        if not self.in_flight:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def _check_idle(self):
        if not self.in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)
