"""What an LNM may send the controller, checked before anything is stored.

An LNM host may be compromised (README, "Security"): everything it sends —
its hello and node information, its inventory, its change and status
reports, the answers to commands — is hostile input until these checks
pass. Pure functions, no I/O and no PB: the PB boundary
(``usher.controller.lnm_link``) calls them, the controller's logic only sees
what they return. Each returns a clean copy holding only the fields the
controller uses (unknown keys are dropped, never stored) or raises
``InvalidRequest`` saying what is wrong; nothing else escapes them.
"""

import dataclasses
import math
import re

from usher import states
from usher.errors import InvalidRequest
from usher.naming import (MAX_NAME, USER_RE, check_short_name, is_host_vm_name, is_managed,
                          split)
from usher.records import CHUNK_BYTES, decode_chunks

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}"
                      r"-[0-9a-fA-F]{12}$")
_CLUSTER_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

# Plausible sizes of one host (and so of any VM on it).
MAX_CPUS = 1 << 16
MAX_MEMORY_MIB = 1 << 32          # 4 PiB
MAX_TEXT = 255                    # hostname, driver, model, error kind
MAX_URI = 1024
MAX_ERROR = 4096
MAX_METADATA_KEYS = 16
# Status figures: percent, bytes per second, MiB; none is negative.
MAX_FIGURE = 1e15
MAX_COUNT = 1 << 32

# States an LNM may report of a domain (``lost`` and ``starting`` are the
# controller's own; ``missing`` is the controller's word for a vanished VM,
# which an LNM reports as state None). Answers to commands may also echo the
# cached record's state.
REPORTED_STATES = frozenset({states.RUN, states.PAUSED, states.HIBERNATED, states.SHUTOFF,
                             states.UNKNOWN, states.MIGRATING})
ANSWER_STATES = frozenset(states.ALL_STATES)

# Assumed bytes per entry when turning entry caps into chunk caps (an entry
# of an inventory or report is a few hundred bytes).
_ENTRY_BYTES = 1024


@dataclasses.dataclass(frozen=True)
class LNMLimits:
    """Per-LNM caps (controller settings ``lnm_max_report_changes``,
    ``lnm_max_vms``, ``lnm_max_unmanaged``; see etc/ctrl.config.orig)."""
    max_report_changes: int = 1024     # changes in one report
    max_vms: int = 10000               # entries in one inventory or status report
    max_unmanaged: int = 1000          # unmanaged (and quarantined) VMs listed per LNM

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field.name} must be a non-negative integer")
        if self.max_report_changes < 1 or self.max_vms < 1:
            raise ValueError("max_report_changes and max_vms must be at least 1")

    @property
    def report_chunks(self):
        """JSON chunks one change report may have."""
        return _chunks_for(self.max_report_changes)

    @property
    def bulk_chunks(self):
        """JSON chunks one inventory or status report may have."""
        return _chunks_for(self.max_vms)


def _chunks_for(entries):
    return max(2, -(-entries * _ENTRY_BYTES // CHUNK_BYTES) + 1)


# -- scalars -----------------------------------------------------------------------

def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value, what, limit=MAX_TEXT, *, optional=True):
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise InvalidRequest(f"{what} must be a printable string of at most {limit} "
                             "characters")
    return value


def _count(value, what, limit, *, optional=True, minimum=0):
    if value is None and optional:
        return None
    if not _is_int(value) or not minimum <= value <= limit:
        raise InvalidRequest(f"{what} must be a whole number from {minimum} to {limit}")
    return value


def _flag(value, what):
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"{what} must be true or false")
    return value


def _mapping(value, what):
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a dict, not {type(value).__name__}")
    return value


def check_uuid(value, what="uuid"):
    """None or a canonical UUID (8-4-4-4-12 hex digits) -> lower case."""
    if value is None:
        return None
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value):
        raise InvalidRequest(f"{what} must be a UUID (8-4-4-4-12 hex digits)")
    return value.lower()


def check_vm_name(name, domain):
    """A VM name an LNM sends -> it. Managed names (in ``domain``) must be
    Usher's exactly; any other must be DNS-style labels (usher.naming)."""
    if not isinstance(name, str):
        raise InvalidRequest("a VM name must be a string")
    if not is_host_vm_name(name):
        raise InvalidRequest(f"invalid VM name {name[:64]!r}: dot-separated labels of "
                             f"letters, digits, hyphens and underscores, at most "
                             f"{MAX_NAME} characters")
    if is_managed(name, domain):
        parts = split(name, domain)
        if parts is not None:
            if name != name.lower():
                raise InvalidRequest(f"invalid VM name {name[:64]!r}: Usher's names are "
                                     "lower case")
            check_short_name(parts[0])
    return name


