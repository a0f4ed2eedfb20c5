"""LibvirtVMM against libvirt's real test driver (no mocks of libvirt)."""

import inspect
import os
import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from usher import states
from usher.errors import (ConfigError, InvalidRequest, MigrationUnsupported,
                          NoSuchVM, Unavailable)
from usher.interfaces import IVMM
from usher.lnm import domain_xml, testhost
from usher.lnm.libvirt_vmm import LibvirtVMM, wait_until

NASTY = "x<y&z\"'>]]>"


@pytest.fixture
def make_vmm(tmp_path, pool):
    """Async factory: a connected LibvirtVMM on a fresh test-driver host of its own."""
    made = []

    async def make(label="vmm1", **options):
        host_dir = tmp_path / label
        uri = testhost.write_test_host(host_dir / "node.xml", hostname=f"{label}.example",
                                       cpus=4, memory_mib=8192, model="Usher Test CPU")
        vmm = LibvirtVMM(uri, reactor=reactor, pool=pool,
                         state_dir=str(host_dir / "state"), **options)
        made.append(vmm)
        await vmm.connect()
        return vmm

    yield make
    for vmm in made:
        pytest_twisted.blockon(vmm.close())


@pytest.fixture
def vmm(make_vmm):
    return pytest_twisted.blockon(defer.ensureDeferred(make_vmm()))


def spec(name="web1", **changes):
    base = {"name": name, "uuid": str(uuid.uuid4()), "memory_mib": 256, "vcpus": 2,
            "owner": "alice", "cluster": "sneetch", "args": {}}
    base.update(changes)
    return base


class Recorder:
    """A subscriber that lets a test wait for one (name, state) event."""

    def __init__(self):
        self.events = []
        self._waiting = []

    def __call__(self, name, state):
        self.events.append((name, state))
        for wanted, d in list(self._waiting):
            if wanted == (name, state):
                self._waiting.remove((wanted, d))
                d.callback(None)

    def wait_for(self, name, state, timeout=10):
        if (name, state) in self.events:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append(((name, state), d))
        # A guard against hanging forever, not a timing assertion.
        return d.addTimeout(timeout, reactor)


async def raises(error_class, d):
    with pytest.raises(error_class) as info:
        await d
    return info.value


# --- the node -----------------------------------------------------------------

def test_provides_ivmm(vmm):
    assert verifyObject(IVMM, vmm)


def test_every_method_answers_a_deferred_and_a_bad_argument_is_a_failed_one(tmp_path, pool):
    vmm = LibvirtVMM("test:///default", reactor=reactor, pool=pool,
                     state_dir=str(tmp_path / "state"))
    # The methods show the IVMM signatures, not the pool functions' (conn).
    assert list(inspect.signature(vmm.operate).parameters) == [
        "operation", "name", "shutdown_timeout"]
    assert list(inspect.signature(vmm.import_image).parameters) == ["spec", "payload"]
    assert list(inspect.signature(vmm.node_info).parameters) == []
    # Checked before the connection is asked for: the argument's error wins.
    for d, error in [(vmm.domain_info("a/b"), InvalidRequest),
                     (vmm.operate("explode", "web1"), InvalidRequest),
                     (vmm.operate("shutdown", "web1", shutdown_timeout=-1), InvalidRequest),
                     (vmm.migrate("web1", ""), InvalidRequest),
                     (vmm.create({"name": "web1"}), InvalidRequest),
                     (vmm.import_image(spec(), {"xml": 3}), InvalidRequest),
                     (vmm.domain_info("web1"), Unavailable),
                     (vmm.create(spec()), Unavailable),
                     (vmm.list_domains(), Unavailable)]:
        assert isinstance(d, defer.Deferred)
        failure = []
        d.addErrback(failure.append)
        assert failure and failure[0].check(error), (failure, error)
    with pytest.raises(TypeError):
        vmm.operate("pause")            # not a call of the method at all


