"""A whole Usher grid in one process, for fast tests (after Tahoe-LAFS's
no_network): a real Controller and real NodeManagers on real libvirt
test-driver hosts, joined by in-process handles instead of PB, which a test
can break and mend.
"""

import os

from twisted.python.threadpool import ThreadPool

from usher.config import load_plugin_config
from usher.controller.core import Controller
from usher.controller.plugins import PluginRegistry
from usher.errors import Unavailable
from usher.lnm.libvirt_vmm import LibvirtVMM
from usher.lnm.node import NodeManager
from usher.lnm.testhost import write_test_host
from usher.settings import default_plugin_registrations

DOMAIN = "usher.test"


class LocalLNM:
    """The controller's handle on an in-process NodeManager."""

    def __init__(self, node):
        self.node = node
        self.broken = False

    def __getattr__(self, method):
        target = getattr(self.node, method)

        async def forward(*args):
            if self.broken:
                raise Unavailable(f"{method}: LNM {self.node.name} unreachable")
            return await target(*args)
        return forward

    async def ping(self):
        if self.broken:
            raise Unavailable("ping: unreachable")
        return True

    def disconnect(self):
        self.broken = True


class LocalReporter:
    def __init__(self, controller, name):
        self.controller = controller
        self.name = name

    async def report(self, changes):
        return self.controller.lnm_report(self.name, changes)

    async def report_status(self, node, vms):
        return self.controller.lnm_status_report(self.name, node, vms)


class Grid:
    def __init__(self, reactor, tmpdir, *, lnms=3, cpus=8, memory_mib=16384,
                 plugin_dir=None, registrations=None, controller_options=None,
                 vmm_options=None):
        self.reactor = reactor
        self.tmpdir = str(tmpdir)
        self.lnm_count = lnms
        self.cpus = cpus
        self.memory_mib = memory_mib
        # LibvirtVMM options of every LNM, or a function of its state_dir
        # giving them (domain_template, arg_policy ...).
        self.vmm_options = vmm_options or {}
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="grid")
        self.controller = Controller(domain=DOMAIN, clock=reactor, admins=["root"],
                                     **(controller_options or {}))
        self.controller.plugins = PluginRegistry(
            self.controller.chains, self.controller.api, third_party_dir=plugin_dir,
            load_config=load_plugin_config)
        self.registrations = (default_plugin_registrations() if registrations is None
                              else registrations)
        self.nodes = {}
        self.handles = {}
        self.vmms = {}

    async def start(self):
        self.pool.start()
        for reg_name, reg in self.registrations.items():
            for event in reg["events"]:
                self.controller.plugins.register(reg["plugin"] or reg_name, event,
                                                 reg.get("config"), reg.get("order"))
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
        await self.attach(name)
        return node

    async def attach(self, name):
        node = self.nodes[name]
        handle = LocalLNM(node)
        self.handles[name] = handle
        await self.controller.attach_lnm(name, handle, {})
        node.set_reporter(LocalReporter(self.controller, name))

    def cut(self, name):
        """The link to an LNM fails: the controller sees it disconnect."""
        handle = self.handles[name]
        handle.broken = True
        self.nodes[name].set_reporter(None)
        self.controller.detach_lnm(name, handle)

    async def report(self):
        """Make every LNM scan its host and report now."""
        for node in self.nodes.values():
            await node.scan()
            await node.drain()

    async def stop(self):
        for node in self.nodes.values():
            await node.shutdown()
        for vmm in self.vmms.values():
            await vmm.close()
        self.pool.stop()
