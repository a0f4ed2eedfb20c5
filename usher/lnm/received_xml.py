"""Checking a domain definition this LNM did not build: a migrated VM's.

A save/restore migration (``export_image`` on the source LNM, ``import_image``
here) hands this host the definition another host exported, and a memory
image that carries a definition of its own (libvirt restores from that one).
The source host may be compromised; its damage must stay there. So before
anything is defined here, each definition is parsed (``parse``: no DTD, no
entity, at most ``MAX_DEFINITION_CHARS`` characters, ``MAX_ELEMENTS``
elements and ``MAX_DEPTH`` levels) and checked (``check``) against what this
host itself would build for the VM's record (``HostReach``: its reference
definition, its ``[[domain]]`` defaults, its own files for the VM, its
``ArgPolicy`` and the emulators its hypervisor offers). Refused, with the
reason:

- another root, domain type, name or (when the record has one) UUID than the
  record's; Usher metadata naming another owner or cluster; more memory or
  vCPUs than the record's, vCPUs pinned to host CPUs;
- a host path (disk, cdrom, kernel, initrd, loader, nvram, console/serial
  files and sockets, chardev logs, ROMs, filesystem passthrough, any
  absolute path outside the guest's own text) that is neither in the
  reference, a ``[[domain]]`` default, this VM's console log here, nor, for
  disk and filesystem sources and the kernel and initrd, confined as the
  ``ArgPolicy`` confines args (canonical, in ``image_dirs``, never in
  ``state_dir``); an emulator the hypervisor does not offer;
- a network interface other than a bridge or network this host offers (its
  ``bridges``/``networks``, defaults and reference), or with host-side
  plumbing (scripts, tap/vhost backends, VLANs, virtual ports, port groups,
  unmanaged tap devices);
- every element that reaches the host otherwise (host device passthrough,
  ``<qemu:commandline>`` and any other foreign namespace, shared memory,
  memory devices, leases, graphics, smartcards, USB redirection, tuning and
  pinning, SMBIOS/fw_cfg files, lower security labels, network disks, SCSI
  passthrough, disk secrets, TCP/UDP chardevs, host input devices ...),
  unless an equal element (ignoring libvirt's guest ``<address>`` and
  ``<alias>``) is in the reference, i.e. the site template has it.

Nothing here calls libvirt; ``ArgPolicy.confine`` stats files: run ``check``
in the LNM's thread pool.
"""

import xml.etree.ElementTree as ET
from xml.parsers import expat

from usher.errors import InvalidRequest
from usher.lnm import domain_xml

# A domain definition travels as one PB string (usher.lnm.api: under
# banana's 640 KiB); real ones are a few KiB.
MAX_DEFINITION_CHARS = 512 * 1024
MAX_ELEMENTS = 20_000
MAX_DEPTH = 64
# How much larger than the VM's memory its memory image may be (device
# state, video memory, ROMs): the [lnm] option import_overhead_mib.
DEFAULT_IMPORT_OVERHEAD_MIB = 256
MIB = 1024 * 1024


def image_limit(memory_mib, overhead_mib=DEFAULT_IMPORT_OVERHEAD_MIB):
    """The largest memory image (bytes) accepted for a VM of ``memory_mib``."""
    return (memory_mib + overhead_mib) * MIB


# --- parsing ------------------------------------------------------------------

def _clark(name):
    # expat with namespace_separator "}" gives "uri}local": ElementTree's "{uri}local".
    return "{" + name if "}" in name else name


