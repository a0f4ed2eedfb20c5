"""What Usher needs on real hypervisors, tested without one (tests/realhv
does it all on real QEMU guests):

- live migration between LNMs, in process: a real Controller and real
  NodeManagers over FakeVMMs whose migration lands the domain on the peer (as
  libvirt's peer-to-peer migration does), joined by in-process PB links
  (tests.wire), task.Clock driving scans, reports and the links; what is checked is who holds the VM's cached object and what gets
  reported while and after it moves;
- the LNM's ``[[domain]]`` template defaults;
- the built-in QEMU template's console log and disk cache mode;
- how a host's memory is read.
"""

import xml.etree.ElementTree as ET

import libvirt
import pytest
from twisted.internet import defer, task

from usher import pki, settings, states
from usher.config import load_config, load_plugin_config
from usher.controller.core import Controller
from usher.controller.plugins import PluginRegistry
from usher.errors import ConfigError, OperationFailed
from usher.lnm import domain_xml, service
from usher.lnm.api import NodeAPI
from usher.lnm.libvirt_stats import host_memory_kib
from usher.lnm.link import ControllerLinkFactory
from usher.lnm.node import NodeManager
from usher.vmset import Selection

from tests.grid import connect_lnm
from tests.fakes import VM as RECORD_VM
from tests.fakes import FakeVMM, record
from tests.test_lnm_node import result_of
from tests.wire import EventualQueue, peer_certificate

DOMAIN = "usher.test"
VM = f"1.web.alice.{DOMAIN}"
SCAN = 600.0
REPORT = 0.2


class MigratingVMM(FakeVMM):
    """A FakeVMM whose live migration moves the domain to the peer at the
    migration URI, which then emits its lifecycle event; ``abort`` makes the
    next migration fail half-way (the domain stays here)."""

    def __init__(self, name, peers):
        super().__init__(uri=f"fake:///{name}", hostname=name, live_migration=True)
        self.peers = peers
        self.abort = False

    def migrate(self, name, target_uri):
        def migrate():
            info = self._info(name)
            if self.abort:
                raise OperationFailed("operation aborted: migration out: canceled by client")
            target = self.peers[target_uri]
            del self.domains[name]
            target.domains[name] = info
            target.emit(name, info["state"])
        return self._call("migrate", migrate, name, target_uri)


class TwoHosts:
    def __init__(self):
        self.clock = task.Clock()
        self.controller = Controller(domain=DOMAIN, clock=self.clock, admins=["root"])
        self.controller.plugins = PluginRegistry(
            self.controller.chains, self.controller.api, third_party_dir=None,
            load_config=load_plugin_config)
        self.controller.plugins.register_configured(settings.default_plugin_registrations())
        self.eventual = EventualQueue(self.clock)
        peers = {}
        self.vmms, self.nodes, self.links = {}, {}, {}
        for name in ("lnm1", "lnm2"):
            uri = f"fake+tcp://{name}/system"
            vmm = peers[uri] = MigratingVMM(name, peers)
            self.vmms[name] = vmm
            self.nodes[name] = NodeManager(vmm, name=name, clock=self.clock,
                                           scan_interval=SCAN, report_interval=REPORT,
                                           migration_uri=uri)

    async def start(self):
        for name, node in self.nodes.items():
            await node.startup()
            link = ControllerLinkFactory(node, NodeAPI(node), clock=self.clock, call_timeout=60)
            self.links[name] = await connect_lnm(self.controller, link, self.eventual,
                                                 clock=self.clock,
                                                 certificate=peer_certificate(name))
        await self.controller.start("alice", False, [], ["lnm1"],
                                    {"cluster": "web", "count": 1})
        assert self.controller.state.vms[VM]["lnm"] == "lnm1"
        return self

    def finished(self, work):
        """The result of ``work`` (a coroutine or Deferred), which must end
        once what is on its way on the links has crossed."""
        d = work if isinstance(work, defer.Deferred) else defer.Deferred.fromCoroutine(work)
        self.clock.advance(0)       # every delivery due now, and those they cause
        return result_of(d)

    async def stop(self):
        for vmm in self.vmms.values():
            vmm.release()
        for node in self.nodes.values():
            await node.shutdown()
        self.eventual.stop()

    def migrate(self):
        return defer.Deferred.fromCoroutine(self.controller.migrate(
            "alice", False, Selection(names=[VM]), ["lnm2"]))


