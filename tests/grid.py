"""A whole Usher grid in one process, for fast tests (after Tahoe-LAFS's
no_network): a real Controller and real NodeManagers on real libvirt
test-driver hosts, each LNM attached as it is over the network -- its
``ControllerLinkFactory`` calls ``attach`` on the controller's ``LNMRoot``,
the controller drives it through a ``RemoteLNM`` and it reports through the
``NodeReporter`` it got back -- over an in-process PB connection
(``tests.wire``), so every call runs the real remote methods, eventually,
through the real serialisation. A test can break, hold, cut and mend a link.
"""

import os

from twisted.internet import defer
from twisted.python.threadpool import ThreadPool
from twisted.spread import pb

from usher.config import load_plugin_config
from usher.controller.core import Controller
from usher.controller.lnm_link import LNMRoot
from usher.controller.plugins import PluginRegistry
from usher.errors import UsherError
from usher.lnm.api import NodeAPI
from usher.lnm.libvirt_vmm import LibvirtVMM
from usher.lnm.link import ControllerLinkFactory
from usher.lnm.node import NodeManager
from usher.lnm.testhost import write_test_host
from usher.settings import default_plugin_registrations

from tests.wire import EventualQueue, LocalConnection, peer_certificate

DOMAIN = "usher.test"
CALL_TIMEOUT = 60.0
COMMAND_TIMEOUT = 600.0


class _SeesHandles:
    """The controller as an ``LNMRoot`` sees it, noting the handle each
    attach brings (the grid's view of the controller's side of a link)."""

    def __init__(self, controller):
        self._controller = controller
        self.handle = None

    def __getattr__(self, name):
        return getattr(self._controller, name)

    async def attach_lnm(self, name, handle, hello=None):
        self.handle = handle
        return await self._controller.attach_lnm(name, handle, hello)


class LNMConnection(LocalConnection):
    """One LNM's connection to a controller: ``to_lnm`` are the switches of
    the controller's calls on the LNM, ``to_controller`` of the LNM's reports
    and pings; ``handle`` the controller's ``RemoteLNM``."""

    handle = None

    @property
    def to_lnm(self):
        return self.server_calls

    @property
    def to_controller(self):
        return self.client_calls


async def connect_lnm(controller, lnm_link, eventual, *, clock, certificate,
                      call_timeout=CALL_TIMEOUT, command_timeout=COMMAND_TIMEOUT):
    """Connect the LNM whose link factory is ``lnm_link`` to ``controller`` (as
    its ClientService would, over a new in-process connection) and wait until
    it is attached. -> the LNMConnection. ``certificate`` is the LNM's (its
    common name is its name on the controller)."""
    seen = _SeesHandles(controller)
    root = LNMRoot(seen, clock=clock, call_timeout=call_timeout,
                   command_timeout=command_timeout)
    server = pb.PBServerFactory(root).buildProtocol(None)
    client = lnm_link.buildProtocol(None)
    attached = lnm_link.when_attached()
    connection = LNMConnection(client, server, eventual, client_certificate=certificate)
    index, _result = await defer.race([attached, connection.when_lost()])
    if index == 1 or lnm_link.attached_broker is not client:
        raise UsherError(f"LNM {lnm_link.manager.name} could not attach (see the log)")
    connection.handle = seen.handle
    return connection


