"""Assembling usherctrl: one root MultiService holding the thread pools (the
controller's, the plugins'), the client listener (TLS), the LNM listener
(mutual TLS) and the plugins."""

import os

from twisted.application import internet, service
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
from usher.controller.lnm_link import LNMRoot
from usher.controller.plugin_api import PLUGIN_THREADS, thread_pool_runner
from usher.controller.plugins import PluginRegistry
from usher.controller.recovery import RecoveryService
from usher.daemon import ThreadPoolService

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
    (with ``[ctrl] ha_database``: (root, None), see
    ``usher.controller.ha_service``)."""
    ctrl = config["ctrl"]
    if ctrl.get("ha_database"):
        from usher.controller.ha_service import make_ha_service
        return make_ha_service(config, reactor)
    root = service.MultiService()
    pool, plugin_pool = _thread_pools(root)

    os.makedirs(ctrl["state_dir"], exist_ok=True)
    controller = build_controller(
        ctrl, reactor, KnownLNMs(os.path.join(ctrl["state_dir"], "lnms.json")))
    controller.api.run_in_thread = thread_pool_runner(reactor, plugin_pool)
    # Failures (README, "Failures and recovery"): recovery after a restart
    # (before the listeners: what connects first must find it), and the
    # heartbeat on every attached LNM.
    _active_services(controller, ctrl, reactor, root)

    chain = build_auth_chain(ctrl["auth_modules"], ctrl, pool, reactor)
    portal = Portal(UsherRealm(controller, clock=reactor, call_timeout=ctrl["call_timeout"],
                               role_of=_role_lookup(chain)), [chain])
    # Pre-login budget, deadline and login back-off (client_broker, client_login); a login's
    # claimed source address counts only from a gateway's certificate.
    _listen(reactor, root, ctrl["client_port"], client_port_tls(ctrl), ctrl["client_interface"],
            client_factory(portal, ctrl, reactor, is_gateway=_is_gateway))
    lnm_root = LNMRoot(controller, clock=reactor, call_timeout=ctrl["call_timeout"],
                       command_timeout=ctrl["start_timeout"])
    _listen(reactor, root, ctrl["lnm_port"], lnm_port_tls(ctrl), ctrl["lnm_interface"],
            lnm_factory(lnm_root, ctrl, reactor))

    if ctrl["metrics_port"] is not None:
        metrics_listener(controller, ctrl, reactor, pool).setServiceParent(root)
    return root, controller


def _thread_pools(root):
    """The controller's thread pool (logins, metrics, the HA database) and
    the plugins' (PluginAPI.run_blocking: a pool of its own so that it never
    holds up logins), started before the plugins, stopped after them."""
    pool = ThreadPool(minthreads=1, maxthreads=4, name="usherctrl")
    ThreadPoolService(pool).setServiceParent(root)
    plugin_pool = ThreadPool(minthreads=0, maxthreads=PLUGIN_THREADS, name="usherctrl-plugins")
    ThreadPoolService(plugin_pool).setServiceParent(root)
    return pool, plugin_pool


def _listen(reactor, root, port, tls, interface, factory):
    """A TLS listener under ``root`` that fails the start when it cannot bind."""
    endpoint = SSL4ServerEndpoint(reactor, port, tls, backlog=LISTEN_BACKLOG,
                                  interface=interface)
    listener = internet.StreamServerEndpointService(endpoint, factory)
    listener._raiseSynchronously = True
    listener.setServiceParent(root)
    return listener


def lnm_factory(lnm_root, ctrl, reactor):
    return KeepAlivePBServerFactory(lnm_root, interval=ctrl["lnm_ping_interval"],
                                    timeout=ctrl["lnm_ping_timeout"], clock=reactor)


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
