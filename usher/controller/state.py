"""The controller's global state: VMs, VMMs (LNMs) and virtual clusters,
plus the lost, missing and unmanaged lists of the paper.

Plain Python, no I/O. Every change to a VM goes through ``GlobalState`` so
that it bumps the record's version and tells the listeners (client
subscriptions, plugin events) exactly once.
"""

from collections.abc import Mapping

from usher import states
from usher.naming import DEFAULT_CLUSTER, cluster_of, split


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


class VMMInfo:
    """One connected (or remembered) LNM and its hypervisor."""

    __slots__ = ("name", "info", "connected", "vms", "handle")

    def __init__(self, name, info=None, handle=None):
        self.name = name
        self.info = info or {}
        self.connected = handle is not None
        self.vms = set()
        self.handle = handle

    def to_wire(self):
        data = {"name": self.name, "connected": self.connected,
                "vms": len(self.vms),
                "hostname": self.info.get("hostname"),
                "driver": self.info.get("driver"),
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
        self.vmms = {}         # LNM name -> VMMInfo
        self.clusters = {}     # (owner, cluster) -> set of VM names
        # VM name -> target LNM while a migration is under way: the VM holds
        # room on both hosts until it is settled on one (usher.controller.capacity).
        self.incoming = {}
        self._owned = {}       # owner -> set of VM names
        self._listeners = []

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

    def connected_vmms(self):
        return [v for v in self.vmms.values() if v.connected]

    # -- VM changes ----------------------------------------------------------

    def new_record(self, name, *, state, vmm=None, cluster=None, memory_mib=None,
                   vcpus=None, uuid=None, args=None, owner=None):
        parts = split(name, self.domain)
        managed = parts is not None
        if managed:
            short, owner = parts
            cluster = cluster or cluster_of(short)
        return {"name": name, "owner": owner, "cluster": cluster or DEFAULT_CLUSTER,
                "state": state, "vmm": vmm, "memory_mib": memory_mib,
                "vcpus": vcpus, "uuid": uuid, "managed": managed, "version": 0,
                "args": dict(args or {})}

    def add(self, record):
        """Add a managed VM (a new record from ``new_record``)."""
        name = record["name"]
        assert name not in self.vms, name
        self.vms[name] = record
        self._index(record)
        self._place(record, record["vmm"])
        record["version"] += 1
        self._notify(record, None)
        return record

    def update(self, name, **fields):
        """Change fields of a managed VM; returns the record (None if unknown).
        Notifies only when something really changed."""
        record = self.vms.get(name)
        if record is None:
            return None
        old_state = record["state"]
        changed = False
        for key, value in fields.items():
            if value is None and key not in ("vmm",):
                continue
            if record.get(key) != value:
                if key == "vmm":
                    self._place(record, value)
                if key in ("owner", "cluster"):
                    self._unindex(record)
                    record[key] = value
                    self._index(record)
                record[key] = value
                changed = True
        if changed:
            record["version"] += 1
            self._notify(record, old_state)
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

    def _place(self, record, vmm_name):
        old = self.vmms.get(record["vmm"]) if record["vmm"] else None
        if old is not None:
            old.vms.discard(record["name"])
        record["vmm"] = vmm_name
        if vmm_name is not None:
            self.vmms.setdefault(vmm_name, VMMInfo(vmm_name)).vms.add(record["name"])

    # -- unmanaged -----------------------------------------------------------

    def set_unmanaged(self, name, vmm, state, **fields):
        if state is None:
            self.unmanaged.pop(name, None)
            return
        record = self.unmanaged.get(name)
        if record is None:
            record = self.new_record(name, state=state, vmm=vmm, **fields)
            self.unmanaged[name] = record
        record.update(state=state, vmm=vmm)

    def drop_unmanaged_on(self, vmm):
        for name in [n for n, r in self.unmanaged.items() if r["vmm"] == vmm]:
            del self.unmanaged[name]
