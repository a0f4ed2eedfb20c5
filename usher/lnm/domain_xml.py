"""libvirt domain XML for Usher VMs: validating a VM spec and building its XML.

A spec is what the controller sends to ``IVMM.create``: ``name``, ``uuid``,
``memory_mib``, ``vcpus``, ``owner``, ``cluster`` and ``args`` (free-form
request arguments). ``normalize_spec`` checks it and returns a clean copy;
``build_domain_xml`` turns it into domain XML from

- a built-in template for libvirt's test driver (``<domain type='test'>``),
- a built-in template for QEMU (``<domain type='qemu'>`` by default; direct
  kernel boot from ``kernel``/``initrd``/``cmdline`` or a ``disk`` image,
  serial console logged to ``<state_dir>/consoles/<name>.log``), or
- a site template file (``DomainTemplate``) in ``string.Template`` syntax.

Every domain carries Usher's metadata element::

    <metadata>
      <usher:vm xmlns:usher="https://usher.invalid/xmlns/vm/1"
                owner="..." cluster="..."/>
    </metadata>

which ``read_usher_metadata`` reads back. Nothing here touches libvirt or
blocks, except ``DomainTemplate.from_file`` (one file read).
"""

import os
import re
import string
import uuid as uuidlib
import xml.etree.ElementTree as ET
from xml.dom import minidom
from xml.parsers.expat import ExpatError
from xml.sax.saxutils import escape as _escape_text

from usher.errors import ConfigError, InvalidRequest

USHER_NS = "https://usher.invalid/xmlns/vm/1"
USHER_PREFIX = "usher"

# Variables every site template may use; request args may not redefine them.
TEMPLATE_VARIABLES = ("name", "uuid", "memory_kib", "memory_mib", "vcpus",
                      "owner", "cluster", "state_dir", "console_path")

# Keys of args (or of the LNM's template defaults) the built-in QEMU template
# understands.
QEMU_ARGS = ("domain_type", "kernel", "initrd", "cmdline", "disk",
             "disk_format", "disk_cache", "network", "bridge")

# A VM name becomes a file name (<name>.save, <name>.log): keep it well
# inside NAME_MAX (255 bytes) once a suffix is added.
MAX_NAME_BYTES = 200
MAX_MEMORY_MIB = 16 * 1024 * 1024   # 16 TiB
MAX_VCPUS = 4096

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# Characters XML 1.0 cannot carry at all, escaped or not.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_ARG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def check_name(name):
    """Return name if it can name a domain and its files; else InvalidRequest."""
    if not isinstance(name, str):
        raise InvalidRequest(f"a VM name must be a string, not {type(name).__name__}")
    if not name.strip():
        raise InvalidRequest("a VM name must not be empty or blank")
    if "/" in name:
        raise InvalidRequest(f"VM name {name!r} must not contain '/'")
    if _CONTROL_CHARS.search(name) or _XML_ILLEGAL.search(name):
        raise InvalidRequest(f"VM name {name!r} must not contain control characters")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise InvalidRequest(f"VM name {name[:40]!r}... is longer than "
                             f"{MAX_NAME_BYTES} bytes")
    return name


def _check_text(field, value, *, allow_none=True):
    if value is None and allow_none:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"spec field {field!r} must be a string, "
                             f"not {type(value).__name__}")
    if _XML_ILLEGAL.search(value):
        raise InvalidRequest(f"spec field {field!r} contains characters that "
                             "cannot be stored (control characters)")
    return value


def _check_count(field, value, maximum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"spec field {field!r} must be a whole number, "
                             f"not {value!r}")
    if not 1 <= value <= maximum:
        raise InvalidRequest(f"spec field {field!r} must be between 1 and "
                             f"{maximum}, not {value}")
    return value


