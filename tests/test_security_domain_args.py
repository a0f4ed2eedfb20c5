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
"""

import os
import re
import xml.etree.ElementTree as ET

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThreadPool

from usher import states
from usher.config import load_config
from usher.controller.core import plugin_set_args
from usher.errors import ConfigError, InvalidRequest
from usher.lnm import domain_xml, service
from usher import settings as usher_settings

from tests.clientgrid import client_grids, pki_dir  # noqa: F401 (fixtures)
from tests.e2e import RunningSandbox, parse_json, wait_for

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
    lnm = grid.controller.state.vms[secret]["vmm"]
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
    xml = await _xml(grid, result["started"][0]["vmm"], good)
    assert xml.find("devices/disk/source").get("file") == f"{site['images']}/real/web2.qcow2"
    assert xml.find("devices/disk/driver").get("type") == "qcow2"
    assert xml.findtext("os/initrd") == site["defaults"]["initrd"]
    assert grid.controller.state.vms[good]["plugin_args"] == []
    # A plugin chooses the disk (plugin_args = disk): the site's path through.
    result = await alice.start(["chosen"], args={"image": "web"})
    assert result["failed"] == [], result
    chosen = f"chosen.alice.{DOMAIN}"
    assert grid.controller.state.vms[chosen]["plugin_args"] == ["disk"]
    xml = await _xml(grid, result["started"][0]["vmm"], chosen)
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
    lnm = bob.vms[secret]["vmm"]
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
