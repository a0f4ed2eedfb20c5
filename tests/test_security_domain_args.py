"""Hole 3: a request's args reach the domain XML only as the LNM allows.

An ordinary user's ``--arg disk=<another user's hibernation image>``,
``initrd=/etc/shadow`` or ``bridge=mgmt0`` used to land unchanged in
``<source file>``, ``<initrd>`` and ``<source bridge>``. Now the LNM's
``ArgPolicy`` (usher.lnm.domain_xml; the [lnm] options request_args,
plugin_args, image_dirs, path_args, bridges, networks) decides:

- the XML level: every attack refused with its reason, allowed values
  canonical in the XML, the configuration's own mistakes refused, and a
  property test of path confinement;
- the controller's mark of plugin-set args (``plugin_args``), which a user
  cannot forge;
- a real controller's client boundary (PB over TLS) on real LibvirtVMMs
  (``tests.clientgrid``), looking into libvirt itself: nothing is defined;
- the real start path end to end: a sandbox of processes, the attacks sent
  through the client library and ush.

Hole 4, for migrations: a compromised LNM must not reach another host
through the definition of a VM it hands over (``usher.lnm.received_xml``):

- the checker: every hostile element refused with its reason, the
  definitions the host builds itself (the test driver's, QEMU's as libvirt
  gives them back, a site template's own host-reaching elements) accepted;
- a real LibvirtVMM refusing crafted definitions and memory images (and
  oversized ones), defining nothing;
- a compromised source's exports through the controller's migration saga
  (in process, clients over TLS) and end to end (the controller and the
  target as processes over PB/TLS, the compromised LNM a real one with its
  real certificate): refused, nothing in the target's libvirt, the VM still
  on its source, another user answered meanwhile;
- ``live_migration = False``, which keeps every move on the checked path.
"""

import os
import re
import struct
import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task, threads
from twisted.internet.threads import deferToThreadPool

from usher import states
from usher.config import load_config
from usher.controller.commands import plugin_set_args
from usher.errors import ConfigError, InvalidRequest, MigrationUnsupported
from usher.lnm import domain_xml, received_xml, service, testhost
from usher.lnm.libvirt_vmm import LibvirtVMM
from usher import settings as usher_settings

from tests import libvirtd
from tests.e2e import RunningSandbox, wait_for
from tests.libvirtd import PrivateLibvirtd

DOMAIN = "usher.test"

# A site template for libvirt's test driver that puts every variable where
# the QEMU template would (the test driver keeps what it is given, so the XML
# shows what a request managed to set).
TEMPLATE = """\
<domain type='test'>
  <name>${name}</name><uuid>${uuid}</uuid>
  <memory unit='KiB'>${memory_kib}</memory><vcpu>${vcpus}</vcpu>
  <os><type>hvm</type><kernel>${kernel}</kernel><initrd>${initrd}</initrd>
    <cmdline>${cmdline}</cmdline></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='${disk_format}'/>
      <source file='${disk}'/><target dev='vda' bus='virtio'/></disk>
    <interface type='bridge'><source bridge='${bridge}'/><model type='virtio'/></interface>
  </devices>
</domain>
"""
REQUEST_ARGS = ["kernel", "initrd", "disk", "disk_format", "bridge"]


def make_site(root):
    """An image directory with images, a symlink inside it and one out of it,
    the template, and the [[domain]] defaults -> dict of paths."""
    root = os.path.realpath(str(root))
    images = os.path.join(root, "images")
    os.makedirs(os.path.join(images, "real"), exist_ok=True)
    for name in ("base.img", "vmlinuz", "initrd.img", "web.img", "real/web2.qcow2"):
        with open(os.path.join(images, name), "w") as f:
            f.write("image\n")
    for link, target in (("link.qcow2", os.path.join(images, "real", "web2.qcow2")),
                         ("escape.img", "/etc/passwd")):
        if not os.path.lexists(os.path.join(images, link)):
            os.symlink(target, os.path.join(images, link))
    template = os.path.join(root, "domain.xml")
    with open(template, "w") as f:
        f.write(TEMPLATE)
    defaults = {"kernel": f"{images}/vmlinuz", "initrd": f"{images}/initrd.img",
                "cmdline": "console=ttyS0", "disk": f"{images}/base.img",
                "disk_format": "raw", "bridge": "br0"}
    return {"root": root, "images": images, "template": template, "defaults": defaults}


def attacks(images, save_image):
    """(args, what the refusal says) for every attack of the issue."""
    return [
        ({"disk": save_image}, "state directory"),
        ({"disk": f"{images}/hib.img"}, "state directory"),       # symlink to it
        ({"initrd": "/etc/shadow"}, "not inside this host's image directories"),
        ({"bridge": "mgmt0"}, "'mgmt0' is not one this host offers"),
        ({"disk": "../../etc/passwd"}, "must be an absolute path"),
        ({"disk": f"{images}/../../../etc/passwd"}, "must not contain '..'"),
        ({"disk": f"{images}/escape.img"}, "not inside this host's image directories"),
        ({"disk_format": "vvfat"}, "disk_format' must be one of raw, qcow2"),
        ({"disk": f"{images}/missing.img"}, "no usable image there"),
        ({"disk": images}, "is not a file or a block device"),
        ({"network": "default"}, "argument 'network' may not be set by a request"),
    ]


def policy_for(site, state_dir, **changes):
    options = dict(state_dir=state_dir, request_args=REQUEST_ARGS, image_dirs=[site["images"]],
                   bridges=["br0"])
    options.update(changes)
    return domain_xml.ArgPolicy(**options)


def vm_spec(name="q1", args=None, plugin_args=None):
    return domain_xml.normalize_spec({"name": name, "memory_mib": 128, "vcpus": 1,
                                      "owner": "alice", "cluster": "web", "args": args or {},
                                      "plugin_args": plugin_args})


def qemu_xml(site, state_dir, args, policy=None, plugin_args=None):
    return ET.fromstring(domain_xml.build_domain_xml(
        vm_spec(args=args, plugin_args=plugin_args), driver="qemu", state_dir=state_dir,
        defaults=site["defaults"], policy=policy or policy_for(site, state_dir)))


@pytest.fixture
def site(tmp_path):
    site = make_site(tmp_path)
    state = os.path.join(site["root"], "state")
    os.makedirs(os.path.join(state, "images"))
    save = os.path.join(state, "images", "1.secret.bob.usher.test.save")
    with open(save, "w") as f:
        f.write("bob's memory\n")
    os.symlink(save, os.path.join(site["images"], "hib.img"))
    site.update(state=state, save=save)
    return site


# --- the XML level ------------------------------------------------------------------

