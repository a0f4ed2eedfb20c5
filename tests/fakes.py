"""The test doubles shared by the tests, each checked against the interface
it stands for (tests/test_fakes.py):

- ``FakeVMM``: a hypervisor in a dict (``IVMM``) for NodeManager tests;
- ``RecordingReporter``, ``HeldReporter``: a NodeManager's reporter, the
  controller side of its reports (``record`` and ``echo_acks`` make the
  records such a controller answers with);
- ``FakeLNMHandle``: the controller's handle on an LNM (``ILNMHandle``) whose
  inventory a test sets;
- ``FakeAuthModule``: a link of the authentication chain (``IAuthModule``);
- ``FakeMonitoring``: the controller's monitoring with chosen figures.
"""

import copy
import uuid as uuidlib

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from usher import states
from usher.errors import MigrationUnsupported, NoSuchVM, OperationFailed
from usher.interfaces import IAuthModule, ILNMHandle, IVMM

VM = "1.web.alice.usher.local"


def record(name=VM, state=states.STARTING, **extra):
    """A VM record as the controller sends it to an LNM."""
    base = {"name": name, "owner": "alice", "cluster": "web", "state": state,
            "lnm": "lnm1", "memory_mib": 128, "vcpus": 2, "uuid": None, "managed": True,
            "version": 1, "args": {}}
    base.update(extra)
    return base


def echo_acks(changes):
    """A controller that manages every reported VM and records its new state
    (MISSING for a VM that vanished)."""
    return [record(c["name"], c["state"] or states.MISSING, version=2) for c in changes]


_RESULTS = dict(states.OPERATION_RESULT)


@implementer(IVMM)
class FakeVMM:
    """A hypervisor in a dict. Calls answer at once unless ``hold`` is set:
    then each call waits in ``held`` until ``release()``."""

    def __init__(self, uri="fake:///host", hostname="host1", live_migration=True):
        self.uri = uri
        self.hostname = hostname
        self.live_migration = live_migration
        self.domains = {}
        self.callbacks = []
        self.calls = []
        self.hold = False
        self.held = []
        self.fail_next = None

    # -- test controls -------------------------------------------------------

    def release(self):
        held, self.held = self.held, []
        for d, action in held:
            self._answer(d, action)

    def emit(self, name, state):
        for callback in list(self.callbacks):
            callback(name, state)

    def set_state(self, name, state, *, emit=True):
        self.domains[name]["state"] = state
        if emit:
            self.emit(name, state)

    def add_domain(self, name, state=states.RUN, metadata=None, *, emit=False):
        self.domains[name] = {"name": name, "uuid": str(uuidlib.uuid4()), "state": state,
                              "memory_mib": 64, "vcpus": 1, "metadata": dict(metadata or {})}
        if emit:
            self.emit(name, state)

    def remove_domain(self, name, *, emit=False):
        del self.domains[name]
        if emit:
            self.emit(name, None)

    # -- plumbing ------------------------------------------------------------

    def _answer(self, d, action):
        try:
            d.callback(action())
        except Exception as e:
            d.errback(e)

    def _call(self, method, action, *args):
        self.calls.append((method,) + args)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            return defer.fail(error)
        d = defer.Deferred()
        if self.hold:
            self.held.append((d, action))
        else:
            self._answer(d, action)
        return d

    def _info(self, name):
        if name not in self.domains:
            raise NoSuchVM(f"no domain {name}")
        return copy.deepcopy(self.domains[name])

    # -- IVMM ----------------------------------------------------------------

    def connect(self):
        return defer.succeed(None)

    def close(self):
        return defer.succeed(None)

    def node_info(self):
        return self._call("node_info", lambda: {
            "hostname": self.hostname, "uri": self.uri, "driver": "fake", "cpus": 4,
            "memory_mib": 4096, "model": "fake-model", "live_migration": self.live_migration})

    def node_status(self):
        return self._call("node_status", lambda: {
            "vms": sum(1 for d in self.domains.values() if d["state"] == states.RUN),
            "free_memory_mib": None})

    def list_domains(self):
        return self._call("list_domains",
                          lambda: [copy.deepcopy(d) for d in self.domains.values()])

    def domain_info(self, name):
        return self._call("domain_info", lambda: self._info(name), name)

    def create(self, spec):
        def create():
            name = spec["name"]
            if name in self.domains:
                if self.domains[name]["state"] == states.SHUTOFF:
                    self.domains[name]["state"] = states.RUN
                return self._info(name)
            self.domains[name] = {
                "name": name, "uuid": spec.get("uuid") or str(uuidlib.uuid4()),
                "state": states.RUN, "memory_mib": spec["memory_mib"],
                "vcpus": spec["vcpus"],
                "metadata": {"owner": spec["owner"], "cluster": spec["cluster"]}}
            return self._info(name)
        return self._call("create", create, spec["name"])

    def operate(self, operation, name):
        def operate():
            info = self._info(name)
            if info["state"] not in states.OPERATION_PRECONDITIONS[operation]:
                raise OperationFailed(f"cannot {operation} {name}: it is {info['state']}")
            if operation == "delete":
                del self.domains[name]
                return None
            self.domains[name]["state"] = _RESULTS[operation]
            return self._info(name)
        return self._call("operate", operate, operation, name)

    def migrate(self, name, target_uri):
        def migrate():
            self._info(name)
            if not self.live_migration:
                raise MigrationUnsupported("the fake driver cannot migrate")
            del self.domains[name]
        return self._call("migrate", migrate, name, target_uri)

    def export_image(self, name):
        def export():
            info = self._info(name)
            del self.domains[name]
            image = b"IMAGE:" + info["name"].encode() + bytes(range(256)) * 3
            return {"xml": f"<domain><name>{name}</name></domain>", "image": image,
                    "state": info["state"]}
        return self._call("export_image", export, name)

    def import_image(self, spec, exported):
        def restore():
            if not exported["image"].startswith(b"IMAGE:" + spec["name"].encode()):
                raise OperationFailed("not an image of " + spec["name"])
            self.domains[spec["name"]] = {
                "name": spec["name"], "uuid": spec.get("uuid") or str(uuidlib.uuid4()),
                "state": states.RUN, "memory_mib": spec["memory_mib"], "vcpus": spec["vcpus"],
                "metadata": {"owner": spec["owner"], "cluster": spec["cluster"]}}
            return self._info(spec["name"])
        return self._call("import_image", restore, spec["name"])

    def subscribe(self, callback):
        self.callbacks.append(callback)


