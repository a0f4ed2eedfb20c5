"""Events, requests and the plugin chains that process them.

Every client request becomes a ``Request`` that travels down the chain of
plugins registered for its event (``start_request``, ``migrate_request``,
``pause_request`` …), lowest ``order`` first. Each plugin may approve it
(do nothing), modify it (drop VMs, place VMs, change arguments) or reject
it. Other events (``register_vm``, ``start_complete``, ``vm_state_changed``,
``lnm_connected`` …) notify plugins of what happened.

Failure rule: on a request chain a plugin that raises or exceeds its timeout
rejects the request (fail closed: a broken authorization plugin must not let
requests through); on a notification chain it is logged and the chain goes
on. A plugin's timeout is its own ``timeout`` (set from its configuration
file) or else the chains' default.

The ``timer`` event is not a chain that something fires: each plugin
registered for it is called on its own, every ``interval`` seconds (see
``usher.controller.plugins.PluginTimer``).

A request event nobody registered for falls back on another's chain when
``FALLBACK_CHAINS`` names one: ``delete_request`` (issue 17) runs the
``destroy_request`` chain while it has no plugin of its own, so a site that
authorized removal on ``destroy_request`` before delete existed keeps its
policy (logged once, the first time).

Plugins run on the reactor thread. The chains time the synchronous part of
every call (``entry_point`` itself and, for a coroutine, its first step up
to the first ``await`` that waits) and log a warning naming the plugin, the
event and the milliseconds when it held the reactor longer than
``hold_warning`` seconds: blocking work belongs in
``PluginAPI.run_blocking`` (``usher.controller.plugin_api``).
"""

import time

from twisted.internet import defer
from twisted.logger import Logger

from usher.errors import Rejected
from usher.states import OPERATIONS

log = Logger()

REQUEST_EVENTS = ("start_request", "migrate_request", "list_request") + tuple(
    f"{op}_request" for op in OPERATIONS)
NOTIFICATION_EVENTS = (
    "register_vm", "start_complete", "migrate_complete", "op_complete",
    "vm_state_changed", "vm_lost", "vm_missing", "vm_unmanaged", "vm_adopted",
    "vm_removed", "lnm_connected", "lnm_disconnected", "lnm_hold_changed",
    "user_authenticated",
    "timer", "error")
ALL_EVENTS = REQUEST_EVENTS + NOTIFICATION_EVENTS
# event -> the chain that runs for it while nobody is registered on its own.
FALLBACK_CHAINS = {"delete_request": "destroy_request"}


class Request:
    """A user's request as plugins see it.

    ``vms`` are full VM names; ``lnms`` the caller's LNM suggestion (a hint
    that policy may ignore); ``placement`` maps a VM to the LNM a placement
    plugin chose; ``args`` holds every extra argument of the request (OS,
    filesystem …) for plugins to use.
    """

    def __init__(self, kind, user, *, admin=False, vms=(), lnms=(), args=None,
                 records=None):
        self.kind = kind
        self.user = user
        self.admin = admin
        self.vms = list(vms)
        self.lnms = list(lnms)
        self.args = dict(args or {})
        self.records = records or {}   # name -> record, for requests on existing VMs
        self.placement = {}
        # name -> the host it leaves: VMs of a start request that placement
        # must put on another host than the one their record names (an HA
        # restart of a VM whose host was fenced), as for a migration.
        self.relocate = {}
        self.vm_args = {}              # name -> extra arguments for that VM only
        self.dropped = {}              # name -> reason (approved with modification)
        self.dropped_codes = {}        # name -> its code, when not "rejected"
        self.rejected = None
        self.rejected_by = None
        self.notes = []

    def reject(self, reason):
        self.rejected = str(reason)

    def drop(self, vm, reason, code=None):
        """Approve with modification: leave ``vm`` out, telling the user why
        (``code``: one of usher.errors.ERROR_CODES for the failed entry;
        default "rejected")."""
        if vm in self.vms:
            self.vms.remove(vm)
            self.placement.pop(vm, None)
            self.dropped[vm] = str(reason)
            if code is not None:
                self.dropped_codes[vm] = str(code)

    def place(self, vm, lnm):
        self.placement[vm] = lnm

    def set_vm_arg(self, vm, key, value):
        """Give one VM an argument of its own (an IP address, a disk …); it
        lands in that VM's record ``args``."""
        self.vm_args.setdefault(vm, {})[key] = value

    def note(self, message):
        self.notes.append(str(message))


class Event:
    """What a plugin's ``entry_point`` receives."""

    def __init__(self, name, api, *, request=None, **data):
        self.name = name
        self.api = api            # the controller's PluginAPI
        self.request = request
        self.data = data
        self.fired_at = time.time()

    def __getattr__(self, key):
        try:
            return self.__dict__["data"][key]
        except KeyError:
            raise AttributeError(key) from None

    def __repr__(self):
        return f"<Event {self.name} {self.data!r}>"


class Registration:
    __slots__ = ("plugin", "event", "order", "seq", "config_file")

    def __init__(self, plugin, event, order, seq, config_file):
        self.plugin = plugin
        self.event = event
        self.order = order
        self.seq = seq
        self.config_file = config_file

    def sort_key(self):
        return (self.order, self.seq)