@pytest_twisted.ensureDeferred
async def test_node_info_describes_the_simulated_host(vmm):
    info = await vmm.node_info()
    assert info == {"hostname": "vmm1.example", "uri": vmm.uri, "driver": "TEST",
                    "cpus": 4, "memory_mib": 8192, "model": "Usher Test CPU",
                    "live_migration": False}
    assert vmm.uri.startswith("test:///")


@pytest_twisted.ensureDeferred
async def test_node_status_counts_active_vms_and_never_invents_free_memory(vmm):
    assert await vmm.node_status() == {"vms": 0, "free_memory_mib": None}
    await vmm.create(spec("a"))
    await vmm.create(spec("b"))
    await vmm.operate("shutdown", "b")
    assert await vmm.node_status() == {"vms": 1, "free_memory_mib": None}


@pytest_twisted.ensureDeferred
async def test_two_hosts_in_one_process_are_independent(make_vmm):
    one, two = await make_vmm("host-one"), await make_vmm("host-two")
    await one.create(spec("only-on-one"))
    assert [d["name"] for d in await one.list_domains()] == ["only-on-one"]
    assert await two.list_domains() == []
    assert (await two.node_info())["hostname"] == "host-two.example"


def test_write_test_host_rejects_bad_parameters(tmp_path):
    path = tmp_path / "node.xml"
    with pytest.raises(ConfigError, match="model"):
        testhost.write_test_host(path, hostname="h", cpus=1, memory_mib=1, model="m" * 32)
    with pytest.raises(ConfigError, match="cpus"):
        testhost.write_test_host(path, hostname="h", cpus=0, memory_mib=1, model="m")
    with pytest.raises(ConfigError, match="hostname"):
        testhost.write_test_host(path, hostname=" ", cpus=1, memory_mib=1, model="m")
    assert not path.exists()


def test_test_host_uri_survives_odd_paths(tmp_path):
    path = tmp_path / "odd dir & co" / "node#1.xml"
    uri = testhost.write_test_host(path, hostname="odd", cpus=2, memory_mib=512, model="m")
    assert testhost.node_file_path(uri) == str(path)
    assert testhost.read_test_host(uri) == {"hostname": "odd"}
    assert testhost.read_test_host("qemu:///system") is None
    conn = libvirt.open(uri)
    try:
        assert conn.getInfo()[:3] == ["m", 512, 2]
        assert conn.listAllDomains() == []
    finally:
        conn.close()


# --- create, list, metadata -------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_create_boots_a_persistent_vm_with_usher_metadata(vmm):
    wanted = spec("web1")
    info = await vmm.create(wanted)
    assert info == {"name": "web1", "uuid": wanted["uuid"], "state": states.RUN,
                    "memory_mib": 256, "vcpus": 2,
                    "metadata": {"owner": "alice", "cluster": "sneetch"}}
    assert await vmm.list_domains() == [info]
    assert await vmm.domain_info("web1") == info


@pytest_twisted.ensureDeferred
async def test_create_is_idempotent_and_boots_a_shut_off_vm(vmm):
    wanted = spec("web1")
    first = await vmm.create(wanted)
    assert await vmm.create(wanted) == first
    assert len(await vmm.list_domains()) == 1
    await vmm.operate("shutdown", "web1")
    again = await vmm.create(wanted)
    assert again["state"] == states.RUN and again["uuid"] == wanted["uuid"]


@pytest_twisted.ensureDeferred
async def test_domains_not_made_by_usher_have_empty_metadata(vmm):
    def define_foreign(conn):
        conn.defineXML("<domain type='test'><name>foreign</name>"
                       "<memory unit='KiB'>65536</memory><os><type>hvm</type></os>"
                       "</domain>")
    await vmm.hypervisor.run("define", None, define_foreign)
    info = await vmm.domain_info("foreign")
    assert info["metadata"] == {} and info["state"] == states.SHUTOFF


