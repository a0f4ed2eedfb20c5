"""What plugins may use of the controller: the ``api`` a plugin's class is
given, and every event carries (``event.api``).

Plugins run on the reactor thread: while an ``entry_point`` computes, the
controller serves nobody (the event chains log a warning when one holds the
reactor longer than ``[ctrl] plugin_hold_warning``). Blocking work -- a
database, a DNS update, a file, a subprocess -- goes through
``api.run_blocking(function, *args, **kwargs)``, which runs ``function`` in
the controller's plugin thread pool and returns a Deferred of its result
(``await`` it in a coroutine ``entry_point``, or return it). The function
runs in another thread: it must not touch the controller's state or call
Twisted APIs; pass it what it needs and act on its result back on the
reactor.
"""

import functools

from twisted.internet import defer, threads

from usher.vmset import Selection

# Threads of the controller's plugin pool (usher.controller.service): blocking
# plugin work beyond these many calls at once waits its turn.
PLUGIN_THREADS = 4


def thread_pool_runner(reactor, pool):
    """-> run(function, *args, **kwargs): a Deferred, fired on the reactor,
    of ``function``'s result computed in ``pool`` (a Twisted ThreadPool,
    started and stopped by its owner)."""
    return functools.partial(threads.deferToThreadPool, reactor, pool)


class PluginAPI:
    """What plugins may use: the state, configuration and a few actions.

    ``run_in_thread`` is how ``run_blocking`` leaves the reactor: a
    callable ``(function, *args, **kwargs) -> Deferred``, normally
    ``thread_pool_runner(reactor, pool)`` with the pool the controller's
    service owns; tests may give a synchronous fake. None: no pool, and
    ``run_blocking`` fails.
    """

    def __init__(self, controller, run_in_thread=None):
        self._controller = controller
        self.run_in_thread = run_in_thread

    @property
    def state(self):
        return self._controller.state

    @property
    def clock(self):
        return self._controller.clock

    @property
    def monitoring(self):
        """The consolidated monitoring figures
        (``usher.controller.monitoring.Monitoring``): ``lnm_load(name)``,
        ``lnm_figure(name, "cpu", 1)``, ``lnm_loads()``, ``vm_load(name)`` ..."""
        return self._controller.monitoring

    @property
    def holds(self):
        """The holds on hosts (``usher.controller.holds.HostHolds``): why an
        LNM takes no new VMs (maintenance, fenced, powered down)."""
        return self._controller.holds

    @property
    def state_dir(self):
        """The controller's state directory (a plugin keeps its own files
        there, written with ``usher.persist.write_json_atomic``), or None
        when the controller persists nothing."""
        return self._controller.state_dir

    @property
    def store(self):
        """The HA database's state store when the controller is one of an
        active/standby pair (``[ctrl] ha_database``), else None. A plugin
        that persists state must then keep it there, not in ``state_dir``
        (the standby taking over has another disk): ``store.load(name)`` ->
        the data saved (None if none), ``store.save(name, data)`` -> a
        Deferred fired once it is durable (write-behind, coalesced, fenced
        by the term of leadership: a deposed controller's write fails).
        ``name`` is the plugin's own (e.g. ``leases``); ``data`` JSON-able.
        (``usher.controller.store.IStateStore``)."""
        return getattr(self._controller, "store", None)

    @property
    def default_memory(self):
        return self._controller.default_memory

    @property
    def default_vcpus(self):
        return self._controller.default_vcpus

    async def settled(self):
        """Wait until the controller's global state is rebuilt after a
        restart (every LNM known before is back, or the recovery window is
        over); at once when it is not recovering."""
        await self._controller.settled()

    @property
    def recovering(self):
        return self._controller.recovering

    def run_blocking(self, function, *args, **kwargs):
        """Run ``function(*args, **kwargs)`` in the controller's plugin
        thread pool, off the reactor. -> Deferred of its result (or of its
        exception). See the module docstring for what the function may do."""
        if self.run_in_thread is None:
            return defer.fail(RuntimeError(
                "this controller has no plugin thread pool (PluginAPI.run_in_thread)"))
        return self.run_in_thread(function, *args, **kwargs)

    def register_plugin(self, name, event, config_file=None, order=None):
        return self._controller.plugins.register(name, event, config_file, order)

    def unregister_plugin(self, name, event=None):
        return self._controller.plugins.unregister(name, event)

    def register_query(self, name, handler, owner=None):
        """Answer users' ``query(name, args)`` with ``async handler(user,
        admin, args) -> list`` of JSON-able items; the handler decides what
        the caller may see. The query goes away with the plugin (``owner``:
        default the handler's instance, or the plugin whose ``__init__``
        registers it). See usher.controller.queries."""
        self._queries().register(name, handler, owner)

    def unregister_query(self, name):
        """-> True if the query ``name`` was registered."""
        return self._queries().unregister(name)

    def _queries(self):
        if self._controller.plugins is None:
            raise RuntimeError("this controller has no plugin registry")
        return self._controller.plugins.queries

    def migrate(self, vms, lnms=(), args=None):
        """Migrate VMs on the system's behalf (rebalancers); -> Deferred."""
        return defer.Deferred.fromCoroutine(self._controller.migrate(
            "usher", True, Selection(names=list(vms)), list(lnms), args))

    # -- leases (issue 15) -------------------------------------------------------------

    def op_on(self, operation, vms, args=None):
        """Run a Table 3 operation (``shutdown``, ``hibernate``, ``destroy``
        …) or ``delete`` (``args={"force": True}``: running VMs too) on VMs on the system's behalf (leases, policies), through its
        ``<operation>_request`` chain as any request; -> Deferred of the
        result (``{"operation", "done", "failed", "notes"}``)."""
        return defer.Deferred.fromCoroutine(self._controller.op_on(
            "usher", True, operation, Selection(names=list(vms)), args))

    def notify_user(self, user, kind, message):
        """Tell every session ``user`` has open (ush prints a ``[notice]``
        line, the browser shows it): ``kind`` a short word (``lease``),
        ``message`` one line (at most 1,000 characters). -> how many
        sessions; never waits (usher.controller.notices)."""
        return self._controller.notify_user(user, kind, message)

    # -- part A: maintenance and evacuation (issue 15) --

    def set_maintenance(self, lnm, on, reason=None, evacuate=False, concurrency=None):
        """Put an LNM into maintenance or take it out, as the system; ->
        Deferred of its status (``usher.controller.maintenance``)."""
        return defer.Deferred.fromCoroutine(self._controller.maintenance.set(
            lnm, on, by="usher", reason=reason, evacuate=evacuate, concurrency=concurrency))

    # -- HA restart only with fencing (issue 15, part B) --------------------------

    @property
    def fencing(self):
        """``usher.controller.fencing.Fencing``: fenced hosts, what was
        restarted off them, the ``stale_copies`` policy."""
        return self._controller.fencing

    def confirm_fenced(self, lnm, evidence, by="usher"):
        """The host of disconnected ``lnm`` is known to be off. -> the hold."""
        return self._controller.confirm_fenced(lnm, evidence=evidence, by=by)

    def restart_elsewhere(self, names, by="usher"):
        """Restart elsewhere VMs lost on fenced LNMs; -> Deferred of
        {"started", "failed", "notes"}. The core refuses any other VM."""
        return defer.Deferred.fromCoroutine(self._controller.restart_elsewhere(
            list(names), by=by))
