"""The benchmark table: each figure beside its target and the peers'."""

import json
import platform
import os
import time

# (key, what, unit, target text, target check, peers' figure)
FIGURES = [
    ("start_vms_per_s", "start 1,000 VMs on 100 LNMs (end to end)", "VMs/s", ">= 1,000",
     lambda v: v >= 1000, "OpenNebula ~1 VM/s dispatch (default)"),
    ("start_vs_raw_libvirt", "  ... time relative to 1,000 raw createXML calls", "x", "<= 10x",
     lambda v: v <= 10, "-"),
    ("sync_10k_s", "fresh client connect + sync of 10,000 VMs", "s", "<= 0.5",
     lambda v: v <= 0.5, "-"),
    ("list_10k_s", "list of 10,000 VMs from the controller", "s", "<= 0.5",
     lambda v: v <= 0.5, "OpenNebula 2.4-6.4 s (20k), CloudStack ~10 s (25k)"),
    ("ctrl_rss_mb", "controller RSS, 10k VMs / 500 LNMs / 20 clients", "MB", "<= 200",
     lambda v: v <= 200, "paper: ~20 MB for 75 VMs"),
    ("ctrl_idle_cpu_pct", "controller idle CPU, same load", "%", "<= 1",
     lambda v: v <= 1, "paper: < 1% for 75 VMs"),
    ("recovery_s", "controller kill -9 + restart until 10k VMs known", "s", "<= 5",
     lambda v: v <= 5, "-"),
    ("lost_detect_s", "LNM silent -> its VMs lost (default settings)", "s", "<= 10",
     lambda v: v <= 10, "Nova marks a host down after 60 s"),
    ("notify_p50_ms", "notification latency p50 at 100 changes/s", "ms", "-",
     lambda v: True, "-"),
    ("notify_p99_ms", "notification latency p99 at 100 changes/s", "ms", "<= 100",
     lambda v: v <= 100, "-"),
    ("ops_per_s", "100 clients for 60 s: operations per second", "ops/s", "-",
     lambda v: True, "-"),
    ("ops_p99_ms", "100 clients: p99 operation latency", "ms", "-", lambda v: True, "-"),
    ("ops_errors", "100 clients: errors", "", "0", lambda v: v == 0, "-"),
]


def machine():
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def table(results):
    rows = [("figure", "value", "target", "met", "peers")]
    for key, what, unit, target, check, peers in FIGURES:
        if key not in results:
            continue
        value = results[key]
        shown = f"{value:,.3g} {unit}".strip() if isinstance(value, float) else f"{value} {unit}"
        rows.append((what, shown.strip(), target, "yes" if check(value) else "NO", peers))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(path, results, extra=None):
    data = {"machine": machine(), "results": results}
    if extra:
        data.update(extra)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