# --- Table 3 --------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_every_operation_leaves_the_state_table_3_promises(vmm):
    created = await vmm.create(spec("vm"))
    steps = [("pause", states.PAUSED), ("resume", states.RUN), ("reboot", states.RUN),
             ("hibernate", states.HIBERNATED), ("restore", states.RUN),
             ("pause", states.PAUSED), ("cycle", states.RUN),
             ("shutdown", states.SHUTOFF), ("cycle", states.RUN),
             ("pause", states.PAUSED), ("shutdown", states.SHUTOFF)]
    for operation, expected in steps:
        assert expected == states.OPERATION_RESULT[operation]
        info = await vmm.operate(operation, "vm")
        assert info["state"] == expected, operation
        assert (await vmm.domain_info("vm"))["state"] == expected, operation
        assert info["uuid"] == created["uuid"]
    await vmm.operate("cycle", "vm")
    await raises(InvalidRequest, vmm.operate("delete", "vm"))     # it runs
    assert (await vmm.operate("destroy", "vm"))["state"] == states.SHUTOFF
    assert (await vmm.operate("destroy", "vm"))["state"] == states.SHUTOFF   # already off
    assert (await vmm.create(spec("vm")))["uuid"] == created["uuid"]    # boots the kept one
    await vmm.operate("destroy", "vm")
    assert await vmm.operate("delete", "vm") is None
    await raises(NoSuchVM, vmm.domain_info("vm"))


@pytest_twisted.ensureDeferred
async def test_hibernate_writes_an_image_and_restore_consumes_it(vmm):
    await vmm.create(spec("sleeper"))
    image = vmm.image_path("sleeper")
    assert (await vmm.operate("hibernate", "sleeper"))["state"] == states.HIBERNATED
    assert os.path.getsize(image) > 0
    assert [d["state"] for d in await vmm.list_domains()] == [states.HIBERNATED]
    assert (await vmm.operate("restore", "sleeper"))["state"] == states.RUN
    assert not os.path.exists(image)
    assert os.listdir(os.path.dirname(image)) == []  # no scratch files left


@pytest_twisted.ensureDeferred
async def test_hibernate_from_paused_and_create_wakes_a_hibernated_vm(vmm):
    wanted = spec("sleeper")
    await vmm.create(wanted)
    await vmm.operate("pause", "sleeper")
    await vmm.operate("hibernate", "sleeper")
    info = await vmm.create(wanted)
    assert info["state"] == states.RUN
    assert not os.path.exists(vmm.image_path("sleeper"))


@pytest_twisted.ensureDeferred
async def test_delete_removes_definition_and_image(vmm):
    await vmm.create(spec("gone"))
    await vmm.operate("hibernate", "gone")
    await raises(InvalidRequest, vmm.operate("destroy", "gone"))   # not running
    assert await vmm.operate("delete", "gone") is None
    assert await vmm.list_domains() == []
    assert not os.path.exists(vmm.image_path("gone"))
    # A new VM of the same name starts clean.
    info = await vmm.create(spec("gone"))
    assert info["state"] == states.RUN


@pytest_twisted.ensureDeferred
async def test_shutdown_falls_back_to_destroy_after_the_timeout(vmm):
    await vmm.create(spec("stubborn"))
    vmm._request_shutdown = lambda dom: None   # a guest that ignores ACPI
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        info = await vmm.operate("shutdown", "stubborn", shutdown_timeout=0)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert info["state"] == states.SHUTOFF
    assert any("did not shut down" in e.get("log_format", "") and e.get("vm") == "stubborn"
               for e in logged)


@pytest_twisted.ensureDeferred
async def test_the_lnm_shutdown_timeout_option_bounds_the_wait(make_vmm):
    """The site's shutdown_timeout (the LNM option) is the default of every
    shutdown: a guest ignoring ACPI is powered off once it has passed."""
    quick = await make_vmm("quick", shutdown_timeout=0)
    await quick.create(spec("stubborn"))
    quick._request_shutdown = lambda dom: None   # a guest that ignores ACPI
    info = await quick.operate("shutdown", "stubborn")
    assert info["state"] == states.SHUTOFF
    assert (await quick.create(spec("stubborn")))["state"] == states.RUN   # kept


