"""Assembling usherctrl: one root MultiService holding the thread pools (the
controller's, the plugins'), the client listener (TLS), the LNM listener
(mutual TLS) and the plugins."""

import os
import socket
import weakref

from twisted.application import internet, service
from twisted.internet import defer
from twisted.cred.portal import Portal
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from usher import pki
from usher.auth.chain import build_auth_chain
from usher.config import load_plugin_config
from usher.controller.client_link import UsherRealm
from usher.controller.client_login import client_factory
from usher.controller.core import Controller
from usher.controller.known_lnms import KnownLNMs
from usher.controller.liveness import KeepAlivePBServerFactory, LNMLiveness
from usher.controller.lnm_input import LNMLimits
from usher.controller.leadership import Leadership, LeadershipDB, connect
from usher.controller.lnm_link import HALNMRoot, LNMRoot, abort_all
from usher.controller.plugin_api import PLUGIN_THREADS, thread_pool_runner
from usher.controller.plugins import PluginRegistry
from usher.controller.recovery import RecoveryService
from usher.controller.store import PgStateStore, redact_dsn
from usher.daemon import ThreadPoolService
from usher.errors import ConfigError, Standby

log = Logger()

# Connections waiting to be accepted. Twisted's default, 50, overflows when
# hundreds of LNMs dial at once (a restarted controller announces itself to
# all of them): the kernel drops the extra SYNs and those LNMs retry 1, 3, 7,
# 15 s later. The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096


class PluginsService(service.Service):
    """Registers the configured plugins when the controller starts."""

    def __init__(self, registry, registrations):
        self.registry = registry
        self.registrations = registrations

    def startService(self):
        super().startService()
        self.registry.register_configured(self.registrations)

    def stopService(self):
        super().stopService()
        self.registry.unregister_all()


def _role_lookup(chain):
    """-> async role_of(user): the first role an authentication module knows."""
    modules = [m for m in chain.modules if hasattr(m, "role")]

    async def role_of(user):
        for module in modules:
            role = await module.role(user)
            if role:
                return role
        return None
    return role_of


def _is_gateway(broker):
    """Is this client connection a gateway's (plusher): did it present a
    certificate of role gateway that the handshake accepted?"""
    return pki.peer_role(broker.transport) == pki.ROLE_GATEWAY


def client_port_tls(ctrl):
    """TLS of the client port: the controller's certificate (role
    controller). A client certificate is optional; one presented must be a
    site certificate of role gateway, and marks the connection as a
    gateway's (``usher.pki.peer_role(broker.transport) == "gateway"``)."""
    return pki.server_tls_options(ctrl["ssl_cert_file"], ctrl["ssl_key_file"],
                                  ctrl["ssl_ca_file"], role=pki.ROLE_CONTROLLER,
                                  client_roles=(pki.ROLE_GATEWAY,),
                                  link="the controller's client port")


def lnm_port_tls(ctrl):
    """TLS of the LNM port: mutual, and only certificates of role lnm whose
    name ``[ctrl] lnm_names`` allows (empty: none)."""
    allowed = pki.NameAllowList(ctrl.get("lnm_names") or (), option="[ctrl] lnm_names")
    if not allowed:
        log.warn("[ctrl] lnm_names is empty: no LNM can attach. List the LNMs' names "
                 "(e.g. lnm_names = node[1-64]) in ctrl.config")
    return pki.server_tls_options(ctrl["ssl_cert_file"], ctrl["ssl_key_file"],
                                  ctrl["ssl_ca_file"], require_client_cert=True,
                                  role=pki.ROLE_CONTROLLER, client_roles=(pki.ROLE_LNM,),
                                  allowed_names=allowed, link="the controller's LNM port")


