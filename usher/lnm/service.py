"""Assembling a running LNM from its configuration.

``make_service(config, reactor)`` -> one ``LNMService`` (a MultiService)
holding, in start order:

1. the thread pool that every blocking hypervisor call runs in (unless one
   is shared: a fleet of LNMs in one process, ``usher.lnm.fleet``);
2. the node: the VMM (libvirt at ``libvirt_uri``, or with ``test_host =
   yes`` the embedded test driver on a simulated host written into
   ``state_dir``) and the
   NodeManager;
3. the link to the controller (mutual TLS with the LNM's certificate), started
   only once the node is ready, since the controller asks for the inventory
   at once; just before it, the recovery listener (``usher.lnm.recovery``),
   where a restarted controller announces itself.

Stopping goes the other way, each step waiting for the previous one.
"""

import os
import random

from cryptography.x509.oid import NameOID
from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import wrapClientTLS
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from usher import pki
from usher.controllers import Rotation, controllers_of, tcp_endpoint
from usher.daemon import ThreadPoolService
from usher.errors import ConfigError
from usher.lnm import domain_xml
from usher.lnm.api import NodeAPI
from usher.lnm.libvirt_vmm import DEFAULT_SHUTDOWN_TIMEOUT, LibvirtVMM
from usher.lnm.link import ControllerLink
from usher.lnm.recovery import RecoveryListener
from usher.lnm.monitor import Monitor
from usher.lnm.node import NodeManager
from usher.lnm.received_xml import DEFAULT_IMPORT_OVERHEAD_MIB as IMPORT_OVERHEAD_MIB
from usher.lnm.terms import TermGate
from usher.lnm.testhost import is_test_uri, write_test_host

TEST_HOST_FILE = "testhost.xml"

log = Logger()


def lnm_name(lnm_config):
    """The LNM's name: ``name`` from the configuration, else the common name
    of its certificate (which is what the controller calls it anyway)."""
    if lnm_config.get("name"):
        return lnm_config["name"]
    cert_file = lnm_config["ssl_cert_file"]
    names = pki.load_certificate(cert_file).subject.get_attributes_for_oid(
        NameOID.COMMON_NAME)
    if not names or not str(names[0].value).strip():
        raise ConfigError(f"{cert_file}: the certificate has no common name; set "
                          "[lnm] name")
    return str(names[0].value)


def controller_endpoint(reactor, lnm_config, controller=None):
    """The TLS client endpoint to a controller's LNM port (``controller``,
    a usher.controllers.Controller; by default the first configured),
    presenting the LNM's certificate (role lnm) and accepting only a
    certificate of the site CA with role controller that names that
    controller (its controller_tls_name, else its host)."""
    if controller is None:
        controller = controllers_of(lnm_config, "[lnm]")[0]
    options = pki.client_tls_options(controller.tls_name,
                                     lnm_config["ssl_ca_file"],
                                     lnm_config["ssl_cert_file"],
                                     lnm_config["ssl_key_file"],
                                     peer_role=pki.ROLE_CONTROLLER, role=pki.ROLE_LNM,
                                     link=f"LNM {lnm_name(lnm_config)}")
    # An address needs no name resolution (a thread job per reconnection).
    return wrapClientTLS(options, tcp_endpoint(reactor, controller.host, controller.port))


def controllers_endpoint(reactor, lnm_config):
    """One controller: its endpoint (today's link). Several (high
    availability): a Rotation over their endpoints, each checking its own
    controller's certificate."""
    controllers = controllers_of(lnm_config, "[lnm]")
    if len(controllers) == 1:
        return controller_endpoint(reactor, lnm_config, controllers[0])
    return Rotation(controllers,
                    lambda controller: controller_endpoint(reactor, lnm_config, controller),
                    base_policy=None)


def template_defaults(lnm_config):
    """The ``[[domain]]`` subsection: template variables (kernel, initrd,
    cmdline, disk, ...) for every VM this LNM starts, which a request's own
    args override. The variables taken from the VM spec itself cannot be
    set here: the spec would silently win."""
    defaults = dict(lnm_config.get("domain") or {})
    reserved = sorted(set(defaults) & set(domain_xml.TEMPLATE_VARIABLES))
    if reserved:
        raise ConfigError(f"[lnm] [[domain]] {', '.join(reserved)}: set from each VM's "
                          "own spec (name, memory, CPUs, owner ...), not configurable")
    return defaults