def test_wait_until_polls_until_true_or_deadline():
    now = [0.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    answers = iter([False, False, True])
    assert wait_until(lambda: next(answers), 10, interval=1,
                      clock=lambda: now[0], sleep=sleep)
    assert slept == [1, 1]
    slept.clear()
    assert not wait_until(lambda: False, 2.5, interval=1, clock=lambda: now[0], sleep=sleep)
    assert slept == [1, 1, 0.5]


# --- errors -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_operations_from_the_wrong_state_are_refused_and_change_nothing(vmm):
    await vmm.create(spec("vm"))
    error = await raises(InvalidRequest, vmm.operate("resume", "vm"))
    assert "'vm'" in str(error) and "it is run" in str(error) and "paused" in str(error)
    await raises(InvalidRequest, vmm.operate("restore", "vm"))
    await vmm.operate("shutdown", "vm")
    for operation in ("pause", "reboot", "hibernate", "resume", "restore"):
        await raises(InvalidRequest, vmm.operate(operation, "vm"))
    assert (await vmm.domain_info("vm"))["state"] == states.SHUTOFF
    error = await raises(InvalidRequest, vmm.operate("explode", "vm"))
    assert "explode" in str(error) and "hibernate" in str(error)


@pytest_twisted.ensureDeferred
async def test_unknown_vms_and_bad_names(vmm):
    await raises(NoSuchVM, vmm.domain_info("nobody"))
    error = await raises(NoSuchVM, vmm.operate("pause", "nobody"))
    assert "nobody" in str(error)
    await raises(NoSuchVM, vmm.export_image("nobody"))
    await raises(NoSuchVM, vmm.migrate("nobody", "test:///default"))
    for bad in ("", "   ", "a/b", "line\nbreak", "x" * 201, 42, None):
        await raises(InvalidRequest, vmm.create(spec(bad)))
        await raises(InvalidRequest, vmm.operate("pause", bad))
    assert await vmm.list_domains() == []


@pytest_twisted.ensureDeferred
async def test_bad_specs_are_refused_before_anything_is_defined(vmm):
    bad_specs = [
        (spec(memory_mib=0), "memory_mib"),
        (spec(memory_mib="256"), "memory_mib"),
        (spec(vcpus=True), "vcpus"),
        (spec(uuid="not-a-uuid"), "uuid"),
        (spec(owner=7), "owner"),
        (spec(args={"name": "override"}), "reserved"),
        (spec(args={"bad key": "v"}), "bad key"),
        (spec(args={"k": ["list"]}), "'k'"),
        ({"name": "x"}, "memory_mib"),
    ]
    for bad, mentioned in bad_specs:
        error = await raises(InvalidRequest, vmm.create(bad))
        assert mentioned in str(error)
    assert await vmm.list_domains() == []


@pytest_twisted.ensureDeferred
async def test_closed_vmm_is_unavailable(make_vmm):
    vmm = await make_vmm()
    await vmm.close()
    await raises(Unavailable, vmm.list_domains())
    await vmm.connect()
    assert await vmm.list_domains() == []  # a fresh test host: nothing persisted


# --- escaping -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_xml_specials_in_names_and_metadata_round_trip_without_injection(vmm):
    evil_owner = 'bob"/><usher:vm owner="root'
    wanted = spec(NASTY, owner=evil_owner, cluster="<c&d>")
    info = await vmm.create(wanted)
    assert info["name"] == NASTY
    assert info["metadata"] == {"owner": evil_owner, "cluster": "<c&d>"}

    def desc(conn):
        return conn.lookupByName(NASTY).XMLDesc(0)
    root = ET.fromstring(await vmm.hypervisor.run("xml", NASTY, desc))
    assert root.findtext("name") == NASTY
    usher = root.findall(f"metadata/{{{domain_xml.USHER_NS}}}vm")
    assert len(usher) == 1 and usher[0].get("owner") == evil_owner
    assert (await vmm.operate("hibernate", NASTY))["state"] == states.HIBERNATED
    assert (await vmm.operate("restore", NASTY))["state"] == states.RUN


def test_site_template_escapes_values_and_embeds_metadata(tmp_path):
    path = tmp_path / "domain.xml"
    path.write_text(
        "<domain type='test'>\n"
        "  <name>${name}</name><uuid>${uuid}</uuid>\n"
        "  <title>${owner} in ${cluster}</title>\n"
        "  <description note='${note}'>${state_dir}</description>\n"
        "  <memory unit='KiB'>${memory_kib}</memory><vcpu>${vcpus}</vcpu>\n"
        "  <os><type>hvm</type></os>\n"
        "</domain>\n")
    template = domain_xml.DomainTemplate.from_file(path)
    clean = domain_xml.normalize_spec(spec(NASTY, owner="o'<", args={"note": "it's \"x\""}))
    policy = domain_xml.ArgPolicy(state_dir=str(tmp_path), request_args=["note"])
    root = ET.fromstring(domain_xml.build_domain_xml(
        clean, driver="test", state_dir=str(tmp_path), template=template, policy=policy))
    assert root.findtext("name") == NASTY
    assert root.findtext("title") == "o'< in sneetch"
    assert root.find("description").get("note") == "it's \"x\""
    assert domain_xml.read_usher_metadata(ET.tostring(root, encoding="unicode")) == {
        "owner": "o'<", "cluster": "sneetch"}
    error = pytest.raises(InvalidRequest, template.render,
                          domain_xml.normalize_spec(spec()), str(tmp_path))
    assert "${note}" in str(error.value)


@pytest.mark.parametrize("text, complaint", [
    ("<domain><name>${name}</name>", "well-formed"),
    ("<node><name>${name}</name></node>", "<node>"),
    ("<domain><name>fixed</name></domain>", "${name}"),
    ("<domain><name>${name}</name>$</domain>", "line 1"),
])
def test_broken_site_templates_are_config_errors(tmp_path, text, complaint):
    path = tmp_path / "t.xml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)) as error:
        domain_xml.DomainTemplate.from_file(path)
    assert complaint in str(error.value)


@pytest_twisted.ensureDeferred
async def test_vmm_uses_a_site_template(make_vmm, tmp_path):
    path = tmp_path / "site.xml"
    path.write_text("<domain type='test'><name>${name}</name><uuid>${uuid}</uuid>"
                    "<memory unit='KiB'>${memory_kib}</memory><vcpu>${vcpus}</vcpu>"
                    "<os><type>hvm</type></os><description>${purpose}</description>"
                    "</domain>")
    vmm = await make_vmm(domain_template=str(path), template_defaults={"purpose": "batch"})
    info = await vmm.create(spec("templated"))
    assert info["metadata"] == {"owner": "alice", "cluster": "sneetch"}
    assert info["memory_mib"] == 256 and info["vcpus"] == 2


def test_qemu_template_boots_a_kernel_and_logs_the_console(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "vmlinuz").touch()
    kernel = str(tmp_path / "images" / "vmlinuz")
    clean = domain_xml.normalize_spec(spec("q1", args={"kernel": kernel, "bridge": "br0"}))
    state = str(tmp_path / "state")
    policy = domain_xml.ArgPolicy(state_dir=state, request_args=["kernel", "bridge"],
                                  image_dirs=[str(tmp_path / "images")], bridges=["br0"])
    root = ET.fromstring(domain_xml.build_domain_xml(
        clean, driver="qemu", state_dir=state, policy=policy,
        defaults={"initrd": "/boot/initrd.gz", "kernel": "/default/kernel"}))
    assert root.get("type") == "qemu"
    assert root.findtext("os/kernel") == kernel             # args beat defaults
    assert root.findtext("os/initrd") == "/boot/initrd.gz"
    assert root.findtext("os/cmdline") == "console=ttyS0"
    assert root.find("features/acpi") is not None
    assert root.find("devices/serial/source").get("path") == f"{state}/consoles/q1.log"
    assert root.find("devices/interface/source").get("bridge") == "br0"
    assert root.findtext("memory") == str(256 * 1024)
    with pytest.raises(InvalidRequest, match="kernel"):
        domain_xml.build_domain_xml(domain_xml.normalize_spec(spec("q2")),
                                    driver="qemu", state_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="lxc"):
        domain_xml.build_domain_xml(clean, driver="lxc", state_dir=state, policy=policy)


# --- migration and moving images ------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_test_driver_cannot_live_migrate(make_vmm):
    source, target = await make_vmm("src"), await make_vmm("dst")
    await source.create(spec("mover"))
    await raises(MigrationUnsupported, source.migrate("mover", target.uri))
    assert (await source.domain_info("mover"))["state"] == states.RUN


@pytest.mark.parametrize("before", [states.RUN, states.PAUSED, states.HIBERNATED,
                                    states.SHUTOFF])
@pytest_twisted.ensureDeferred
async def test_export_and_import_move_a_vm_between_hosts(make_vmm, before):
    source, target = await make_vmm("src"), await make_vmm("dst")
    wanted = spec("mover", owner="carol", cluster="c1")
    created = await source.create(wanted)
    to_reach = {states.PAUSED: "pause", states.HIBERNATED: "hibernate",
                states.SHUTOFF: "shutdown"}
    if before in to_reach:
        await source.operate(to_reach[before], "mover")

    payload = await source.export_image("mover")
    assert payload["state"] == before
    assert (payload["image"] is None) == (before == states.SHUTOFF)
    assert await source.list_domains() == []
    assert os.listdir(os.path.join(source.state_dir, "images")) == []

    info = await target.import_image(wanted, payload)
    assert info == dict(created, state=before)
    assert await target.list_domains() == [info]
    if before == states.HIBERNATED:
        assert (await target.operate("restore", "mover"))["state"] == states.RUN


@pytest_twisted.ensureDeferred
async def test_import_refuses_mismatches_and_existing_vms(make_vmm):
    source, target = await make_vmm("src"), await make_vmm("dst")
    wanted = spec("mover")
    await source.create(wanted)
    payload = await source.export_image("mover")
    await raises(InvalidRequest, target.import_image(spec("other"), payload))
    await raises(InvalidRequest, target.import_image(dict(wanted, uuid=str(uuid.uuid4())),
                                                     payload))
    await raises(InvalidRequest, target.import_image(wanted, dict(payload, image=None)))
    await raises(InvalidRequest, target.import_image(wanted, b"raw bytes"))
    await target.create(spec("mover"))
    error = await raises(InvalidRequest, target.import_image(wanted, payload))
    assert "already exists" in str(error)


# --- events ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_lifecycle_events_reach_subscribers_as_usher_states(vmm):
    assert vmm.events_supported
    recorder = Recorder()
    await vmm.subscribe(recorder)
    await vmm.create(spec("watched"))
    await recorder.wait_for("watched", states.RUN)
    await vmm.operate("pause", "watched")
    await recorder.wait_for("watched", states.PAUSED)
    await vmm.operate("hibernate", "watched")
    await recorder.wait_for("watched", states.HIBERNATED)
    await vmm.operate("restore", "watched")
    await vmm.operate("pause", "watched")
    await vmm.operate("shutdown", "watched")
    await vmm.operate("delete", "watched")
    await recorder.wait_for("watched", None)
    assert recorder.events == [
        ("watched", states.RUN), ("watched", states.PAUSED),
        ("watched", states.HIBERNATED), ("watched", states.RUN),
        ("watched", states.PAUSED),
        # shutdown resumes a paused guest first: it cannot see the button.
        ("watched", states.RUN), ("watched", states.SHUTOFF),
        ("watched", None)]


@pytest_twisted.ensureDeferred
async def test_without_events_nothing_is_delivered(make_vmm):
    quiet = await make_vmm(events=False)
    assert not quiet.events_supported
    recorder = Recorder()
    await quiet.subscribe(recorder)
    await quiet.create(spec("silent"))
    await quiet.operate("pause", "silent")
    # A watched VMM on another host proves the loop delivered meanwhile.
    loud = await make_vmm("loud")
    witness = Recorder()
    await loud.subscribe(witness)
    await loud.create(spec("noisy"))
    await witness.wait_for("noisy", states.RUN)
    assert recorder.events == []