def make_service(config, reactor):
    """-> (root MultiService, Controller) for a loaded ctrl configuration
    (with ``[ctrl] ha_database``: (root, None), see ``make_ha_service``)."""
    ctrl = config["ctrl"]
    if ctrl.get("ha_database"):
        return make_ha_service(config, reactor)
    root = service.MultiService()
    pool = ThreadPool(minthreads=1, maxthreads=4, name="usherctrl")
    ThreadPoolService(pool).setServiceParent(root)

    os.makedirs(ctrl["state_dir"], exist_ok=True)
    controller = build_controller(
        ctrl, reactor, KnownLNMs(os.path.join(ctrl["state_dir"], "lnms.json")))
    # Plugins' blocking work (PluginAPI.run_blocking), in a pool of its own so
    # that it never holds up logins (PAM, bcrypt) or metrics; started before
    # the plugins, stopped after them.
    plugin_pool = ThreadPool(minthreads=0, maxthreads=PLUGIN_THREADS, name="usherctrl-plugins")
    ThreadPoolService(plugin_pool).setServiceParent(root)
    controller.api.run_in_thread = thread_pool_runner(reactor, plugin_pool)
    # Failures (README, "Failures and recovery"): recovery after a restart
    # (before the listeners: what connects first must find it), and the
    # heartbeat on every attached LNM.
    _active_services(controller, ctrl, reactor, root)

    chain = build_auth_chain(ctrl["auth_modules"], ctrl, pool, reactor)
    portal = Portal(UsherRealm(controller, clock=reactor, call_timeout=ctrl["call_timeout"],
                               role_of=_role_lookup(chain)), [chain])

    client_tls = client_port_tls(ctrl)
    client_endpoint = SSL4ServerEndpoint(reactor, ctrl["client_port"], client_tls,
                                         backlog=LISTEN_BACKLOG,
                                         interface=ctrl["client_interface"])
    # Pre-login budget, deadline and login back-off (client_broker, client_login); a login's
    # claimed source address counts only from a gateway's certificate.
    client_listener = internet.StreamServerEndpointService(
        client_endpoint, client_factory(portal, ctrl, reactor, is_gateway=_is_gateway))
    client_listener._raiseSynchronously = True
    client_listener.setServiceParent(root)

    lnm_tls = lnm_port_tls(ctrl)
    lnm_endpoint = SSL4ServerEndpoint(reactor, ctrl["lnm_port"], lnm_tls,
                                      backlog=LISTEN_BACKLOG,
                                      interface=ctrl["lnm_interface"])
    lnm_root = LNMRoot(controller, clock=reactor, call_timeout=ctrl["call_timeout"],
                       command_timeout=ctrl["start_timeout"])
    lnm_listener = internet.StreamServerEndpointService(
        lnm_endpoint, KeepAlivePBServerFactory(lnm_root, interval=ctrl["lnm_ping_interval"],
                                               timeout=ctrl["lnm_ping_timeout"],
                                               clock=reactor))
    lnm_listener._raiseSynchronously = True
    lnm_listener.setServiceParent(root)

    if ctrl["metrics_port"] is not None:
        metrics_listener(controller, ctrl, reactor, pool).setServiceParent(root)
    return root, controller


def metrics_listener(controller, ctrl, reactor, pool):
    """The Prometheus endpoint (plain HTTP at ``/metrics`` on
    ``metrics_interface:metrics_port``) as a service."""
    from twisted.web.server import Site

    from usher.controller.metrics import ControllerMetrics

    metrics = ControllerMetrics(controller, reactor=reactor, pool=pool,
                                per_vm=ctrl["metrics_per_vm"])
    metrics.install()
    endpoint = TCP4ServerEndpoint(reactor, ctrl["metrics_port"],
                                  interface=ctrl["metrics_interface"])
    site = Site(metrics.resource())
    site.noisy = False
    listener = internet.StreamServerEndpointService(endpoint, site)
    listener._raiseSynchronously = True
    listener.metrics = metrics
    log.info("Prometheus metrics at http://{interface}:{port}/metrics",
             interface=ctrl["metrics_interface"], port=ctrl["metrics_port"])
    return listener


# -- one of an active/standby pair (README, "A standby controller") ----------------


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


