"""The benchmark table: each figure beside its target and the peers'."""

import json
import platform
import os
import time

# (key, what, unit, target text, target check, peers' figure). ``what`` is
# formatted with the run's scale (bench.run.Scale), so a quick run says what
# it really measured.
FIGURES = [
    ("start_vms_per_s", "1 start {start_vms:,} VMs on {start_lnms} LNMs (end to end)", "VMs/s",
     ">= 1,000", lambda v: v >= 1000, "OpenNebula ~1 VM/s dispatch (default)"),
    ("start_vs_raw_libvirt", "1 ... time relative to {start_vms:,} raw createXML calls", "x",
     "<= 10x", lambda v: v <= 10, "-"),
    ("sync_10k_s", "2 fresh client connect + sync of {vms:,} VMs", "s", "<= 0.5",
     lambda v: v <= 0.5, "-"),
    ("list_10k_s", "2 list of {vms:,} VMs from the controller", "s", "<= 0.5",
     lambda v: v <= 0.5, "OpenNebula 2.4-6.4 s (20k), CloudStack ~10 s (25k)"),
    ("list_vs_virsh", "2 ... time relative to listing {vms:,} domains on one libvirt "
     "connection", "x", "-", lambda v: True, "-"),
    ("ctrl_rss_mb", "3 controller RSS, {vms:,} VMs / {lnms} LNMs / {idle_clients} clients",
     "MB", "<= 200", lambda v: v <= 200, "paper: ~20 MB for 75 VMs"),
    ("ctrl_idle_cpu_pct", "3 controller idle CPU, same load", "%", "<= 1",
     lambda v: v <= 1, "paper: < 1% for 75 VMs"),
    ("ctrl_rss_mb_per_1k_vms", "3 ... controller RSS per 1,000 VMs", "MB", "-",
     lambda v: True, "-"),
    ("ctrl_idle_cpu_pct_per_1k_lnms", "3 ... controller idle CPU per 1,000 LNMs", "%", "-",
     lambda v: True, "-"),
    ("recovery_s", "4 controller kill -9 + restart until {vms:,} VMs back", "s", "<= 5",
     lambda v: v <= 5, "-"),
    ("lost_detect_s", "5 LNM silent -> its VMs lost", "s", "<= 10",
     lambda v: v <= 10, "Nova marks a host down after 60 s"),
    ("notify_p50_ms", "6 notification latency p50 at {notify_rate:g} changes/s", "ms", "-",
     lambda v: True, "-"),
    ("notify_p99_ms", "6 notification latency p99 at {notify_rate:g} changes/s", "ms",
     "<= 100", lambda v: v <= 100, "-"),
    ("ops_per_s", "7 {ops_clients} clients for {ops_duration:g} s: operations/s", "ops/s",
     "-", lambda v: True, "-"),
    ("ops_p99_ms", "7 {ops_clients} clients: p99 operation latency", "ms", "-",
     lambda v: True, "-"),
    ("ops_errors", "7 {ops_clients} clients: errors", "", "0", lambda v: v == 0, "-"),
]

# The large profile's targets (issue 16), where they differ from the above:
# key -> (target text, target check).
LARGE_TARGETS = {
    "start_vms_per_s": (">= 1,000", lambda v: v >= 1000),
    "start_vs_raw_libvirt": ("<= 4x", lambda v: v <= 4),
    "sync_10k_s": ("<= 1", lambda v: v <= 1),
    "list_10k_s": ("<= 1", lambda v: v <= 1),
    "list_vs_virsh": ("<= 5x", lambda v: v <= 5),
    "ctrl_rss_mb": ("<= 600", lambda v: v <= 600),
    "ctrl_idle_cpu_pct": ("<= 2", lambda v: v <= 2),
    "recovery_s": ("<= 10", lambda v: v <= 10),
    "notify_p99_ms": ("<= 100", lambda v: v <= 100),
}


def figures(profile="full"):
    """FIGURES with the targets of ``profile`` ("full", "quick" or "large")."""
    if profile != "large":
        return list(FIGURES)
    return [(key, what, unit) + LARGE_TARGETS.get(key, (target, check)) + (peers,)
            for key, what, unit, target, check, peers in FIGURES]


# The scale, for tables made without a run's own.
FULL_SCALE = {"start_vms": 1000, "start_lnms": 100, "vms": 10000, "lnms": 500,
              "idle_clients": 20, "notify_rate": 100, "ops_clients": 100, "ops_duration": 60}


def machine():
    return {"cpus": os.cpu_count(), "memory_mb": _memory_mb(), "cpu_model": _cpu_model(),
            "python": platform.python_version(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d")}


def _memory_mb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def describe_machine():
    m = machine()
    return (f"{m['cpus']} CPUs ({m['cpu_model']}), {m['memory_mb']:,} MB, Python "
            f"{m['python']}, {m['platform']}, {m['date']}")


def _shown(value, unit):
    if isinstance(value, float):
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    else:
        text = f"{value:,}"
    return f"{text} {unit}".strip()


def table(results, scale=None, errors=None, profile="full"):
    """The Markdown table: each figure, its value, target (``profile``'s),
    whether it is met and the peers' figure; figures a failed step left out
    say so."""
    scale = dict(FULL_SCALE, **(scale or {}))
    rows = [("figure", "value", "target", "met", "peers")]
    for key, what, unit, target, check, peers in figures(profile):
        what = what.format(**scale)
        if key not in results or results[key] is None:
            rows.append((what, "not measured", target, "NO", peers))
            continue
        value = results[key]
        rows.append((what, _shown(value, unit), target, "yes" if check(value) else "NO",
                     peers))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for step, error in (errors or {}).items():
        lines.append(f"\n{step} failed: {error}")
    return "\n".join(lines)


def write_json(path, results, extra=None):
    data = {"machine": machine(), "results": results}
    if extra:
        data.update(extra)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
