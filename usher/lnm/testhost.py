"""Simulated hosts on libvirt's test driver: the LNM's embedded default.

``write_test_host`` writes a test-driver node file (CPUs, memory, CPU model,
no predefined domains) and returns its ``test:///...`` URI. Each connection to
such a file is an independent in-process hypervisor, so several LNMs in one
process, each with its own file, are several independent hosts.

The test driver answers ``getHostname`` with the real machine's name, so the
simulated host's name is kept in the node file in Usher's own namespace
(libvirt ignores elements it does not know) and read back with
``read_test_host``.

Both functions block (file I/O): call them at start-up or from a thread.
"""

import os
import tempfile
import urllib.parse
import xml.etree.ElementTree as ET

from usher.errors import ConfigError

HOST_NS = "https://usher.invalid/xmlns/host/1"

# virNodeInfo.model is a char[32]: the test driver refuses longer models.
MAX_MODEL_BYTES = 31
CPU_MHZ = 2000


def node_file_uri(path):
    """The libvirt URI of a test-driver node file (percent-encoded path)."""
    return "test://" + urllib.parse.quote(os.path.abspath(path), safe="/")


def _positive(field, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"test host {field} must be a positive whole number, "
                          f"not {value!r}")
    return value


def write_test_host(path, *, hostname, cpus, memory_mib, model):
    """Write a test-driver node file at path and return its URI."""
    if not isinstance(hostname, str) or not hostname.strip():
        raise ConfigError(f"test host hostname must be a non-empty string, not {hostname!r}")
    _positive("cpus", cpus)
    _positive("memory_mib", memory_mib)
    if not isinstance(model, str) or not model or len(model.encode()) > MAX_MODEL_BYTES:
        raise ConfigError(f"test host CPU model must be 1 to {MAX_MODEL_BYTES} bytes, "
                          f"not {model!r}")
    node = ET.Element("node")
    cpu = ET.SubElement(node, "cpu")
    for tag, value in (("mhz", CPU_MHZ), ("model", model), ("active", cpus),
                       ("nodes", 1), ("sockets", 1), ("cores", cpus),
                       ("threads", 1)):
        ET.SubElement(cpu, tag).text = str(value)
    ET.SubElement(node, "memory").text = str(memory_mib * 1024)  # KiB
    ET.SubElement(node, "usher:host", {"xmlns:usher": HOST_NS, "hostname": hostname})
    text = ET.tostring(node, encoding="unicode")

    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    # Replace atomically: a libvirt connection opened meanwhile reads a whole file.
    fd, tmp = tempfile.mkstemp(prefix=".node-", suffix=".xml", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write('<?xml version="1.0" encoding="UTF-8"?>\n' + text + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return node_file_uri(path)


def is_test_uri(uri):
    """Is ``uri`` one of libvirt's test driver (``test:///...``, ``test+tcp://...``)?"""
    return urllib.parse.urlsplit(uri).scheme.lower().split("+")[0] == "test"


def node_file_path(uri):
    """The node file of a ``test:///path`` URI, or None (other drivers,
    ``test:///default``)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != "test" or parts.path in ("", "/", "/default"):
        return None
    return urllib.parse.unquote(parts.path)


def read_test_host(uri):
    """{"hostname": ...} from a node file written by write_test_host, or None."""
    path = node_file_path(uri)
    if path is None:
        return None
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    host = root.find(f"{{{HOST_NS}}}host")
    if host is None or not host.get("hostname"):
        return None
    return {"hostname": host.get("hostname")}
