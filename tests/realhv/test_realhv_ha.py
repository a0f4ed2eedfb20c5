"""HA restart only with fencing, on real QEMU guests (issue 15, part B): a
real network partition, a real fence agent, and where each guest runs asked
of both libvirtds directly (virsh).

The cluster of test_realhv.py (two libvirtd hosts in network namespaces, a
controller and two usherlnm), with short heartbeats. The HA plugin is
registered through ``ush register_plugin`` with a short ``grace``; its
``fence_command`` is a script in the run directory that fails ("BMC
unreachable") until the marker file ``power-off`` exists, and records each
call. Three guests start on h1: two restartable (``ha_priority`` 900 and
500) and one that must never be restarted elsewhere (``ha_priority=0``).

The story, each step timed (``<tmp_path>/timings.json``; printed with -s):
h1's port on the bridge goes down (``Cluster.cut_link``: a partition -- h1
and its guests run on, only nobody reaches it); its VMs go ``lost``; past
the grace the fence agent runs and fails, again and again, and nothing is
restarted: h2's libvirtd has no copy. The marker appears, the agent
confirms: the two restartable VMs are restarted on h2 (virsh on h2: running;
their consoles there show them booting), the priority-0 one stays lost, and
h1's libvirtd still runs the old copies (their consoles on h1 keep
counting: the fence agent "lied", as a wrong one would, and this is what the
heal must undo). The link heals: h1's LNM comes back, its stale copies are
destroyed (virsh on h1: gone), the priority-0 VM comes back where it always
was, exactly one copy of each VM runs on the two hypervisors, the fenced
hold is released and h1 takes new VMs again.

Skips only as test_realhv.py does.
"""

import json
import os

from tests.realhv import hosts
from tests.realhv.test_realhv import (BOOT_TIMEOUT, EVENT_TIMEOUT, console, domain_state,
                                      listing, running, running_copies, ush, wait_for,
                                      wait_ticking)
# The fixtures: timed steps, the guest (skips where the machine cannot run it).
from tests.realhv.test_realhv import guest, steps  # noqa: F401

import pytest

USER, DOMAIN = hosts.USHER_USER, hosts.USHER_DOMAIN
RESTARTABLE = {f"1.ha.{USER}.{DOMAIN}": 900, f"2.ha.{USER}.{DOMAIN}": 500}
PINNED = f"1.pinned.{USER}.{DOMAIN}"          # ha_priority=0: never restarted elsewhere
AFTER = f"1.after.{USER}.{DOMAIN}"
VMS = sorted(RESTARTABLE) + [PINNED]
HA_EVENTS = "lnm_disconnected,lnm_connected,lnm_hold_changed,timer"
GRACE = 1.0
# The controller declares a silent LNM gone after 2 s; the LNM gives up on
# a silent controller after 3 s and reconnects (at most 5 s apart).
CTRL_OPTIONS = "lnm_ping_interval = 0.5\nlnm_ping_timeout = 2\n"
LNM_OPTIONS = "ping_interval = 0.5\nping_timeout = 3\n"


def short(name):
    return name.split(f".{USER}.")[0]


def write_fence_agent(directory):
    """-> (agent, calls, marker): the agent fails until ``marker`` exists,
    then says the host is off; each call appends its arguments to ``calls``."""
    agent = os.path.join(directory, "fence-agent")
    calls = os.path.join(directory, "fence-calls")
    marker = os.path.join(directory, "power-off")
    with open(agent, "w") as f:
        f.write(f"""#!/bin/sh
echo "$1" >> {calls}
if [ -e {marker} ]; then echo "chassis power of $1 is off"; exit 0; fi
echo "BMC of $1 unreachable" >&2
exit 1
""")
    os.chmod(agent, 0o755)
    return agent, calls, marker


def fence_calls(path):
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


@pytest.fixture
def cluster(guest, steps, tmp_path):  # noqa: F811
    directory = tmp_path / "realhv"
    with running(hosts.Cluster(directory, guest, ctrl_options=CTRL_OPTIONS,
                               lnm_options=LNM_OPTIONS), steps) as cluster:
        yield cluster


def states(cluster):
    vms = listing(cluster)
    return {name: (vms[name]["state"], vms[name]["lnm"]) if name in vms else None
            for name in VMS}


def ha_status(cluster):
    items = ush(cluster, "query", "ha.status")
    return ({item["lnm"]: item for item in items if item["kind"] == "host"},
            next(item for item in items if item["kind"] == "queue"))


def holds_of(cluster, lnm):
    return {entry["name"]: entry for entry in ush(cluster, "list_lnm")}[lnm].get("holds") or {}


