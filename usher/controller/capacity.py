"""What hosts can still take: CPU and memory accounting for placement
plugins, with overcommit ratios and resource guarantees, and the accessors
for monitoring figures (``host_load``, ``vm_cpus``).

Shared by every placement plugin (``usher.controller.placement``) and the
rebalancer so that they agree on what "room" means.

The model (after the RRC-KI deployment, where jobs get guaranteed
resources while the rest is multiplexed):

- A host offers its CPUs and memory minus what is *reserved* for the host
  itself (``reserved_cpus``, ``reserved_memory_mib``; per host in a
  ``[hosts]`` section).
- An ordinary VM's vCPUs and memory may be overcommitted: they count
  ``1 / overcommit`` against the host (``cpu_overcommit`` vCPUs per physical
  CPU, ``memory_overcommit`` for memory ballooning or page sharing).
- A *guaranteed* VM (request argument ``guaranteed=yes``, or every VM with
  ``guarantees = all``) counts in full: its resources are backed by physical
  CPUs and memory that no other VM can take.

A VM fits on a host when guaranteed + ordinary / overcommit stays within
the host's usable amount, for memory and for CPUs, and the host runs fewer
than ``max_vms_per_host`` VMs (0: no limit). Every refusal says why, in words
a user can act on.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping

from usher import states

# VMs in these states hold (or may hold: lost, unknown) their host's
# resources. Shut-off, hibernated and missing VMs hold none.
ACTIVE_STATES = frozenset({states.RUN, states.PAUSED, states.STARTING, states.MIGRATING,
                           states.LOST, states.UNKNOWN})

TRUE_WORDS = frozenset({"1", "yes", "true", "on", "y"})

# The options every placement plugin (and the rebalancer) understands, in
# CONFIG_SPEC syntax; plugins add their own after it.
CAPACITY_SPEC = """
memory_overcommit = float(min=0.1, default=1.0)
cpu_overcommit = float(min=0.1, default=16.0)
reserved_memory_mib = integer(min=0, default=0)
reserved_cpus = integer(min=0, default=0)
max_vms_per_host = integer(min=0, default=0)
guarantees = option('requested', 'all', 'none', default='requested')
[hosts]
[[__many__]]
memory_overcommit = float(min=0.1, default=None)
cpu_overcommit = float(min=0.1, default=None)
reserved_memory_mib = integer(min=0, default=None)
reserved_cpus = integer(min=0, default=None)
max_vms_per_host = integer(min=0, default=None)
"""


def is_true(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    return isinstance(value, str) and value.strip().lower() in TRUE_WORDS


@dataclasses.dataclass(frozen=True)
class Demand:
    """What one VM needs."""
    memory_mib: int
    vcpus: int
    guaranteed: bool = False

    def describe(self):
        kind = "guaranteed " if self.guaranteed else ""
        return f"{self.memory_mib} MiB and {self.vcpus} {kind}vCPU" + (
            "" if self.vcpus == 1 else "s")


@dataclasses.dataclass(frozen=True)
class HostRules:
    memory_overcommit: float = 1.0
    cpu_overcommit: float = 16.0
    reserved_memory_mib: int = 0
    reserved_cpus: int = 0
    max_vms_per_host: int = 0


class CapacityPolicy:
    """The capacity options of one plugin configuration."""

    def __init__(self, config: Mapping | None = None):
        config = dict(config or {})
        base = {field.name: config[field.name] for field in dataclasses.fields(HostRules)
                if config.get(field.name) is not None}
        self.default_rules = HostRules(**base)
        self.guarantees = config.get("guarantees") or "requested"
        self.host_rules = {}
        for host, overrides in (config.get("hosts") or {}).items():
            changed = {k: v for k, v in overrides.items() if v is not None}
            self.host_rules[host] = dataclasses.replace(self.default_rules, **changed)

    def rules(self, host: str) -> HostRules:
        return self.host_rules.get(host, self.default_rules)

    def guaranteed(self, args: Mapping | None) -> bool:
        if self.guarantees == "all":
            return True
        if self.guarantees == "none":
            return False
        return is_true((args or {}).get("guaranteed"))

    def demand(self, record: Mapping | None, args: Mapping | None, *, default_memory,
               default_vcpus) -> Demand:
        """A VM's needs from its record (existing VMs) or the request's arguments."""
        record = record or {}
        args = args or {}
        memory = record.get("memory_mib") or args.get("memory_mib") or default_memory
        vcpus = record.get("vcpus") or args.get("vcpus") or default_vcpus
        vm_args = record.get("args") if isinstance(record.get("args"), Mapping) else None
        return Demand(int(memory), int(vcpus),
                      self.guaranteed(vm_args if vm_args is not None else args))


class HostUsage:
    """One connected host: what it has, what its VMs use."""

    def __init__(self, name, info, rules: HostRules):
        self.name = name
        self.cpus = int(info.get("cpus") or 0)
        self.memory_mib = int(info.get("memory_mib") or 0)
        self.rules = rules
        self.memory = 0.0          # ordinary VMs' memory (MiB), before overcommit
        self.vcpus = 0             # ordinary VMs' vCPUs, before overcommit
        self.guaranteed_memory = 0
        self.guaranteed_vcpus = 0
        self.vms = 0               # active VMs
        self.clusters = Counter()  # (owner, cluster) -> active VMs here
        self.added = 0             # VMs placed here by the current decision

    @property
    def usable_memory(self):
        return max(self.memory_mib - self.rules.reserved_memory_mib, 0)

    @property
    def usable_cpus(self):
        return max(self.cpus - self.rules.reserved_cpus, 0)

    def memory_in_use(self):
        """Physical memory committed, in MiB (guaranteed + ordinary / overcommit)."""
        return self.guaranteed_memory + self.memory / self.rules.memory_overcommit

    def cpus_in_use(self):
        return self.guaranteed_vcpus + self.vcpus / self.rules.cpu_overcommit

    def fill(self):
        """The larger of the memory and CPU fractions committed (0..1+)."""
        fractions = [self.memory_in_use() / self.usable_memory if self.usable_memory else 1.0,
                     self.cpus_in_use() / self.usable_cpus if self.usable_cpus else 1.0]
        return max(fractions)

    def fill_after(self, demand: Demand, sign=1):
        """The fill this host would have with ``demand`` added (sign -1: removed)."""
        self.add(demand, sign=sign)
        try:
            return self.fill()
        finally:
            self.add(demand, sign=-sign)

    def add(self, demand: Demand, owner=None, cluster=None, sign=1):
        if demand.guaranteed:
            self.guaranteed_memory += sign * demand.memory_mib
            self.guaranteed_vcpus += sign * demand.vcpus
        else:
            self.memory += sign * demand.memory_mib
            self.vcpus += sign * demand.vcpus
        self.vms += sign
        if owner is not None:
            self.clusters[(owner, cluster)] += sign

    def refusal(self, demand: Demand) -> str | None:
        """None if ``demand`` fits here, else why not."""
        rules = self.rules
        if rules.max_vms_per_host and self.vms + 1 > rules.max_vms_per_host:
            return f"already runs {self.vms} VMs (at most {rules.max_vms_per_host} per host)"
        if self.usable_memory <= 0 or self.usable_cpus <= 0:
            return (f"nothing left after the host's reservation ({rules.reserved_cpus} CPUs, "
                    f"{rules.reserved_memory_mib} MiB reserved)")
        memory_ratio = 1.0 if demand.guaranteed else rules.memory_overcommit
        free_memory = (self.usable_memory - self.memory_in_use()) * memory_ratio
        if demand.memory_mib > free_memory + 1e-9:
            # Committed: the configured memory of the VMs placed here, not
            # the free memory the host measures (list_lnm -s shows both).
            return (f"memory: needs {demand.memory_mib} MiB, "
                    f"{_amount(max(free_memory, 0))} MiB uncommitted (VMs' configured "
                    f"memory commits {_amount(self.memory_in_use())} of "
                    f"{_terms(self.memory_mib, 'MiB', rules.reserved_memory_mib, memory_ratio, demand.guaranteed)})")
        cpu_ratio = 1.0 if demand.guaranteed else rules.cpu_overcommit
        free_vcpus = (self.usable_cpus - self.cpus_in_use()) * cpu_ratio
        if demand.vcpus > free_vcpus + 1e-9:
            return (f"CPUs: needs {demand.vcpus} vCPUs, {_amount(max(free_vcpus, 0))} "
                    f"uncommitted (VMs' vCPUs commit {_amount(self.cpus_in_use())} of "
                    f"{_terms(self.cpus, 'CPUs', rules.reserved_cpus, cpu_ratio, demand.guaranteed)})")
        return None


def _amount(value):
    return f"{value:.0f}" if abs(value - round(value)) < 0.05 else f"{value:.1f}"


def _terms(total, unit, reserved, ratio, guaranteed):
    """"32768 MiB" and what changes the sum: "1024 MiB, 256 reserved for the host"."""
    parts = [f"{total} {unit}"]
    if reserved:
        parts.append(f"{reserved} reserved for the host")
    if guaranteed:
        parts.append("guaranteed: no overcommit")
    elif ratio != 1.0:
        parts.append(f"overcommit x{ratio:g}")
    return ", ".join(parts)


def committed(state, host):
    """-> (MiB, vCPUs): the configured memory and vCPUs of the VMs that hold
    room on ``host`` (active there, or on their way to it), before
    overcommit: what placement counts, not what the host measures free."""
    memory = vcpus = 0
    info = state.lnms.get(host)
    names = set(info.vms) if info is not None else set()
    names.update(name for name, target in getattr(state, "incoming", {}).items()
                 if target == host)
    for name in names:
        record = state.vms.get(name)
        if record is None or record.get("state") not in ACTIVE_STATES:
            continue
        memory += int(record.get("memory_mib") or 0)
        vcpus += int(record.get("vcpus") or 0)
    return memory, vcpus


class Ledger:
    """The connected hosts' usage, from the global state, updated as a
    plugin places VMs so that one request's VMs see each other."""

    def __init__(self, state, policy: CapacityPolicy, *, default_memory=256,
                 default_vcpus=1, ignore=()):
        self.state = state
        self.policy = policy
        self.default_memory = default_memory
        self.default_vcpus = default_vcpus
        self.hosts: dict[str, HostUsage] = {}
        # Hosts that take no new VMs now (usher.controller.holds): their
        # usage is counted, every placement on them is refused with the reason.
        self.held: dict[str, str] = {}
        holds = getattr(state, "holds", None)
        for host in state.connected_lnms():
            self.hosts[host.name] = HostUsage(host.name, host.info, policy.rules(host.name))
            reason = holds.reason(host.name) if holds is not None else None
            if reason is not None:
                self.held[host.name] = reason
        ignore = set(ignore)
        for record in state.vms.values():
            host = self.hosts.get(record.get("lnm"))
            if host is None or record["name"] in ignore or record["state"] not in ACTIVE_STATES:
                continue
            host.add(self.demand(record), record.get("owner"), record.get("cluster"))
        # A VM on its way to a host holds room there too (libvirt reserves
        # it on the target while it copies; an import restores it there).
        for name, target in getattr(state, "incoming", {}).items():
            host, record = self.hosts.get(target), state.vms.get(name)
            if host is None or record is None or name in ignore or record.get("lnm") == target:
                continue
            host.add(self.demand(record), record.get("owner"), record.get("cluster"))

    def demand(self, record, args=None) -> Demand:
        return self.policy.demand(record, args, default_memory=self.default_memory,
                                  default_vcpus=self.default_vcpus)

    def refusal(self, host: str, demand: Demand) -> str | None:
        usage = self.hosts.get(host)
        if usage is None:
            return "not connected"
        if host in self.held:
            return self.held[host]
        return usage.refusal(demand)

    def placeable(self, host: str) -> bool:
        """Connected and not held: a host new VMs may go to (room aside)."""
        return host in self.hosts and host not in self.held

    def commit(self, host, demand, owner=None, cluster=None):
        usage = self.hosts[host]
        usage.add(demand, owner, cluster)
        usage.added += 1

    def release(self, host, demand, owner=None, cluster=None):
        usage = self.hosts.get(host)
        if usage is not None:
            usage.add(demand, owner, cluster, sign=-1)


