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
blocks, except ``DomainTemplate.from_file`` (one file read) and
``ArgPolicy.check`` (a few ``stat`` calls: run it in the LNM's thread pool).

What a VM's args may put into its definition is the LNM's ``ArgPolicy``:
args are untrusted (a user's request) unless the controller marked them as
set by its plugins (the spec's ``plugin_args``: names, computed by the
controller, never by a client). Only the template variables the LNM's
``request_args`` (or, for plugin values, ``plugin_args``) option lists may be
set; host paths are canonicalised and must lie in ``image_dirs`` (never in
the LNM's state directory: hibernation images, consoles); enumerations come
from fixed sets and devices from the sets the LNM configures. The LNM's own
``[[domain]]`` defaults are the site's and are not checked. Args that are no
template variable (``os``, ``guaranteed`` ...) never reach the XML. A VM's
MAC, addresses and VLAN (set by the controller's address-management plugin):
``usher.lnm.guest_network``.
"""

import os
import re
import stat
import string
import uuid as uuidlib
import xml.etree.ElementTree as ET
from xml.dom import minidom
from xml.parsers.expat import ExpatError
from xml.sax.saxutils import escape as _escape_text

from usher.errors import ConfigError, InvalidRequest
from usher.lnm import guest_network

USHER_NS = "https://usher.invalid/xmlns/vm/1"
USHER_PREFIX = "usher"

# Variables every site template may use; request args may not redefine them.
TEMPLATE_VARIABLES = ("name", "uuid", "memory_kib", "memory_mib", "vcpus",
                      "owner", "cluster", "state_dir", "console_path",
                      *guest_network.DERIVED_VARIABLES)

# Keys of args (or of the LNM's template defaults) the built-in QEMU template
# understands.
QEMU_ARGS = ("domain_type", "kernel", "initrd", "cmdline", "disk",
             "disk_format", "disk_cache", "network", "bridge",
             *guest_network.NETWORK_VARIABLES)

# What each template variable a VM's args may set is, and how its value is
# checked (``ArgPolicy``; etc/lnm.config.orig documents each one):
# host files: canonicalised (realpath), inside the LNM's image_dirs;
PATH_VARIABLES = ("kernel", "initrd", "disk", "cdrom")
# fixed sets of values;
ENUM_VARIABLES = {
    "domain_type": ("qemu", "kvm"),
    "disk_format": ("raw", "qcow2", "qed", "vmdk", "vdi", "vpc", "vhdx"),
    "disk_cache": ("default", "none", "writethrough", "writeback", "directsync", "unsafe"),
    "disk_bus": ("virtio", "sata", "scsi", "ide", "usb"),
    "net_model": ("virtio", "e1000", "e1000e", "rtl8139"),
}
# host devices: from the set the LNM's option of that name gives;
DEVICE_VARIABLES = {"bridge": "bridges", "network": "networks"}
# the guest's MAC, addresses and VLAN: usher.lnm.guest_network.check_value;
# free text (XML-escaped), e.g. the guest kernel's command line: cmdline and
# every other ${variable} of a site template.
KNOWN_VARIABLES = frozenset(QEMU_ARGS + PATH_VARIABLES) | set(ENUM_VARIABLES) | set(
    DEVICE_VARIABLES)

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


def _check_plugin_args(names, args):
    """The spec's ``plugin_args``: the names of the args the controller's
    plugins set (the site's values, not the user's) -> a sorted list of those
    present in ``args``."""
    if names is None:
        return []
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise InvalidRequest("spec field 'plugin_args' must be a list of argument names")
    return sorted(set(names) & set(args))


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
    args = _check_args(spec.get("args"))
    return {
        "name": check_name(spec["name"]),
        "uuid": vm_uuid,
        "memory_mib": _check_count("memory_mib", spec["memory_mib"], MAX_MEMORY_MIB),
        "vcpus": _check_count("vcpus", spec["vcpus"], MAX_VCPUS),
        "owner": _check_text("owner", spec.get("owner")),
        "cluster": _check_text("cluster", spec.get("cluster")),
        "args": args,
        "plugin_args": _check_plugin_args(spec.get("plugin_args"), args),
    }


def console_path(state_dir, name):
    """Where the built-in QEMU template logs a VM's serial console."""
    return os.path.join(os.path.abspath(state_dir), "consoles", f"{name}.log")


def _inside(path, directory):
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _names(option, names):
    names = list(names or ())
    bad = [n for n in names if not isinstance(n, str) or not _ARG_KEY.match(n)
           or n in TEMPLATE_VARIABLES]
    if bad:
        raise ConfigError(f"[lnm] {option}: {', '.join(map(repr, bad))} cannot be set by "
                          "a VM's args (not a variable name, or set from the VM spec)")
    return frozenset(names)


class ArgPolicy:
    """What a VM's args may set in its domain definition on this LNM (the
    [lnm] options of the same names; empty: nothing).

    ``request_args``: template variables a user's request may set;
    ``plugin_args``: those the controller's plugins may set (the spec's
    ``plugin_args`` names them); ``image_dirs``: where host files named by
    path variables (``PATH_VARIABLES`` and ``path_args``) must lie once
    canonicalised; ``bridges``, ``networks``: the host devices a VM may be
    attached to; ``vlan_tags``: whether a ``vlan`` arg tags the interface
    (usher.lnm.guest_network). ``state_dir`` (hibernation images, consoles)
    is never an image directory. Directories are canonicalised here: build it
    at start-up.
    """

    def __init__(self, *, state_dir, request_args=(), plugin_args=(), image_dirs=(),
                 bridges=(), networks=(), path_args=(), vlan_tags=False):
        self.vlan_tags = bool(vlan_tags)
        self.request_args = _names("request_args", request_args)
        self.plugin_args = _names("plugin_args", plugin_args)
        self.path_variables = frozenset(PATH_VARIABLES) | _names("path_args", path_args)
        self.state_dir = os.path.realpath(state_dir)
        dirs = []
        for directory in image_dirs or ():
            if not isinstance(directory, str) or not os.path.isabs(directory):
                raise ConfigError(f"[lnm] image_dirs: {directory!r} is not an absolute path")
            real = os.path.realpath(directory)
            if _inside(real, self.state_dir) or _inside(self.state_dir, real):
                raise ConfigError(
                    f"[lnm] image_dirs: {directory} overlaps the LNM's state_dir "
                    f"{self.state_dir} (hibernation images, consoles): never an image "
                    "directory")
            dirs.append(real)
        self.image_dirs = tuple(dirs)
        self.devices = {"bridge": frozenset(bridges or ()),
                        "network": frozenset(networks or ())}

    def variables(self, template=None):
        """The template variables args may reach: the built-in ones (on every
        driver, so a request means the same on every host), the site
        template's, and the path variables."""
        found = KNOWN_VARIABLES | self.path_variables
        if template is not None:
            found = found | (template.identifiers - set(TEMPLATE_VARIABLES))
        return found

    def check(self, spec, template=None):
        """The template variables a normalized spec's args set, checked ->
        {name: value} (paths canonical); InvalidRequest saying why not.
        Blocking (stat): the LNM's thread pool."""
        variables = self.variables(template)
        by_plugin = set(spec.get("plugin_args") or ())
        values = {}
        for key, value in spec["args"].items():
            if key not in variables:
                continue          # not for the template: kept in the record only
            if key in by_plugin:
                allowed, option, who = self.plugin_args, "plugin_args", "a plugin"
            else:
                allowed, option, who = self.request_args, "request_args", "a request"
            if key not in allowed:
                listed = ", ".join(sorted(allowed)) or "none"
                raise InvalidRequest(f"argument {key!r} may not be set by {who} on this "
                                     f"host (its {option}: {listed})")
            values[key] = self._value(key, value)
        return values

    def _value(self, key, value):
        if key in self.path_variables:
            return self.confine(key, value)
        if key in ENUM_VARIABLES:
            if value not in ENUM_VARIABLES[key]:
                raise InvalidRequest(f"argument {key!r} must be one of "
                                     f"{', '.join(ENUM_VARIABLES[key])}, not {value[:64]!r}")
            return value
        if key in DEVICE_VARIABLES:
            offered = self.devices[key]
            if value not in offered:
                raise InvalidRequest(
                    f"argument {key!r}: {value[:64]!r} is not one this host offers "
                    f"(its {DEVICE_VARIABLES[key]}: {', '.join(sorted(offered)) or 'none'})")
            return value
        if key in guest_network.NETWORK_VARIABLES:
            return guest_network.check_value(key, value)
        return value

    def confine(self, key, value, *, directory=False, what=None):
        """A host path named by ``key`` -> its canonical form, if it lies in
        an image directory (never the state directory) and is a file or a
        block device (or, with ``directory``, a directory); else
        InvalidRequest saying why (``what`` names the value: default
        "argument 'key'"). Blocking (stat)."""
        what = what or f"argument {key!r}"
        if not os.path.isabs(value):
            raise InvalidRequest(f"{what} must be an absolute path, "
                                 f"not {value[:64]!r}")
        if ".." in value.split(os.sep):
            raise InvalidRequest(f"{what} must not contain '..'")
        real = os.path.realpath(value)
        if _inside(real, self.state_dir):
            raise InvalidRequest(f"{what}: {value[:200]} is in the host's Usher "
                                 "state directory (hibernation images, consoles), never "
                                 "an image")
        if not any(_inside(real, d) for d in self.image_dirs):
            dirs = ", ".join(self.image_dirs) or "none configured"
            raise InvalidRequest(f"{what}: {value[:200]} is not inside this "
                                 f"host's image directories ({dirs})")
        try:
            mode = os.stat(real).st_mode
        except OSError as e:
            raise InvalidRequest(f"{what}: {value[:200]}: no usable image there "
                                 f"({e.strerror})") from None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)
                or (directory and stat.S_ISDIR(mode))):
            kinds = "a file, a block device or a directory" if directory else (
                "a file or a block device")
            raise InvalidRequest(f"{what}: {value[:200]} is not {kinds}")
        return real


def template_values(spec, state_dir, variables=None):
    """The variables a template sees: ``variables`` (the LNM's defaults and
    the args its ArgPolicy let through), then the spec's own."""
    values = dict(variables or {})
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


def _build_qemu(spec, state_dir, values, network, vlan_tags):
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
        ET.SubElement(os_el, "cmdline").text = guest_network.guest_cmdline(
            values.get("cmdline", "console=ttyS0"), network, spec["name"])
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
    guest_network.add_interfaces(devices, values, vlan_tags=vlan_tags)
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

    def render(self, spec, state_dir, variables=None):
        """``variables``: the LNM's defaults and the checked args
        (``build_domain_xml`` gives them)."""
        values = template_values(spec, state_dir, variables)
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


def build_domain_xml(spec, *, driver, state_dir, template=None, defaults=None,
                     policy=None):
    """Domain XML for a normalized spec.

    ``driver`` is the libvirt driver name in lower case ("test", "qemu");
    ``template`` a DomainTemplate that replaces the built-in one;
    ``defaults`` template variables (kernel, initrd, ...) that the args
    ``policy`` (an ArgPolicy; None: args set nothing) lets through override.
    Raises InvalidRequest for args the policy refuses; blocking (see
    ``ArgPolicy.check``).
    """
    if policy is None:
        policy = ArgPolicy(state_dir=state_dir)
    values = dict(defaults or {})
    checked = policy.check(spec, template)
    values.update(checked)
    network = guest_network.GuestNetwork.from_values(values)
    if network is not None and "cmdline" in checked and "cmdline" not in (
            spec.get("plugin_args") or ()):
        guest_network.check_request_cmdline(checked["cmdline"])
    if template is not None:
        return template.render(spec, state_dir,
                               values | guest_network.derived_values(network, spec["name"]))
    if driver == "test":
        return _build_test(spec)
    if driver == "qemu":
        return _build_qemu(spec, state_dir, values, network, policy.vlan_tags)
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

