"""What a VM exported by another host must pass before this host defines it.

An import brings two definitions from another host, the exported one and the
one its memory image carries (libvirt restores from that one): each must be
what this host would define itself for the VM's record
(``usher.lnm.received_xml``), and the image no larger than the VM's memory
allows. The checks of the request run on the reactor thread
(``import_arguments``); those that ask the hypervisor, in the pool
(``ImportChecks``).
"""

import xml.etree.ElementTree as ET

import libvirt

from usher import states
from usher.errors import InvalidRequest
from usher.lnm import domain_xml, received_xml

# The states a VMM itself can report (the others are the controller's).
VMM_STATES = (states.RUN, states.PAUSED, states.HIBERNATED, states.SHUTOFF)


def import_arguments(spec, payload, *, overhead_mib):
    """import_image(spec, payload) checked -> (name, normalised spec, whether
    the spec gave a UUID, definition, image bytes or None, exported state)."""
    uuid_given = isinstance(spec, dict) and spec.get("uuid") is not None
    spec = domain_xml.normalize_spec(spec)
    name = spec["name"]
    if not isinstance(payload, dict) or not isinstance(payload.get("xml"), str):
        raise InvalidRequest(f"import of {name!r}: the image must be the dict "
                             "export_image returned (xml, image, state)")
    state = payload.get("state", states.RUN)
    image = payload.get("image")
    if state not in VMM_STATES:
        raise InvalidRequest(f"import of {name!r}: unknown exported state {state!r}")
    if state != states.SHUTOFF and not isinstance(image, bytes):
        raise InvalidRequest(f"import of {name!r}: a {state} VM needs its memory "
                             "image (bytes)")
    limit = received_xml.image_limit(spec["memory_mib"], overhead_mib)
    if state != states.SHUTOFF and len(image) > limit:
        raise InvalidRequest(
            f"import of {name!r}: its memory image ({len(image)} bytes) is larger than "
            f"a VM of {spec['memory_mib']} MiB may have here ({limit} bytes: its memory "
            "and the LNM's import_overhead_mib)")
    if len(payload["xml"]) > received_xml.MAX_DEFINITION_CHARS:
        raise InvalidRequest(f"import of {name!r}: the definition is longer than "
                             f"{received_xml.MAX_DEFINITION_CHARS} characters")
    return name, spec, uuid_given, payload["xml"], image, state


class ImportChecks:
    """The checks of an import that ask the hypervisor. Blocking.

    ``state_dir``, ``defaults`` (template variables) and ``policy``
    (``domain_xml.ArgPolicy``) are the LNM's, as for the VMs it creates.
    """

    def __init__(self, *, state_dir, defaults, policy):
        self._state_dir = state_dir
        self._defaults = defaults
        self._policy = policy
        # (connection, emulator paths its capabilities offer), see _emulators.
        self._emulators_of = (None, frozenset())

    def _emulators(self, conn):
        """The emulator binaries this hypervisor offers (its capabilities),
        asked once per connection."""
        cached_conn, emulators = self._emulators_of
        if cached_conn is not conn:
            root = ET.fromstring(conn.getCapabilities())
            emulators = frozenset(e.text.strip() for e in root.iter("emulator") if e.text)
            self._emulators_of = (conn, emulators)
        return emulators

    def reach(self, conn, spec, *, driver, template):
        """What this host's own definition of the VM ``spec`` may reach
        (``received_xml.HostReach``); InvalidRequest if this host would not
        define the VM at all (its ArgPolicy refuses the record's args)."""
        try:
            reference = domain_xml.build_domain_xml(
                spec, driver=driver, state_dir=self._state_dir, template=template,
                defaults=self._defaults, policy=self._policy)
        except InvalidRequest as e:
            raise InvalidRequest(f"import of {spec['name']!r} is refused: this host would "
                                 f"not define the VM itself: {e}") from None
        return received_xml.HostReach(
            reference, policy=self._policy, defaults=self._defaults,
            own_paths=[domain_xml.console_path(self._state_dir, spec["name"])],
            emulators=self._emulators(conn))

    @staticmethod
    def check_definition(xml, spec, reach, uuid_given):
        """The exported definition, against this host's own (``reach``)."""
        received_xml.check(xml, spec=spec, reach=reach, uuid_given=uuid_given,
                           what=f"import of {spec['name']!r}: the definition")

    @staticmethod
    def check_image(conn, path, spec, reach, uuid_given):
        """The definition the memory image at ``path`` carries (libvirt
        restores from it) must pass the same check as the exported one."""
        what = f"import of {spec['name']!r}: the definition in its memory image"
        try:
            embedded = conn.saveImageGetXMLDesc(path, 0)
        except libvirt.libvirtError as e:
            raise InvalidRequest(f"{what} cannot be read, so the image is refused: "
                                 f"{e.get_error_message()}") from None
        received_xml.check(embedded, spec=spec, reach=reach, uuid_given=uuid_given,
                           what=what)