def test_by_default_args_set_no_template_variable(site):
    policy = domain_xml.ArgPolicy(state_dir=site["state"])
    for key in ("disk", "kernel", "initrd", "cmdline", "bridge", "network", "domain_type",
                "disk_format", "cdrom"):
        with pytest.raises(InvalidRequest, match=rf"'{key}' may not be set by a request on "
                                                 r"this host \(its request_args: none\)"):
            qemu_xml(site, site["state"], {key: f"{site['images']}/web.img"}, policy)
    # Args that are no template variable stay out of the XML, and are no error.
    root = qemu_xml(site, site["state"], {"os": "debian", "guaranteed": "yes"}, policy)
    assert root.findtext("os/kernel") == site["defaults"]["kernel"]
    assert "debian" not in ET.tostring(root, encoding="unicode")


@pytest.mark.parametrize("index", range(11))
def test_every_attack_is_refused_at_the_xml_level(site, index):
    args, complaint = attacks(site["images"], site["save"])[index]
    with pytest.raises(InvalidRequest) as refused:
        qemu_xml(site, site["state"], args)
    assert complaint in str(refused.value)
    # The test driver too: a request means the same on every host.
    with pytest.raises(InvalidRequest, match=re.escape(complaint)):
        domain_xml.build_domain_xml(vm_spec(args=args), driver="test",
                                    state_dir=site["state"],
                                    policy=policy_for(site, site["state"]))


def test_an_allowed_request_gets_canonical_paths_in_the_qemu_xml(site):
    root = qemu_xml(site, site["state"], {"disk": f"{site['images']}/link.qcow2",
                                          "disk_format": "qcow2",
                                          "kernel": f"{site['images']}/./vmlinuz",
                                          "bridge": "br0"})
    disk = root.find("devices/disk")
    assert disk.find("source").get("file") == f"{site['images']}/real/web2.qcow2"
    assert disk.find("driver").get("type") == "qcow2"
    assert root.findtext("os/kernel") == f"{site['images']}/vmlinuz"
    assert root.findtext("os/initrd") == site["defaults"]["initrd"]        # the default
    assert root.find("devices/interface/source").get("bridge") == "br0"
    assert root.find("devices/serial/source").get("path").startswith(site["state"])


def test_plugin_values_need_plugin_args_and_pass_the_same_checks(site):
    web = f"{site['images']}/web.img"
    policy = policy_for(site, site["state"], request_args=[], plugin_args=["disk"])
    root = qemu_xml(site, site["state"], {"disk": web}, policy, plugin_args=["disk"])
    assert root.find("devices/disk/source").get("file") == web
    # The same value from the request itself is the user's: refused.
    with pytest.raises(InvalidRequest, match="may not be set by a request"):
        qemu_xml(site, site["state"], {"disk": web}, policy)
    # What plugins may set is checked like the rest.
    with pytest.raises(InvalidRequest, match="state directory"):
        qemu_xml(site, site["state"], {"disk": site["save"]}, policy, plugin_args=["disk"])
    with pytest.raises(InvalidRequest, match=r"may not be set by a plugin on this host "
                                             r"\(its plugin_args: disk\)"):
        qemu_xml(site, site["state"], {"bridge": "br0"}, policy, plugin_args=["bridge"])


def test_site_templates_variables_are_allowed_one_by_one(site, tmp_path):
    path = tmp_path / "qemu-site.xml"
    path.write_text(
        "<domain type='qemu'><name>${name}</name><memory unit='KiB'>${memory_kib}</memory>"
        "<devices><disk type='file' device='cdrom'><source file='${cdrom}'/></disk>"
        "<disk type='file' device='disk'><source file='${seed}'/></disk></devices>"
        "<description>${purpose}</description></domain>")
    template = domain_xml.DomainTemplate.from_file(path)
    iso = f"{site['images']}/web.img"
    defaults = {"cdrom": iso, "seed": iso, "purpose": "batch"}

    def render(args, **changes):
        policy = policy_for(site, site["state"], **changes)
        return ET.fromstring(domain_xml.build_domain_xml(
            vm_spec(args=args), driver="qemu", state_dir=site["state"], template=template,
            defaults=defaults, policy=policy))

    with pytest.raises(InvalidRequest, match="'purpose' may not be set"):
        render({"purpose": "mine"})
    assert render({"purpose": "mine<&>"}, request_args=["purpose"]).findtext(
        "description") == "mine<&>"
    # cdrom is a path everywhere; a site's own path variables are named in path_args.
    with pytest.raises(InvalidRequest, match="not inside"):
        render({"cdrom": "/etc/shadow"}, request_args=["cdrom"])
    assert render({"seed": "/etc/shadow"}, request_args=["seed"]).find(
        "devices/disk[@device='disk']/source").get("file") == "/etc/shadow"
    with pytest.raises(InvalidRequest, match="not inside"):
        render({"seed": "/etc/shadow"}, request_args=["seed"], path_args=["seed"])


@pytest.mark.parametrize("options, complaint", [
    ({"image_dirs": ["{state}"]}, "overlaps the LNM's state_dir"),
    ({"image_dirs": ["{state}/images"]}, "overlaps the LNM's state_dir"),
    ({"image_dirs": ["{root}"]}, "overlaps the LNM's state_dir"),
    ({"image_dirs": ["images"]}, "not an absolute path"),
    ({"request_args": ["name"]}, "request_args: 'name' cannot be set"),
    ({"plugin_args": ["bad key"]}, "plugin_args: 'bad key' cannot be set"),
    ({"path_args": ["console_path"]}, "path_args: 'console_path'"),
])
def test_the_configuration_refuses_what_would_open_the_hole(site, options, complaint):
    options = {k: [v.format(**site) for v in values] for k, values in options.items()}
    with pytest.raises(ConfigError, match=complaint):
        domain_xml.ArgPolicy(state_dir=site["state"], **options)


def test_lnm_config_options_make_the_policy(site, tmp_path):
    path = tmp_path / "lnm.config"
    path.write_text(f"""\
[lnm]
state_dir = {site['state']}
request_args = disk, bridge
plugin_args = kernel
image_dirs = {site['images']}
path_args = seed
bridges = br0, br1
networks = default
""")
    lnm = load_config(usher_settings.LNM, [str(path)], isolated=True)["lnm"]
    policy = service.arg_policy(lnm)
    assert (policy.request_args, policy.plugin_args) == ({"disk", "bridge"}, {"kernel"})
    assert policy.image_dirs == (site["images"],) and "seed" in policy.path_variables
    assert policy.devices == {"bridge": {"br0", "br1"}, "network": {"default"}}
    defaults = load_config(usher_settings.LNM, [], isolated=True)["lnm"]
    assert [defaults[k] for k in ("request_args", "plugin_args", "image_dirs", "path_args",
                                  "bridges", "networks")] == [[]] * 6