def test_ha_restarts_only_once_fenced_and_the_heal_leaves_one_copy(cluster, steps):
    h1, h2 = cluster.hosts
    agent, calls, marker = write_fence_agent(cluster.dir)
    config = os.path.join(cluster.dir, "ha.config")
    with open(config, "w") as f:
        f.write(f"interval = 0.5\ngrace = {GRACE}\nfence_command = {agent}, {{lnm}}\n"
                "fence_timeout = 10\nretry_initial = 0.5\nretry_max = 1\n"
                "max_restarts_per_minute = 100\n")

    with steps("register ha; start 3 guests on h1 (until their consoles count)"):
        ush(cluster, "register_plugin", "ha", HA_EVENTS, config)
        # Three starts at once (each its own priority).
        starting = [cluster.ush_popen("start", short(name), "-l", "lnm1", "--arg",
                                      f"ha_priority={priority}")
                    for name, priority in {**RESTARTABLE, PINNED: 0}.items()]
        for process in starting:
            out, err = process.communicate(timeout=180)
            assert process.returncode == 0, out + err
        for name in VMS:
            wait_ticking(console(cluster, "lnm1", name), boots=1)
    assert states(cluster) == {name: ("run", "lnm1") for name in VMS}
    assert {name: listing(cluster)[name]["args"]["ha_priority"] for name in VMS} == {
        **RESTARTABLE, PINNED: 0}
    assert all(running_copies(cluster, name) == ["h1"] for name in VMS)

    with steps("cut h1's link (ip link set h1 down): its VMs go lost"):
        cluster.cut_link(h1)
        wait_for(lambda: states(cluster) == {name: ("lost", "lnm1") for name in VMS},
                 EVENT_TIMEOUT, "ush list to show the VMs of lnm1 lost")
    assert not {e["name"]: e for e in ush(cluster, "list_lnm")}["lnm1"]["connected"]

    with steps("past the grace the agent fails (3 tries): nothing restarted"):
        wait_for(lambda: len(fence_calls(calls)) >= 3, EVENT_TIMEOUT,
                 "the fence agent to be tried three times")
    assert set(fence_calls(calls)) == {"lnm1"}
    assert states(cluster) == {name: ("lost", "lnm1") for name in VMS}
    away, queue = ha_status(cluster)
    assert away["lnm1"]["fenced"] is None and away["lnm1"]["fence_attempts"] >= 3
    assert "BMC of lnm1 unreachable" in away["lnm1"]["last_error"]
    assert queue["waiting"] == []
    assert "fenced" not in holds_of(cluster, "lnm1")
    # On the hypervisors: h2 has no copy at all, h1 runs on, unreachable.
    for name in VMS:
        assert domain_state(h2, name) is None, name
        assert domain_state(h1, name) == "running", name
    # Nor may anyone restart them by hand while the host is not fenced.
    refused = cluster.ush("migrate", VMS[0], "--to", "lnm2", check=False)
    assert refused.returncode != 0
    assert states(cluster)[VMS[0]] == ("lost", "lnm1")

    old_ticks = {name: hosts.console_summary(console(cluster, "lnm1", name))[1]
                 for name in RESTARTABLE}
    with steps("the agent confirms (marker): restarted on h2, booting there"):
        with open(marker, "w"):
            pass
        wait_for(lambda: all(states(cluster)[name] == ("run", "lnm2") for name in RESTARTABLE),
                 EVENT_TIMEOUT, "the restartable VMs to run on lnm2")
        for name in RESTARTABLE:
            wait_ticking(console(cluster, "lnm2", name), boots=1, timeout=BOOT_TIMEOUT)
    fenced = holds_of(cluster, "lnm1")["fenced"]
    assert fenced["evidence"] == "fence-agent: chassis power of lnm1 is off"
    assert fenced["by"] == "ha" and sorted(fenced["restarted"]) == sorted(RESTARTABLE)
    assert states(cluster)[PINNED] == ("lost", "lnm1")
    assert domain_state(h2, PINNED) is None
    away, queue = ha_status(cluster)
    assert queue["never"] == [PINNED] and queue["waiting"] == []
    # The partition is only a network cut: h1's libvirtd still runs the old
    # copies, and their consoles there keep counting.
    for name in RESTARTABLE:
        assert domain_state(h2, name) == "running", name
        assert running_copies(cluster, name) == ["h1", "h2"], name
        wait_ticking(console(cluster, "lnm1", name), boots=1, after=old_ticks[name],
                     timeout=EVENT_TIMEOUT)
    assert running_copies(cluster, PINNED) == ["h1"]

    with steps("heal h1's link: stale copies deleted, one copy of each VM"):
        cluster.heal_link(h1)
        wait_for(lambda: all(domain_state(h1, name) is None for name in RESTARTABLE),
                 EVENT_TIMEOUT + 10, "the stale copies on h1 to be destroyed")
        wait_for(lambda: states(cluster)[PINNED] == ("run", "lnm1"), EVENT_TIMEOUT,
                 f"{PINNED} to come back on lnm1")
        wait_for(lambda: "fenced" not in holds_of(cluster, "lnm1"), EVENT_TIMEOUT,
                 "the fenced hold of lnm1 to be released")
    expected = {**{name: ("run", "lnm2") for name in RESTARTABLE}, PINNED: ("run", "lnm1")}
    assert states(cluster) == expected
    for name, (_state, lnm) in expected.items():
        where, other = (h2, h1) if lnm == "lnm2" else (h1, h2)
        assert running_copies(cluster, name) == [where.name], name
        assert domain_state(other, name) is None, name      # not even defined
    lnm1 = {e["name"]: e for e in ush(cluster, "list_lnm")}["lnm1"]
    assert lnm1["connected"] and not lnm1.get("holds")
    assert "removed the stale copy" in cluster.log_tail("usherctrl", 400)
    # The restarted guests run on, undisturbed by the heal (one boot each).
    for name in RESTARTABLE:
        wait_ticking(console(cluster, "lnm2", name), boots=1,
                     after=hosts.console_summary(console(cluster, "lnm2", name))[1],
                     timeout=EVENT_TIMEOUT)

    with steps("h1 takes VMs again: a new guest on lnm1"):
        started = ush(cluster, "start", short(AFTER), "-l", "lnm1")
        assert [vm["lnm"] for vm in started] == ["lnm1"], started
        wait_ticking(console(cluster, "lnm1", AFTER), boots=1)
    assert running_copies(cluster, AFTER) == ["h1"]
    print("\nfence agent calls: " + json.dumps(fence_calls(calls)))