def _check_args(args):
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise InvalidRequest(f"spec field 'args' must be a dict, "
                             f"not {type(args).__name__}")
    clean = {}
    for key, value in args.items():
        if not isinstance(key, str) or not _ARG_KEY.match(key):
            raise InvalidRequest(f"argument name {key!r} must be a letter or "
                                 "underscore followed by letters, digits or "
                                 "underscores")
        if key in TEMPLATE_VARIABLES:
            raise InvalidRequest(f"argument {key!r} is reserved: it is set from "
                                 "the VM spec itself")
        if isinstance(value, bool):
            value = "yes" if value else "no"
        elif isinstance(value, (int, float)):
            value = str(value)
        elif not isinstance(value, str):
            raise InvalidRequest(f"argument {key!r} must be a string or a "
                                 f"number, not {type(value).__name__}")
        if _XML_ILLEGAL.search(value):
            raise InvalidRequest(f"argument {key!r} contains control characters")
        clean[key] = value
    return clean


def normalize_spec(spec):
    """Check a VM spec and return a clean copy (uuid generated when absent).

    Raises InvalidRequest naming the first bad field; the spec passed in is
    not modified.
    """
    if not isinstance(spec, dict):
        raise InvalidRequest(f"a VM spec must be a dict, not {type(spec).__name__}")
    missing = [f for f in ("name", "memory_mib", "vcpus") if f not in spec]
    if missing:
        raise InvalidRequest(f"VM spec lacks {', '.join(missing)}")
    raw_uuid = spec.get("uuid")
    if raw_uuid is None:
        vm_uuid = str(uuidlib.uuid4())
    else:
        try:
            vm_uuid = str(uuidlib.UUID(str(raw_uuid)))
        except ValueError:
            raise InvalidRequest(f"spec field 'uuid' is not a UUID: {raw_uuid!r}") from None
    return {
        "name": check_name(spec["name"]),
        "uuid": vm_uuid,
        "memory_mib": _check_count("memory_mib", spec["memory_mib"], MAX_MEMORY_MIB),
        "vcpus": _check_count("vcpus", spec["vcpus"], MAX_VCPUS),
        "owner": _check_text("owner", spec.get("owner")),
        "cluster": _check_text("cluster", spec.get("cluster")),
        "args": _check_args(spec.get("args")),
    }


def console_path(state_dir, name):
    """Where the built-in QEMU template logs a VM's serial console."""
    return os.path.join(os.path.abspath(state_dir), "consoles", f"{name}.log")


def template_values(spec, state_dir, defaults=None):
    """The variables a template sees: defaults, then args, then the spec."""
    values = dict(defaults or {})
    values.update(spec["args"])
    values.update({
        "name": spec["name"],
        "uuid": spec["uuid"],
        "memory_kib": str(spec["memory_mib"] * 1024),
        "memory_mib": str(spec["memory_mib"]),
        "vcpus": str(spec["vcpus"]),
        "owner": spec["owner"],
        "cluster": spec["cluster"],
        "state_dir": os.path.abspath(state_dir),
        "console_path": console_path(state_dir, spec["name"]),
    })
    return values


# --- built-in templates (xml.etree: every value is escaped by the serializer)

def _usher_metadata_element(parent, owner, cluster):
    # A literal prefixed tag with its own xmlns attribute keeps the namespace
    # declaration on this element (not hoisted to <domain>) and leaves
    # ElementTree's process-wide prefix registry alone.
    return ET.SubElement(parent, f"{USHER_PREFIX}:vm", {
        f"xmlns:{USHER_PREFIX}": USHER_NS, "owner": owner, "cluster": cluster})


def _domain_skeleton(domain_type, spec):
    root = ET.Element("domain", {"type": domain_type})
    ET.SubElement(root, "name").text = spec["name"]
    ET.SubElement(root, "uuid").text = spec["uuid"]
    _usher_metadata_element(ET.SubElement(root, "metadata"),
                            spec["owner"], spec["cluster"])
    ET.SubElement(root, "memory", {"unit": "KiB"}).text = str(spec["memory_mib"] * 1024)
    ET.SubElement(root, "vcpu").text = str(spec["vcpus"])
    return root


