"""What the daemon achieved, and what one job per host would have: the
report of ``usher-batch report`` (plain Python, no clock of its own).

- Utilisation: the vCPUs and memory the running jobs hold over the capacity
  of the powered-on hosts, averaged over time (``Meter.sample`` at every
  tick integrates step-wise).
- Host-hours: powered-on hosts, and hosts running at least one job, over time.
- The baseline: the same jobs (their submission times and the run times they
  really had) on the same number of hosts, one job per host, FIFO, each host
  on only while it runs a job (``one_job_per_host``).
"""

import heapq


class Meter:
    """Time integrals of the figures sampled at each tick."""

    FIELDS = ("capacity_vcpus", "capacity_memory", "used_vcpus", "used_memory",
              "hosts_on", "hosts_in_use")

    def __init__(self, data=None):
        data = data or {}
        self.last = data.get("last")            # (time, {field: value}) of the last sample
        self.totals = {f: float(data.get("totals", {}).get(f, 0.0)) for f in self.FIELDS}
        self.seconds = float(data.get("seconds", 0.0))

    def sample(self, now, **figures):
        if self.last is not None:
            then, values = self.last
            elapsed = max(0.0, now - then)
            self.seconds += elapsed
            for f in self.FIELDS:
                self.totals[f] += values.get(f, 0) * elapsed
        self.last = (now, {f: figures.get(f, 0) for f in self.FIELDS})

    def to_dict(self):
        return {"last": self.last, "totals": self.totals, "seconds": self.seconds}

    def figures(self):
        t = self.totals
        return {
            "seconds": self.seconds,
            "utilisation_vcpus": t["used_vcpus"] / t["capacity_vcpus"] if t["capacity_vcpus"] else 0.0,
            "utilisation_memory": (t["used_memory"] / t["capacity_memory"]
                                   if t["capacity_memory"] else 0.0),
            "host_hours_on": t["hosts_on"] / 3600.0,
            "host_hours_in_use": t["hosts_in_use"] / 3600.0,
            "mean_hosts_on": t["hosts_on"] / self.seconds if self.seconds else 0.0,
            "mean_hosts_in_use": t["hosts_in_use"] / self.seconds if self.seconds else 0.0,
        }


def one_job_per_host(jobs, host_count, host_vcpus, host_memory):
    """The baseline for ``jobs`` [(submitted, runtime, vcpus, memory_mib)]
    on ``host_count`` equal hosts -> its figures."""
    if not jobs or host_count < 1:
        return {"jobs": 0, "utilisation_vcpus": 0.0, "utilisation_memory": 0.0,
                "host_hours_in_use": 0.0, "mean_wait": 0.0, "makespan": 0.0,
                "mean_hosts_in_use": 0.0}
    free_at = [0.0] * host_count          # a heap of the times hosts become free
    heapq.heapify(free_at)
    waits, first, last = [], min(j[0] for j in jobs), 0.0
    busy = vcpu_time = memory_time = 0.0
    for submitted, runtime, vcpus, memory in sorted(jobs):
        start = max(submitted, heapq.heappop(free_at))
        end = start + runtime
        heapq.heappush(free_at, end)
        waits.append(start - submitted)
        last = max(last, end)
        busy += runtime
        vcpu_time += vcpus * runtime
        memory_time += memory * runtime
    span = last - first
    return {"jobs": len(jobs),
            "utilisation_vcpus": vcpu_time / (busy * host_vcpus) if busy else 0.0,
            "utilisation_memory": memory_time / (busy * host_memory) if busy else 0.0,
            "host_hours_in_use": busy / 3600.0,
            "mean_wait": sum(waits) / len(waits),
            "makespan": span,
            "mean_hosts_in_use": busy / span if span else 0.0}


def report(meter, jobs, host_count, host_vcpus, host_memory):
    """-> the whole report: ours (meter, jobs) beside the baseline."""
    finished = [j for j in jobs if j.started is not None and j.ended is not None]
    waiting = [j for j in jobs if j.state == "queued"]
    waits = [j.started - j.submitted for j in jobs if j.started is not None]
    counts = {}
    for j in jobs:
        counts[j.state] = counts.get(j.state, 0) + 1
    ours = dict(meter.figures())
    ours.update({"jobs": counts, "jobs_done": len(finished), "jobs_waiting": len(waiting),
                 "mean_wait": sum(waits) / len(waits) if waits else 0.0})
    trace = [(j.submitted, j.ended - j.started, j.vcpus, j.memory_mib) for j in finished]
    return {"usherbatchd": ours,
            "baseline": one_job_per_host(trace, host_count, host_vcpus, host_memory),
            "hosts": host_count, "host_vcpus": host_vcpus, "host_memory_mib": host_memory}


def format_report(data):
    ours, base = data["usherbatchd"], data["baseline"]
    rows = [
        ("", "usherbatchd", "one job per host"),
        ("vCPU utilisation", f"{ours['utilisation_vcpus']:.1%}", f"{base['utilisation_vcpus']:.1%}"),
        ("memory utilisation", f"{ours['utilisation_memory']:.1%}",
         f"{base['utilisation_memory']:.1%}"),
        ("mean hosts in use", f"{ours['mean_hosts_in_use']:.2f}", f"{base['mean_hosts_in_use']:.2f}"),
        ("mean hosts powered on", f"{ours['mean_hosts_on']:.2f}", f"{base['mean_hosts_in_use']:.2f}"),
        ("host-hours in use", f"{ours['host_hours_in_use']:.3f}", f"{base['host_hours_in_use']:.3f}"),
        ("host-hours powered on", f"{ours['host_hours_on']:.3f}", f"{base['host_hours_in_use']:.3f}"),
        ("mean wait (s)", f"{ours['mean_wait']:.1f}", f"{base['mean_wait']:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>12}  {c:>16}" for a, b, c in rows]
    jobs = ", ".join(f"{n} {s}" for s, n in sorted(ours["jobs"].items())) or "none"
    lines.append(f"jobs: {jobs}; {ours['jobs_done']} finished, {ours['jobs_waiting']} waiting; "
                 f"{data['hosts']} hosts of {data['host_vcpus']} CPUs and "
                 f"{data['host_memory_mib']} MiB")
    return "\n".join(lines)
