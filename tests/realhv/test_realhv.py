"""End to end on real hypervisors: Usher driving QEMU guests under two
libvirtds (two "hosts" in network namespaces, see hosts.py), through ush.

One test, in steps that build on each other (booting real guests is the
expensive part): start a virtual cluster, pause, resume, hibernate, restore,
reboot, cycle, live-migrate while the console keeps counting, a migration
that fails half-way, ACPI shutdown, then changes made behind Usher's back
with virsh. Each step's time is printed (pytest -s) and written to
``<tmp_path>/timings.json``.

It installs what it needs (Debian packages, a guest built from Debian
packages, cached in ~/.cache/usher/realhv). It skips only where the machine
cannot run it (not root, not Debian, not x86_64, or USHER_REALHV=skip).
"""

import contextlib
import json
import os
import time

import libvirt
import pytest

from tests.realhv import hosts

CLUSTER = "web"
VM1 = f"1.{CLUSTER}.{hosts.USHER_USER}.{hosts.USHER_DOMAIN}"
VM2 = f"2.{CLUSTER}.{hosts.USHER_USER}.{hosts.USHER_DOMAIN}"
ADOPTED = f"1.adhoc.{hosts.USHER_USER}.{hosts.USHER_DOMAIN}"
FOREIGN = "plain-guest"

# Generous bounds for real processes on a slow, busy machine; the steps
# normally take a small fraction of them (see the timings).
BOOT_TIMEOUT = 60
EVENT_TIMEOUT = 20

