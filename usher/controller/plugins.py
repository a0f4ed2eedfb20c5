"""Finding, loading and registering plugins.

Plugins are modules in the ``usher.plugins`` package (the source tree's
``plugins/``) and in a configurable third-party directory; every module
found is *available*. A module provides a class ``Plugin(config, api)`` with
an ``entry_point(event)`` method, and may declare ``CONFIG_SPEC`` (the spec of
its configuration file, read with the same rules as the daemons' files) and
``DEFAULT_ORDER``.

``register_plugin(name, event, config_file)`` makes one instance per
(plugin, config file) and puts it on the event's chain, so one plugin may sit
on several chains and keep one state.

Every plugin configuration file may also set ``order`` (position on chains),
``timeout`` (seconds a Deferred it returns may take; default: the
controller's ``plugin_timeout``) and ``interval`` (seconds between calls
when registered for ``timer``; a module may give ``DEFAULT_INTERVAL``).
Registering for ``timer`` starts calling the plugin periodically;
unregistering stops it.

A plugin's position on a chain is, first found: the order given to
``register`` (``order`` of a ``[[plugins]]`` registration, or of
``register_plugin``), the ``order`` of its configuration file, the order its
instance set itself, the module's ``DEFAULT_ORDER``, else 1000 (after the
ordered plugins, in registration order).

``register_configured`` registers a whole ``[[plugins]]`` section: the
daemon's service and the test grids use it.
"""

import ast
import importlib
import importlib.util
import os
import pkgutil
import sys

from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import directlyProvides, providedBy
from zope.interface.verify import verifyObject

from usher.config import parse_spec
from usher.controller.events import Event
from usher.controller.queries import PluginQueries
from usher.errors import ConfigError, InvalidRequest, UsherError
from usher.interfaces import IPlugin

log = Logger()

BUILTIN_PACKAGE = "usher.plugins"
THIRD_PARTY_PREFIX = "usher_thirdparty_plugins"
TIMER_EVENT = "timer"

# Options every plugin configuration accepts unless its CONFIG_SPEC declares
# them itself (``order`` is added by usher.config.load_plugin_config).
COMMON_OPTIONS = {
    "timeout": "float(gt=0, default=None)",
    "interval": "float(gt=0, default=None)",
}


def _with_common_options(spec):
    declared = parse_spec(spec if spec is not None else {})
    for key, check in COMMON_OPTIONS.items():
        declared.setdefault(key, check)
    return declared


def _summary(path):
    """The first sentence of a plugin module's docstring, read without running it."""
    try:
        with open(path, encoding="utf-8") as source:
            doc = ast.get_docstring(ast.parse(source.read(), path))
    except (OSError, SyntaxError, ValueError):
        return ""
    if not doc:
        return ""
    paragraph = " ".join(doc.strip().split("\n\n", 1)[0].split())
    sentence, stop, _rest = paragraph.partition(". ")
    return sentence + "." if stop else paragraph


class PluginTimer:
    """Calls one plugin's ``entry_point`` with a ``timer`` event every
    ``interval`` seconds, never waiting on it: a tick that comes while the
    previous call is still running is skipped (and logged), so a slow plugin
    cannot pile up calls; a call that fails or exceeds the plugin's timeout
    is logged and the timer goes on."""

    def __init__(self, chains, registration, api, interval):
        self.chains = chains
        self.registration = registration
        self.api = api
        self.interval = interval
        self.ticks = 0
        self.skipped = 0
        self._running = None
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = chains.clock

    def start(self):
        self._loop.start(self.interval, now=False)

    def stop(self):
        if self._loop.running:
            self._loop.stop()

    @property
    def running(self):
        return self._loop.running

    def _tick(self):
        name = self.registration.plugin.name
        if self._running is not None:
            self.skipped += 1
            log.warn("plugin {plugin}: timer tick skipped, the previous call is still "
                     "running", plugin=name)
            return
        self.ticks += 1
        event = Event(TIMER_EVENT, self.api, interval=self.interval, tick=self.ticks)
        d = defer.Deferred.fromCoroutine(self.chains.call_one(self.registration, event))
        if not d.called:
            self._running = d

            def finished(result):
                self._running = None
                return result
            d.addBoth(finished)