def parse(text, what="the definition"):
    """Untrusted domain XML -> an ElementTree element; InvalidRequest for
    anything over the limits, not well-formed, or with a DTD (hence no
    entity: expat stops at the DOCTYPE, before any declaration)."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{what} must be text, not {type(text).__name__}")
    if len(text) > MAX_DEFINITION_CHARS:
        raise InvalidRequest(f"{what} is longer than {MAX_DEFINITION_CHARS} characters")
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate(namespace_separator="}")
    level = [0, 0]   # depth, elements

    def forbidden(*_args):
        raise InvalidRequest(f"{what} has a DOCTYPE or an entity declaration "
                             "(a domain definition has none)")

    def start(tag, attributes):
        level[0] += 1
        level[1] += 1
        if level[0] > MAX_DEPTH or level[1] > MAX_ELEMENTS:
            raise InvalidRequest(f"{what} has more than {MAX_ELEMENTS} elements or "
                                 f"{MAX_DEPTH} levels")
        builder.start(_clark(tag), {_clark(k): v for k, v in attributes.items()})

    def end(tag):
        level[0] -= 1
        builder.end(_clark(tag))

    for handler in ("StartDoctypeDeclHandler", "EntityDeclHandler",
                    "UnparsedEntityDeclHandler", "NotationDeclHandler",
                    "ExternalEntityRefHandler"):
        setattr(parser, handler, forbidden)
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = builder.data
    parser.buffer_text = True
    try:
        parser.Parse(text, True)
    except expat.ExpatError as e:
        raise InvalidRequest(f"{what} is not well-formed XML: {e}") from None
    return builder.close()


# --- what this host's own definition reaches -------------------------------------

def _canonical(element, device=True):
    """An element compared as the site wrote it: the guest address and alias
    libvirt gives a device aside (its own children; a <source>'s address is
    the host's)."""
    return (element.tag, tuple(sorted(element.attrib.items())), (element.text or "").strip(),
            tuple(_canonical(child, False) for child in element
                  if not (device and child.tag in ("address", "alias"))))


def _absolute_values(root):
    for element in root.iter():
        for value in element.attrib.values():
            if value.startswith("/"):
                yield value
        text = (element.text or "").strip()
        if text.startswith("/"):
            yield text


class HostReach:
    """What a definition this host built itself for one VM may reach.

    ``reference``: the domain XML this host builds for the VM's record
    (``build_domain_xml`` with its template, defaults and ArgPolicy);
    ``policy``: its ArgPolicy (path confinement, bridges, networks);
    ``defaults``: its ``[[domain]]`` values; ``own_paths``: files it keeps
    for the VM (its console log); ``emulators``: the emulator binaries its
    hypervisor offers (libvirt's capabilities).
    """

    def __init__(self, reference, *, policy, defaults=None, own_paths=(), emulators=()):
        root = ET.fromstring(reference)          # built here: trusted
        defaults = dict(defaults or {})
        self.policy = policy
        self.type = root.get("type")
        self.paths = set(own_paths) | set(_absolute_values(root)) | {
            value for value in defaults.values() if value.startswith("/")}
        self.emulators = frozenset(emulators)
        self.devices = {}
        for kind in ("bridge", "network"):
            offered = set(policy.devices[kind])
            offered.update(source.get(kind) for source in root.iterfind(
                f"devices/interface[@type='{kind}']/source") if source.get(kind))
            if defaults.get(kind):
                offered.add(defaults[kind])
            self.devices[kind] = offered
        self.formats = set(domain_xml.ENUM_VARIABLES["disk_format"]) | {
            driver.get("type") for driver in root.iterfind("devices/disk/driver")}
        self.lifecycle = _LIFECYCLE | {element.text.strip() for element in root
                                       if element.tag in _LIFECYCLE_EVENTS and element.text}
        # (parent tag, tag) -> the reference's elements there, compared whole.
        self.elements = {}
        for parent in root.iter():
            for element in parent:
                self.elements.setdefault((parent.tag, element.tag), set()).add(
                    _canonical(element))

    def has(self, element, parent):
        """True if the reference has an element equal to this one under a
        ``parent`` of the same tag."""
        return _canonical(element) in self.elements.get((parent, element.tag), ())


# --- checking ------------------------------------------------------------------

_TOP_LEVEL = frozenset((
    "name", "uuid", "genid", "title", "description", "metadata", "memory",
    "currentMemory", "vcpu", "os", "features", "cpu", "clock", "on_poweroff",
    "on_reboot", "on_crash", "pm", "devices", "resource", "seclabel"))
_OS = frozenset(("type", "boot", "bootmenu", "kernel", "initrd", "dtb", "cmdline", "loader",
                 "nvram", "smbios", "bios", "acpi", "firmware"))
_LIFECYCLE_EVENTS = ("on_poweroff", "on_reboot", "on_crash")
_LIFECYCLE = frozenset(("destroy", "restart", "preserve", "rename-restart"))
# Devices that reach the host only through the paths in them (checked).
_GUEST_DEVICES = frozenset(("controller", "video", "sound", "memballoon", "watchdog",
                            "panic", "hub", "iommu", "vsock"))
_CHARDEVS = frozenset(("serial", "console", "parallel", "channel"))
# Chardev types that open nothing on the host, or only the path they name
# (checked); the others (tcp, udp, stdio, nmdm, dbus ...) only as the reference has them.
_CHARDEV_TYPES = frozenset(("pty", "null", "vc", "spicevmc", "spiceport", "qemu-vdagent",
                            "file", "unix", "dev", "pipe"))
_INTERFACE_PLUMBING = frozenset(("script", "downscript", "backend", "vlan", "virtualport",
                                 "port"))
_RNG_SOURCES = frozenset(("/dev/random", "/dev/urandom", "/dev/hwrng"))
# Attributes that name host paths wherever they appear (but on a <target>,
# the guest's side); "dev" only on a <source>.
_PATH_ATTRIBUTES = frozenset(("file", "path", "dir", "socket", "template", "evdev", "tap",
                              "vhost", "rendernode", "xauth"))
_PATH_TEXTS = frozenset(("kernel", "initrd", "dtb", "loader", "nvram", "emulator"))
_UNITS = {"b": 1, "bytes": 1, "kb": 10 ** 3, "k": 2 ** 10, "kib": 2 ** 10, "mb": 10 ** 6,
          "m": 2 ** 20, "mib": 2 ** 20, "gb": 10 ** 9, "g": 2 ** 30, "gib": 2 ** 30,
          "tb": 10 ** 12, "t": 2 ** 40, "tib": 2 ** 40, "pb": 10 ** 15, "p": 2 ** 50,
          "pib": 2 ** 50, "eb": 10 ** 18, "e": 2 ** 60, "eib": 2 ** 60}


def check(text, *, spec, reach, uuid_given=True, what="the definition"):
    """Parse and check an untrusted domain definition for the VM of the
    normalized ``spec`` (the controller's record) against ``reach`` ->
    the parsed root; InvalidRequest naming what is refused and why.
    ``uuid_given``: the record has a UUID, which the definition must have."""
    root = parse(text, what)
    _Check(spec, reach, what).domain(root, uuid_given)
    return root


class _Check:
    def __init__(self, spec, reach, what):
        self.spec = spec
        self.reach = reach
        self.what = what

    def refuse(self, where, why):
        # (``where`` holds the peer's tag names: bounded, as every value is)
        raise InvalidRequest(f"{self.what} is refused: <{where[:160]}> {why}")

    def absent(self, where):
        self.refuse(where, "is not in the definition this host builds for the VM (only the "
                           "site's own template may have it here)")

    # -- the domain and its identity

    def domain(self, root, uuid_given):
        spec = self.spec
        if root.tag != "domain":
            self.refuse(root.tag, "is not a <domain>")
        if root.get("type") != self.reach.type:
            self.refuse("domain", f"has type {str(root.get('type'))[:32]!r}; this host "
                                  f"defines the VM as {self.reach.type!r}")
        names = root.findall("name")
        if len(names) != 1 or (names[0].text or "") != spec["name"]:
            self.refuse("name", f"must be the record's {spec['name']!r}")
        uuids = root.findall("uuid")
        if uuid_given and (len(uuids) != 1
                           or (uuids[0].text or "").strip().lower() != spec["uuid"]):
            self.refuse("uuid", f"must be the record's {spec['uuid']}")
        for child in root:
            if self.reach.has(child, "domain"):
                continue
            if child.tag not in _TOP_LEVEL:
                self.absent(child.tag)
            getattr(self, f"_{child.tag}", self._guest)(child)

    def _skip(self, _element):
        pass

    _name = _uuid = _genid = _title = _description = _skip

    def _metadata(self, element):
        # Opaque to libvirt but for Usher's own, which must be the record's.
        for mine in element.iterfind(f"{{{domain_xml.USHER_NS}}}vm"):
            for key in ("owner", "cluster"):
                if mine.get(key, "") != self.spec[key]:
                    self.refuse("metadata", f"names {key} {mine.get(key, '')[:64]!r}, the "
                                            f"record {self.spec[key]!r}")

    def _guest(self, element, where=None):
        self.paths(element, where or element.tag)

    # -- resources

    def _memory(self, element):
        try:
            factor = _UNITS[element.get("unit", "KiB").lower()]
            size = int((element.text or "").strip()) * factor
        except (KeyError, ValueError):
            self.refuse(element.tag, "is not a size")
        if size > self.spec["memory_mib"] * 2 ** 20:
            self.refuse(element.tag, f"is more than the record's {self.spec['memory_mib']} MiB")

    _currentMemory = _memory

    def _vcpu(self, element):
        if set(element.attrib) - {"placement", "current"}:
            self.absent("vcpu cpuset")
        try:
            counts = [int((element.text or "").strip()), int(element.get("current", 1))]
        except ValueError:
            self.refuse("vcpu", "is not a number")
        if max(counts) > self.spec["vcpus"]:
            self.refuse("vcpu", f"is more than the record's {self.spec['vcpus']}")

    def _lifecycle(self, element):
        if (element.text or "").strip() not in self.reach.lifecycle:
            self.refuse(element.tag, f"action {(element.text or '')[:32]!r} is not one of "
                                     f"{', '.join(sorted(self.reach.lifecycle))}")

    _on_poweroff = _on_reboot = _on_crash = _lifecycle

    def _resource(self, element):
        # libvirt's default cgroup partition, the only one this host uses.
        if [(c.tag, (c.text or "").strip(), len(c)) for c in element] != [
                ("partition", "/machine", 0)]:
            self.absent("resource")

    def _seclabel(self, element):
        # Confinement as the host's security driver chooses; never less.
        if element.get("type", "dynamic") != "dynamic" or element.get("relabel") == "no":
            self.absent(f"seclabel type={element.get('type')}")
        for child in element:
            if child.tag not in ("label", "imagelabel"):    # regenerated when dynamic
                self.absent(f"seclabel/{child.tag}")

    def _os(self, element):
        for child in element:
            if self.reach.has(child, "os") or child.tag == "cmdline":
                continue       # the guest kernel's command line: the guest's text
            if child.tag not in _OS:
                self.absent(f"os/{child.tag}")
            self.paths(child, f"os/{child.tag}",
                       confine=child.tag in ("kernel", "initrd"))

    # -- devices

    def _devices(self, element):
        for device in element:
            if self.reach.has(device, "devices"):
                continue
            handler = getattr(self, f"_device_{device.tag}", None)
            if handler is None:
                if device.tag not in _GUEST_DEVICES:
                    self.absent(f"devices/{device.tag}")
                handler = self._guest
            handler(device, f"devices/{device.tag}")

    def _device_emulator(self, element, where):
        path = (element.text or "").strip()
        if path not in self.reach.emulators and path not in self.reach.paths:
            self.refuse(where, f"{path[:200]} is not an emulator this host's hypervisor "
                               "offers")

    def _no_secrets(self, element, where):
        for found in element.iter():
            if found.tag in ("auth", "encryption", "seclabel", "reservations"):
                self.absent(f"{where} {found.tag}")

    def _device_disk(self, element, where):
        kind = element.get("type", "file")
        if kind not in ("file", "block"):
            self.absent(f"{where} type={kind}")
        if element.get("device", "disk") not in ("disk", "cdrom", "floppy"):
            self.absent(f"{where} device={element.get('device')}")
        if element.get("rawio") or element.get("sgio"):
            self.absent(f"{where} rawio/sgio")
        self._no_secrets(element, where)
        for found in element.iter():
            if found.tag in ("backingStore", "dataStore", "mirror") and found.get(
                    "type", "file") not in ("file", "block"):
                self.absent(f"{where}/{found.tag} type={found.get('type')}")
            if found.tag in ("host", "config") or "protocol" in found.attrib:
                self.absent(f"{where} network source")
        for driver in element.iter("driver"):
            if driver.get("type") is not None and driver.get("type") not in self.reach.formats:
                self.refuse(f"{where}/driver", f"format {driver.get('type')[:32]!r} is not "
                                               f"one of {', '.join(sorted(self.reach.formats))}")
        self.paths(element, where, confine=True)

    def _device_filesystem(self, element, where):
        if element.get("type", "mount") not in ("mount", "file", "block"):
            self.absent(f"{where} type={element.get('type')}")
        self._no_secrets(element, where)
        self.paths(element, where, confine=True, directory=True)

    def _device_interface(self, element, where):
        kind = element.get("type")
        if kind not in ("bridge", "network"):
            self.absent(f"{where} type={kind}")
        # (libvirt shows a network's port and bridge in a running VM's XML)
        extra = {"portid", "bridge"} if kind == "network" else set()
        for source in element.iterfind("source"):
            offered = self.reach.devices[kind]
            if not {kind} <= set(source.attrib) <= {kind} | extra or (
                    source.get(kind) not in offered):
                self.refuse(f"{where}/source", f"{kind} {str(source.get(kind))[:64]!r} is not "
                                               f"one this host offers "
                                               f"({', '.join(sorted(offered)) or 'none'})")
        for child in element:
            if child.tag in _INTERFACE_PLUMBING or (
                    child.tag == "target" and child.get("managed") == "no"):
                self.absent(f"{where}/{child.tag}")
        self.paths(element, where)

    def _device_chardev(self, element, where):
        kind = element.get("type", "pty")
        if kind not in _CHARDEV_TYPES:
            self.absent(f"{where} type={kind}")
        for target in element.iterfind("target"):
            if target.get("type") == "guestfwd":
                self.absent(f"{where} guestfwd")
        for child in element:
            # A pty's path is the one its emulator allocated, shown, never opened.
            if not (kind == "pty" and child.tag == "source"):
                self.paths(child, f"{where}/{child.tag}")

    _device_serial = _device_console = _device_parallel = _device_channel = _device_chardev

    def _device_input(self, element, where):
        if element.get("type") not in ("mouse", "keyboard", "tablet"):
            self.absent(f"{where} type={element.get('type')}")
        self.paths(element, where)

    def _device_audio(self, element, where):
        if element.get("type") not in ("none", "spice"):
            self.absent(f"{where} type={element.get('type')}")
        self.paths(element, where)

    def _device_rng(self, element, where):
        for backend in element.iterfind("backend"):
            if backend.get("model") == "random":
                source = (backend.text or "").strip()
                if source and source not in _RNG_SOURCES and source not in self.reach.paths:
                    self.refuse(f"{where}/backend", f"{source[:200]} is not a random "
                                                    "number source")
            elif backend.get("model") != "builtin":
                self.absent(f"{where} backend={backend.get('model')}")

    def _device_tpm(self, element, where):
        for backend in element.iterfind("backend"):
            if backend.get("type") != "emulator":
                self.absent(f"{where} backend={backend.get('type')}")
        self.paths(element, where)

    # -- host paths anywhere

    def paths(self, element, where, *, confine=False, directory=False):
        """Every host path in ``element``'s subtree must be this host's own
        (reference, defaults, its files for the VM); with ``confine``, the
        sources (and a kernel's or initrd's text) may also be any image that
        the ArgPolicy's confinement lets through."""
        confined = confine and element.tag in ("source", "kernel", "initrd")
        for key, value in element.attrib.items():
            if value.startswith("/") or (element.tag != "target" and (
                    key in _PATH_ATTRIBUTES or (key == "dev" and element.tag == "source"))):
                self.path(f"{where} {key}", value, confined, directory)
        text = (element.text or "").strip()
        if text.startswith("/") or (text and element.tag in _PATH_TEXTS):
            self.path(where, text, confined, directory)
        for child in element:
            if child.tag != "cmdline":
                self.paths(child, f"{where}/{child.tag}", confine=confine,
                           directory=directory)

    def path(self, where, value, confined, directory):
        if value in self.reach.paths:
            return
        if not confined:
            self.refuse(where, f"{value[:200]} is a host path that the definition this host "
                               "builds for the VM does not use")
        self.reach.policy.confine(None, value, directory=directory,
                                  what=f"{self.what} is refused: <{where[:160]}>")
