"""The controller (paper, Table 4): the thin front that wires its rooms.

Plain Python with async methods; no Perspective Broker here. Each job is in
its own module:

- ``visibility``: selections, ``list``, ``list_lnm``, ``top``;
- ``starting``: ``start`` (batches of ``start_many``); ``operations``: ``op_on``;
- ``migration``: ``migrate``, each VM's move a state machine;
- ``inventory`` and ``observation``: the attached LNMs and what they report;
- ``inflight``: what is under way on VMs and not settled yet;
- ``commands``: what the commands share.

LNMs are reached through handles providing ``usher.interfaces.ILNMHandle``
(``usher.controller.lnm_link.RemoteLNM`` over PB, or an in-process handle in
tests). Failures: README "Failures and recovery", ``usher.controller.inventory``.

Every change of a VM's state goes through ``GlobalState``, whose listener
here tells plugins ``vm_state_changed`` once per change (starts, operations,
migrations, reports, lost and missing VMs, recovery) and ``vm_removed``.
"""

import functools

from usher.controller.affinity import AffinityRules
from usher.controller.commands import LNMSlots
from usher.controller.events import Event, EventChains
from usher.controller.fencing import Fencing
from usher.controller.holds import HostHolds
from usher.controller.inflight import InFlight
from usher.controller.inventory import LNMInventory
from usher.controller.lnm_input import LNMLimits
from usher.controller.maintenance import DEFAULT_CONCURRENCY, Maintenance
from usher.controller.migration import Migrations
from usher.controller.monitoring import Monitoring, NoInstruments
from usher.controller.notices import UserNotices
from usher.controller.operations import Operations
from usher.controller.plugin_api import PluginAPI
from usher.controller.starting import START_BATCH, Starts
from usher.controller.state import GlobalState
from usher.controller.subscriptions import SubscriptionHub
from usher.controller.visibility import Visibility
from usher.vmset import MAX_NAMES, MAX_PATTERNS, Limits