# -- monitoring figures ------------------------------------------------------------
#
# The only place placement plugins and the rebalancer read monitoring data
# (the controller's ``usher.controller.monitoring.Monitoring``, reached as
# ``api.monitoring``). Units are normalised here: a host's load is the
# fraction of the host that is busy, a VM's the number of CPUs it keeps busy.

def _monitoring(api):
    try:
        return api.monitoring
    except AttributeError:
        return None


def _fresh(monitoring, load_of, name, max_age):
    if max_age is None:
        return True
    load = load_of(name)
    return load is not None and (load.age is None or load.age <= max_age)


def host_load(api, lnm: str, window: int = 1, max_age: float | None = None) -> float | None:
    """The host's CPU utilisation averaged over ``window`` minutes (1, 5 or
    15) as a fraction of the host (0.0 idle .. 1.0 every CPU busy); None when
    its LNM has reported no such figure (or, with ``max_age``, none that
    recent)."""
    monitoring = _monitoring(api)
    if monitoring is None:
        return None
    percent = monitoring.lnm_figure(lnm, "cpu", window)
    if percent is None or not _fresh(monitoring, monitoring.lnm_load, lnm, max_age):
        return None
    return percent / 100.0


def vm_cpus(api, vm: str, window: int = 1, max_age: float | None = None) -> float | None:
    """How many CPUs a VM keeps busy on average over ``window`` minutes
    (1.5: one and a half); None when not reported."""
    monitoring = _monitoring(api)
    if monitoring is None:
        return None
    percent = monitoring.vm_figure(vm, "cpu", window)
    if percent is None or not _fresh(monitoring, monitoring.vm_load, vm, max_age):
        return None
    return percent / 100.0
