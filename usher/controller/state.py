"""The controller's global state: VMs, VMMs (LNMs) and virtual clusters,
plus the lost, missing and unmanaged lists of the paper.

Plain Python, no I/O. Every change to a VM goes through ``GlobalState`` so
that it bumps the record's version and tells the listeners (client
subscriptions, plugin events) exactly once.
"""

from collections.abc import Mapping

from usher import states
from usher.errors import InvalidRequest
from usher.naming import DEFAULT_CLUSTER, cluster_of, split

_STATES = frozenset(states.ALL_STATES)

# Where a change of a VM's state comes from (``GlobalState.change_origin``,
# vm_state_changed's ``origin``): an LNM reported it (its report or
# inventory, its answer to a command), or the controller concluded it
# (starting, lost, missing, migrating, a start undone).
ORIGIN_LNM = "lnm"
ORIGIN_CONTROLLER = "controller"


def _is_count(value):
    return value is None or (isinstance(value, int) and not isinstance(value, bool)
                             and value >= 0)


# What each field of a record may hold; a change that breaks one is refused
# before anything is stored (an index built from a bad field would fail
# halfway, leaving a record no listing can read).
_FIELD_CHECKS = {
    "name": lambda v: isinstance(v, str) and bool(v),
    "owner": lambda v: v is None or isinstance(v, str),
    "cluster": lambda v: isinstance(v, str),
    "state": lambda v: isinstance(v, str) and v in _STATES,
    "lnm": lambda v: v is None or isinstance(v, str),
    "memory_mib": _is_count,
    "vcpus": _is_count,
    "uuid": lambda v: v is None or isinstance(v, str),
    "managed": lambda v: isinstance(v, bool),
    "version": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "args": lambda v: isinstance(v, dict),
    "quarantined": lambda v: v is None or isinstance(v, str),
}


def check_fields(fields, name="a VM"):
    """Refuse (InvalidRequest) a record or change whose known fields do not
    hold what they must; changes nothing."""
    for key, value in fields.items():
        check = _FIELD_CHECKS.get(key)
        if check is not None and not check(value):
            raise InvalidRequest(f"VM {str(name)[:64]}: invalid {key} "
                                 f"({type(value).__name__})")


class VMsByName(Mapping):
    """Read-only records of some VMs, by name, without copying them: lookups
    go to ``vms`` (a dict name -> record) but only ``names`` are in it (and
    iterated). What a selection picks from, among 10,000 VMs, in the time its
    own names take."""

    def __init__(self, vms, names):
        self._vms = vms
        self._names = names

    def __getitem__(self, name):
        if name not in self._names:
            raise KeyError(name)
        return self._vms[name]

    def __contains__(self, name):
        return name in self._names and name in self._vms

    def __iter__(self):
        return (name for name in list(self._names) if name in self._vms)

    def __len__(self):
        return sum(1 for name in self._names if name in self._vms)

    def values(self):
        """The records, as a list (not a live view): what a listing of every
        one of them reads, without a lookup through the view per name."""
        return [rec for rec in map(self._vms.get, list(self._names)) if rec is not None]


class LNMInfo:
    """One connected (or remembered) LNM and its hypervisor."""

    __slots__ = ("name", "info", "connected", "vms", "handle", "unmanaged", "destroy_keeps")

    def __init__(self, name, info=None, handle=None):
        self.name = name
        self.info = info or {}
        self.connected = handle is not None
        self.vms = set()
        self.handle = handle
        self.unmanaged = set()     # names in GlobalState.unmanaged on this LNM
        # Its hello's destroy_keeps (usher.protocol): False, an LNM before
        # issue 17, whose destroy removes the VM.
        self.destroy_keeps = False

    def to_wire(self):
        data = {"name": self.name, "connected": self.connected,
                "vms": len(self.vms), "unmanaged": len(self.unmanaged),
                "hostname": self.info.get("hostname"),
                "driver": self.info.get("driver"),
                # libvirt's test driver: a simulated host whose VMs run nothing.
                "test_host": str(self.info.get("driver") or "").lower() == "test",
                "cpus": self.info.get("cpus"),
                "memory_mib": self.info.get("memory_mib"),
                "model": self.info.get("model"),
                "live_migration": bool(self.info.get("live_migration"))}
        # Monitoring figures live in usher.controller.monitoring.
        return data