@pytest.fixture
def hosts():
    grid = TwoHosts()
    grid.finished(grid.start())
    yield grid
    grid.finished(grid.stop())


def test_live_migration_hands_the_cached_object_to_the_target(hosts):
    source = hosts.vmms["lnm1"]
    source.hold = True                     # the migration takes a while ...
    migration = hosts.migrate()
    hosts.clock.advance(REPORT)            # ... and the LNMs report meanwhile
    source.release()
    result = hosts.finished(migration)
    assert result["migrated"] == [{"name": VM, "from": "lnm1", "to": "lnm2"}]
    assert hosts.nodes["lnm1"].cached_vm(VM) is None
    cached = hosts.nodes["lnm2"].cached_vm(VM)
    assert (cached.record["lnm"], cached.record["state"]) == ("lnm2", states.RUN)
    assert hosts.controller.state.vms[VM]["lnm"] == "lnm2"
    # The target reports what happens to it now (e.g. virsh destroy).
    hosts.vmms["lnm2"].set_state(VM, states.SHUTOFF)
    hosts.clock.advance(REPORT)
    assert hosts.controller.state.vms[VM]["state"] == states.SHUTOFF


def test_target_reports_nothing_while_the_vm_is_on_its_way(hosts):
    reported = []
    original = hosts.nodes["lnm2"]._reporter.report

    async def recording(changes):
        reported.extend(changes)
        return await original(changes)
    hosts.nodes["lnm2"]._reporter.report = recording
    hosts.vmms["lnm1"].hold = True
    migration = hosts.migrate()
    hosts.clock.advance(REPORT)
    hosts.clock.advance(REPORT)
    assert reported == []                  # not "absent": it has not landed yet
    hosts.vmms["lnm1"].release()
    hosts.finished(migration)
    hosts.clock.advance(REPORT)
    assert reported == []                  # its arrival is the migration's result


def test_failed_live_migration_leaves_the_vm_and_its_object_on_the_source(hosts):
    hosts.vmms["lnm1"].abort = True
    result = hosts.finished(hosts.migrate())
    assert result["migrated"] == []
    assert "canceled by client" in result["failed"][0]["error"]
    assert list(hosts.vmms["lnm1"].domains) == [VM] and hosts.vmms["lnm2"].domains == {}
    rec = hosts.controller.state.vms[VM]
    assert (rec["lnm"], rec["state"]) == ("lnm1", states.RUN)
    assert hosts.nodes["lnm1"].cached_vm(VM).record["state"] == states.RUN
    # The target dropped the record it was sent for the migration.
    assert hosts.nodes["lnm2"].cached_vm(VM) is None
    hosts.clock.advance(REPORT)
    assert hosts.nodes["lnm2"].pending_changes == {}
    # And the source still reports it.
    hosts.vmms["lnm1"].set_state(VM, states.PAUSED)
    hosts.clock.advance(REPORT)
    assert hosts.controller.state.vms[VM]["state"] == states.PAUSED


def test_record_naming_another_lnm_drops_only_a_vm_that_is_not_here():
    vmm = FakeVMM()
    node = NodeManager(vmm, name="lnm2", clock=task.Clock(), scan_interval=SCAN,
                       report_interval=REPORT)
    result_of(node.startup())
    result_of(node.receive([record(lnm="lnm2", state=states.MIGRATING)]))
    result_of(node.receive([record(lnm="lnm1", state=states.RUN)]))
    assert node.cached_vm(RECORD_VM) is None
    # A VM that is on this host stays cached whatever the record says: it is
    # reported, and the controller sees the duplicate.
    name = "2.web.alice.usher.local"
    vmm.add_domain(name, states.RUN)
    result_of(node.scan())
    result_of(node.receive([record(name, lnm="lnm2", state=states.RUN)]))
    result_of(node.receive([record(name, lnm="lnm1", state=states.RUN)]))
    assert node.cached_vm(name).record["lnm"] == "lnm1"
    result_of(node.shutdown())


# --- the LNM's [[domain]] template defaults ----------------------------------------

def _lnm_config(tmp_path, text):
    path = tmp_path / "lnm.config"
    path.write_text(text)
    return load_config(settings.LNM, [str(path)], isolated=True)