# A tree with symlinks pointing in, out and into the state directory; paths
# are built from its names, dots and slashes.
SEGMENTS = ["images", "real", "web.img", "web2.qcow2", "link.qcow2", "escape.img", "hib.img",
            "state", "etc", "passwd", "..", ".", "", "in", "out", "up"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    site = make_site(tmp_path_factory.mktemp("tree"))
    images = site["images"]
    state = os.path.join(site["root"], "state")
    os.makedirs(os.path.join(state, "images"))
    with open(os.path.join(state, "images", "x.save"), "w") as f:
        f.write("x")
    os.symlink(os.path.join(state, "images", "x.save"), os.path.join(images, "hib.img"))
    os.symlink("real", os.path.join(images, "in"))
    os.symlink(site["root"], os.path.join(images, "out"))
    os.symlink("..", os.path.join(images, "real", "up"))
    policy = domain_xml.ArgPolicy(state_dir=state, request_args=["disk"], image_dirs=[images])
    return site, state, policy


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=8),
       rooted=st.sampled_from(["images", "root", "/", ""]))
def test_a_path_that_passes_lies_in_an_image_directory(tree, parts, rooted):
    site, state, policy = tree
    start = {"images": site["images"], "root": site["root"], "/": "/", "": ""}[rooted]
    value = os.path.join(start, *parts) if start else "/".join(parts)
    try:
        checked = policy.check(vm_spec(args={"disk": value}))
    except InvalidRequest:
        return
    path = checked["disk"]
    assert path == os.path.realpath(path) == os.path.realpath(value)
    assert path.startswith(site["images"] + os.sep) and os.path.isfile(path)
    assert not path.startswith(state) and ".." not in value.split("/")


# --- the controller's mark of plugin-set args ---------------------------------------------

def test_plugin_args_name_only_what_plugins_set_or_changed():
    user = {"disk": "/srv/images/a.img", "os": "debian", "n": 1}
    final = dict(user, os="ubuntu", ip="10.0.0.7", n=1.0)
    assert plugin_set_args(user, final, {"ip": "10.0.0.7"}) == ["ip", "os"]
    # set_vm_arg with the user's own value: the plugin vouches for it.
    assert plugin_set_args(user, dict(user), {"disk": user["disk"]}) == ["disk"]
    assert plugin_set_args(user, dict(user), {}) == []
    nan = float("nan")
    assert plugin_set_args({"x": nan}, {"x": nan}, {}) == []


# --- a real controller over TLS on real LibvirtVMMs ---------------------------------------

IMAGES_PLUGIN = '''\
"""images: maps a request's image=NAME to a disk in the site's image directory."""
import os
CONFIG_SPEC = "directory = string()\\norder = integer(default=30)\\n"


class Plugin:
    def __init__(self, config, api):
        self.directory = config["directory"]
        self.order = config["order"]

    def entry_point(self, event):
        request = event.request
        image = request.args.get("image")
        if request.kind == "start" and image:
            for vm in request.vms:
                request.set_vm_arg(vm, "disk", os.path.join(self.directory, image + ".img"))
'''


async def _domains(grid):
    """{LNM: sorted domain names} straight from each test-driver host."""
    found = {}
    for name, vmm in grid.grid.vmms.items():
        found[name] = await deferToThreadPool(
            reactor, grid.grid.pool,
            lambda conn: sorted(d.name() for d in conn.listAllDomains(0)),
            vmm.libvirt_connection)
    return found


async def _xml(grid, lnm, vm):
    return ET.fromstring(await deferToThreadPool(
        reactor, grid.grid.pool, lambda conn: conn.lookupByName(vm).XMLDesc(0),
        grid.grid.vmms[lnm].libvirt_connection))


@pytest_twisted.ensureDeferred
async def test_attacks_through_the_client_boundary_define_nothing(tmp_path, client_grids):
    site = make_site(tmp_path / "site")
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "images.py").write_text(IMAGES_PLUGIN)
    (tmp_path / "images.config").write_text(f"directory = {site['images']}\n")
    template = domain_xml.DomainTemplate.from_file(site["template"])

    def vmm_options(state_dir):
        return {"domain_template": site["template"], "template_defaults": site["defaults"],
                "arg_policy": policy_for(site, state_dir, plugin_args=["disk", "cmdline"])}

    assert template.identifiers >= set(REQUEST_ARGS)
    grid = await client_grids(lnms=2, vmm_options=vmm_options, plugin_dir=str(plugin_dir))
    root = await grid.connected("root")
    await root.register_plugin("images", "start_request", str(tmp_path / "images.config"))
    alice, bob = await grid.connected("alice"), await grid.connected("bob")
    secret = f"1.secret.bob.{DOMAIN}"
    await bob.start(cluster="secret", count=1, lnms=["lnm1"])
    await bob.hibernate([secret])
    lnm = grid.controller.state.vms[secret]["lnm"]
    save = grid.grid.vmms[lnm].image_path(secret)
    assert os.path.isfile(save)
    os.symlink(save, os.path.join(site["images"], "hib.img"))
    before = await _domains(grid)
    records = {n: dict(r) for n, r in grid.controller.state.vms.items()}
    with open(save, "rb") as f:
        image = f.read()

    for args, complaint in attacks(site["images"], save) + [
            # A user cannot pass for a plugin.
            ({"plugin_args": "cmdline", "cmdline": "init=/bin/sh"},
             "'cmdline' may not be set by a request")]:
        result, listed = await defer.gatherResults([
            alice.start(["evil"], lnms=[lnm], args=args), bob.list(remote=True)])
        assert result["started"] == [] and len(result["failed"]) == 1, args
        assert complaint in result["failed"][0]["error"], (args, result)
        assert [r["name"] for r in listed if r["owner"] == "bob"] == [secret]   # answered
        assert await _domains(grid) == before
        assert {n: dict(r) for n, r in grid.controller.state.vms.items()} == records
    assert grid.controller.state.vms[secret]["state"] == states.HIBERNATED
    with open(save, "rb") as f:
        assert f.read() == image                                # bob's image untouched

    # An allowed request still gets its definition right, canonical path and all.
    result = await alice.start(["good"], lnms=[lnm],
                               args={"disk": f"{site['images']}/link.qcow2",
                                     "disk_format": "qcow2"})
    assert result["failed"] == [], result
    good = f"good.alice.{DOMAIN}"
    xml = await _xml(grid, result["started"][0]["lnm"], good)
    assert xml.find("devices/disk/source").get("file") == f"{site['images']}/real/web2.qcow2"
    assert xml.find("devices/disk/driver").get("type") == "qcow2"
    assert xml.findtext("os/initrd") == site["defaults"]["initrd"]
    assert grid.controller.state.vms[good]["plugin_args"] == []
    # A plugin chooses the disk (plugin_args = disk): the site's path through.
    result = await alice.start(["chosen"], args={"image": "web"})
    assert result["failed"] == [], result
    chosen = f"chosen.alice.{DOMAIN}"
    assert grid.controller.state.vms[chosen]["plugin_args"] == ["disk"]
    xml = await _xml(grid, result["started"][0]["lnm"], chosen)
    assert xml.find("devices/disk/source").get("file") == f"{site['images']}/web.img"