def check_metadata(value):
    """Usher's metadata of a domain -> {"owner": str|None, "cluster": str|None}.
    A dict of short strings; an owner or cluster that is not a valid user or
    cluster name counts as absent (a domain defined outside Usher)."""
    if value is None:
        return {"owner": None, "cluster": None}
    value = _mapping(value, "metadata")
    if len(value) > MAX_METADATA_KEYS:
        raise InvalidRequest(f"metadata may have at most {MAX_METADATA_KEYS} keys")
    for key, item in value.items():
        if not isinstance(key, str) or len(key) > 64 or not (
                item is None or (isinstance(item, str) and len(item) <= MAX_TEXT)):
            raise InvalidRequest("metadata must map short strings to short strings")
    owner, cluster = value.get("owner"), value.get("cluster")
    return {"owner": owner if owner and USER_RE.fullmatch(owner) else None,
            "cluster": cluster if cluster and _CLUSTER_RE.fullmatch(cluster) else None}


def _state(value, what, allowed):
    if value is None or (isinstance(value, str) and value in allowed):
        return value
    raise InvalidRequest(f"{what}: unknown state {str(value)[:32]!r}")


# -- domains: inventory entries and reported changes -----------------------------------

def check_domain(entry, domain):
    """One inventory entry or reported change -> a clean copy: name, state
    (None: vanished), uuid, memory_mib, vcpus, metadata, and busy/retained
    when set."""
    entry = _mapping(entry, "a VM entry")
    name = check_vm_name(entry.get("name"), domain)
    what = f"VM {name}"
    clean = {"name": name,
             "state": _state(entry.get("state"), what, REPORTED_STATES),
             "uuid": check_uuid(entry.get("uuid"), f"{what}: uuid"),
             "memory_mib": _count(entry.get("memory_mib"), f"{what}: memory_mib",
                                  MAX_MEMORY_MIB),
             "vcpus": _count(entry.get("vcpus"), f"{what}: vcpus", MAX_CPUS),
             "metadata": check_metadata(entry.get("metadata"))}
    if _flag(entry.get("busy"), f"{what}: busy"):
        clean["busy"] = True
    if _flag(entry.get("retained"), f"{what}: retained"):
        clean["retained"] = True
    return clean


def _domains(items, domain, limit, what):
    if len(items) > limit:
        raise InvalidRequest(f"{what} has {len(items)} entries, more than the "
                             f"{limit} allowed")
    checked, seen = [], set()
    for item in items:
        entry = check_domain(item, domain)
        if entry["name"] in seen:
            raise InvalidRequest(f"{what} names {entry['name']} twice")
        seen.add(entry["name"])
        checked.append(entry)
    return checked


def decode_bounded(chunks, max_chunks, what):
    """JSON chunks (usher.records) -> the items, refusing more than
    ``max_chunks`` chunks or a chunk over ``CHUNK_BYTES`` characters before
    any is parsed."""
    if not isinstance(chunks, (list, tuple)):
        raise InvalidRequest(f"{what} must be a list of JSON chunks")
    if len(chunks) > max_chunks:
        raise InvalidRequest(f"{what} has {len(chunks)} chunks, more than the "
                             f"{max_chunks} allowed")
    for chunk in chunks:
        if not isinstance(chunk, (str, bytes)) or len(chunk) > CHUNK_BYTES:
            raise InvalidRequest(f"{what}: each chunk must be a string of at most "
                                 f"{CHUNK_BYTES} characters")
    return decode_chunks(chunks)


def check_inventory(chunks, domain, limits):
    """The answer to ``list_vms`` -> clean entries (at most ``max_vms``)."""
    items = decode_bounded(chunks, limits.bulk_chunks, "the inventory")
    return _domains(items, domain, limits.max_vms, "the inventory")


def check_report(chunks, domain, limits):
    """A ``report`` -> clean changes (at most ``max_report_changes``)."""
    items = decode_bounded(chunks, limits.report_chunks, "a report")
    return _domains(items, domain, limits.max_report_changes, "a report")


# -- answers to commands -------------------------------------------------------------

def check_domain_info(info, name=None, *, optional=False):
    """The domain info answering a command (start, op_on, import_image,
    restore_export, get_details) -> a clean copy of the fields the controller
    reads (state, uuid, memory_mib, vcpus). None only where ``optional``."""
    if info is None and optional:
        return None
    info = _mapping(info, "the LNM's answer")
    what = f"the answer about {name or 'a VM'}"
    if name is not None and info.get("name") not in (None, name):
        raise InvalidRequest(f"{what} names another VM")
    clean = {"state": _state(info.get("state"), what, ANSWER_STATES),
             "uuid": check_uuid(info.get("uuid"), f"{what}: uuid"),
             "memory_mib": _count(info.get("memory_mib"), f"{what}: memory_mib",
                                  MAX_MEMORY_MIB),
             "vcpus": _count(info.get("vcpus"), f"{what}: vcpus", MAX_CPUS)}
    if name is not None:
        clean["name"] = name
    return clean