def test_domain_subsection_gives_the_template_defaults(tmp_path):
    pki.init_ca(tmp_path, key_type="ec")
    pki.issue_cert(tmp_path, "lnm1", tmp_path, role="lnm")
    config = _lnm_config(tmp_path, f"""\
[lnm]
name = lnm1
test_host = yes
state_dir = {tmp_path}/state
ssl_ca_file = {tmp_path}/ca_cert.pem
ssl_cert_file = {tmp_path}/lnm1_cert.pem
ssl_key_file = {tmp_path}/lnm1_key.pem
  [[domain]]
  kernel = ${{state_dir}}/guest/vmlinuz
  cmdline = console=ttyS0 quiet
""")
    assert service.template_defaults(config["lnm"]) == {
        "kernel": f"{tmp_path}/state/guest/vmlinuz", "cmdline": "console=ttyS0 quiet"}
    from twisted.internet import reactor      # built, not started
    lnm = service.make_service(config, reactor)
    assert lnm.vmm._template_defaults["kernel"] == f"{tmp_path}/state/guest/vmlinuz"


def test_domain_subsection_is_empty_by_default(tmp_path):
    config = _lnm_config(tmp_path, "[lnm]\nname = lnm1\n")
    assert service.template_defaults(config["lnm"]) == {}


def test_domain_subsection_refuses_what_each_vm_spec_sets(tmp_path):
    config = _lnm_config(tmp_path, "[lnm]\n  [[domain]]\n  memory_mib = 512\n  kernel = /k\n")
    with pytest.raises(ConfigError, match=r"\[\[domain\]\] memory_mib"):
        service.template_defaults(config["lnm"])


# --- a host's memory --------------------------------------------------------------------

class _Conn:
    def __init__(self, memory_stats=None, info_mib=4826, free_bytes=4 * 1024 ** 3):
        self.memory_stats = memory_stats
        self.info_mib = info_mib
        self.free_bytes = free_bytes

    def getMemoryStats(self, cell, flags=0):
        assert cell == libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS
        if self.memory_stats is None:
            error = libvirt.libvirtError("getMemoryStats")
            error.err = (libvirt.VIR_ERR_NO_SUPPORT, 0, "not supported", 0, "", "", "", 0, 0)
            raise error
        return self.memory_stats

    def getInfo(self):
        return ["x86_64", self.info_mib, 2, 0, 1, 1, 2, 1]

    def getFreeMemory(self):
        return self.free_bytes


def test_host_memory_is_the_whole_host_not_the_numa_cells():
    # Measured on this machine: NUMA cells 4.7 GiB, /proc/meminfo 24 GiB.
    conn = _Conn({"total": 24684092, "free": 24109652, "buffers": 1, "cached": 2})
    assert host_memory_kib(conn) == (24684092, 24109652)


def test_host_memory_falls_back_to_get_info_and_free_memory():
    assert host_memory_kib(_Conn(None)) == (4826 * 1024, 4 * 1024 ** 2)
    assert host_memory_kib(_Conn(None, free_bytes=0)) == (4826 * 1024, None)


# --- the built-in QEMU template ----------------------------------------------------------

def _qemu_xml(tmp_path, **args):
    """The built-in template's XML for a request's args; a ``disk`` is a file
    name in an image directory the LNM lets requests use."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    if "disk" in args:
        (images / args["disk"]).touch()
        args["disk"] = str(images / args["disk"])
    spec = domain_xml.normalize_spec({"name": "q1", "memory_mib": 128, "vcpus": 1,
                                      "owner": "alice", "cluster": "web", "args": args})
    state = str(tmp_path / "state")
    policy = domain_xml.ArgPolicy(state_dir=state, request_args=["disk", "disk_cache"],
                                  image_dirs=[str(images)])
    return ET.fromstring(domain_xml.build_domain_xml(
        spec, driver="qemu", state_dir=state, defaults={"kernel": "/k", "initrd": "/i"},
        policy=policy))


def test_console_log_is_appended_to_by_each_new_qemu(tmp_path):
    source = _qemu_xml(tmp_path).find("devices/serial/source")
    assert source.get("path") == str(tmp_path / "state" / "consoles" / "q1.log")
    assert source.get("append") == "on"


def test_disk_cache_mode_is_set_only_when_asked(tmp_path):
    driver = _qemu_xml(tmp_path, disk="a.qcow2").find("devices/disk/driver")
    assert driver.attrib == {"name": "qemu", "type": "qcow2"}
    driver = _qemu_xml(tmp_path, disk="a.img", disk_cache="none").find(
        "devices/disk/driver")
    assert driver.attrib == {"name": "qemu", "type": "raw", "cache": "none"}