class RecordingReporter:
    """A reporter that records each batch and answers with ``acks(changes)``
    (default: no records, as for unmanaged VMs), or fails while ``failing``."""

    def __init__(self, acks=None):
        self.batches = []
        self.acks = acks or (lambda changes: [])
        self.failing = None

    async def report(self, changes):
        self.batches.append([dict(c) for c in changes])
        if self.failing is not None:
            raise self.failing
        return self.acks(changes)

    @property
    def reported(self):
        return [c for batch in self.batches for c in batch]


class HeldReporter(RecordingReporter):
    """A reporter whose every report waits, in ``answers``, to be answered
    (then acknowledged as ``echo_acks`` would, or failed while ``failing``)."""

    def __init__(self):
        super().__init__(echo_acks)
        self.answers = []

    async def report(self, changes):
        self.batches.append([dict(c) for c in changes])
        answer = defer.Deferred()
        self.answers.append(answer)
        await answer
        if self.failing is not None:
            raise self.failing
        return self.acks(changes)


@implementer(ILNMHandle)
class FakeLNMHandle:
    """An LNM handle answering from what the test sets: ``node_info``,
    ``inventory`` (passed through ``check`` when given, e.g. the PB
    boundary's checks), recording what it is sent; commands it does not
    model fail as the LNM would refuse them."""

    def __init__(self, inventory=(), node_info=None, check=None):
        self.inventory = inventory
        self.node_info = node_info or {"hostname": "h", "cpus": 8, "memory_mib": 8192}
        self.check = check
        self.received = []
        self.disconnected = False

    async def get_node_info(self):
        return dict(self.node_info)

    async def get_node_status(self):
        return {"vms": 0, "free_memory_mib": None}

    async def list_vms(self):
        return self.check(self.inventory) if self.check else list(self.inventory)

    async def receive(self, records):
        self.received.extend(copy.deepcopy(records))
        return len(records)

    async def _not_modelled(self, *args):
        raise OperationFailed("not modelled by FakeLNMHandle")

    get_details = get_status = start = start_many = op_on = migrate = _not_modelled
    export_image = import_image = release_export = restore_export = _not_modelled

    def ping(self):
        return defer.succeed(True)

    def disconnect(self):
        self.disconnected = True

    abort = disconnect


@implementer(IAuthModule)
class FakeAuthModule:
    """Answers from a table; records who it was asked about."""

    def __init__(self, name, answer):
        self.name = name
        self.answer = answer
        self.asked = []

    def authenticate(self, username, password):
        self.asked.append((username, password))
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        if callable(self.answer):
            return self.answer(username, password)
        return defer.succeed(self.answer)


class FakeMonitoring:
    """Wraps the controller's ``Monitoring`` and answers the figures plugins
    read with chosen values: ``hosts`` maps an LNM to its CPU percent (of the
    host), ``vms`` a VM to its CPU percent (of one CPU), the same for every
    window; everything else goes to the real one.

        grid.controller.monitoring = FakeMonitoring(grid.controller.monitoring,
                                                    hosts={"lnm1": 95.0})
    """

    class _Load:
        def __init__(self, age):
            self.age = age

    def __init__(self, real, hosts=None, vms=None):
        self._real = real
        self.hosts = dict(hosts or {})
        self.vms = dict(vms or {})
        self.age = 1.0

    def __getattr__(self, name):
        return getattr(self._real, name)

    def lnm_figure(self, lnm, figure="cpu", window=1):
        return self.hosts.get(lnm) if figure == "cpu" else None

    def vm_figure(self, name, figure="cpu", window=1):
        return self.vms.get(name) if figure == "cpu" else None

    def lnm_load(self, lnm):
        return self._Load(self.age) if lnm in self.hosts else None

    def vm_load(self, name):
        return self._Load(self.age) if name in self.vms else None


def result_of(coroutine_or_deferred):
    """The result of work that must already have finished (in-memory fakes
    answer at once): raised if it failed, AssertionError if it has not."""
    d = coroutine_or_deferred
    if not isinstance(d, defer.Deferred):
        d = defer.Deferred.fromCoroutine(d)
    results = []
    d.addBoth(results.append)
    assert results, "still waiting"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]