def _lifecycle_actions(root):
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"),
                          ("on_crash", "destroy")):
        ET.SubElement(root, event).text = action


def _build_test(spec):
    root = _domain_skeleton("test", spec)
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type").text = "hvm"
    _lifecycle_actions(root)
    return ET.tostring(root, encoding="unicode")


def _build_qemu(spec, state_dir, defaults):
    values = dict(defaults or {})
    values.update(spec["args"])
    domain_type = values.get("domain_type", "qemu")
    if domain_type not in ("qemu", "kvm"):
        raise InvalidRequest(f"domain_type must be 'qemu' or 'kvm', not {domain_type!r}")
    kernel, disk = values.get("kernel"), values.get("disk")
    if not kernel and not disk:
        raise InvalidRequest(
            f"VM {spec['name']!r} needs a kernel (args kernel=, initrd=, cmdline=) "
            "or a disk image (args disk=) for the built-in QEMU template; "
            "pass them with the request or set them in the LNM's template defaults")
    root = _domain_skeleton(domain_type, spec)
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type").text = "hvm"
    if kernel:
        ET.SubElement(os_el, "kernel").text = kernel
        if values.get("initrd"):
            ET.SubElement(os_el, "initrd").text = values["initrd"]
        ET.SubElement(os_el, "cmdline").text = values.get("cmdline", "console=ttyS0")
    else:
        ET.SubElement(os_el, "boot", {"dev": "hd"})
    # ACPI is what lets the guest see the power button of a "shutdown".
    ET.SubElement(ET.SubElement(root, "features"), "acpi")
    _lifecycle_actions(root)
    devices = ET.SubElement(root, "devices")
    if disk:
        disk_format = values.get("disk_format") or (
            "qcow2" if disk.endswith(".qcow2") else "raw")
        disk_el = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
        driver = {"name": "qemu", "type": disk_format}
        if values.get("disk_cache"):
            # libvirt live-migrates a disk on shared storage only with
            # cache none or directsync (else "unsafe migration").
            driver["cache"] = values["disk_cache"]
        ET.SubElement(disk_el, "driver", driver)
        ET.SubElement(disk_el, "source", {"file": disk})
        ET.SubElement(disk_el, "target", {"dev": "vda", "bus": "virtio"})
    for kind in ("network", "bridge"):
        if values.get(kind):
            nic = ET.SubElement(devices, "interface", {"type": kind})
            ET.SubElement(nic, "source", {kind: values[kind]})
            ET.SubElement(nic, "model", {"type": "virtio"})
    serial = ET.SubElement(devices, "serial", {"type": "file"})
    # Appended, not truncated: after a restore or a live migration a new QEMU
    # process opens the same log while the guest keeps writing to it.
    ET.SubElement(serial, "source", {"path": console_path(state_dir, spec["name"]),
                                     "append": "on"})
    ET.SubElement(serial, "target", {"port": "0"})
    return ET.tostring(root, encoding="unicode")


BUILTIN_DRIVERS = ("test", "qemu")


# --- site templates ---------------------------------------------------------

def _escape(value):
    """Escape for XML text and for attribute values in either quote style."""
    return _escape_text(value, {'"': "&quot;", "'": "&apos;"})


