"""The filesystem plugin through the real controller on the in-process grid
(tests.grid: real NodeManagers on libvirt test hosts), its blocking work in
a real thread pool: a 2-VM cluster's trees made and owned by the user
(static and NSS uids), destroyed VMs' trees cleaned by policy, the cluster
tree with its last VM, the global tree kept; starts refused when the export
root is not usable; a configuration the registry refuses, naming the file."""

import os
import pwd
import shutil
import textwrap

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from usher.controller.plugin_api import thread_pool_runner
from usher.errors import ConfigError, Rejected
from usher.settings import default_plugin_registrations
from usher.vmset import Selection

from tests.clientgrid import plugin_instance
from tests.e2e import wait_for
from tests.grid import DOMAIN, Grid

FS_EVENTS = ["start_request", "register_vm", "vm_adopted", "vm_removed"]
ETC = sorted(["init.d"] + [f"rc{n}.d" for n in range(7)])


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def write_config(tmp_path, export, extra=""):
    path = tmp_path / "filesystem.config"
    path.write_text(f"export_root = {export}\n" + textwrap.dedent(extra), encoding="utf-8")
    return str(path)


def owner_of(path):
    info = os.lstat(path)
    return info.st_uid, info.st_gid


class FsGrid:
    def __init__(self, grid, plugin, export, pool):
        self.grid, self.plugin, self.export, self.pool = grid, plugin, export, pool

    async def start(self, count, cluster="sneetch", user="alice"):
        result = await self.grid.controller.start(user, False, [], [],
                                                  {"cluster": cluster, "count": count})
        await self.plugin.flushed()
        return result

    async def delete(self, name, user="alice"):
        await self.grid.controller.op_on(user, False, "delete", Selection(names=[name]),
                                         {"force": True})
        await wait_for(lambda: name not in self.grid.controller.state.vms)
        await self.plugin.flushed()


async def started_grid(tmp_path, extra=""):
    export = tmp_path / "export"
    export.mkdir(exist_ok=True)
    registrations = default_plugin_registrations()
    registrations["filesystem"] = {"plugin": "filesystem", "events": FS_EVENTS,
                                   "config": write_config(tmp_path, export, extra),
                                   "order": None}
    grid = Grid(reactor, tmp_path, lnms=2, registrations=registrations)
    pool = ThreadPool(minthreads=0, maxthreads=4, name="fs-plugins")
    pool.start()
    grid.controller.api.run_in_thread = thread_pool_runner(reactor, pool)
    try:
        await grid.start()
    except BaseException:
        pool.stop()
        raise
    plugin = plugin_instance(grid, "filesystem")
    await plugin.reconciled
    return FsGrid(grid, plugin, export, pool)


async def stopped(box):
    box.grid.controller.plugins.unregister_all()
    await box.grid.stop()
    box.pool.stop()


STATIC = """\
    uid_source = static
    local_cleanup = {local}
    cluster_cleanup = {cluster}
    [users]
    alice = 4100:4200
    """


@pytest.mark.parametrize("local, cluster", [("archive", "archive"), ("delete", "delete"),
                                            ("keep", "keep")])
@pytest_twisted.ensureDeferred
async def test_a_clusters_trees_made_owned_and_cleaned_up_by_policy(tmp_path, local, cluster):
    box = await started_grid(tmp_path, STATIC.format(local=local, cluster=cluster))
    export, archive = box.export, box.export / "archive"
    try:
        result = await box.start(2)
        assert sorted(s["name"] for s in result["started"]) == [full("1.sneetch"),
                                                                 full("2.sneetch")]
        trees = ["global/alice", "cluster/alice/sneetch", "local/alice/1.sneetch",
                 "local/alice/2.sneetch"]
        for top in trees:
            assert owner_of(export / top) == (4100, 4200), top
            assert sorted(os.listdir(export / top / "etc")) == ETC
            assert owner_of(export / top / "etc/rc3.d") == (4100, 4200)

        await box.delete(full("1.sneetch"))
        assert (export / "local/alice/1.sneetch").exists() == (local == "keep")
        archived = list((archive / "local/alice").glob("1.sneetch.*Z")) \
            if archive.exists() else []
        assert len(archived) == (local == "archive")
        assert (export / "cluster/alice/sneetch/etc").is_dir()
        assert (export / "local/alice/2.sneetch/etc").is_dir()

        await box.delete(full("2.sneetch"))
        assert (export / "cluster/alice/sneetch").exists() == (cluster == "keep")
        archived = list((archive / "cluster/alice").glob("sneetch.*Z")) \
            if archive.exists() else []
        assert len(archived) == (cluster == "archive")
        assert (export / "global/alice/etc").is_dir()
        assert owner_of(export / "global/alice") == (4100, 4200)
    finally:
        await stopped(box)


