"""The batch policy as plain functions of a picture of the cluster (no
network, no clock of its own): which queued jobs start where, which VMs
move to empty a lightly used host, which hosts to power down or up.

- **Packing**: FIFO with backfill (EASY: the first job that cannot start
  gets a reservation at the earliest time the running jobs' walltimes free
  room for it; later jobs may start now only where they cannot delay it).
  Each job goes to the powered-on host where it fits best (least room left
  over), so VMs gather on as few hosts as their guarantees allow.
- **Consolidation**: when every job VM of the least-used host fits on the
  other hosts in use, they move there (at most ``max_migrations`` at once).
  A host with any VM that is not one of our running jobs is never emptied.
- **Power**: a host with no VM at all (whoever owns it) for
  ``idle_before_power_off`` seconds is powered down, keeping
  ``min_powered_on``; when the first queued job fits on no powered-on
  host, one powered-down host is powered up.

Resources count in full (the jobs' VMs are guaranteed; other users' VMs
are counted in full too, so a plan never relies on their overcommit).
"""

import dataclasses
import math


@dataclasses.dataclass
class Slot:
    """One VM on a host: what it holds, and whose it is."""
    vcpus: int
    memory_mib: int
    job: str | None = None          # the job id when it is one of ours
    movable: bool = False           # ours and running (not starting, stopping, migrating)


@dataclasses.dataclass
class Host:
    name: str
    cpus: int
    memory_mib: int
    usable: bool = True             # connected and held by nobody (we may start VMs there)
    powered_down: bool = False      # by us
    vms: dict = dataclasses.field(default_factory=dict)     # VM name -> Slot
    empty_since: float | None = None
    reserved_cpus: int = 0
    reserved_memory_mib: int = 0

    @property
    def used_vcpus(self):
        return sum(s.vcpus for s in self.vms.values())

    @property
    def used_memory(self):
        return sum(s.memory_mib for s in self.vms.values())

    @property
    def free_vcpus(self):
        return self.cpus - self.reserved_cpus - self.used_vcpus

    @property
    def free_memory(self):
        return self.memory_mib - self.reserved_memory_mib - self.used_memory

    @property
    def empty(self):
        return not self.vms

    def load(self):
        """The larger of its CPU and memory shares in use (0 to 1)."""
        return max(self.used_vcpus / max(self.cpus, 1), self.used_memory / max(self.memory_mib, 1))


@dataclasses.dataclass
class Room:
    """What is left on a host while a plan is being made."""
    vcpus: float
    memory: float
    cpus: int
    memory_mib: int

    def fits(self, vcpus, memory):
        return vcpus <= self.vcpus and memory <= self.memory

    def take(self, vcpus, memory):
        self.vcpus -= vcpus
        self.memory -= memory

    def leftover(self, vcpus, memory):
        return (self.vcpus - vcpus) / max(self.cpus, 1) + (self.memory - memory) / max(
            self.memory_mib, 1)


def rooms(hosts, names):
    return {n: Room(hosts[n].free_vcpus, hosts[n].free_memory, hosts[n].cpus,
                    hosts[n].memory_mib) for n in names}


def best_fit(room_of, vcpus, memory, candidates):
    """The candidate host with the least room left over after taking the
    job (ties: by name) -> name, or None where it fits nowhere."""
    fitting = [n for n in candidates if room_of[n].fits(vcpus, memory)]
    if not fitting:
        return None
    return min(fitting, key=lambda n: (room_of[n].leftover(vcpus, memory), n))


@dataclasses.dataclass
class Reservation:
    job: str
    host: str | None        # None: fits on no powered-on host, whatever ends
    at: float               # math.inf with host None


@dataclasses.dataclass
class StartPlan:
    starts: list            # [(job, host name)]
    reservation: Reservation | None


def _shadow(host, job, running, now):
    """The earliest time ``job`` fits on ``host`` once running jobs reach
    their walltime -> (time, room then), (inf, None) if never."""
    vcpus, memory = host.free_vcpus, host.free_memory
    if vcpus >= job.vcpus and memory >= job.memory_mib:
        return now, (vcpus - job.vcpus, memory - job.memory_mib)
    # Jobs started in one round end at the same time: order ties by queue
    # position, never by comparing jobs.
    ends = sorted(((j.expected_end or now, j.seq, j) for j in running if j.lnm == host.name
                   and j.id in {s.job for s in host.vms.values()}), key=lambda e: e[:2])
    for end, _, j in ends:
        vcpus += j.vcpus
        memory += j.memory_mib
        if vcpus >= job.vcpus and memory >= job.memory_mib:
            return max(end, now), (vcpus - job.vcpus, memory - job.memory_mib)
    return math.inf, None