class GlobalState:
    def __init__(self, domain):
        self.domain = domain
        self.vms = {}          # managed VMs by full name (includes lost/missing)
        self.unmanaged = {}    # VMs on our hosts that Usher does not manage
        self.lnms = {}         # LNM name -> LNMInfo
        self.clusters = {}     # (owner, cluster) -> set of VM names
        # VM name -> target LNM while a migration is under way: the VM holds
        # room on both hosts until it is settled on one (usher.controller.capacity).
        self.incoming = {}
        self._owned = {}       # owner -> set of VM names
        # usher.controller.holds.HostHolds of the controller (None: no holds),
        # read by placement (usher.controller.capacity.Ledger).
        self.holds = None
        self._listeners = []
        # The origin of the change listeners are being told of.
        self.change_origin = ORIGIN_CONTROLLER

    # -- listeners -----------------------------------------------------------

    def listen(self, callback):
        """callback(record, old_state) for a change; record["state"] is None
        when the VM was removed. Returns a function that stops listening."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def _notify(self, record, old_state):
        for callback in list(self._listeners):
            callback(record, old_state)

    # -- queries -------------------------------------------------------------

    def lost(self):
        return [vm for vm in self.vms.values() if vm["state"] == states.LOST]

    def missing(self):
        return [vm for vm in self.vms.values() if vm["state"] == states.MISSING]

    def owned_by(self, owner):
        return {name: self.vms[name] for name in self._owned.get(owner, ())}

    def owned_view(self, owner):
        """``owned_by`` without the copy (a read-only Mapping; do not change
        the state while iterating it)."""
        return VMsByName(self.vms, self._owned.get(owner, frozenset()))

    def cluster_members(self, clusters, owner=None):
        """Names of the VMs in the virtual clusters named ``clusters`` (of
        ``owner``, or of anyone)."""
        wanted = set(clusters)
        if owner is not None:
            return set().union(*(self.clusters.get((owner, c), ()) for c in wanted))
        return set().union(*(names for (_owner, cluster), names in self.clusters.items()
                             if cluster in wanted))

    def connected_lnms(self):
        return [v for v in self.lnms.values() if v.connected]

    # The names of releases before 2026-12, kept for site plugins written
    # against them (an LNM was called a "VMM" then).
    @property
    def vmms(self):
        return self.lnms

    def connected_vmms(self):
        return self.connected_lnms()

    # -- VM changes ----------------------------------------------------------

    def new_record(self, name, *, state, lnm=None, cluster=None, memory_mib=None,
                   vcpus=None, uuid=None, args=None, owner=None):
        parts = split(name, self.domain)
        managed = parts is not None
        if managed:
            short, owner = parts
            cluster = cluster or cluster_of(short)
        return {"name": name, "owner": owner, "cluster": cluster or DEFAULT_CLUSTER,
                "state": state, "lnm": lnm, "memory_mib": memory_mib,
                "vcpus": vcpus, "uuid": uuid, "managed": managed, "version": 0,
                "args": dict(args or {})}

    def add(self, record):
        """Add a managed VM (a new record from ``new_record``). All or
        nothing: a record with a bad field is refused (InvalidRequest)
        before it is stored or indexed."""
        name = record.get("name")
        check_fields(record, name)
        if name in self.vms:
            raise InvalidRequest(f"VM {name} already exists")
        # A quarantined stranger of that name (usher.controller.observation) gives
        # way to the owner's own VM: on its host it is a duplicate now.
        self._forget_unmanaged(name)
        self.vms[name] = record
        self._index(record)
        self._place(record, record["lnm"])
        record["version"] += 1
        self._notify(record, None)
        return record

    def update(self, name, *, origin=ORIGIN_CONTROLLER, **fields):
        """Change fields of a managed VM; returns the record (None if unknown).
        Notifies only when something really changed. All or nothing: a bad
        field (InvalidRequest) changes nothing. ``origin``: ORIGIN_LNM when
        an LNM said so (listeners read ``change_origin``)."""
        record = self.vms.get(name)
        if record is None:
            return None
        fields = {key: value for key, value in fields.items()
                  if value is not None or key == "lnm"}
        check_fields(fields, name)
        old_state = record["state"]
        changed = False
        for key, value in fields.items():
            if record.get(key) != value:
                if key == "lnm":
                    self._place(record, value)
                if key in ("owner", "cluster"):
                    self._unindex(record)
                    record[key] = value
                    self._index(record)
                record[key] = value
                changed = True
        if changed:
            record["version"] += 1
            self.change_origin = origin
            try:
                self._notify(record, old_state)
            finally:
                self.change_origin = ORIGIN_CONTROLLER
        return record

    def remove(self, name):
        record = self.vms.pop(name, None)
        if record is None:
            return None
        self._place(record, None)
        self._unindex(record)
        old_state = record["state"]
        record["state"] = None
        record["version"] += 1
        self._notify(record, old_state)
        return record

    def _index(self, record):
        name = record["name"]
        self.clusters.setdefault((record["owner"], record["cluster"]), set()).add(name)
        self._owned.setdefault(record["owner"], set()).add(name)

    def _unindex(self, record):
        name = record["name"]
        for index, key in ((self.clusters, (record["owner"], record["cluster"])),
                           (self._owned, record["owner"])):
            members = index.get(key)
            if members is not None:
                members.discard(name)
                if not members:
                    del index[key]

    def _place(self, record, lnm):
        old = self.lnms.get(record["lnm"]) if record["lnm"] else None
        if old is not None:
            old.vms.discard(record["name"])
        record["lnm"] = lnm
        if lnm is not None:
            self.lnms.setdefault(lnm, LNMInfo(lnm)).vms.add(record["name"])

    # -- unmanaged -----------------------------------------------------------

    def set_unmanaged(self, name, lnm, state, *, quarantined=None, memory_mib=None,
                      vcpus=None, uuid=None):
        """Note (``state`` None: forget) a VM on LNM ``lnm`` that Usher does
        not manage; ``quarantined`` is why a VM with a managed name is kept
        here instead of in its owner's namespace. Such records have no owner
        and are managed False. -> the record (None once forgotten)."""
        if state is None:
            self._forget_unmanaged(name)
            return None
        record = self.unmanaged.get(name)
        if record is None:
            record = {"name": name, "owner": None, "cluster": DEFAULT_CLUSTER,
                      "state": state, "lnm": lnm, "memory_mib": memory_mib,
                      "vcpus": vcpus, "uuid": uuid, "managed": False, "version": 0,
                      "args": {}}
            if quarantined is not None:
                record["quarantined"] = quarantined
            check_fields(record, name)
            self.unmanaged[name] = record
        else:
            check_fields({"state": state, "lnm": lnm}, name)
            self._unmanaged_index(record, discard=True)
            record.update(state=state, lnm=lnm)
        self._unmanaged_index(record)
        return record

    def unmanaged_on(self, lnm):
        """How many unmanaged (and quarantined) VMs LNM ``lnm`` has here."""
        info = self.lnms.get(lnm)
        return len(info.unmanaged) if info is not None else 0

    def _unmanaged_index(self, record, discard=False):
        if record["lnm"] is None:
            return
        if discard:
            info = self.lnms.get(record["lnm"])
            if info is not None:
                info.unmanaged.discard(record["name"])
        else:
            self.lnms.setdefault(record["lnm"], LNMInfo(record["lnm"])).unmanaged.add(
                record["name"])

    def _forget_unmanaged(self, name):
        record = self.unmanaged.pop(name, None)
        if record is not None:
            self._unmanaged_index(record, discard=True)

    def drop_unmanaged_on(self, lnm):
        info = self.lnms.get(lnm)
        for name in sorted(info.unmanaged) if info is not None else ():
            self._forget_unmanaged(name)