class Controller:
    """Table 4's requests, the global state and the LNMs, as one object the
    PB boundaries, plugins and services hold."""

    def __init__(self, *, domain, clock, admins=(), default_memory=256, default_vcpus=1,
                 max_request_vms=1000, known_lnms=None, lnm_concurrency=64,
                 status_history=60, vm_status_history=15, status_history_interval=60.0,
                 user_visibility="own", max_selection_names=MAX_NAMES,
                 max_selection_patterns=MAX_PATTERNS, lnm_limits=None, state_dir=None, store=None,
                 evacuation_concurrency=DEFAULT_CONCURRENCY):
        self.domain = domain
        # Where the controller's own files live (None: nothing persisted;
        # in-process tests); plugins reach it as api.state_dir.
        self.state_dir = state_dir
        # The HA database's store (usher.controller.store), None: files in
        # state_dir; plugins reach it as api.store.
        self.store = store
        # The term of leadership (0: a single controller).
        self.term = 0
        # One of a standby pair (usher.controller.ha_service.HAController)?
        self.ha = False
        self.ha_name = None
        self.clock = clock
        self.admins = set(admins)
        self.lnm_limits = lnm_limits or LNMLimits()
        self.state = GlobalState(domain)
        self.chains = EventChains(clock)
        # Why hosts take no new VMs (maintenance, fencing, power), persisted
        # with the known LNMs; placement reads them through the state.
        self.holds = HostHolds(known_lnms)
        self.state.holds = self.holds
        self.api = PluginAPI(self)
        # -- affinity (issue 15): the clusters' rules; placement reads them
        # through the state, as it reads the holds --
        self.affinity = AffinityRules(state_dir, self.api, store=store)
        self.state.affinity = self.affinity
        self.plugins = None          # a PluginRegistry, set by the service
        self.hub = SubscriptionHub(self.state, clock)
        self.monitoring = Monitoring(self.state, clock, lnm_history=status_history,
                                     vm_history=vm_status_history,
                                     history_interval=status_history_interval)
        # Logged-in client sessions (the PB boundary counts them).
        self.client_sessions = 0
        # Request and plugin-chain timings (usher.controller.metrics).
        self.instruments = NoInstruments()

        self.inflight = InFlight()
        shared = dict(state=self.state, chains=self.chains, api=self.api,
                      ledger=self.inflight)
        self.visibility = Visibility(
            domain=domain, state=self.state, chains=self.chains, api=self.api,
            monitoring=self.monitoring, clock=clock,
            limits=Limits(max_selection_names, max_selection_patterns),
            user_visibility=user_visibility, settled=self.settled)
        self.inventory = LNMInventory(domain=domain, clock=clock, monitoring=self.monitoring,
                                      lnm_limits=self.lnm_limits, known_lnms=known_lnms,
                                      **shared)
        rooms = dict(shared, inventory=self.inventory, visibility=self.visibility)
        slots = LNMSlots(lnm_concurrency, START_BATCH)
        self.starts = Starts(domain=domain, clock=clock, slots=slots,
                             max_request_vms=max_request_vms, default_memory=default_memory,
                             default_vcpus=default_vcpus, **rooms)
        self.operations = Operations(slots=slots, **rooms)
        self.migrations = Migrations(**rooms)
        # (issue 15, part B) HA restart only with fencing.
        self.fencing = Fencing(state=self.state, holds=self.holds, inventory=self.inventory,
                               starts=self.starts, ledger=self.inflight, clock=clock)
        self.state.listen(self._state_changed)
        self.holds.listen(self._hold_changed)
        # -- part A: maintenance and evacuation (issue 15) --
        self.maintenance = Maintenance(state=self.state, holds=self.holds,
                                       inventory=self.inventory, migrations=self.migrations,
                                       clock=clock, settled=self.settled,
                                       concurrency=evacuation_concurrency)

    # -- settings the rooms hold ------------------------------------------------------

    @property
    def default_memory(self):
        return self.starts.default_memory

    @property
    def default_vcpus(self):
        return self.starts.default_vcpus

    @property
    def max_request_vms(self):
        return self.starts.max_request_vms

    @property
    def known_lnms(self):
        return self.inventory.known_lnms

    @property
    def recovery(self):
        """A usher.controller.recovery.Recovery while the controller recovers
        (set by the RecoveryService), else None."""
        return self.inventory.recovery

    @recovery.setter
    def recovery(self, recovery):
        self.inventory.recovery = recovery

    @property
    def recovering(self):
        return self.inventory.recovering

    async def settled(self):
        """Wait until the global state is rebuilt after a restart."""
        await self.inventory.settled()

    # -- users and selections -----------------------------------------------------------

    def is_admin(self, user, role=None):
        return role == "admin" or user in self.admins

    def budget(self):
        return self.visibility.budget()

    def selection(self, selection, budget=None):
        return self.visibility.selection(selection, budget)

    # -- Table 4 --------------------------------------------------------------------------

    async def list(self, user, admin, selection, status=False):
        return await self.visibility.list(user, admin, selection, status)

    async def list_chunks(self, user, admin, selection, status=False):
        """``list`` JSON-encoded in chunks, as the client boundary sends it."""
        return await self.visibility.list_chunks(user, admin, selection, status)

    def list_lnm(self, user, admin, patterns=(), status=False, budget=None):
        return self.visibility.list_lnm(user, admin, patterns, status, budget)

    async def top(self, user, admin, patterns=(), count=10):
        return await self.visibility.top(user, admin, patterns, count)

    async def start(self, user, admin, vms, lnms=(), args=None):
        return await self.starts.start(user, admin, vms, lnms, args)

    async def op_on(self, user, admin, operation, selection, args=None):
        return await self.operations.op_on(user, admin, operation, selection, args)

    async def migrate(self, user, admin, selection, lnms=(), args=None):
        return await self.migrations.migrate(user, admin, selection, lnms, args)

    # -- LNMs -------------------------------------------------------------------------------

    async def attach_lnm(self, name, handle, hello=None):
        await self.inventory.attach(name, handle, hello)

    def detach_lnm(self, name, handle):
        self.inventory.detach(name, handle)

    def forget_lnm(self, name):
        """Retire a disconnected LNM and the VMs last known on it. -> their names."""
        return self.inventory.forget(name)

    def watch_lnms(self, watcher):
        """``watcher.lnm_attached(name, handle)``, ``watcher.lnm_detached(name, handle)``."""
        self.inventory.watch(watcher)

    def lnm_report(self, lnm, changes):
        return self.inventory.report(lnm, changes)

    def lnm_status_report(self, lnm, node, vms, kept=()):
        return self.inventory.status_report(lnm, node, vms, kept)

    def lnm_refused(self, lnm, what, error):
        self.inventory.refused(lnm, what, error)

    def resolve_soon(self):
        self.inventory.resolve_soon()

    # -- affinity (issue 15) --

    async def set_affinity(self, user, admin, cluster, rule=None):
        """Read (``rule`` None) or set a cluster's affinity rule."""
        return await self.affinity.answer(self.state, user, admin, cluster, rule)

    # -- notifications to plugins -----------------------------------------------------------

    def _hold_changed(self, lnm, kind, details):
        self.chains.notify(Event("lnm_hold_changed", self.api, lnm=lnm, kind=kind,
                                 held=details is not None, details=details or {}))

    def _state_changed(self, record, old_state):
        """Every change to a VM's record (GlobalState's listener): plugins
        hear of each change of its state once, whatever made it."""
        new_state = record["state"]
        if new_state is None:
            if old_state is not None:
                self.inflight.move_settled(record["name"])
                self.chains.notify(Event("vm_removed", self.api, vm=dict(record)))
        elif old_state is not None and new_state != old_state:
            self.chains.notify(Event("vm_state_changed", self.api, vm=dict(record),
                                     old_state=old_state, new_state=new_state,
                                     origin=self.state.change_origin))

    # -- leases (issue 15): notices to users' clients --------------------------------------

    @functools.cached_property
    def notices(self):
        """The sessions of every logged-in user, for notices
        (``usher.controller.notices.UserNotices``; the realm adds them)."""
        return UserNotices(self.clock)

    def notify_user(self, user, kind, message):
        """Push a notice (``kind``: a short word such as ``lease``; one line
        of text) to every session ``user`` has open -> how many sessions.
        Bounded and never waited on: usher.controller.notices."""
        return self.notices.notify(user, kind, message)

    # -- HA restart only with fencing (issue 15, part B) ----------------------------------

    def confirm_fenced(self, lnm, *, evidence, by):
        return self.fencing.confirm_fenced(lnm, evidence=evidence, by=by)

    async def restart_elsewhere(self, names, *, by="usher"):
        return await self.fencing.restart_elsewhere(names, by=by)