# --- end to end: the real start path, processes over TLS ---------------------------------

@pytest_twisted.async_yield_fixture(scope="module")
async def system(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sandbox")
    site = make_site(directory / "site")
    box = RunningSandbox(directory, lnms=2, settings={"lnm": {
        "request_args": ", ".join(REQUEST_ARGS), "image_dirs": site["images"],
        "bridges": "br0", "domain_template": site["template"]}})
    for name in box.description["lnms"]:
        with open(box.description["configs"][name], "a", encoding="utf-8") as f:
            f.write("  [[domain]]\n" + "".join(f"  {k} = {v}\n"
                                               for k, v in site["defaults"].items()))
    await box.start()
    box.add_user("bob", "bob-secret")
    box.add_user("mallory", "mallory-secret")
    box.site = site
    yield box
    await box.stop()


@pytest_twisted.ensureDeferred
async def test_attacks_through_the_real_start_path_are_refused(system):
    bob = await system.connected_client("bob", "bob-secret")
    mallory = await system.connected_client("mallory", "mallory-secret")
    admin = await system.connected_client()
    secret = f"1.secret.bob.{DOMAIN}"
    await bob.start(cluster="secret", count=1, lnms=["lnm1"])
    await wait_for(lambda: bob.vms.get(secret, {}).get("state") == states.RUN)
    await bob.hibernate([secret])
    lnm = bob.vms[secret]["lnm"]
    save = os.path.join(system.dir, f"{lnm}-state", "images", f"{secret}.save")
    assert os.path.isfile(save)
    images = system.site["images"]
    os.symlink(save, os.path.join(images, "hib.img"))
    hosts = {h["name"]: h["vms"] for h in await admin.list_lnm()}

    for args, complaint in attacks(images, save):
        result, listed = await defer.gatherResults([
            mallory.start(["evil"], lnms=[lnm], args=args), bob.list(remote=True)])
        assert result["started"] == [] and len(result["failed"]) == 1, args
        assert complaint in result["failed"][0]["error"], (args, result)
        assert [r["name"] for r in listed if r["owner"] == "bob"] == [secret]
        assert [r for r in await mallory.list(remote=True) if r["owner"] == "mallory"] == []
    assert {h["name"]: h["vms"] for h in await admin.list_lnm()} == hosts
    assert [(r["name"], r["state"]) for r in await bob.list(remote=True) if r["owner"] == "bob"] == [
        (secret, states.HIBERNATED)]

    # ush shows the reason to the user, and says the start failed.
    mallory_config = os.path.join(system.dir, "mallory.config")
    with open(system.description["configs"]["ush"]) as f:
        text = f.read()
    with open(mallory_config, "w") as f:
        f.write(text.replace(f"username = {system.description['user']}", "username = mallory")
                .replace(f"password = {system.description['password']}",
                         "password = mallory-secret"))
    done = await system.ush("start", "evil", "--arg", "initrd=/etc/shadow",
                            config=mallory_config, json_output=False)
    assert done.returncode == 1
    assert "/etc/shadow is not inside this host's image directories" in done.stdout + done.stderr

    # An allowed request starts.
    result = await mallory.start(["fine"], args={"disk": f"{images}/web.img"})
    assert result["failed"] == [] and len(result["started"]) == 1


# === hole 4 (a compromised LNM is contained): a migrated VM's definitions ===============
#
# A save/restore migration defines on the target what the source exported,
# and libvirt restores from the definition inside the memory image. The
# target checks both against what it would build itself for the VM's record
# (usher.lnm.received_xml) before defining anything.

# What libvirt 9.0 with QEMU 7.2 answers for a VM of the built-in QEMU
# template (XMLDesc(INACTIVE); the definition inside its save image is the
# same), recorded on a real host.
QEMU_DEFINITION = """\
<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <usher:vm xmlns:usher="https://usher.invalid/xmlns/vm/1" owner="alice" cluster="web"/>
  </metadata>
  <memory unit='KiB'>131072</memory>
  <currentMemory unit='KiB'>131072</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0</cmdline>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
  </features>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='forbid'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <controller type='usb' index='0' model='piix3-uhci'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x2'/>
    </controller>
    <controller type='pci' index='0' model='pci-root'/>
    <interface type='bridge'>
      <mac address='52:54:00:6b:3c:58'/>
      <source bridge='br0'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </interface>
    <serial type='file'>
      <source path='{console}' append='on'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='file'>
      <source path='{console}' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <audio id='1' type='none'/>
    <memballoon model='virtio'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </memballoon>
  </devices>
</domain>
"""
QEMU_EMULATORS = ["/usr/bin/qemu-system-x86_64", "/usr/bin/qemu-system-i386"]
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def qemu_reach(site, spec, policy=None, template=None):
    """What the target (a QEMU host with the site's defaults) may let through."""
    policy = policy or policy_for(site, site["state"])
    reference = domain_xml.build_domain_xml(spec, driver="qemu", state_dir=site["state"],
                                            template=template, defaults=site["defaults"],
                                            policy=policy)
    return received_xml.HostReach(
        reference, policy=policy, defaults=site["defaults"], emulators=QEMU_EMULATORS,
        own_paths=[domain_xml.console_path(site["state"], spec["name"])])


def qemu_definition(site, spec):
    return QEMU_DEFINITION.format(
        name=spec["name"], uuid=spec["uuid"], kernel=site["defaults"]["kernel"],
        initrd=site["defaults"]["initrd"], disk=site["defaults"]["disk"],
        console=domain_xml.console_path(site["state"], spec["name"]))


def crafted(xml, change):
    """A definition changed by ``change``: ("devices"|"domain"|"os", snippet)
    inserts before that element's end tag; (old, new) replaces once."""
    where, what = change
    if where in ("devices", "domain", "os"):
        end = f"</{where}>"
        assert end in xml
        return xml.replace(end, what + end, 1)
    assert where in xml, where
    return xml.replace(where, what, 1)


def hostile_changes(site, victim_uuid, own_uuid):
    """(change, what the refusal says): every way the issue names for a
    compromised source to reach another host through a definition, and more."""
    images, save = site["images"], site["save"]
    dev = "devices"
    return [
        # host files: disks, kernels, firmware, consoles, logs, sockets, shares
        ((dev, "<disk type='file' device='disk'><source file='/etc/shadow'/>"
               "<target dev='vdb'/></disk>"), "/etc/shadow is not inside this host's image"),
        ((dev, f"<disk type='file' device='disk'><source file='{save}'/>"
               "<target dev='vdb'/></disk>"), "state directory"),
        ((dev, f"<disk type='file' device='cdrom'><source file='{images}/escape.img'/>"
               "<target dev='hdc'/></disk>"), "not inside this host's image directories"),
        ((dev, "<disk type='file'><source file='etc/shadow'/><target dev='vdb'/></disk>"),
         "must be an absolute path"),
        ((dev, f"<disk type='file'><driver name='qemu' type='qcow2'/><source file="
               f"'{images}/base.img'/><backingStore type='file'><source file='/etc/shadow'/>"
               "</backingStore><target dev='vdb'/></disk>"), "/etc/shadow is not inside"),
        ((site["defaults"]["initrd"], save), "state directory"),
        ((site["defaults"]["kernel"], "/boot/vmlinuz-other"), "not inside this host's image"),
        (("os", "<loader readonly='yes' type='pflash'>/etc/shadow</loader>"),
         "<os/loader> /etc/shadow is a host path"),
        (("os", "<nvram>/var/lib/libvirt/qemu/nvram/victim_VARS.fd</nvram>"),
         "is a host path that the definition"),
        ((dev, "<serial type='file'><source path='/etc/cron.d/evil'/></serial>"),
         "<devices/serial/source path> /etc/cron.d/evil is a host path"),
        ((dev, "<serial type='pty'><log file='/root/.ssh/authorized_keys'/></serial>"),
         "authorized_keys is a host path"),
        ((dev, "<channel type='unix'><source mode='connect' path='/run/libvirt/libvirt-sock'/>"
               "<target type='virtio' name='x'/></channel>"), "libvirt-sock is a host path"),
        ((dev, "<filesystem type='mount' accessmode='passthrough'><source dir='/'/>"
               "<target dir='root'/></filesystem>"), "/ is not inside this host's image"),
        ((dev, "<interface type='bridge'><source bridge='br0'/><rom file='/etc/shadow'/>"
               "</interface>"), "rom file> /etc/shadow is a host path"),
        ((dev, "<audio id='2' type='file' path='/etc/motd'/>"), "devices/audio type=file"),
        (("/usr/bin/qemu-system-x86_64", "/tmp/evil-qemu"), "not an emulator this host"),
        # the host's networks
        ((dev, "<interface type='bridge'><source bridge='mgmt0'/></interface>"),
         "bridge 'mgmt0' is not one this host offers (br0)"),
        ((dev, "<interface type='network'><source network='management'/></interface>"),
         "network 'management' is not one this host offers"),
        ((dev, "<interface type='direct'><source dev='eth0' mode='bridge'/></interface>"),
         "devices/interface type=direct"),
        ((dev, "<interface type='user'/>"), "devices/interface type=user"),
        ((dev, "<interface type='ethernet'><script path='/tmp/x.sh'/></interface>"),
         "type=ethernet"),
        ((dev, "<interface type='bridge'><source bridge='br0'/><script path='/tmp/x.sh'/>"
               "</interface>"), "devices/interface/script"),
        ((dev, "<interface type='bridge'><source bridge='br0'/><vlan><tag id='1'/></vlan>"
               "</interface>"), "devices/interface/vlan"),
        ((dev, "<interface type='bridge'><source bridge='br0'/><target dev='tap-victim' "
               "managed='no'/></interface>"), "devices/interface/target"),
        ((dev, "<serial type='tcp'><source mode='connect' host='10.0.0.1' service='22'/>"
               "</serial>"), "devices/serial type=tcp"),
        ((dev, "<channel type='pty'><target type='guestfwd' address='10.0.2.1' port='22'/>"
               "</channel>"), "guestfwd"),
        ((dev, "<disk type='network' device='disk'><source protocol='nbd' name='x'>"
               "<host name='10.0.0.1' port='10809'/></source><target dev='vdc'/></disk>"),
         "devices/disk type=network"),
        ((dev, f"<disk type='file'><source file='{images}/base.img'/><backingStore "
               "type='network'><source protocol='nbd'/></backingStore><target dev='vdb'/>"
               "</disk>"), "backingStore type=network"),
        ((dev, "<graphics type='vnc' port='-1' listen='0.0.0.0'/>"), "devices/graphics"),
        # host devices and the emulator's command line
        ((dev, "<hostdev mode='subsystem' type='pci' managed='yes'><source><address "
               "domain='0' bus='0' slot='3' function='0'/></source></hostdev>"),
         "<devices/hostdev> is not in the definition this host builds"),
        (("domain", f"<qemu:commandline xmlns:qemu='{QEMU_NS}'><qemu:arg value='-chardev'/>"
                    "<qemu:arg value='file,id=x,path=/etc/shadow'/></qemu:commandline>"),
         "commandline> is not in the definition"),
        ((dev, "<disk type='block' device='lun' sgio='unfiltered'><source dev='/dev/sda'/>"
               "<target dev='sda' bus='scsi'/></disk>"), "device=lun"),
        ((dev, f"<disk type='file'><source file='{images}/base.img'/><encryption "
               "format='luks'><secret type='passphrase' uuid='" + victim_uuid + "'/>"
               "</encryption><target dev='vdb'/></disk>"), "encryption"),
        ((dev, "<input type='evdev'><source dev='/dev/input/event0'/></input>"),
         "devices/input type=evdev"),
        ((dev, "<shmem name='victim-shm'><model type='ivshmem-plain'/></shmem>"),
         "devices/shmem"),
        ((dev, "<memory model='nvdimm'><source><path>/etc/shadow</path></source><target>"
               "<size unit='KiB'>1024</size></target></memory>"), "devices/memory"),
        ((dev, "<smartcard mode='passthrough' type='tcp'><source mode='connect' "
               "host='10.0.0.1' service='2001'/></smartcard>"), "devices/smartcard"),
        ((dev, "<redirdev bus='usb' type='tcp'><source mode='connect' host='10.0.0.1' "
               "service='4000'/></redirdev>"), "devices/redirdev"),
        ((dev, "<rng model='virtio'><backend model='egd' type='tcp'><source mode='connect' "
               "host='10.0.0.1' service='708'/></backend></rng>"), "backend=egd"),
        ((dev, "<rng model='virtio'><backend model='random'>/etc/shadow</backend></rng>"),
         "is not a random number source"),
        ((dev, "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/>"
               "</backend></tpm>"), "backend=passthrough"),
        (("domain", "<sysinfo type='fwcfg'><entry name='opt/x' file='/etc/shadow'/></sysinfo>"),
         "<sysinfo> is not in the definition"),
        (("domain", "<seclabel type='none'/>"), "seclabel type=none"),
        (("domain", "<seclabel type='dynamic' model='selinux'><baselabel>"
                    "system_u:system_r:unconfined_t:s0</baselabel></seclabel>"),
         "seclabel/baselabel"),
        (("domain", "<cputune><shares>262144</shares></cputune>"), "<cputune> is not"),
        (("domain", "<memoryBacking><locked/></memoryBacking>"), "<memoryBacking> is not"),
        (("domain", "<resource><partition>/machine/victims</partition></resource>"),
         "<resource> is not"),
        (("<on_crash>destroy</on_crash>", "<on_crash>coredump-destroy</on_crash>"),
         "action 'coredump-destroy'"),
        # the record's identity and size
        (("<name>", "<name>1.secret.bob.usher.test"), "<name> must be the record's"),
        ((own_uuid, victim_uuid), "<uuid> must be the record's"),
        (("domain type='qemu'", "domain type='kvm'"), "has type 'kvm'"),
        (('owner="alice"', 'owner="bob"'), "names owner 'bob'"),
        (("<memory unit='KiB'>131072", "<memory unit='GiB'>64"), "more than the record's"),
        (("<currentMemory unit='KiB'>131072", "<currentMemory unit='KiB'>999999"),
         "more than the record's"),
        (("<vcpu placement='static'>1", "<vcpu placement='static'>64"),
         "more than the record's 1"),
        (("<vcpu placement='static'>", "<vcpu placement='static' cpuset='0'>"),
         "vcpu cpuset"),
        # the parser
        (("<domain type='qemu'>", "<!DOCTYPE domain [<!ENTITY a 'aaaaaaaaaa'>"
                                  "<!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>]>"
                                  "<domain type='qemu'><title>&b;</title>"),
         "DOCTYPE or an entity declaration"),
        (("<domain type='qemu'>", "<!DOCTYPE domain [<!ENTITY s SYSTEM 'file:///etc/shadow'>]>"
                                  "<domain type='qemu'><title>&s;</title>"),
         "DOCTYPE or an entity declaration"),
        (("<cmdline>console=ttyS0", "<cmdline>&shadow;"), "not well-formed XML"),
        (("domain", "<title>" + "x" * received_xml.MAX_DEFINITION_CHARS + "</title>"),
         "longer than 524288 characters"),
        (("domain", "<a>" * 70 + "</a>" * 70), "levels"),
    ]



def test_every_hostile_definition_is_refused(site):
    spec = vm_spec(name="1.web.alice.usher.test")
    spec["memory_mib"], spec["vcpus"] = 128, 1
    reach = qemu_reach(site, spec)
    honest = qemu_definition(site, spec)
    received_xml.check(honest, spec=spec, reach=reach)            # the honest one passes
    wrong = []
    for change, complaint in hostile_changes(site, "6f1f3c2a-0c59-4a38-8d0e-5f1d2c3b4a59",
                                             spec["uuid"]):
        try:
            received_xml.check(crafted(honest, change), spec=spec, reach=reach,
                               what="import of it")
        except InvalidRequest as e:
            refusal = str(e)
            if complaint not in refusal or not refusal.startswith("import of it"):
                wrong.append((change, refusal[:300]))
            assert "root:" not in refusal                # nothing of /etc/shadow read
        else:
            wrong.append((change, "accepted"))
    assert wrong == []


def test_what_this_host_allows_itself_is_accepted(site):
    spec = vm_spec(name="1.web.alice.usher.test")
    spec["memory_mib"], spec["vcpus"] = 128, 1
    honest = qemu_definition(site, spec)
    policy = policy_for(site, site["state"], networks=["default"])
    reach = qemu_reach(site, spec, policy)
    images = site["images"]
    for change in [
            # a disk, cdrom or share inside image_dirs, as args could have set it
            ("devices", f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                        f"<source file='{images}/real/web2.qcow2'/><target dev='vdb'/></disk>"),
            ("devices", f"<disk type='file' device='cdrom'><source file='{images}/link.qcow2'/>"
                        "<target dev='hdc'/><readonly/></disk>"),
            ("devices", f"<filesystem type='mount'><source dir='{images}/real'/>"
                        "<target dir='share'/></filesystem>"),
            # its bridges and networks (a running VM shows the network's port and bridge)
            ("devices", "<interface type='network'><source network='default' portid="
                        "'0b5e8ab6-4b37-4a3e-9f61-2a7f3e1f7d10' bridge='virbr0'/></interface>"),
            # guest devices, labels and consoles libvirt chooses
            ("devices", "<serial type='pty'><source path='/dev/pts/3'/><target port='1'/>"
                        "</serial>"),
            ("devices", "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent"
                        ".0'/></channel>"),
            ("devices", "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"),
            ("devices", "<watchdog model='i6300esb' action='reset'/>"),
            ("domain", "<seclabel type='dynamic' model='dac' relabel='yes'/>"),
            ("domain", "<resource><partition>/machine</partition></resource>"),
            ("<memory unit='KiB'>131072", "<memory unit='MiB'>128"),
            ("<cmdline>console=ttyS0", "<cmdline>/init root=/dev/vda"),
            ("<metadata>", "<metadata><site:x xmlns:site='https://site.invalid/x' path='/etc'/>")]:
        received_xml.check(crafted(honest, change), spec=spec, reach=reach)


def test_the_site_templates_own_host_reaching_elements_pass_and_nothing_more(site, tmp_path):
    path = tmp_path / "qemu-site.xml"
    path.write_text(
        f"<domain type='kvm' xmlns:qemu='{QEMU_NS}'><name>${{name}}</name><uuid>${{uuid}}</uuid>"
        "<memory unit='KiB'>${memory_kib}</memory><vcpu>${vcpus}</vcpu>"
        "<os><type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd"
        "</loader></os><devices>"
        "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' "
        "bus='0x65' slot='0x00' function='0x0'/></source></hostdev>"
        "<graphics type='vnc' port='-1' listen='127.0.0.1'/></devices>"
        "<qemu:commandline><qemu:arg value='-global'/><qemu:arg value='kvm-pit.lost_tick_policy"
        "=discard'/></qemu:commandline></domain>")
    template = domain_xml.DomainTemplate.from_file(path)
    spec = vm_spec(name="1.gpu.alice.usher.test")
    policy = policy_for(site, site["state"])
    reach = qemu_reach(site, spec, policy, template)
    reference = domain_xml.build_domain_xml(spec, driver="qemu", state_dir=site["state"],
                                            template=template, defaults=site["defaults"],
                                            policy=policy)
    # As libvirt gives it back: with guest addresses and aliases added.
    honest = reference.replace("</hostdev>", "<alias name='hostdev0'/><address type='pci' "
                               "domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>"
                               "</hostdev>")
    assert "alias name='hostdev0'" in honest
    received_xml.check(honest, spec=spec, reach=reach)
    for change, complaint in [
            (('bus="0x65"', 'bus="0x66"'), "devices/hostdev"),
            (("lost_tick_policy=discard", "lost_tick_policy=discard,x=/etc/shadow"),
             "commandline>"),
            (('listen="127.0.0.1"', 'listen="0.0.0.0"'), "devices/graphics"),
            (("/usr/share/OVMF/OVMF_CODE.fd", "/etc/shadow"), "<os/loader> /etc/shadow")]:
        with pytest.raises(InvalidRequest, match=re.escape(complaint)):
            received_xml.check(crafted(honest, change), spec=spec, reach=reach)


def test_the_test_drivers_definitions_pass_and_a_record_this_host_refuses_fails(site, tmp_path):
    """libvirt's test driver as the LNM uses it: the definition it exports and
    the one its save image carries pass; args this host's policy refuses
    make it refuse the VM whatever the definition says."""
    uri = testhost.write_test_host(tmp_path / "host.xml", hostname="t", cpus=2,
                                   memory_mib=4096, model="t")
    conn = libvirt.open(uri)
    try:
        spec = vm_spec(name="1.web.alice.usher.test")
        built = domain_xml.build_domain_xml(spec, driver="test", state_dir=site["state"])
        dom = conn.defineXML(built)
        dom.create()
        reach = received_xml.HostReach(built, policy=domain_xml.ArgPolicy(
            state_dir=site["state"]))
        received_xml.check(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), spec=spec, reach=reach)
        image = str(tmp_path / "vm.save")
        dom.save(image)
        embedded = conn.saveImageGetXMLDesc(image, 0)
        received_xml.check(embedded, spec=spec, reach=reach)
        with pytest.raises(InvalidRequest, match="has type 'qemu'"):
            received_xml.check(qemu_definition(site, spec), spec=spec, reach=reach)
    finally:
        conn.close()
    # An honest definition of a VM whose args this host would not accept.
    refused = vm_spec(name="1.web.alice.usher.test", args={"initrd": "/etc/shadow"})
    with pytest.raises(InvalidRequest, match="not inside this host's image directories"):
        qemu_reach(site, refused)
    assert received_xml.image_limit(128) == (128 + 256) * 2 ** 20


