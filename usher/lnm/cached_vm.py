"""The controller's VM records on an LNM, checked, and the LNM's cached copy
of each VM it manages (the paper: "the cached copy of a VM at its LNM
contains methods for manipulating the VM it represents").

``check_record`` is the boundary check of every record the controller sends;
``CachedVM`` holds one and carries the operations on that VM through the
VMM (the bookkeeping around them is ``usher.lnm.commands``); ``report_entry`` is
the entry a report carries for one VM.
"""

from twisted.internet import defer

from usher import states
from usher.errors import InvalidRequest, NoSuchVM, OperationFailed
from usher.naming import is_host_vm_name
from usher.protocol import MAX_FIELD

# Operations whose result is a state: replayed on a VM already there, they
# answer with the VM as it is instead of failing (idempotent commands).
_IDEMPOTENT_OPERATIONS = frozenset({"pause", "resume", "shutdown", "hibernate", "restore",
                                    "destroy"})

_RECORD_STR_FIELDS = ("uuid", "owner", "cluster", "lnm")
_RECORD_COUNT_FIELDS = ("memory_mib", "vcpus", "version")


def check_record(record):
    """Validate one VM record from the controller; -> a copy of it.

    Raises InvalidRequest naming the record and the field that is wrong."""
    if not isinstance(record, dict):
        raise InvalidRequest(f"VM record must be a dict, not {type(record).__name__}")
    name = record.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_FIELD:
        raise InvalidRequest("VM record without a valid name")
    state = record.get("state")
    if state is not None and state not in states.ALL_STATES:
        raise InvalidRequest(f"VM record {name}: unknown state {state!r}")
    for field in _RECORD_STR_FIELDS:
        value = record.get(field)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_FIELD):
            raise InvalidRequest(f"VM record {name}: {field} must be a string")
    for field in _RECORD_COUNT_FIELDS:
        value = record.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise InvalidRequest(f"VM record {name}: {field} must be a non-negative integer")
    args = record.get("args")
    if args is not None and not isinstance(args, dict):
        raise InvalidRequest(f"VM record {name}: args must be a dict")
    plugin_args = record.get("plugin_args")
    if plugin_args is not None and (not isinstance(plugin_args, list) or not all(
            isinstance(key, str) for key in plugin_args)):
        raise InvalidRequest(f"VM record {name}: plugin_args must be a list of names")
    return dict(record)


def check_domain(info):
    """Domain info from the VMM is trusted, but a malformed entry must not
    break the scan: -> True if usable. A name the controller would refuse
    (usher.naming.is_host_vm_name; libvirt allows more) is left out."""
    return isinstance(info, dict) and is_host_vm_name(info.get("name"))


def report_entry(name, state, source):
    """A reported change; ``source`` is the domain info (or, for a VM that
    vanished before it was ever observed, the cached record)."""
    metadata = source.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {key: source[key] for key in ("owner", "cluster")
                    if source.get(key) is not None}
    return {"name": name, "state": state, "uuid": source.get("uuid"),
            "memory_mib": source.get("memory_mib"), "vcpus": source.get("vcpus"),
            "metadata": dict(metadata)}


class CachedVM:
    """The LNM's cached copy of a VM the controller manages.

    ``record`` is the controller's record (its view, updated by ``receive``,
    acknowledgments and the results of operations); ``observed`` is the
    domain last observed on the host (None if it is not here). The methods
    carry out operations on the VM through the VMM; bookkeeping around them
    (serialising, settling the cache) is ``usher.lnm.commands``'.
    """

    def __init__(self, ledger, vmm, record):
        self._ledger = ledger
        self._vmm = vmm
        self.record = record
        # One operation at a time per VM; a second waits for the first.
        self.lock = defer.DeferredLock()
        self.busy = False
        # The controller session (NodeManager.begin_session) whose controller
        # sent this record.
        self.session = ledger.session

    @property
    def name(self):
        return self.record["name"]

    @property
    def observed(self):
        return self._ledger.domains.get(self.name)

    def spec(self):
        """The creation spec of IVMM.create/import_image."""
        record = self.record
        for field in ("memory_mib", "vcpus"):
            if not record.get(field):
                raise InvalidRequest(f"cannot start {self.name}: its record has no {field}")
        return {"name": self.name, "uuid": record.get("uuid"),
                "memory_mib": record["memory_mib"], "vcpus": record["vcpus"],
                "owner": record.get("owner"), "cluster": record.get("cluster"),
                "args": dict(record.get("args") or {}),
                # The args the controller's plugins set (the site's values).
                "plugin_args": list(record.get("plugin_args") or ())}

    def start(self):
        return self._vmm.create(self.spec())

    async def operate(self, operation):
        try:
            return await self._vmm.operate(operation, self.name)
        except NoSuchVM:
            if operation == "delete":
                return None  # already gone: delete's goal is met
            raise
        except (InvalidRequest, OperationFailed):
            # A retried or replayed command finds its work done: the VM as it
            # is now is its answer.
            if operation in _IDEMPOTENT_OPERATIONS:
                info = await self._vmm.domain_info(self.name)
                if info.get("state") == states.OPERATION_RESULT[operation]:
                    return info
            raise

    async def remove(self):
        """Power the VM off hard if it runs, then delete it -> None."""
        try:
            info = await self._vmm.domain_info(self.name)
        except NoSuchVM:
            return None
        if info.get("state") in (states.RUN, states.PAUSED):
            if await self.operate("destroy") is None:
                return None     # transient: nothing left to delete
        return await self.operate("delete")

    def migrate(self, target_uri):
        return self._vmm.migrate(self.name, target_uri)

    def export_image(self):
        return self._vmm.export_image(self.name)

    async def import_image(self, exported):
        try:
            return await self._vmm.import_image(self.spec(), exported)
        except InvalidRequest as refused:
            # Imported already (a replayed import): the same VM is its answer.
            uuid = self.record.get("uuid")
            try:
                info = await self._vmm.domain_info(self.name)
            except NoSuchVM:
                raise refused from None      # the refusal says why, not "no such VM"
            if uuid is not None and info.get("uuid") == uuid:
                return info
            raise