# A guest with no kernel and no disk (its firmware finds nothing to boot and
# idles): the cheapest thing virsh can start behind Usher's back.
BARE_GUEST_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
</domain>
"""


@pytest.fixture
def steps(tmp_path):
    steps = Steps(tmp_path / "timings.json")
    yield steps
    if steps.times:
        print("\nreal-hypervisor steps:\n" + steps.report())


@pytest.fixture
def guest(steps):
    reason = hosts.why_not_runnable()
    if reason:
        pytest.skip(f"real hypervisors cannot run here: {reason}")
    with steps("install packages, build the guest (cached after the first run)"):
        return hosts.prepare()


@contextlib.contextmanager
def running(cluster, steps):
    """The cluster started, and stopped (by PID) however the block ends."""
    try:
        with steps("two libvirtd hosts, controller and two LNMs up"):
            cluster.start()
        yield cluster
    finally:
        with steps("teardown (by PID) and namespaces removed"):
            cluster.stop()


@pytest.fixture
def cluster(guest, steps, tmp_path):
    try:
        with running(hosts.Cluster(tmp_path / "realhv", guest), steps) as cluster:
            yield cluster
    finally:
        # Hibernation images are tens of MiB each; the logs stay for a post-mortem.
        for path in (tmp_path / "realhv").glob("lnm*-state/images/*"):
            path.unlink()


class Steps:
    """Times each step; the report goes to the terminal and a JSON file."""

    def __init__(self, path):
        self.path = path
        self.times = {}

    @contextlib.contextmanager
    def __call__(self, name):
        started = time.monotonic()
        try:
            yield
        finally:
            self.times[name] = round(time.monotonic() - started, 2)
            with open(self.path, "w") as f:
                json.dump(self.times, f, indent=1)

    def report(self):
        width = max(len(name) for name in self.times)
        return "\n".join(f"  {name:<{width}}  {seconds:6.2f} s"
                         for name, seconds in self.times.items())


def ush(cluster, *args, expect=0):
    result = cluster.ush(*args, check=False)
    assert result.returncode == expect, (f"ush {' '.join(args)} exited "
                                         f"{result.returncode}: {result.stdout}{result.stderr}")
    return json.loads(result.stdout) if result.stdout.strip() else None


def listing(cluster, *args):
    return {vm["name"]: vm for vm in ush(cluster, "list", *args)}


def wait_for(predicate, timeout, what):
    hosts.wait_for(predicate, timeout, what, interval=0.2)


def wait_for_state(cluster, name, state, lnm=None, timeout=EVENT_TIMEOUT):
    def reached():
        vm = listing(cluster).get(name)
        return vm is not None and vm["state"] == state and (lnm is None or vm["lnm"] == lnm)
    wait_for(reached, timeout, f"ush list to show {name} {state}" + (f" on {lnm}" if lnm else ""))


def domain_state(host, name):
    """virsh's word for a domain's state on a host, None if it is not there."""
    result = host.virsh("domstate", name, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def running_copies(cluster, name):
    return [host.name for host in cluster.hosts if domain_state(host, name) == "running"]


def console(cluster, lnm, name):
    return os.path.join(cluster.dir, f"{lnm}-state", "consoles", f"{name}.log")


def wait_ticking(path, *, boots, after=None, timeout=BOOT_TIMEOUT):
    """Wait until the console shows ``boots`` boots and the guest counting
    (past ``after`` if given) -> the last tick."""
    def counting():
        seen_boots, last = hosts.console_summary(path)
        assert seen_boots <= boots, f"{path}: the guest booted {seen_boots} times, not {boots}"
        return seen_boots == boots and last is not None and (after is None or last > after)
    wait_for(counting, timeout, f"{os.path.basename(path)} to count (boot {boots}"
             + (f", past tick {after})" if after is not None else ")"))
    return hosts.console_summary(path)[1]


def test_usher_on_real_hypervisors(cluster, steps):
    h1, h2 = cluster.hosts
    # Each console is logged under the state directory of the LNM that
    # created the VM, and stays there when the VM migrates.
    con1, con2 = console(cluster, "lnm1", VM1), console(cluster, "lnm2", VM2)
    _run_steps(cluster, steps, h1, h2, con1, con2)


def _run_steps(cluster, steps, h1, h2, con1, con2):
    # --- capacity: what the LNMs report is the host's real memory ---------------
    lnms = {lnm["name"]: lnm for lnm in ush(cluster, "list_lnm", "-s")}
    conn = libvirt.open(h1.uri)
    try:
        host_total_kib = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)["total"]
        node_cpu = conn.getCPUStats(libvirt.VIR_NODE_CPU_STATS_ALL_CPUS)
    finally:
        conn.close()
    for name in ("lnm1", "lnm2"):
        assert lnms[name]["connected"] and lnms[name]["driver"] == "QEMU"
        assert lnms[name]["live_migration"] is True
        assert lnms[name]["memory_mib"] == host_total_kib // 1024
        free = lnms[name].get("free_memory_mib")   # with the monitoring figures
        assert free is None or 0 < free <= lnms[name]["memory_mib"]
    assert node_cpu["user"] > 0 and node_cpu["idle"] > 0

    # --- a virtual cluster of real guests ---------------------------------------------
    with steps("start 2 guests (ush start, until both consoles count)"):
        started = ush(cluster, "start", "-n", CLUSTER, "-c", "2", "lnm1", "lnm2")
        assert {vm["name"]: vm["lnm"] for vm in started} == {VM1: "lnm1", VM2: "lnm2"}
        wait_ticking(con1, boots=1)
        wait_ticking(con2, boots=1)
    assert domain_state(h1, VM1) == "running" and domain_state(h2, VM2) == "running"
    vms = listing(cluster, "-n", CLUSTER)
    assert {n: (vm["state"], vm["lnm"], vm["owner"], vm["memory_mib"]) for n, vm in vms.items()} \
        == {VM1: ("run", "lnm1", "alice", 128), VM2: ("run", "lnm2", "alice", 128)}
    _check_guest_statistics(h1, VM1)

    with steps("pause both"):
        result = ush(cluster, "pause", "-n", CLUSTER)
    assert [d["state"] for d in result["done"]] == ["paused", "paused"]
    assert domain_state(h1, VM1) == "paused" and domain_state(h2, VM2) == "paused"

    with steps("resume both"):
        result = ush(cluster, "resume", "-n", CLUSTER)
    assert [d["state"] for d in result["done"]] == ["run", "run"]
    assert domain_state(h1, VM1) == "running"

    tick = hosts.console_summary(con1)[1]
    with steps("hibernate both"):
        result = ush(cluster, "hibernate", "-n", CLUSTER)
    assert [d["state"] for d in result["done"]] == ["hibernated", "hibernated"]
    image = os.path.join(cluster.dir, "lnm1-state", "images", f"{VM1}.save")
    assert os.path.getsize(image) > 16 * 1024 * 1024
    assert domain_state(h1, VM1) == "shut off"
    assert {vm["state"] for vm in listing(cluster, "-n", CLUSTER).values()} == {"hibernated"}

    with steps("restore both"):
        result = ush(cluster, "restore", "-n", CLUSTER)
    assert [d["state"] for d in result["done"]] == ["run", "run"]
    assert not os.path.exists(image)
    # Restored, not rebooted: the same boot goes on counting.
    wait_ticking(con1, boots=1, after=tick, timeout=EVENT_TIMEOUT)

    with steps("reboot both (ACPI, until both count again)"):
        result = ush(cluster, "reboot", "-n", CLUSTER)
        assert [d["state"] for d in result["done"]] == ["run", "run"]
        wait_ticking(con1, boots=2)
        wait_ticking(con2, boots=2)

    with steps("cycle 2 (power off and boot, until it counts)"):
        result = ush(cluster, "cycle", VM2)
        assert result["done"] == [{"name": VM2, "state": "run"}]
        wait_ticking(con2, boots=3)

    # --- live migration -------------------------------------------------------------------
    tick = hosts.console_summary(con1)[1]
    with steps("live-migrate 1 from lnm1 to lnm2"):
        result = ush(cluster, "migrate", VM1, "--to", "lnm2")
    assert result["migrated"] == [{"name": VM1, "from": "lnm1", "to": "lnm2"}], result
    assert domain_state(h2, VM1) == "running" and domain_state(h1, VM1) is None
    vm = listing(cluster)[VM1]
    assert (vm["state"], vm["lnm"], vm["owner"], vm["cluster"]) == ("run", "lnm2", "alice", CLUSTER)
    # Its console (the same file: the hosts share the filesystem) keeps
    # counting, with no new boot.
    wait_ticking(con1, boots=2, after=tick + 2, timeout=EVENT_TIMEOUT)
    with steps("pause and resume 1 on its new host"):
        assert ush(cluster, "pause", VM1)["done"] == [{"name": VM1, "state": "paused"}]
        assert domain_state(h2, VM1) == "paused"
        assert ush(cluster, "resume", VM1)["done"] == [{"name": VM1, "state": "run"}]

    # --- a migration that fails half-way leaves one running copy ---------------------
    h2.virsh("migrate-setspeed", VM2, "1")     # MiB/s: slow enough to abort for sure
    with steps("failed migration of 2 (aborted mid-way)"):
        migrating = cluster.ush_popen("migrate", VM2, "--to", "lnm1")
        try:
            wait_for(lambda: "Outgoing migration" in h2.virsh("domjobinfo", VM2,
                                                               check=False).stdout,
                     EVENT_TIMEOUT, "the migration of 2 to begin")
            h2.virsh("domjobabort", VM2)
            out, err = migrating.communicate(timeout=120)
        finally:
            if migrating.poll() is None:
                migrating.kill()
                migrating.wait()
    assert migrating.returncode == 1, out + err
    result = json.loads(out)
    assert result["migrated"] == [] and [f["name"] for f in result["failed"]] == [VM2]
    assert running_copies(cluster, VM2) == ["h2"]
    assert domain_state(h1, VM2) is None
    vm = listing(cluster)[VM2]
    assert (vm["state"], vm["lnm"]) == ("run", "lnm2")
    h2.virsh("migrate-setspeed", VM2, "8796093022207")
    # Usher still drives it where it is.
    assert ush(cluster, "pause", VM2)["done"] == [{"name": VM2, "state": "paused"}]
    assert ush(cluster, "resume", VM2)["done"] == [{"name": VM2, "state": "run"}]

    # --- shutdown -----------------------------------------------------------------------------
    with steps("shutdown both (ACPI)"):
        result = ush(cluster, "shutdown", "-n", CLUSTER)
    assert [d["state"] for d in result["done"]] == ["shutoff", "shutoff"]
    assert domain_state(h2, VM1) == "shut off" and domain_state(h2, VM2) == "shut off"

    # --- behind Usher's back, with virsh (the LNMs' scans are minutes apart:
    # only libvirt's lifecycle events can tell them) ----------------------------------------
    with steps("virsh start / destroy / undefine of 1 seen in ush list"):
        h2.virsh("start", VM1)
        wait_for_state(cluster, VM1, "run", "lnm2")
        h2.virsh("destroy", VM1)
        wait_for_state(cluster, VM1, "shutoff", "lnm2")
        h2.virsh("undefine", VM1)
        wait_for_state(cluster, VM1, "missing")

    xml_dir = os.path.join(cluster.dir, "xml")
    os.makedirs(xml_dir, exist_ok=True)
    for name in (ADOPTED, FOREIGN):
        with open(os.path.join(xml_dir, f"{name}.xml"), "w") as f:
            f.write(BARE_GUEST_XML.format(name=name))
    with steps("virsh create under a managed name: quarantined"):
        # Anyone with access to a host could forge a managed name: the VM is
        # not handed to the user it names (README "Security").
        h1.virsh("create", os.path.join(xml_dir, f"{ADOPTED}.xml"))

        def quarantined():
            vm = listing(cluster, "-a").get(ADOPTED)
            return vm is not None and vm.get("quarantined") and vm["lnm"] == "lnm1"
        wait_for(quarantined, EVENT_TIMEOUT, f"ush list -a to show {ADOPTED} quarantined")
    vm = listing(cluster, "-a")[ADOPTED]
    assert vm["owner"] is None and vm["managed"] is False
    with steps("virsh create under another name: unmanaged"):
        h1.virsh("create", os.path.join(xml_dir, f"{FOREIGN}.xml"))

        def listed_unmanaged():
            vm = listing(cluster, "-a").get(FOREIGN)
            return vm is not None and vm.get("managed") is False and vm["lnm"] == "lnm1"
        wait_for(listed_unmanaged, EVENT_TIMEOUT, f"ush list -a to show {FOREIGN} unmanaged")
    # The quarantined VM is nobody's: the site removes it on the host.
    h1.virsh("destroy", ADOPTED)
    wait_for(lambda: ADOPTED not in listing(cluster, "-a"), EVENT_TIMEOUT,
             f"ush list -a to drop {ADOPTED}")
    assert domain_state(h1, ADOPTED) is None


def _check_guest_statistics(host, name):
    """libvirt's statistics calls answer real figures for a QEMU guest (the
    monitoring samples them). Not virDomainGetCPUStats: it reads the cpuacct
    cgroup, which these hosts leave alone (cgroup_controllers = [ ])."""
    conn = libvirt.open(host.uri)
    try:
        dom = conn.lookupByName(name)
        assert dom.info()[4] > 0        # CPU time, ns
        memory = dom.memoryStats()
        assert memory["actual"] == 128 * 1024 and memory["rss"] > 0
        records = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
                                         | libvirt.VIR_DOMAIN_STATS_BALLOON)
        stats = {dom.name(): values for dom, values in records}
        assert stats[name]["cpu.time"] > 0 and stats[name]["balloon.rss"] > 0
    finally:
        conn.close()