class PluginRegistry:
    def __init__(self, chains, api, *, third_party_dir=None, load_config=None):
        self.chains = chains
        self.api = api
        self.third_party_dir = third_party_dir
        self._load_config = load_config
        self._instances = {}     # (plugin name, config file) -> instance
        self._timers = {}        # plugin name -> PluginTimer
        # The queries plugins answer for users (api.register_query); those of
        # an instance go with it.
        self.queries = PluginQueries(chains.clock, chains.timeout_of)

    # -- discovery -------------------------------------------------------------

    def available(self):
        """-> dict plugin name -> (module name or file path)."""
        found = {}
        try:
            package = importlib.import_module(BUILTIN_PACKAGE)
        except ImportError:
            package = None
        if package is not None:
            for info in pkgutil.iter_modules(package.__path__):
                if not info.name.startswith("_"):
                    found[info.name] = f"{BUILTIN_PACKAGE}.{info.name}"
        if self.third_party_dir and os.path.isdir(self.third_party_dir):
            for entry in sorted(os.listdir(self.third_party_dir)):
                stem, ext = os.path.splitext(entry)
                if ext == ".py" and not stem.startswith("_") and stem.isidentifier():
                    found[stem] = os.path.join(self.third_party_dir, entry)
        return found

    def _import(self, name):
        where = self.available().get(name)
        if where is None:
            raise InvalidRequest(f"no such plugin: {name!r} (available: "
                                 f"{', '.join(sorted(self.available())) or 'none'})")
        if where.startswith(BUILTIN_PACKAGE + "."):
            return importlib.import_module(where)
        module_name = f"{THIRD_PARTY_PREFIX}.{name}"
        spec = importlib.util.spec_from_file_location(module_name, where)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise InvalidRequest(f"plugin {name!r} ({where}) failed to load: {e}") from None
        sys.modules[module_name] = module
        return module

    # -- instances ---------------------------------------------------------------

    def _instance(self, name, config_file):
        key = (name, config_file)
        if key in self._instances:
            return self._instances[key]
        module = self._import(name)
        cls = getattr(module, "Plugin", None)
        if cls is None:
            raise InvalidRequest(f"plugin {name!r} has no Plugin class")
        config = {}
        if self._load_config is not None:
            config = self._load_config(
                _with_common_options(getattr(module, "CONFIG_SPEC", None)), config_file)
        elif config_file:
            raise ConfigError(f"{config_file}: plugin configuration cannot be read")
        queries_before = set(self.queries.names())
        try:
            plugin = cls(config, self.api)
        except Exception as e:
            # What it registered before failing goes with it.
            for query in set(self.queries.names()) - queries_before:
                self.queries.unregister(query)
            if isinstance(e, ConfigError) and config_file and config_file not in str(e):
                # A plugin checks its options by key; the file is the registry's to name.
                raise ConfigError(f"{config_file}: {e}") from None
            if isinstance(e, UsherError):
                raise
            log.failure("plugin {plugin} failed to start", plugin=name)
            raise InvalidRequest(f"plugin {name!r} failed to start: "
                                 f"{e.__class__.__name__}: {e}") from None
        self.queries.adopt(set(self.queries.names()) - queries_before, plugin)
        if not getattr(plugin, "name", None):
            plugin.name = name
        # Each option: the configuration file's value, else what the plugin
        # set itself, else the module's default. A configuration always holds
        # ``order``, ``timeout`` and ``interval`` (None when unset), so
        # ``config.get(option, default)`` would never reach the default.
        for option, module_default in (("order", "DEFAULT_ORDER"),
                                       ("timeout", "DEFAULT_TIMEOUT"),
                                       ("interval", "DEFAULT_INTERVAL")):
            if config.get(option) is not None:
                setattr(plugin, option, config[option])
            elif getattr(plugin, option, None) is None:
                setattr(plugin, option, getattr(module, module_default, None))
        if IPlugin not in providedBy(plugin):
            directlyProvides(plugin, IPlugin)
        try:
            verifyObject(IPlugin, plugin)
        except Exception as e:
            self.queries.drop_owned_by(plugin)
            raise InvalidRequest(f"plugin {name!r} does not provide entry_point: {e}") from None
        self._instances[key] = plugin
        return plugin

    def register(self, name, event, config_file=None, order=None):
        plugin = self._instance(name, config_file)
        try:
            if event == TIMER_EVENT:
                interval = getattr(plugin, "interval", None)
                if not isinstance(interval, (int, float)) or interval <= 0:
                    raise ValueError(
                        f"plugin {name} needs an interval to be registered for {TIMER_EVENT}: "
                        "set interval (seconds) in its configuration file")
            self.chains.add(plugin, event, order=order, config_file=config_file)
        except ValueError as e:
            self._forget_unused()
            raise InvalidRequest(str(e)) from None
        if event == TIMER_EVENT:
            registration = next(r for r in self.chains.registrations(TIMER_EVENT)
                                if r.plugin is plugin)
            timer = PluginTimer(self.chains, registration, self.api, plugin.interval)
            self._timers[plugin.name] = timer
            timer.start()
        log.info("plugin {plugin} registered for {event} (order {order})",
                 plugin=name, event=event, order=order if order is not None else plugin.order)
        return plugin

    def register_configured(self, registrations):
        """Register every plugin of a parsed ``[[plugins]]`` section
        (registration name -> plugin, events, config, order) on each of its
        events, in the section's order. Raises on the first that fails: a
        ConfigError naming the registration (an unknown plugin or event is
        the configuration's fault; the daemon exits 2 and is not restarted
        in a loop)."""
        for registration_name, registration in registrations.items():
            for event in registration["events"]:
                try:
                    self.register(registration.get("plugin") or registration_name, event,
                                  registration.get("config"), registration.get("order"))
                except InvalidRequest as e:
                    raise ConfigError(f"[plugins] [[{registration_name}]]: {e}") from None

    def unregister_all(self):
        """Take every plugin off every chain (stopping timers and instances);
        a failure is logged and the others still go."""
        for registration in self.chains.registrations():
            try:
                self.unregister(registration.plugin.name, registration.event)
            except Exception:
                log.failure("plugin {plugin} failed to unregister from {event}",
                            plugin=registration.plugin.name, event=registration.event)

    def unregister(self, name, event=None):
        removed = self.chains.remove(name, event)
        if not removed:
            raise InvalidRequest(f"plugin {name!r} is not registered"
                                 + (f" for {event}" if event else ""))
        if any(r.event == TIMER_EVENT for r in removed):
            timer = self._timers.pop(name, None)
            if timer is not None:
                timer.stop()
        self._forget_unused()
        log.info("plugin {plugin} unregistered from {events}", plugin=name,
                 events=", ".join(r.event for r in removed))
        return [r.event for r in removed]

    def _forget_unused(self):
        """Drop (and stop) instances no chain uses any more."""
        still_used = {r.plugin for r in self.chains.registrations()}
        for key, plugin in list(self._instances.items()):
            if plugin not in still_used:
                del self._instances[key]
                self.queries.drop_owned_by(plugin)
                stop = getattr(plugin, "stop", None)
                if stop is not None:
                    try:
                        stop()
                    except Exception:
                        log.failure("plugin {plugin} failed to stop", plugin=key[0])

    def timer(self, name):
        """-> the PluginTimer of a plugin registered for ``timer`` (or None)."""
        return self._timers.get(name)

    def describe(self):
        """-> what ``ush plugins`` shows: available plugins (with the first
        line of their docstring) and the chains, in calling order."""
        available = self.available()
        about = {}
        for name, where in available.items():
            if where.startswith(BUILTIN_PACKAGE + "."):
                spec = importlib.util.find_spec(where)
                where = spec.origin if spec is not None else ""
            about[name] = _summary(where) if where else ""
        registered = []
        for r in sorted(self.chains.registrations(), key=lambda r: (r.event, r.order, r.seq)):
            entry = {"plugin": r.plugin.name, "event": r.event, "order": r.order,
                     "config": r.config_file, "timeout": self.chains.timeout_of(r.plugin)}
            if r.event == TIMER_EVENT:
                entry["interval"] = getattr(r.plugin, "interval", None)
            registered.append(entry)
        return {"available": sorted(available), "about": about, "registered": registered}