def arg_policy(lnm_config):
    """What VMs' args may set in their definitions here (``request_args``,
    ``plugin_args``, ``image_dirs``, ``path_args``, ``bridges``, ``networks``,
    ``vlan_tags``;
    see ``usher.lnm.domain_xml.ArgPolicy``). Reads the file system (the
    directories are canonicalised): at start-up."""
    return domain_xml.ArgPolicy(
        state_dir=lnm_config["state_dir"],
        request_args=lnm_config.get("request_args"),
        plugin_args=lnm_config.get("plugin_args"),
        image_dirs=lnm_config.get("image_dirs"),
        path_args=lnm_config.get("path_args"),
        bridges=lnm_config.get("bridges"), networks=lnm_config.get("networks"),
        vlan_tags=lnm_config.get("vlan_tags", False))


class NodeService(service.Service):
    """Connects the VMM and runs the NodeManager. ``ready`` fires once both
    are up (or fails with the reason they are not)."""

    def __init__(self, vmm, manager):
        self.vmm = vmm
        self.manager = manager
        self.ready = None

    def startService(self):
        super().startService()
        self.ready = defer.Deferred.fromCoroutine(self._start())

    async def _start(self):
        await self.vmm.connect()
        await self.manager.startup()
        if self.manager.monitor is not None:
            self.manager.monitor.start()

    def stopService(self):
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        if self.manager.monitor is not None:
            await self.manager.monitor.stop()
        await self.manager.shutdown()
        try:
            await self.vmm.close()
        except Exception as e:
            log.warn("closing the hypervisor connection failed: {error}", error=e)


class LNMService(service.MultiService):
    """The whole LNM; see the module docstring for the order of things."""

    def __init__(self, *, name, pool_service, node_service, link, recovery=None):
        super().__init__()
        self.name = name
        # None when the thread pool is someone else's (a fleet shares one).
        self.pool_service = pool_service
        self.node_service = node_service
        self.link = link
        # The recovery listener (usher.lnm.recovery): up with the link.
        self.recovery = recovery
        children = [(node_service, "node"), (link, "controller-link")]
        if pool_service is not None:
            children.insert(0, (pool_service, "threads"))
        if recovery is not None:
            children.append((recovery, "recovery-listener"))
        for child, child_name in children:
            child.setName(child_name)
            child.setServiceParent(self)
        self.ready = None

    @property
    def manager(self):
        return self.node_service.manager

    @property
    def vmm(self):
        return self.node_service.vmm

    def startService(self):
        service.Service.startService(self)
        self.ready = defer.Deferred.fromCoroutine(self._start())

    async def _start(self):
        if self.pool_service is not None:
            self.pool_service.startService()
        self.node_service.startService()
        try:
            await self.node_service.ready
        except Exception as e:
            log.critical("LNM {lnm} cannot start: {error}", lnm=self.name,
                         error=str(e) or e.__class__.__name__)
            raise
        if self.running:
            if self.recovery is not None:
                self.recovery.startService()
            self.link.startService()

    def stopService(self):
        service.Service.stopService(self)
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        if self.recovery is not None and self.recovery.running:
            await defer.maybeDeferred(self.recovery.stopService)
        if self.link.running:
            await self.link.stopService()
        if self.node_service.running:
            if self.node_service.ready is not None:
                # A start still in progress finishes (or fails) first.
                try:
                    await self.node_service.ready
                except Exception:
                    pass
            await self.node_service.stopService()
        if self.pool_service is not None and self.pool_service.running:
            self.pool_service.stopService()
        log.info("LNM {lnm} stopped", lnm=self.name)


def hypervisor_uri(lnm_config, where="[lnm]"):
    """The libvirt URI the LNM manages, or None for the embedded test host.

    The test host is used only when asked for (``test_host = yes``: the
    sandbox, fleets, tests): an LNM with neither that nor a ``libvirt_uri``
    is a configuration error, never a fake host. ``where`` names the
    configuration in the message (its files)."""
    uri = lnm_config.get("libvirt_uri")
    if lnm_config.get("test_host"):
        if uri:
            raise ConfigError(f"{where}: test_host = yes and libvirt_uri = {uri} exclude "
                              "each other: remove test_host to manage that hypervisor, or "
                              "libvirt_uri for an embedded test host")
        return None
    if not uri:
        raise ConfigError(
            f"{where}: libvirt_uri is not set: set [lnm] libvirt_uri to the hypervisor this "
            "LNM manages (e.g. libvirt_uri = qemu:///system), or test_host = yes for an "
            "embedded libvirt test host (trials only: its VMs run nothing)")
    return uri


