"""Reading libvirt's figures: domain states, per-domain statistics samples
and the host's CPU and memory. Blocking: for pool threads only.

``StatisticsSampler`` takes the raw samples ``LibvirtVMM.domain_stats`` and
``node_stats`` answer (the LNM's monitor turns them into rates and
averages); the functions below it parse libvirt's answers. A figure the
driver does not report is None, never a made-up number.
"""

import xml.etree.ElementTree as ET

import libvirt

from usher import states
from usher.lnm.libvirt_connection import UNSUPPORTED, error_code

DOMAIN_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: states.RUN,
    libvirt.VIR_DOMAIN_RUNNING: states.RUN,
    libvirt.VIR_DOMAIN_BLOCKED: states.RUN,
    libvirt.VIR_DOMAIN_PAUSED: states.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: states.PAUSED,
    libvirt.VIR_DOMAIN_SHUTOFF: states.SHUTOFF,
    libvirt.VIR_DOMAIN_SHUTDOWN: states.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: states.SHUTOFF,
}

# Drivers whose statistics calls answer fixed values (the test driver: CPU
# time, block and node CPU figures never move, memoryStats is {}): passing
# them on would be making numbers up, so their statistics count as missing.
DRIVERS_WITH_FIXED_STATS = frozenset(("test",))

_BULK_STATS_GROUPS = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
                      | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_VCPU
                      | libvirt.VIR_DOMAIN_STATS_INTERFACE | libvirt.VIR_DOMAIN_STATS_BLOCK)

# The counters of a raw domain sample (``LibvirtVMM.domain_stats``).
DOMAIN_COUNTERS = ("cpu_time_ns", "net_rx_bytes", "net_tx_bytes", "disk_read_bytes",
                   "disk_write_bytes")


def read_each(domains, read):
    """[read(dom) for each of ``domains``], leaving out a domain that is gone
    since it was listed."""
    found = []
    for dom in domains:
        try:
            found.append(read(dom))
        except libvirt.libvirtError as e:
            if error_code(e) != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    return found


class StatisticsSampler:
    """Raw samples of one hypervisor's domains and host (see
    ``LibvirtVMM.domain_stats`` and ``node_stats``). One bulk call
    (``getAllDomainStats``) per sample where the driver has it; once the
    driver refuses it, per-domain calls."""

    def __init__(self):
        self.bulk = True

    def domain_samples(self, conn, *, fixed):
        """The active domains' samples; only what every driver tells truly
        when ``fixed`` (the driver's statistics are fixed values)."""
        if fixed:
            return [bare_sample(dom) for dom in _active_domains(conn)]
        if self.bulk:
            try:
                records = conn.getAllDomainStats(
                    _BULK_STATS_GROUPS, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE)
            except libvirt.libvirtError as e:
                if error_code(e) not in UNSUPPORTED:
                    raise
                self.bulk = False
            else:
                return [sample_from_bulk_stats(dom.name(), dom.UUIDString(), stats)
                        for dom, stats in records]
        return read_each(_active_domains(conn), _sample_one)

    @staticmethod
    def node_sample(conn, *, fixed):
        """The host's sample; its size and VM count only when ``fixed``."""
        _model, memory_mib, cpus = conn.getInfo()[:3]
        stats = {"cpus": cpus, "memory_kib": memory_mib * 1024, "vms": conn.numOfDomains(),
                 "cpu_busy_ns": None, "cpu_total_ns": None, "memory_used_kib": None,
                 "memory_free_kib": None}
        if fixed:
            return stats
        try:
            stats["cpu_busy_ns"], stats["cpu_total_ns"] = node_cpu_counters(
                conn.getCPUStats(libvirt.VIR_NODE_CPU_STATS_ALL_CPUS))
        except libvirt.libvirtError as e:
            if error_code(e) not in UNSUPPORTED:
                raise
        try:
            memory = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
        except libvirt.libvirtError as e:
            if error_code(e) not in UNSUPPORTED:
                raise
        else:
            stats["memory_used_kib"] = node_memory_used_kib(memory)
            stats["memory_kib"] = memory.get("total") or stats["memory_kib"]
        free_bytes = conn.getFreeMemory()
        if free_bytes > 0:
            stats["memory_free_kib"] = free_bytes // 1024
        return stats


def _active_domains(conn):
    return conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)


def bare_sample(dom, info=None):
    """What every driver tells truly: the domain, its size and state."""
    code, _max_kib, memory_kib, vcpus, _cpu_time = info or dom.info()
    sample = dict.fromkeys(DOMAIN_COUNTERS + ("memory_used_kib",))
    sample.update(name=dom.name(), uuid=dom.UUIDString(),
                  state=DOMAIN_STATES.get(code, states.UNKNOWN), vcpus=vcpus,
                  memory_kib=memory_kib)
    return sample


