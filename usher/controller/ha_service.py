"""One of an active/standby pair of controllers (README, "A standby
controller"): the listeners run from the start and a standby answers
``Standby``; the leadership service (usher.controller.leadership) opens the
business when it wins a term and closes it when it steps down."""

import os
import socket
import weakref

from twisted.application import service
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.logger import Logger

from usher.auth.chain import build_auth_chain
from usher.controller.client_link import UsherRealm
from usher.controller.client_login import client_factory
from usher.controller.known_lnms import KnownLNMs
from usher.controller.leadership import Leadership, LeadershipDB, connect
from usher.controller.lnm_link import HALNMRoot, abort_all
from usher.controller.plugin_api import thread_pool_runner
from usher.controller.service import (_active_services, _is_gateway, _listen, _role_lookup,
                                      _thread_pools, build_controller, client_port_tls,
                                      lnm_factory, lnm_port_tls, metrics_listener)
from usher.controller.store import PgStateStore, redact_dsn
from usher.errors import ConfigError, Standby

log = Logger()


class StandbyPortal:
    """The client port's portal on one of a standby pair: the active term's
    portal, or ``Standby`` (``standby_error()``, checked by the login
    gateway before anything else)."""

    def __init__(self, standby_message):
        self.current = None
        self.standby_message = standby_message

    def standby_error(self):
        if self.current is None:
            return Standby(self.standby_message())
        return None

    def login(self, credentials, mind, *interfaces):
        if self.current is None:
            return defer.fail(Standby(self.standby_message()))
        return self.current.login(credentials, mind, *interfaces)


class _TrackingRoot:
    """Wraps a PB root: remembers every connection (to cut them all)."""

    def __init__(self, root):
        self.root = root
        self.brokers = weakref.WeakSet()

    def rootObject(self, broker):
        self.brokers.add(broker)
        return self.root.rootObject(broker)

    def drop_all(self):
        self.brokers = abort_all(self.brokers)


class HAController:
    """One of a standby pair: opens for business when ``Leadership`` wins a
    term (loads the store, builds a fresh Controller, starts its plugins,
    recovery and liveness, announces the term to the LNMs), and stops
    commanding when it steps down (drops every LNM and client connection,
    stops those services). ``controller`` is the active term's, None on a
    standby."""

    def __init__(self, config, reactor, root, pool, plugin_pool):
        self.config = config
        self.ctrl = ctrl = config["ctrl"]
        self.reactor = reactor
        self.root = root
        self.pool = pool
        self.run = thread_pool_runner(reactor, pool)
        self.plugin_run = thread_pool_runner(reactor, plugin_pool)
        self.name = ctrl["ha_name"] or socket.gethostname()
        self.controller = None
        self.active_services = None
        self.store = None
        self.leadership = None
        self.portal = StandbyPortal(self.standby_message)
        self.chain = None
        self.lnm_root = None
        self.client_root = None

    def standby_message(self):
        holder = self.leadership.holder if self.leadership is not None else None
        if holder == self.name:
            holder = None
        return (f"standby controller {self.name}; the active one is "
                f"{holder or 'not known yet'}")

    def connect(self):
        return connect(self.ctrl["ha_database"], lost_after=self.ctrl["ha_lost_after"],
                       application_name=f"usherctrl {self.name}"[:60])

    async def become_active(self, term):
        ctrl = self.ctrl
        store = PgStateStore(self.connect, self.run, term=lambda: term,
                             on_fenced=self.leadership.fenced)
        await store.load_all()
        if self.leadership.term != term or not self.leadership.active:
            await store.close()
            return
        self.store = store
        controller = build_controller(ctrl, self.reactor, KnownLNMs(store=store),
                                      store=store)
        controller.term = term
        controller.ha = True
        controller.ha_name = self.name
        controller.api.run_in_thread = self.plugin_run
        active = service.MultiService()
        _active_services(controller, ctrl, self.reactor, active, term=term)
        if ctrl["metrics_port"] is not None:
            # Served while active only (a standby has no figures).
            metrics_listener(controller, ctrl, self.reactor, self.pool).setServiceParent(active)
        self.controller = controller
        self.active_services = active
        self.portal.current = Portal(
            UsherRealm(controller, clock=self.reactor, call_timeout=ctrl["call_timeout"],
                       role_of=_role_lookup(self.chain)), [self.chain])
        self.lnm_root.controller = controller
        active.startService()
        log.info("HA: {name} is active in term {term}: {count} known LNMs loaded, "
                 "recovery announced", name=self.name, term=term,
                 count=len(controller.known_lnms.entries))

    def on_active(self, term):
        return defer.Deferred.fromCoroutine(self.become_active(term))

    def on_standby(self, reason):
        self.portal.current = None
        if self.lnm_root is not None:
            self.lnm_root.controller = None
            self.lnm_root.drop_all()
        if self.client_root is not None:
            self.client_root.drop_all()
        active, self.active_services = self.active_services, None
        self.controller = None
        store, self.store = self.store, None
        d = defer.succeed(None)
        if active is not None and active.running:
            d = defer.maybeDeferred(active.stopService)
        if store is not None:
            # Stopping: the thread pools stop too; the close only says goodbye.
            d.addBoth(lambda _: store.close() if self.leadership.running
                      else store._drop_connection())
        return d.addErrback(lambda f: log.failure("HA: stopping the active services", f))


def make_ha_service(config, reactor):
    """-> (root MultiService, None): one of an active/standby pair. The
    listeners run from the start (a standby answers ``Standby``); the
    leadership service opens and closes the business (``HAController``)."""
    ctrl = config["ctrl"]
    if ctrl["ha_lost_after"] <= ctrl["ha_check_interval"]:
        raise ConfigError(f"[ctrl] ha_lost_after ({ctrl['ha_lost_after']:g} s) must be "
                          f"longer than ha_check_interval ({ctrl['ha_check_interval']:g} s)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ConfigError("[ctrl] ha_database needs psycopg (pip install "
                          "'psycopg[binary]')") from None
    root = service.MultiService()
    pool, plugin_pool = _thread_pools(root)
    os.makedirs(ctrl["state_dir"], exist_ok=True)

    ha = HAController(config, reactor, root, pool, plugin_pool)
    ha.chain = build_auth_chain(ctrl["auth_modules"], ctrl, pool, reactor)
    leadership = Leadership(LeadershipDB(ha.connect), ha.run, name=ha.name, clock=reactor,
                            check_interval=ctrl["ha_check_interval"],
                            lost_after=ctrl["ha_lost_after"], on_active=ha.on_active,
                            on_standby=ha.on_standby)
    ha.leadership = leadership
    log.info("HA: {name} uses the database {dsn}", name=ha.name,
             dsn=redact_dsn(ctrl["ha_database"]))

    factory = client_factory(ha.portal, ctrl, reactor, is_gateway=_is_gateway)
    ha.client_root = factory.root = _TrackingRoot(factory.root)
    _listen(reactor, root, ctrl["client_port"], client_port_tls(ctrl), ctrl["client_interface"],
            factory)
    ha.lnm_root = HALNMRoot(clock=reactor, call_timeout=ctrl["call_timeout"],
                            command_timeout=ctrl["start_timeout"],
                            standby_message=ha.standby_message)
    _listen(reactor, root, ctrl["lnm_port"], lnm_port_tls(ctrl), ctrl["lnm_interface"],
            lnm_factory(ha.lnm_root, ctrl, reactor))
    # Last: started once the listeners are up, stopped first (steps down).
    leadership.setServiceParent(root)
    root.ha = ha
    return root, None