class Grid:
    def __init__(self, reactor, tmpdir, *, lnms=3, cpus=8, memory_mib=16384,
                 plugin_dir=None, registrations=None, controller_options=None,
                 vmm_options=None, call_timeout=CALL_TIMEOUT, command_timeout=COMMAND_TIMEOUT):
        self.reactor = reactor
        self.tmpdir = str(tmpdir)
        self.lnm_count = lnms
        self.cpus = cpus
        self.memory_mib = memory_mib
        self.call_timeout = call_timeout
        self.command_timeout = command_timeout
        # LibvirtVMM options of every LNM, or a function of its state_dir
        # giving them (domain_template, arg_policy ...).
        self.vmm_options = vmm_options or {}
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="grid")
        self.eventual = EventualQueue(reactor)
        self.controller = Controller(domain=DOMAIN, clock=reactor, admins=["root"],
                                     **(controller_options or {}))
        self.controller.plugins = PluginRegistry(
            self.controller.chains, self.controller.api, third_party_dir=plugin_dir,
            load_config=load_plugin_config)
        self.registrations = (default_plugin_registrations() if registrations is None
                              else registrations)
        self.nodes = {}
        self.vmms = {}
        # Per LNM: its link factory (kept across connections, as its
        # ClientService keeps it), certificate and current connection.
        self.lnm_links = {}
        self.certificates = {}
        self.links = {}

    @property
    def handles(self):
        """The controller's RemoteLNM of each LNM's current connection."""
        return {name: link.handle for name, link in self.links.items()}

    def to_lnm(self, name):
        """The switches (tests.wire.Faults) of the controller's calls on LNM ``name``."""
        return self.links[name].to_lnm

    def to_controller(self, name):
        """The switches of LNM ``name``'s calls on the controller."""
        return self.links[name].to_controller

    async def start(self):
        self.pool.start()
        self.controller.plugins.register_configured(self.registrations)
        for i in range(1, self.lnm_count + 1):
            await self.add_lnm(f"lnm{i}")
        return self

    async def add_lnm(self, name):
        state_dir = os.path.join(self.tmpdir, name)
        os.makedirs(state_dir, exist_ok=True)
        uri = write_test_host(os.path.join(state_dir, "host.xml"), hostname=name,
                              cpus=self.cpus, memory_mib=self.memory_mib, model="grid")
        options = (self.vmm_options(state_dir) if callable(self.vmm_options)
                   else self.vmm_options)
        vmm = LibvirtVMM(uri, reactor=self.reactor, pool=self.pool, state_dir=state_dir,
                         **options)
        await vmm.connect()
        node = NodeManager(vmm, name=name, clock=self.reactor, scan_interval=3600,
                           report_interval=3600)
        await node.startup()
        self.vmms[name] = vmm
        self.nodes[name] = node
        self.lnm_links[name] = ControllerLinkFactory(node, NodeAPI(node), clock=self.reactor,
                                                     call_timeout=self.call_timeout)
        self.certificates[name] = peer_certificate(name)
        await self.attach(name)
        return node

    async def attach(self, name, controller=None):
        """LNM ``name`` connects (again) to the controller (or to
        ``controller``, e.g. a restarted one); its previous connection, if
        still up, drops first. -> the new LNMConnection."""
        previous = self.links.get(name)
        if previous is not None:
            previous.cut()
        link = await connect_lnm(controller or self.controller, self.lnm_links[name],
                                 self.eventual, clock=self.reactor,
                                 certificate=self.certificates[name],
                                 call_timeout=self.call_timeout,
                                 command_timeout=self.command_timeout)
        self.links[name] = link
        return link

    def cut(self, name):
        """The link to an LNM fails: both ends see it drop, now."""
        self.links[name].cut()

    def settle(self):
        """-> Deferred firing once nothing is on its way on any link."""
        return self.eventual.flush()

    async def remove_on_host(self, lnm, name):
        """Power VM ``name`` off and delete it on ``lnm``'s host, behind
        Usher's back (as virsh destroy and undefine would)."""
        await self.vmms[lnm].operate("destroy", name)
        await self.vmms[lnm].operate("delete", name)

    async def report(self):
        """Make every LNM scan its host and report now."""
        for node in self.nodes.values():
            await node.scan()
            await node.drain()

    async def stop(self):
        for node in self.nodes.values():
            await node.shutdown()
        self.eventual.stop()
        for vmm in self.vmms.values():
            await vmm.close()
        self.pool.stop()