def build_controller(ctrl, reactor, known_lnms, *, store=None):
    return Controller(
        domain=ctrl["domain"], clock=reactor, admins=ctrl["admins"],
        default_memory=ctrl["default_memory"], default_vcpus=ctrl["default_vcpus"],
        max_request_vms=ctrl["max_request_vms"],
        evacuation_concurrency=ctrl["evacuation_concurrency"],
        max_selection_names=ctrl["max_selection_names"],
        max_selection_patterns=ctrl["max_selection_patterns"],
        user_visibility=ctrl["user_visibility"],
        known_lnms=known_lnms, state_dir=ctrl["state_dir"], store=store,
        status_history=ctrl["status_history"], vm_status_history=ctrl["vm_status_history"],
        status_history_interval=ctrl["status_history_interval"],
        lnm_limits=LNMLimits(max_report_changes=ctrl["lnm_max_report_changes"],
                             max_vms=ctrl["lnm_max_vms"],
                             max_unmanaged=ctrl["lnm_max_unmanaged"]))


def _active_services(controller, ctrl, reactor, parent, *, term=None):
    """The plugins, recovery (announcing ``term``) and LNM liveness of one
    active term, under ``parent``."""
    controller.chains.timeout = ctrl["plugin_timeout"]
    controller.chains.hold_warning = ctrl["plugin_hold_warning"]
    registry = PluginRegistry(controller.chains, controller.api,
                              third_party_dir=ctrl["plugin_dir"],
                              load_config=load_plugin_config)
    controller.plugins = registry
    PluginsService(registry, ctrl["plugins"]).setServiceParent(parent)
    RecoveryService(controller, reactor=reactor, window=ctrl["recovery_window"],
                    tls_options_for=pki.client_tls_options_for(
                        ctrl["ssl_ca_file"], ctrl["ssl_cert_file"], ctrl["ssl_key_file"],
                        peer_role=pki.ROLE_LNM, role=pki.ROLE_CONTROLLER,
                        link="the controller's recovery announcer"),
                    term=term).setServiceParent(parent)
    liveness = LNMLiveness(controller, clock=reactor, interval=ctrl["lnm_ping_interval"],
                           timeout=ctrl["lnm_ping_timeout"])
    controller.watch_lnms(liveness)
    liveness.setServiceParent(parent)


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
    pool = ThreadPool(minthreads=1, maxthreads=4, name="usherctrl")
    ThreadPoolService(pool).setServiceParent(root)
    plugin_pool = ThreadPool(minthreads=0, maxthreads=PLUGIN_THREADS, name="usherctrl-plugins")
    ThreadPoolService(plugin_pool).setServiceParent(root)
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
    client_endpoint = SSL4ServerEndpoint(reactor, ctrl["client_port"], client_port_tls(ctrl),
                                         backlog=LISTEN_BACKLOG,
                                         interface=ctrl["client_interface"])
    client_listener = internet.StreamServerEndpointService(client_endpoint, factory)
    client_listener._raiseSynchronously = True
    client_listener.setServiceParent(root)

    ha.lnm_root = HALNMRoot(clock=reactor, call_timeout=ctrl["call_timeout"],
                            command_timeout=ctrl["start_timeout"],
                            standby_message=ha.standby_message)
    lnm_endpoint = SSL4ServerEndpoint(reactor, ctrl["lnm_port"], lnm_port_tls(ctrl),
                                      backlog=LISTEN_BACKLOG, interface=ctrl["lnm_interface"])
    lnm_listener = internet.StreamServerEndpointService(
        lnm_endpoint, KeepAlivePBServerFactory(ha.lnm_root, interval=ctrl["lnm_ping_interval"],
                                               timeout=ctrl["lnm_ping_timeout"],
                                               clock=reactor))
    lnm_listener._raiseSynchronously = True
    lnm_listener.setServiceParent(root)
    # Last: started once the listeners are up, stopped first (steps down).
    leadership.setServiceParent(root)
    root.ha = ha
    return root, None