def saved_image(xml, memory=b""):
    """A memory image of libvirt's test driver that carries ``xml`` (its
    format: magic, length, the definition)."""
    data = xml.encode()
    return b"TestGuestMagic\x00" + struct.pack("<I", len(data)) + data + memory


@pytest_twisted.ensureDeferred
async def test_a_crafted_definition_or_image_is_refused_and_nothing_is_defined(tmp_path,
                                                                                pool):
    vmms = []
    for label in ("source", "target"):
        uri = testhost.write_test_host(tmp_path / label / "host.xml", hostname=label, cpus=2,
                                       memory_mib=4096, model="t")
        vmm = LibvirtVMM(uri, reactor=reactor, pool=pool,
                         state_dir=str(tmp_path / label / "state"))
        await vmm.connect()
        vmms.append(vmm)
    source, target = vmms
    try:
        spec = {"name": "1.web.alice.usher.test", "uuid": str(uuid.uuid4()), "memory_mib": 1,
                "vcpus": 1, "owner": "alice", "cluster": "web"}
        await source.create(spec)
        honest = await source.export_image(spec["name"])
        assert honest["state"] == states.RUN
        shadow = ("devices", "<disk type='file' device='disk'><source file='/etc/shadow'/>"
                             "<target dev='vdb'/></disk>")
        victim = (spec["name"], "1.secret.bob.usher.test")
        evil_xml = crafted(honest["xml"], shadow)
        payloads = [
            (dict(honest, xml=evil_xml), "import of '1.web.alice.usher.test': the definition "
                                         "is refused: <devices/disk/source file>: /etc/shadow"),
            # The exported definition is honest, the one libvirt would restore from is not.
            (dict(honest, image=saved_image(evil_xml)), "the definition in its memory image "
                                                        "is refused: <devices/disk/source file>"),
            (dict(honest, image=saved_image(crafted(honest["xml"], victim))),
             "memory image is refused: <name> must be the record's"),
            (dict(honest, state=states.HIBERNATED, image=saved_image(evil_xml)),
             "memory image is refused"),
            (dict(honest, image=b"not a memory image"), "memory image cannot be read"),
            (dict(honest, image=honest["image"] + b"\0" * (257 * 2 ** 20)),
             "is larger than a VM of 1 MiB may have here"),
        ]
        for payload, complaint in payloads:
            with pytest.raises(InvalidRequest) as refused:
                await target.import_image(spec, payload)
            assert complaint in str(refused.value)
            assert await target.list_domains() == []
            assert os.listdir(os.path.join(target.state_dir, "images")) == []
        # The honest export still moves the VM.
        assert (await target.import_image(spec, honest))["state"] == states.RUN
    finally:
        for vmm in vmms:
            await vmm.close()