def make_service(config, reactor, *, pool=None, warn_test_host=True):
    """Build the LNM from ``load_config(usher.settings.LNM)``'s result.

    ``pool``: a thread pool shared with other LNMs (``usher.lnm.fleet``),
    started and stopped by its owner; by default the LNM has its own, of
    ``threads`` threads. ``warn_test_host``: log a warning when it runs the
    embedded test host or a ``test:`` libvirt_uri (a fleet says so once for
    all its members).

    Reads the certificate (for the name) and writes the test host file (for
    the embedded driver): call it at start-up, before the reactor serves.
    """
    lnm = config["lnm"]
    name = lnm_name(lnm)
    pool_service = None
    if pool is None:
        pool = ThreadPool(minthreads=0, maxthreads=lnm["threads"], name=f"usherlnm-{name}")
        pool_service = ThreadPoolService(pool)
    uri = hypervisor_uri(lnm)
    if uri is None and warn_test_host:
        log.warn("LNM {lnm}: test_host = yes: running an embedded libvirt TEST host "
                 "({cpus} CPUs, {memory} MiB, simulated: its VMs run nothing); set "
                 "libvirt_uri to manage a hypervisor", lnm=name, cpus=lnm["host_cpus"],
                 memory=lnm["host_memory"])
    elif uri is not None and is_test_uri(uri) and warn_test_host:
        log.warn("LNM {lnm}: libvirt_uri = {uri}: libvirt's TEST driver (simulated: its VMs "
                 "run nothing); set libvirt_uri to a hypervisor (e.g. qemu:///system) to "
                 "manage real VMs", lnm=name, uri=uri)
    if uri is None:
        uri = write_test_host(os.path.join(lnm["state_dir"], TEST_HOST_FILE),
                              hostname=name, cpus=lnm["host_cpus"],
                              memory_mib=lnm["host_memory"], model=lnm["host_model"])
    vmm = LibvirtVMM(uri, reactor=reactor, pool=pool, state_dir=lnm["state_dir"],
                     domain_template=lnm.get("domain_template"),
                     template_defaults=template_defaults(lnm),
                     arg_policy=arg_policy(lnm),
                     import_overhead_mib=lnm.get("import_overhead_mib", IMPORT_OVERHEAD_MIB),
                     live_migration=lnm.get("live_migration", True),
                     shutdown_timeout=lnm.get("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT),
                     reconnect_initial_delay=lnm["reconnect_initial_delay"],
                     reconnect_max_delay=lnm["reconnect_max_delay"])
    # Scans and samples start at a random point of their intervals: LNMs
    # started together (a fleet, hosts after a power cut) spread them out.
    manager = NodeManager(vmm, name=name, clock=reactor,
                          scan_interval=lnm["scan_interval"],
                          report_interval=lnm["report_interval"],
                          migration_uri=lnm.get("migration_uri"),
                          import_overhead_mib=lnm.get("import_overhead_mib", IMPORT_OVERHEAD_MIB),
                          scan_phase=random.uniform(0, lnm["scan_interval"]))
    # (.get: configurations built in code may predate the monitoring options)
    simulated_load = lnm.get("simulated_load") or "off"
    manager.set_monitor(Monitor(
        vmm, name=name, clock=reactor, sample_interval=lnm.get("sample_interval", 5.0),
        sample_phase=random.uniform(0, lnm.get("sample_interval", 5.0)),
        report_interval=lnm.get("status_report_interval", 15.0),
        simulated_load=None if simulated_load == "off" else simulated_load,
        reporter_of=lambda: manager.reporter, vm_args=manager.vm_args))
    recovery = []
    # The highest controller term seen (high availability): a file in
    # state_dir once a controller sends a term above 0.
    terms = TermGate(lnm["state_dir"], lnm_name=name, reactor=reactor, pool=pool)
    link = ControllerLink(controllers_endpoint(reactor, lnm), manager,
                          NodeAPI(manager, terms), terms=terms,
                          clock=reactor, call_timeout=lnm["call_timeout"],
                          # Advertised only while the listener really listens.
                          recovery_port=lambda: recovery[0].advertised_port(),
                          initial_delay=lnm["reconnect_initial_delay"],
                          max_delay=lnm["reconnect_max_delay"],
                          ping_interval=lnm.get("ping_interval"),
                          ping_timeout=lnm.get("ping_timeout"))
    recovery.append(RecoveryListener(
        reactor, link, lnm_name=name, interface=lnm["recovery_interface"],
        port=lnm["recovery_port"], cert_file=lnm["ssl_cert_file"],
        key_file=lnm["ssl_key_file"], ca_file=lnm["ssl_ca_file"],
        controller_identity=[c.tls_name for c in controllers_of(lnm, "[lnm]")],
        terms=terms))
    return LNMService(name=name, pool_service=pool_service,
                      node_service=NodeService(vmm, manager), link=link,
                      recovery=recovery[0])
