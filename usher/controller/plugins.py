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
"""

import importlib
import importlib.util
import os
import pkgutil
import sys

from twisted.logger import Logger
from zope.interface import directlyProvides, providedBy
from zope.interface.verify import verifyObject

from usher.errors import ConfigError, InvalidRequest
from usher.interfaces import IPlugin

log = Logger()

BUILTIN_PACKAGE = "usher.plugins"
THIRD_PARTY_PREFIX = "usher_thirdparty_plugins"


class PluginRegistry:
    def __init__(self, chains, api, *, third_party_dir=None, load_config=None):
        self.chains = chains
        self.api = api
        self.third_party_dir = third_party_dir
        self._load_config = load_config
        self._instances = {}     # (plugin name, config file) -> instance

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
            config = self._load_config(getattr(module, "CONFIG_SPEC", None), config_file)
        elif config_file:
            raise ConfigError(f"{config_file}: plugin configuration cannot be read")
        plugin = cls(config, self.api)
        if not getattr(plugin, "name", None):
            plugin.name = name
        if getattr(plugin, "order", None) is None:
            plugin.order = config.get("order", getattr(module, "DEFAULT_ORDER", None))
        if IPlugin not in providedBy(plugin):
            directlyProvides(plugin, IPlugin)
        try:
            verifyObject(IPlugin, plugin)
        except Exception as e:
            raise InvalidRequest(f"plugin {name!r} does not provide entry_point: {e}") from None
        self._instances[key] = plugin
        return plugin

    def register(self, name, event, config_file=None, order=None):
        plugin = self._instance(name, config_file)
        try:
            self.chains.add(plugin, event, order=order, config_file=config_file)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        log.info("plugin {plugin} registered for {event} (order {order})",
                 plugin=name, event=event, order=order if order is not None else plugin.order)
        return plugin

    def unregister(self, name, event=None):
        removed = self.chains.remove(name, event)
        if not removed:
            raise InvalidRequest(f"plugin {name!r} is not registered"
                                 + (f" for {event}" if event else ""))
        still_used = {r.plugin for r in self.chains.registrations()}
        for key, plugin in list(self._instances.items()):
            if plugin not in still_used:
                del self._instances[key]
                stop = getattr(plugin, "stop", None)
                if stop is not None:
                    try:
                        stop()
                    except Exception:
                        log.failure("plugin {plugin} failed to stop", plugin=key[0])
        log.info("plugin {plugin} unregistered from {events}", plugin=name,
                 events=", ".join(r.event for r in removed))
        return [r.event for r in removed]

    def describe(self):
        """-> what ``ush plugins`` shows: available plugins and the chains."""
        return {"available": sorted(self.available()),
                "registered": [{"plugin": r.plugin.name, "event": r.event,
                                "order": r.order, "config": r.config_file}
                               for r in sorted(self.chains.registrations(),
                                               key=lambda r: (r.event, r.order, r.seq))]}