def _sample_one(dom):
    info = dom.info()
    sample = bare_sample(dom, info)
    sample["cpu_time_ns"] = info[4]
    interfaces, disks = device_targets(dom.XMLDesc(0))

    def summed(devices, call, fields):
        totals = [0] * len(fields)
        for device in devices:
            try:
                values = call(device)
            except libvirt.libvirtError as e:
                if (error_code(e) in UNSUPPORTED
                        or error_code(e) == libvirt.VIR_ERR_OPERATION_INVALID):
                    return [None] * len(fields)
                raise
            for i, field in enumerate(fields):
                totals[i] += values[field]
        return totals

    # interfaceStats: rx_bytes, rx_packets, rx_errs, rx_drop, tx_bytes, ...
    sample["net_rx_bytes"], sample["net_tx_bytes"] = summed(
        interfaces, dom.interfaceStats, (0, 4))
    # blockStats: rd_req, rd_bytes, wr_req, wr_bytes, errs
    sample["disk_read_bytes"], sample["disk_write_bytes"] = summed(
        disks, dom.blockStats, (1, 3))
    try:
        sample["memory_used_kib"] = memory_used_kib(dom.memoryStats())
    except libvirt.libvirtError as e:
        if error_code(e) not in UNSUPPORTED:
            raise
    return sample


# --- parsing libvirt's answers ----------------------------------------------------

def _summed(stats, group, field):
    """Sum ``<group>.<i>.<field>`` over ``<group>.count`` devices of a bulk
    stats record; None when the driver did not report the group or the field
    (a domain without devices has a true 0)."""
    count = stats.get(f"{group}.count")
    if count is None:
        return None
    total = 0
    for index in range(count):
        value = stats.get(f"{group}.{index}.{field}")
        if value is None:
            return None
        total += value
    return total


def memory_used_kib(balloon):
    """A VM's memory in use from balloon/memoryStats figures (KiB): its
    resident set on the host, else the guest's own view (available minus
    unused), else None."""
    rss = balloon.get("rss")
    if rss:
        return rss
    available, unused = balloon.get("available"), balloon.get("unused")
    if available is not None and unused is not None:
        return max(available - unused, 0)
    return None


def sample_from_bulk_stats(name, uuid, stats):
    """One ``getAllDomainStats`` record -> a raw domain sample (see
    ``LibvirtVMM.domain_stats``); None where the driver reported nothing."""
    code = stats.get("state.state")
    balloon = {key: stats.get(f"balloon.{key}") for key in ("rss", "available", "unused")}
    return {
        "name": name,
        "uuid": uuid,
        "state": DOMAIN_STATES.get(code, states.UNKNOWN) if code is not None else None,
        "vcpus": stats.get("vcpu.current"),
        "memory_kib": stats.get("balloon.current"),
        "cpu_time_ns": stats.get("cpu.time"),
        "net_rx_bytes": _summed(stats, "net", "rx.bytes"),
        "net_tx_bytes": _summed(stats, "net", "tx.bytes"),
        "disk_read_bytes": _summed(stats, "block", "rd.bytes"),
        "disk_write_bytes": _summed(stats, "block", "wr.bytes"),
        "memory_used_kib": memory_used_kib(balloon),
    }


def device_targets(xml):
    """A live domain definition -> (interface target devices, disk target
    devices): the names interfaceStats and blockStats take."""
    root = ET.fromstring(xml)
    interfaces = [t.get("dev") for t in root.findall("./devices/interface/target")
                  if t.get("dev")]
    disks = [t.get("dev") for t in root.findall("./devices/disk/target") if t.get("dev")]
    return interfaces, disks


def node_cpu_counters(cpu_stats):
    """``conn.getCPUStats(ALL_CPUS)`` -> (busy ns, total ns), or (None, None)
    when the driver's answer lacks the fields."""
    try:
        busy = cpu_stats["kernel"] + cpu_stats["user"]
        total = busy + cpu_stats["idle"] + cpu_stats.get("iowait", 0)
    except (KeyError, TypeError):
        return None, None
    return busy, total


def node_memory_used_kib(memory_stats):
    """``conn.getMemoryStats(ALL_CELLS)`` -> KiB in use (total less free,
    buffers and cache, as free(1) counts it), or None."""
    try:
        return max(memory_stats["total"] - memory_stats["free"]
                   - memory_stats.get("buffers", 0) - memory_stats.get("cached", 0), 0)
    except (KeyError, TypeError):
        return None


def host_memory_kib(conn):
    """A real host's memory -> (total KiB, free KiB or None).

    From the whole host's memory statistics (``/proc/meminfo`` on Linux)
    where the driver has them. ``getInfo`` and ``getFreeMemory`` add up the
    NUMA cells instead, which on some machines cover only part of the memory
    (measured: 4.7 GiB of cells on a 24 GiB host), so they are the fallback.
    """
    try:
        stats = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
    except libvirt.libvirtError as e:
        if error_code(e) not in UNSUPPORTED:
            raise
        stats = {}
    total, free = stats.get("total"), stats.get("free")
    if not total:
        total = conn.getInfo()[1] * 1024
    if free is None:
        free_bytes = conn.getFreeMemory()
        free = free_bytes // 1024 if free_bytes > 0 else None
    return total, free