class EventChains:
    """The per-event chains of plugin registrations, and firing them."""

    def __init__(self, clock, timeout=10.0, *, hold_warning=0.1, monotonic=time.monotonic):
        self.clock = clock
        self.timeout = timeout
        # Seconds a plugin's synchronous part may hold the reactor before a
        # warning; measured with ``monotonic`` (tests give a fake).
        self.hold_warning = hold_warning
        self.monotonic = monotonic
        self._chains = {}
        self._seq = 0
        self._fallbacks_logged = set()
        # observer(event name, outcome, seconds) after each chain ran
        # (the controller's metrics); None: not timed.
        self.observer = None

    def add(self, plugin, event, *, order=None, config_file=None):
        if event not in ALL_EVENTS:
            raise ValueError(f"unknown event {event!r}")
        chain = self._chains.setdefault(event, [])
        if any(r.plugin.name == plugin.name for r in chain):
            raise ValueError(f"plugin {plugin.name} is already registered for {event}")
        self._seq += 1
        if order is None:
            order = getattr(plugin, "order", None)
        # Unordered plugins run in registration order, after ordered ones of the
        # same value.
        chain.append(Registration(plugin, event, 1000 if order is None else order,
                                  self._seq, config_file))
        chain.sort(key=Registration.sort_key)

    def remove(self, plugin_name, event=None):
        removed = []
        for name, chain in self._chains.items():
            if event is not None and name != event:
                continue
            for reg in [r for r in chain if r.plugin.name == plugin_name]:
                chain.remove(reg)
                removed.append(reg)
        return removed

    def registrations(self, event=None):
        if event is not None:
            return list(self._chains.get(event, []))
        return [r for chain in self._chains.values() for r in chain]

    def has(self, event):
        return bool(self._chains.get(event))

    def _still_registered(self, reg):
        # A plugin unregistered while a chain is running is not called any more.
        return reg in self._chains.get(reg.event, ())

    def timeout_of(self, plugin):
        return getattr(plugin, "timeout", None) or self.timeout

    async def _call(self, reg, event):
        result = self._enter(reg, event)
        if isinstance(result, defer.Deferred):
            result.addTimeout(self.timeout_of(reg.plugin), self.clock)
            await result

    def _enter(self, reg, event):
        """Call the plugin and run it as far as it goes without waiting,
        timing how long it held the reactor. -> its result, a coroutine
        made a Deferred."""
        started = self.monotonic()
        try:
            result = reg.plugin.entry_point(event)
            if hasattr(result, "__await__") and not isinstance(result, defer.Deferred):
                result = defer.ensureDeferred(result)
            return result
        finally:
            held = self.monotonic() - started
            if held > self.hold_warning:
                log.warn("plugin {plugin} held the reactor for {held_ms} ms on {event} "
                         "(warning above {threshold_ms} ms): the controller served nobody "
                         "meanwhile; blocking work belongs in api.run_blocking",
                         plugin=reg.plugin.name, event=event.name,
                         held_ms=round(held * 1000), threshold_ms=round(self.hold_warning * 1000))

    async def call_one(self, reg, event):
        """Call one registration as a notification (timers): a failure or
        timeout is logged and swallowed. -> True if the plugin succeeded."""
        try:
            await self._call(reg, event)
        except Exception:
            log.failure("plugin {plugin} failed on {event}", plugin=reg.plugin.name,
                        event=event.name)
            return False
        return True

    async def fire_request(self, event):
        """Run a request event down its chain; raises Rejected if a plugin
        rejects the request or fails."""
        return await self._timed(self._fire_request, event)

    async def fire_notification(self, event):
        return await self._timed(self._fire_notification, event)

    async def _timed(self, fire, event):
        observer = self.observer
        if observer is None:
            return await fire(event)
        started = self.clock.seconds()
        outcome = "error"
        try:
            result = await fire(event)
            outcome = "ok"
            return result
        except Rejected:
            outcome = "rejected"
            raise
        finally:
            try:
                observer(event.name, outcome, self.clock.seconds() - started)
            except Exception:
                log.failure("chain observer failed on {event}", event=event.name)

    def _request_chain(self, event_name):
        """-> the name of the chain that runs for a request event: its own,
        or while that is empty its FALLBACK_CHAINS one."""
        fallback = FALLBACK_CHAINS.get(event_name)
        if fallback is None or self.has(event_name) or not self.has(fallback):
            return event_name
        if event_name not in self._fallbacks_logged:
            self._fallbacks_logged.add(event_name)
            log.warn("no plugin is registered on {event}: its requests go through the "
                     "{fallback} chain ({plugins}) until one is, so that the policy this "
                     "site set for {fallback} keeps applying; register plugins on {event} "
                     "in ctrl.config's [[plugins]] to give it its own",
                     event=event_name, fallback=fallback,
                     plugins=", ".join(r.plugin.name for r in self.registrations(fallback)))
        return fallback

    async def _fire_request(self, event):
        """Run a request event down its chain; raises Rejected if a plugin
        rejects the request or fails."""
        request = event.request
        for reg in self.registrations(self._request_chain(event.name)):
            if not self._still_registered(reg):
                continue
            try:
                await self._call(reg, event)
            except Exception as e:
                log.failure("plugin {plugin} failed on {event}; rejecting the request",
                            plugin=reg.plugin.name, event=event.name)
                request.reject(f"plugin {reg.plugin.name} failed: {e.__class__.__name__}: {e}")
            if request.rejected is not None:
                request.rejected_by = reg.plugin.name
                raise Rejected(f"{request.rejected} (rejected by {reg.plugin.name})")
        return request

    async def _fire_notification(self, event):
        for reg in self.registrations(event.name):
            if not self._still_registered(reg):
                continue
            try:
                await self._call(reg, event)
            except Exception:
                log.failure("plugin {plugin} failed on {event}",
                            plugin=reg.plugin.name, event=event.name)

    def notify(self, event):
        """Fire a notification without waiting for it (never blocks the caller)."""
        if not self.has(event.name):
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(self.fire_notification(event))