# --- through the controller's migration path ---------------------------------------------

def compromise_export(node, change):
    """Make a real LNM's answer to export_image ``change(honest answer)`` (a
    compromised host: it keeps the honest export, and can put the VM back);
    None: honest again."""
    honest = node.__dict__.setdefault("honest_export", node.export_image)
    if change is None:
        node.export_image = honest
        return

    async def export_image(name):
        exported = await honest(name)
        return change(dict(exported))
    node.export_image = export_image


@pytest_twisted.ensureDeferred
async def test_a_compromised_source_cannot_migrate_a_crafted_definition(client_grids):
    """A real LNM whose export answers are crafted (a compromised host) hands
    them to a real target through the controller's migration saga."""
    grid = await client_grids(lnms=2)
    alice, bob = await grid.connected("alice"), await grid.connected("bob")
    await bob.start(cluster="secret", count=1, lnms=["lnm2"])
    secret = f"1.secret.bob.{DOMAIN}"
    shadow = ("devices", "<disk type='file' device='disk'><source file='/etc/shadow'/>"
                         "<target dev='vdb'/></disk>")
    commandline = ("domain", f"<qemu:commandline xmlns:qemu='{QEMU_NS}'><qemu:arg "
                             "value='-runas'/></qemu:commandline>")
    attacks_by_source = [
        (lambda e: dict(e, xml=crafted(e["xml"], shadow)), "/etc/shadow"),
        (lambda e: dict(e, xml=crafted(e["xml"], commandline)), "commandline> is not"),
        (lambda e: dict(e, image=saved_image(crafted(e["xml"], shadow))),
         "the definition in its memory image is refused"),
        (lambda e: dict(e, image=saved_image(re.sub("<name>[^<]*", f"<name>{secret}",
                                                    e["xml"]))),
         "<name> must be the record's"),
    ]
    started = await alice.start(cluster="movers", count=len(attacks_by_source) + 1,
                                lnms=["lnm1"])
    assert started["failed"] == [] and {s["lnm"] for s in started["started"]} == {"lnm1"}
    movers = sorted(s["name"] for s in started["started"])
    before = await _domains(grid)
    images = os.path.join(grid.grid.vmms["lnm2"].state_dir, "images")
    node = grid.grid.nodes["lnm1"]
    for mover, (change, complaint) in zip(movers, attacks_by_source):
        compromise_export(node, change)
        moved, listed = await defer.gatherResults([
            defer.ensureDeferred(alice.migrate([mover], ["lnm2"])),
            defer.ensureDeferred(bob.list(remote=True))])
        assert moved["migrated"] == [] and len(moved["failed"]) == 1, moved
        assert "migration to lnm2 failed" in moved["failed"][0]["error"]
        assert complaint in moved["failed"][0]["error"], moved
        assert [r["name"] for r in listed if r["owner"] == "bob"] == [secret]  # answered
        # Nothing defined on the target; the VM runs on its source, as before.
        assert await _domains(grid) == before
        assert os.listdir(images) == []
        record = grid.controller.state.vms[mover]
        assert (record["lnm"], record["state"]) == ("lnm1", states.RUN)
        assert grid.controller.state.vms[secret]["lnm"] == "lnm2"
    # An honest source still migrates.
    compromise_export(node, None)
    moved = await alice.migrate([movers[-1]], ["lnm2"])
    assert moved["migrated"] == [{"name": movers[-1], "from": "lnm1", "to": "lnm2"}], moved