class DomainTemplate:
    """A site's domain XML template in ``string.Template`` syntax.

    Values are XML-escaped before substitution, so a placeholder is safe in
    element text and in attribute values. The template must produce a
    ``<domain>`` whose ``<name>`` is ``${name}``.
    """

    def __init__(self, text, source="<template>"):
        self.source = source
        self._template = string.Template(text)
        self.identifiers = frozenset(self._template.get_identifiers())
        try:
            sample = self._template.substitute(
                {ident: "1" for ident in self.identifiers} | {"name": "usher-sample"})
        except ValueError as e:
            raise ConfigError(f"domain template {source}: {e}") from None
        root = self._parse(sample, ConfigError)
        names = [n for n in root.childNodes if n.nodeType == n.ELEMENT_NODE
                 and n.tagName == "name"]
        if len(names) != 1 or _text_of(names[0]) != "usher-sample":
            raise ConfigError(f"domain template {source}: it must contain "
                              "exactly one <name>${name}</name>")

    @classmethod
    def from_file(cls, path):
        """Read a template file (blocking). Raises ConfigError."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read domain template {path}: {e}") from None
        return cls(text, source=str(path))

    def _parse(self, text, error):
        try:
            doc = minidom.parseString(text)
        except ExpatError as e:
            raise error(f"domain template {self.source} does not give "
                        f"well-formed XML: {e}") from None
        root = doc.documentElement
        if root.tagName != "domain":
            raise error(f"domain template {self.source}: the root element is "
                        f"<{root.tagName}>, not <domain>")
        return root

    def render(self, spec, state_dir, defaults=None):
        values = template_values(spec, state_dir, defaults)
        missing = sorted(self.identifiers - values.keys())
        if missing:
            wanted = ", ".join("${%s}" % m for m in missing)
            raise InvalidRequest(
                f"domain template {self.source} needs {wanted}: pass it as a "
                "request argument or set it in the LNM's template defaults")
        text = self._template.substitute(
            {k: _escape(v) for k, v in values.items() if k in self.identifiers})
        root = self._parse(text, InvalidRequest)
        _embed_metadata_dom(root, spec["owner"], spec["cluster"])
        # minidom keeps the site's own namespace prefixes (qemu:commandline,
        # ...) exactly as written, which ElementTree would rename.
        return root.toxml()


def _text_of(node):
    return "".join(c.data for c in node.childNodes if c.nodeType == c.TEXT_NODE)


def _embed_metadata_dom(root, owner, cluster):
    doc = root.ownerDocument
    metadata = next((n for n in root.childNodes if n.nodeType == n.ELEMENT_NODE
                     and n.tagName == "metadata"), None)
    if metadata is None:
        metadata = doc.createElement("metadata")
        root.appendChild(metadata)
    for old in [n for n in metadata.childNodes if n.nodeType == n.ELEMENT_NODE
                and n.namespaceURI == USHER_NS]:
        metadata.removeChild(old)
    element = doc.createElementNS(USHER_NS, f"{USHER_PREFIX}:vm")
    element.setAttribute(f"xmlns:{USHER_PREFIX}", USHER_NS)
    element.setAttribute("owner", owner)
    element.setAttribute("cluster", cluster)
    metadata.appendChild(element)


def build_domain_xml(spec, *, driver, state_dir, template=None, defaults=None):
    """Domain XML for a normalized spec.

    ``driver`` is the libvirt driver name in lower case ("test", "qemu");
    ``template`` a DomainTemplate that replaces the built-in one;
    ``defaults`` template variables (kernel, initrd, ...) that request args
    override.
    """
    if template is not None:
        return template.render(spec, state_dir, defaults)
    if driver == "test":
        return _build_test(spec)
    if driver == "qemu":
        return _build_qemu(spec, state_dir, defaults)
    raise ConfigError(f"there is no built-in domain template for the {driver!r} "
                      "driver: configure a domain template file")


# --- reading back -------------------------------------------------------------

def read_usher_metadata(text):
    """Usher's metadata as a dict, from libvirt's metadata element (what
    ``virDomain.metadata`` returns) or from a whole domain XML; {} if absent."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return {}
    if root.tag == "domain":
        root = root.find(f"metadata/{{{USHER_NS}}}vm")
        if root is None:
            return {}
    return {k: v for k, v in root.attrib.items() if not k.startswith("{")}


def domain_identity(text):
    """(name, uuid or None) of a domain XML document; InvalidRequest if it is not one."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise InvalidRequest(f"not well-formed domain XML: {e}") from None
    if root.tag != "domain" or root.findtext("name") is None:
        raise InvalidRequest("not a libvirt domain XML document (no <domain> with a <name>)")
    vm_uuid = root.findtext("uuid")
    return root.findtext("name"), (vm_uuid.strip().lower() if vm_uuid else None)