def check_start_outcome(entry):
    """One entry of a ``start_many`` answer -> (name, info dict) or (name,
    (error kind, message))."""
    entry = _mapping(entry, "a start_many entry")
    name = entry.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise InvalidRequest("a start_many entry without a valid name")
    if "error" in entry:
        kind = _text(entry.get("kind"), "an error kind", 64)
        message = entry.get("error")
        if not isinstance(message, str):
            raise InvalidRequest("a start_many error must be a string")
        return name, (kind, message[:MAX_ERROR])
    if not isinstance(entry.get("info"), dict):
        raise InvalidRequest("an entry has neither info nor error")
    return name, check_domain_info(entry["info"], name)


# -- the hello and the node ------------------------------------------------------------

def check_hello(hello, protocol):
    """``attach``'s hello -> {"protocol", "recovery_port", "destroy_keeps"};
    absent keys take their defaults (``protocol``, None, False: an LNM before
    issue 17, whose destroy removes the VM)."""
    if hello is None:
        hello = {}
    hello = _mapping(hello, "the hello")
    version = hello.get("protocol", protocol)
    if version != protocol or not _is_int(version):
        raise InvalidRequest(f"protocol {str(version)[:16]!r} not supported")
    return {"protocol": version,
            "recovery_port": _count(hello.get("recovery_port"), "recovery_port", 65535,
                                    minimum=1),
            "destroy_keeps": _flag(hello.get("destroy_keeps"), "destroy_keeps")}


def check_node_info(info):
    """``get_node_info``'s answer -> the fields the controller uses: hostname,
    uri, driver, cpus, memory_mib, model, live_migration, migration_uri,
    hypervisor_connected."""
    info = _mapping(info, "node information")
    return {"hostname": _text(info.get("hostname"), "hostname"),
            "uri": _text(info.get("uri"), "uri", MAX_URI),
            "driver": _text(info.get("driver"), "driver", 64),
            "cpus": _count(info.get("cpus"), "cpus", MAX_CPUS),
            "memory_mib": _count(info.get("memory_mib"), "memory_mib", MAX_MEMORY_MIB),
            "model": _text(info.get("model"), "model"),
            "live_migration": _flag(info.get("live_migration"), "live_migration"),
            "migration_uri": _text(info.get("migration_uri"), "migration_uri", MAX_URI),
            "hypervisor_connected": _flag(info.get("hypervisor_connected", True),
                                          "hypervisor_connected")}


# -- status reports ---------------------------------------------------------------------

def is_figure(value):
    """A figure's average: a finite number from 0 to MAX_FIGURE."""
    return ((type(value) is float or _is_int(value)) and 0 <= value <= MAX_FIGURE
            and not (isinstance(value, float) and math.isnan(value)))


def check_status_size(vms_chunks, limits):
    """A status report's VM chunks -> the decoded VM figures (at most
    ``max_vms``; each then checked by usher.controller.monitoring)."""
    vms = decode_bounded(vms_chunks, limits.bulk_chunks, "a status report")
    if len(vms) > limits.max_vms:
        raise InvalidRequest(f"a status report has figures of {len(vms)} VMs, more than "
                             f"the {limits.max_vms} allowed")
    return vms



def are_names(names):
    """Whether every item of the list ``names`` is a string of 1 to MAX_NAME
    characters (at C speed: a kept list names every VM of every LNM on each
    report)."""
    try:
        "".join(names)              # TypeError unless every item is a str
    except TypeError:
        return False
    return not names or (min(map(len, names)) > 0 and max(map(len, names)) <= MAX_NAME)


def check_status_kept(kept_chunks, limits, sent=0):
    """A status report's kept names (usher.protocol, report_status) -> the
    names: strings of 1 to MAX_NAME characters, no repeats, at most
    ``max_vms`` with the ``sent`` VMs' figures. None (an older LNM) -> ().
    The names are not otherwise checked: the controller keeps figures only
    of VMs its state places on the reporting LNM."""
    if kept_chunks is None:
        return ()
    names = decode_bounded(kept_chunks, limits.bulk_chunks, "a status report's kept names")
    if len(names) + sent > limits.max_vms:
        raise InvalidRequest(f"a status report names {sent} VMs' figures and {len(names)} "
                             f"kept, more than the {limits.max_vms} allowed")
    if not are_names(names):
        raise InvalidRequest("a status report's kept names must be strings of 1 to "
                             f"{MAX_NAME} characters")
    if len(set(names)) != len(names):
        raise InvalidRequest("a status report names a kept VM twice")
    return names