# --- end to end: the real migration path, LNMs over PB/TLS --------------------------------

async def _connected_lnms(admin, wanted, timeout=30.0):
    deadline = reactor.seconds() + timeout
    while True:
        connected = {h["name"] for h in await admin.list_lnm() if h["connected"]}
        if wanted <= connected:
            return
        assert reactor.seconds() < deadline, connected
        await task.deferLater(reactor, 0.05, lambda: None)


@pytest.mark.skipif(not libvirtd.available(), reason="needs root and libvirtd (a private "
                                                     "test-driver host for the target)")
@pytest_twisted.ensureDeferred
async def test_a_compromised_lnm_cannot_hand_another_host_a_crafted_definition(tmp_path):
    """The controller and the target LNM are processes; the target drives a
    private libvirtd the test looks into. lnm1's host is compromised: its LNM
    process gives way to a real LNM with lnm1's certificate whose export
    answers are crafted."""
    target_host = PrivateLibvirtd(tmp_path / "libvirtd2")
    await threads.deferToThread(target_host.start)
    box = RunningSandbox(tmp_path / "box", lnms=2,
                         settings={"lnm2": {"libvirt_uri": target_host.uri}})
    compromised = None
    try:
        await box.start()
        box.add_user("carol", "carol-secret")
        box.add_user("dave", "dave-secret")
        await box.kill("lnm1")
        compromised = service.make_service(load_config(
            usher_settings.LNM, [box.description["configs"]["lnm1"]], isolated=True), reactor)
        compromised.startService()
        await compromised.ready
        admin = await box.connected_client()
        await _connected_lnms(admin, {"lnm1", "lnm2"})
        carol = await box.connected_client("carol", "carol-secret")
        dave = await box.connected_client("dave", "dave-secret")
        await dave.start(["other"], lnms=["lnm2"])
        started = await carol.start(cluster="movers", count=2, lnms=["lnm1"])
        assert started["failed"] == [], started
        movers = sorted(s["name"] for s in started["started"])
        shadow = ("devices", "<disk type='file' device='disk'><source file='/etc/shadow'/>"
                             "<target dev='vdb'/></disk>")
        images = os.path.join(box.dir, "lnm2-state", "images")
        on_target = await threads.deferToThread(target_host.domains)
        assert sorted(on_target) == [f"other.dave.{DOMAIN}"]
        for mover, (change, complaint) in zip(movers, [
                (lambda e: dict(e, xml=crafted(e["xml"], shadow)),
                 "the definition is refused: <devices/disk/source file>: /etc/shadow"),
                (lambda e: dict(e, image=saved_image(crafted(e["xml"], shadow))),
                 "the definition in its memory image is refused")]):
            compromise_export(compromised.manager, change)
            moved, listed = await defer.gatherResults([
                defer.ensureDeferred(carol.migrate([mover], ["lnm2"])),
                defer.ensureDeferred(dave.list(remote=True))])
            assert moved["migrated"] == [] and complaint in moved["failed"][0]["error"], moved
            assert [r["name"] for r in listed if r["owner"] == "dave"] == [
                f"other.dave.{DOMAIN}"]                                  # dave answered
            assert await threads.deferToThread(target_host.domains) == on_target
            assert os.listdir(images) == []
            mine = {r["name"]: (r["lnm"], r["state"]) for r in await carol.list(remote=True)
                    if r["owner"] == "carol"}
            assert mine == {name: ("lnm1", states.RUN) for name in movers}
    finally:
        if compromised is not None:
            await compromised.stopService()
        await box.stop()
        await threads.deferToThread(target_host.stop)