@pytest_twisted.ensureDeferred
async def test_nss_uids_own_the_trees(tmp_path):
    box = await started_grid(tmp_path, "uid_source = nss\n")
    daemon = pwd.getpwnam("daemon")
    try:
        result = await box.start(2, cluster="web", user="daemon")
        assert len(result["started"]) == 2
        for top in ("global/daemon", "cluster/daemon/web", "local/daemon/1.web",
                    "local/daemon/2.web"):
            assert owner_of(box.export / top) == (daemon.pw_uid, daemon.pw_gid)
        with pytest.raises(Rejected) as refused:
            await box.start(1, cluster="web", user="no-such-user")
        assert "no uid for user no-such-user (uid_source = nss)" in str(refused.value)
        assert not any(vm.endswith(f".no-such-user.{DOMAIN}")
                       for vm in box.grid.controller.state.vms)
    finally:
        await stopped(box)


@pytest.mark.parametrize("damage", ["missing", "file"])
@pytest_twisted.ensureDeferred
async def test_no_vm_starts_when_the_export_root_is_not_usable(tmp_path, damage):
    box = await started_grid(tmp_path, STATIC.format(local="archive", cluster="archive"))
    try:
        await box.start(1)
        shutil.rmtree(box.export)
        if damage == "file":
            box.export.write_text("not a directory")
        with pytest.raises(Rejected) as refused:
            await box.start(2, cluster="later")
        problem = "it does not exist" if damage == "missing" else "it is not a directory"
        assert str(refused.value) == ("the VMs' file trees cannot be made: the export root is "
                                      f"not usable ({problem}) (rejected by filesystem)")
        assert sorted(box.grid.controller.state.vms) == [full("1.sneetch")]
        # Back: starts go on.
        if damage == "file":
            box.export.unlink()
        box.export.mkdir()
        result = await box.start(1, cluster="later")
        assert len(result["started"]) == 1
        assert (box.export / "local/alice/1.later/etc/rc6.d").is_dir()
    finally:
        await stopped(box)


@pytest.mark.parametrize("extra, message", [
    ("", "export_root: {export}/absent does not exist"),
    ("uid_source = static\n[users]\nalice = alice\n", "[users] alice: 'alice' is not UID:GID"),
])
@pytest_twisted.ensureDeferred
async def test_a_grid_with_a_bad_configuration_does_not_start(tmp_path, extra, message):
    export = tmp_path / "export"
    export.mkdir()
    root = export / "absent" if not extra else export
    config = tmp_path / "filesystem.config"
    config.write_text(f"export_root = {root}\n" + extra)
    registrations = default_plugin_registrations()
    registrations["filesystem"] = {"plugin": "filesystem", "events": FS_EVENTS,
                                   "config": str(config), "order": None}
    grid = Grid(reactor, tmp_path, lnms=1, registrations=registrations)
    try:
        with pytest.raises(ConfigError) as raised:
            await grid.start()
        assert str(raised.value).startswith(f"{config}: ")
        assert message.format(export=export) in str(raised.value)
    finally:
        grid.controller.plugins.unregister_all()
        await grid.stop()


@pytest_twisted.ensureDeferred
async def test_uids_from_the_real_directory_own_the_trees(tmp_path, slapd):
    """uid_source = ldap against the real slapd (the LDAP plugin's
    directory client, usher.plugins.ldap.directory)."""
    slapd.add_user("fsuser", "fs-secret", uid_number=24242)
    ldap_config = slapd.plugin_config(tmp_path / "ldap.config")
    box = await started_grid(tmp_path, f"uid_source = ldap\nldap_config = {ldap_config}\n")
    try:
        result = await box.start(1, cluster="nfs", user="fsuser")
        assert len(result["started"]) == 1
        for top in ("global/fsuser", "cluster/fsuser/nfs", "local/fsuser/1.nfs"):
            assert owner_of(box.export / top) == (24242, 100), top
        # Not in the directory: no uid, no start.
        with pytest.raises(Rejected) as refused:
            await box.start(1, cluster="nfs", user="nobody-here")
        assert "no uid for user nobody-here (uid_source = ldap)" in str(refused.value)
    finally:
        await stopped(box)