def plan_starts(queue, hosts, running, now, avoid=()):
    """Queued jobs (FIFO order) -> StartPlan. ``hosts``: {name: Host};
    ``running``: the jobs holding resources; ``avoid``: hosts being emptied."""
    targets = sorted(n for n, h in hosts.items() if h.usable and not h.powered_down
                     and n not in avoid)
    room_of = rooms(hosts, targets)
    starts, reservation, spare = [], None, None
    for job in queue:
        host = best_fit(room_of, job.vcpus, job.memory_mib, targets)
        if reservation is None:
            if host is not None:
                room_of[host].take(job.vcpus, job.memory_mib)
                starts.append((job, host))
                continue
            # The head of the queue waits: reserve the earliest host for it.
            best = (math.inf, None, None)
            for name in targets:
                at, left = _shadow(hosts[name], job, running, now)
                if at < best[0]:
                    best = (at, name, left)
            reservation = Reservation(job.id, best[1], best[0])
            spare = list(best[2]) if best[2] else None
            continue
        # Backfill: anywhere but the reserved host, or there if it ends
        # before the reservation, or if it fits in what the reserved job leaves.
        if host is None:
            continue
        if host == reservation.host and now + job.walltime > reservation.at:
            alternatives = [n for n in targets if n != reservation.host]
            other = best_fit(room_of, job.vcpus, job.memory_mib, alternatives)
            if other is not None:
                host = other
            elif spare is not None and job.vcpus <= spare[0] and job.memory_mib <= spare[1]:
                spare[0] -= job.vcpus
                spare[1] -= job.memory_mib
            else:
                continue
        room_of[host].take(job.vcpus, job.memory_mib)
        starts.append((job, host))
    return StartPlan(starts, reservation)


def plan_consolidation(hosts, jobs_by_id, now, *, max_moves, min_remaining=0.0, avoid=()):
    """-> [(job, from host, to host)]: the job VMs of the least-used host
    that can be emptied, each onto the other host in use where it fits best
    (all of them fit, or none is planned), at most ``max_moves``."""
    if max_moves <= 0:
        return []
    in_use = [h for h in hosts.values() if h.usable and not h.powered_down and not h.empty
              and h.name not in avoid]
    if len(in_use) < 2:
        return []

    def emptiable(host):
        for slot in host.vms.values():
            job = jobs_by_id.get(slot.job) if slot.job else None
            if job is None or not slot.movable:
                return False
            if job.expected_end is not None and job.expected_end - now < min_remaining:
                return False      # it ends soon anyway: moving it buys nothing
        return True

    for source in sorted(in_use, key=lambda h: (h.load(), h.name)):
        if not emptiable(source):
            continue
        others = [h.name for h in in_use if h.name != source.name]
        room_of = rooms(hosts, others)
        moves = []
        slots = sorted(source.vms.values(), key=lambda s: (-s.vcpus, -s.memory_mib, s.job))
        for slot in slots:
            target = best_fit(room_of, slot.vcpus, slot.memory_mib, others)
            if target is None:
                moves = None
                break
            room_of[target].take(slot.vcpus, slot.memory_mib)
            moves.append((jobs_by_id[slot.job], source.name, target))
        if moves:
            return moves[:max_moves]
    return []


def plan_power_down(hosts, now, *, idle_before, min_powered_on, busy=()):
    """-> names of hosts to power down: usable, with no VM at all (any
    owner's) for ``idle_before`` seconds, not in ``busy`` (chosen for a
    start), always leaving ``min_powered_on`` hosts on."""
    powered_on = [h for h in hosts.values() if h.usable and not h.powered_down]
    idle = sorted((h for h in powered_on if h.empty and h.name not in busy
                   and h.empty_since is not None and now - h.empty_since >= idle_before),
                  key=lambda h: h.name, reverse=True)
    spare = max(0, len(powered_on) - min_powered_on)
    return [h.name for h in idle[:spare]]


def plan_power_up(hosts, reservation, queue, now, *, power_on_after):
    """-> the powered-down host to power up for the first waiting job, or
    None: when it fits on no powered-on host now, and the reservation (if
    any) is further than ``power_on_after`` seconds away. The smallest host
    it fits on, by name."""
    if reservation is None:
        return None
    if reservation.host is not None and reservation.at - now <= power_on_after:
        return None
    job = next((j for j in queue if j.id == reservation.job), None)
    if job is None:
        return None
    candidates = [h for h in hosts.values() if h.powered_down
                  and h.cpus - h.reserved_cpus >= job.vcpus
                  and h.memory_mib - h.reserved_memory_mib >= job.memory_mib]
    if not candidates:
        return None
    return min(candidates, key=lambda h: (h.cpus, h.memory_mib, h.name)).name