@pytest_twisted.ensureDeferred
async def test_a_site_can_turn_live_migration_off_so_every_move_is_checked(tmp_path, pool):
    """libvirt's live migration hands the target the source's definition
    without the target LNM seeing it: ``live_migration = False`` makes an
    LNM neither offer nor do it, so the controller moves its VMs by
    export/import (checked)."""
    uri = testhost.write_test_host(tmp_path / "host.xml", hostname="h", cpus=2,
                                   memory_mib=4096, model="t")
    vmm = LibvirtVMM(uri, reactor=reactor, pool=pool, state_dir=str(tmp_path / "state"),
                     live_migration=False)
    await vmm.connect()
    try:
        assert (await vmm.node_info())["live_migration"] is False
        await vmm.create({"name": "v1", "memory_mib": 8, "vcpus": 1})
        with pytest.raises(MigrationUnsupported, match=r"turned off on this LNM"):
            await vmm.migrate("v1", "qemu+tcp://elsewhere/system")
    finally:
        await vmm.close()
    lnm = tmp_path / "lnm.config"
    lnm.write_text("[lnm]\nlive_migration = false\nimport_overhead_mib = 64\n")
    options = load_config(usher_settings.LNM, [str(lnm)], isolated=True)["lnm"]
    assert (options["live_migration"], options["import_overhead_mib"]) == (False, 64)
    defaults = load_config(usher_settings.LNM, [], isolated=True)["lnm"]
    assert (defaults["live_migration"], defaults["import_overhead_mib"]) == (True, 256)
