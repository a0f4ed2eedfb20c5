"""Blocking building blocks on libvirt domains, for the pool threads of a
``LibvirtVMM``: finding, reading, undefining and restoring a domain, asking a
guest to shut down, waiting, and one lock per VM name. Each works for every
driver: where a driver refuses a flag, the plainer call follows.
"""

import threading
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager, suppress

import libvirt

from usher.lnm import domain_xml
from usher.lnm.libvirt_connection import UNSUPPORTED, error_code

SHUTDOWN_POLL_INTERVAL = 0.25

# Tried in order: drivers reject flags they do not know (the test driver
# refuses NVRAM), and a plain undefine is the last resort.
_UNDEFINE_FLAG_SETS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM,
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA,
    0,
)


def wait_until(predicate, timeout, *, interval=SHUTDOWN_POLL_INTERVAL,
               clock=time.monotonic, sleep=time.sleep):
    """Poll predicate until it is true (-> True) or timeout seconds pass
    (-> False). Blocking: for pool threads only."""
    deadline = clock() + timeout
    while not predicate():
        remaining = deadline - clock()
        if remaining <= 0:
            return False
        sleep(min(interval, remaining))
    return True


class NameLocks:
    """One lock per VM name, so composite operations (shutdown and wait,
    cycle, hibernate, export) on one VM do not interleave."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks = {}  # name -> [lock, holders and waiters]

    @contextmanager
    def hold(self, name):
        with self._guard:
            entry = self._locks.setdefault(name, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[name]


def lookup_or_none(conn, name):
    """The domain ``name``, or None when there is none."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if error_code(e) == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def read_metadata(dom):
    """A domain's Usher metadata (owner, cluster, ...); {} for a domain
    Usher did not create."""
    try:
        fragment = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                domain_xml.USHER_NS, 0)
    except libvirt.libvirtError as e:
        if error_code(e) == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return {}
        if error_code(e) not in UNSUPPORTED:
            raise
        return domain_xml.read_usher_metadata(dom.XMLDesc(0))
    return domain_xml.read_usher_metadata(fragment)


def defined_identity(xml):
    """The definition ``xml`` -> (its UUID or None, its Usher metadata)."""
    root = ET.fromstring(xml)
    uuid = (root.findtext("uuid") or "").strip().lower() or None
    element = root.find(f"metadata/{{{domain_xml.USHER_NS}}}vm")
    metadata = ({k: v for k, v in element.attrib.items() if not k.startswith("{")}
                if element is not None else {})
    return uuid, metadata


def undefine(dom):
    """Remove the domain's definition, with its managed save, snapshot
    metadata and NVRAM where the driver has them."""
    for flags in _UNDEFINE_FLAG_SETS:
        try:
            if flags:
                dom.undefineFlags(flags)
            else:
                dom.undefine()
            return
        except libvirt.libvirtError as e:
            if flags == 0 or error_code(e) not in UNSUPPORTED:
                raise


def restore(conn, name, path, *, paused):
    """Boot the domain ``name`` from the memory image at ``path``, paused or
    running -> the domain."""
    flag = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
    try:
        conn.restoreFlags(path, None, flag)
    except libvirt.libvirtError as e:
        if error_code(e) not in UNSUPPORTED:
            raise
        conn.restore(path)  # the test driver takes no flags
    dom = conn.lookupByName(name)
    code = dom.state()[0]
    if paused and code == libvirt.VIR_DOMAIN_RUNNING:
        dom.suspend()
    elif not paused and code == libvirt.VIR_DOMAIN_PAUSED:
        dom.resume()
    return dom


def request_shutdown(dom):
    """Press the guest's power button (or the driver's own way of asking)."""
    try:
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    except libvirt.libvirtError as e:
        if error_code(e) not in UNSUPPORTED:
            raise
        dom.shutdown()  # drivers without the ACPI flag pick their own way


def undefine_quietly(dom):
    """Undefine a domain whose creation failed halfway; its own error is the
    one to report."""
    with suppress(libvirt.libvirtError):
        undefine(dom)
