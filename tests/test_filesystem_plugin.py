"""The filesystem plugin against an in-memory controller (task.Clock, the
real GlobalState, blocking work run at once): events, policies, the
start_request checks, the uid sources (LDAP through a fake Directory), the
reconciliation after a recovery, and hostile configuration files."""

import os
import pwd
import textwrap

import pytest
import pytest_twisted
from twisted.internet import defer, task

from usher import states
from usher.config import load_plugin_config
from usher.controller.events import Event, Request
from usher.controller.plugins import PluginRegistry, _with_common_options
from usher.controller.events import EventChains
from usher.controller.state import GlobalState
from usher.errors import ConfigError
from usher.plugins import filesystem
from usher.plugins.filesystem import layout
from usher.plugins.filesystem.owners import LdapIds

DOMAIN = "usher.test"
WHEN = 1709618828          # 2024-03-05 06:07:08 UTC
STAMP = "20240305T060708Z"


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


class FakeAPI:
    """What the plugin uses of the controller's PluginAPI."""

    def __init__(self, clock):
        self.clock = clock
        self.state = GlobalState(DOMAIN)
        self.recovering = False
        self.recovered = defer.succeed(None)
        self.calls = 0

    async def settled(self):
        await self.recovered

    def run_blocking(self, function, *args, **kwargs):
        self.calls += 1
        return defer.maybeDeferred(function, *args, **kwargs)


class FakeDirectory:
    """Directory.user_ids as the spec gives it (usher.plugins.ldap.directory)."""

    def __init__(self, ids):
        self.ids = ids
        self.down = False
        self.asked = []

    def user_ids(self, user):
        self.asked.append(user)
        if self.down:
            raise DirectoryUnavailable("ldap://127.0.0.1:1 is down")
        return self.ids.get(user)


class DirectoryUnavailable(Exception):
    pass


def config(export, **options):
    values = {"export_root": str(export), "uid_source": "static",
              "users": {"alice": "1234:2345", "bob": "1300:1300"}}
    values.update(options)
    return values


def make_plugin(export, clock=None, directory=None, **options):
    clock = clock or task.Clock()
    clock.advance(WHEN)
    api = FakeAPI(clock)
    plugin = filesystem.Plugin(config(export, **options), api, directory=directory)
    return plugin, api


def add_vm(api, name, cluster=None, state=states.RUN):
    record = api.state.new_record(name, state=state, lnm="lnm1", cluster=cluster)
    api.state.add(record)
    return api.state.vms[name]


def event(api, name, **data):
    return Event(name, api, **data)


async def register(plugin, api, name, cluster=None):
    record = add_vm(api, name, cluster)
    await plugin.entry_point(event(api, "register_vm", vm=dict(record)))


async def remove(plugin, api, name):
    record = api.state.remove(name)
    await plugin.entry_point(event(api, "vm_removed", vm=dict(record)))


def owner_of(path):
    info = os.lstat(path)
    return info.st_uid, info.st_gid


@pytest.fixture
def export(tmp_path):
    directory = tmp_path / "export"
    directory.mkdir()
    return directory


# -- events and policies ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_register_makes_the_three_trees_owned_by_the_user(export):
    plugin, api = make_plugin(export)
    await register(plugin, api, full("1.sneetch"))
    for top in ("global/alice", "cluster/alice/sneetch", "local/alice/1.sneetch"):
        assert owner_of(export / top) == (1234, 2345)
        assert (export / top / "etc/rc3.d").is_dir()
    assert api.calls >= 4      # the ids and each tree: off the reactor


@pytest_twisted.ensureDeferred
async def test_the_cluster_start_argument_names_the_cluster_tree(export):
    plugin, api = make_plugin(export)
    await register(plugin, api, full("1.web"), cluster="shop")
    assert (export / "cluster/alice/shop/etc").is_dir()
    assert (export / "local/alice/1.web/etc").is_dir()


@pytest.mark.parametrize("local, cluster", [("archive", "archive"), ("delete", "delete"),
                                            ("keep", "archive"), ("delete", "keep")])
@pytest_twisted.ensureDeferred
async def test_removal_applies_the_policies_and_the_cluster_goes_with_its_last_vm(
        export, local, cluster):
    plugin, api = make_plugin(export, local_cleanup=local, cluster_cleanup=cluster)
    await register(plugin, api, full("1.sneetch"))
    await register(plugin, api, full("2.sneetch"))
    await remove(plugin, api, full("1.sneetch"))
    archive = export / "archive"
    assert (export / "local/alice/1.sneetch").exists() == (local == "keep")
    assert (archive / f"local/alice/1.sneetch.{STAMP}").exists() == (local == "archive")
    assert (export / "cluster/alice/sneetch/etc").is_dir()        # 2.sneetch is still there
    api.clock.advance(61)
    await remove(plugin, api, full("2.sneetch"))
    assert (export / "cluster/alice/sneetch").exists() == (cluster == "keep")
    assert (archive / "cluster/alice/sneetch.20240305T060809Z").exists() == (
        cluster == "archive")
    assert (archive / "local/alice/2.sneetch.20240305T060809Z").exists() == (
        local == "archive")
    assert (export / "global/alice/etc").is_dir()                 # never removed


@pytest_twisted.ensureDeferred
async def test_adoption_makes_missing_trees(export):
    plugin, api = make_plugin(export)
    record = add_vm(api, full("3.sneetch"))
    await plugin.entry_point(event(api, "vm_adopted", vm=dict(record), lnm="lnm1"))
    assert (export / "local/alice/3.sneetch/etc/rc0.d").is_dir()


@pytest_twisted.ensureDeferred
async def test_an_owner_without_ids_gets_no_trees(export):
    plugin, api = make_plugin(export)
    await register(plugin, api, full("1.sneetch", owner="carol"))
    assert not (export / "global").exists()


@pytest_twisted.ensureDeferred
async def test_a_planted_link_is_logged_and_the_other_trees_still_made(export, tmp_path):
    plugin, api = make_plugin(export)
    outside = tmp_path / "outside"
    outside.mkdir()
    (export / "cluster/alice").mkdir(parents=True)
    os.symlink(outside, export / "cluster/alice/sneetch")
    await register(plugin, api, full("1.sneetch"))
    assert os.listdir(outside) == []
    assert (export / "local/alice/1.sneetch/etc").is_dir()
    assert (export / "global/alice/etc").is_dir()


@pytest_twisted.ensureDeferred
async def test_unmanaged_vms_are_ignored(export):
    plugin, api = make_plugin(export)
    record = api.state.new_record("somebody-else", state=states.RUN, lnm="lnm1")
    await plugin.entry_point(event(api, "register_vm", vm=record))
    await plugin.entry_point(event(api, "vm_removed", vm=record))
    assert os.listdir(export) == []


# -- start_request ------------------------------------------------------------------------

def start_request(*names, user="alice"):
    return Request("start", user, vms=list(names))


@pytest_twisted.ensureDeferred
async def test_a_start_is_approved_when_the_trees_can_be_made(export):
    plugin, api = make_plugin(export)
    request = start_request(full("1.sneetch"), full("2.sneetch"))
    await plugin.entry_point(event(api, "start_request", request=request))
    assert request.rejected is None


@pytest.mark.parametrize("damage, problem", [
    ("remove", "it does not exist"), ("file", "it is not a directory")])
@pytest_twisted.ensureDeferred
async def test_a_start_is_refused_when_the_export_root_is_not_usable(export, damage, problem):
    plugin, api = make_plugin(export)
    os.rmdir(export)
    if damage == "file":
        export.write_text("")
    request = start_request(full("1.sneetch"))
    await plugin.entry_point(event(api, "start_request", request=request))
    assert request.rejected == ("the VMs' file trees cannot be made: the export root is not "
                                f"usable ({problem})")


@pytest_twisted.ensureDeferred
async def test_a_start_of_an_owner_without_ids_is_refused_with_the_source(export):
    plugin, api = make_plugin(export)
    request = start_request(full("1.x", owner="carol"), user="carol")
    await plugin.entry_point(event(api, "start_request", request=request))
    assert request.rejected == "no uid for user carol (uid_source = static)"


@pytest_twisted.ensureDeferred
async def test_default_ids_cover_users_not_listed(export):
    plugin, api = make_plugin(export, default_ids="65534:65534")
    request = start_request(full("1.x", owner="carol"), user="carol")
    await plugin.entry_point(event(api, "start_request", request=request))
    assert request.rejected is None
    await register(plugin, api, full("1.x", owner="carol"))
    assert owner_of(export / "global/carol") == (65534, 65534)


# -- uid sources --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_nss_ids_come_from_getpwnam(export):
    plugin, api = make_plugin(export, uid_source="nss", users={})
    daemon = pwd.getpwnam("daemon")
    await register(plugin, api, full("1.web", owner="daemon"))
    assert owner_of(export / "local/daemon/1.web") == (daemon.pw_uid, daemon.pw_gid)
    request = start_request(full("1.web", owner="no-such-user"), user="no-such-user")
    await plugin.entry_point(event(api, "start_request", request=request))
    assert request.rejected == "no uid for user no-such-user (uid_source = nss)"


@pytest_twisted.ensureDeferred
async def test_ldap_ids_come_from_the_directory(export):
    directory = FakeDirectory({"alice": (5001, 5000)})
    plugin, api = make_plugin(export, uid_source="ldap", users={}, directory=directory)
    await register(plugin, api, full("1.sneetch"))
    assert owner_of(export / "cluster/alice/sneetch") == (5001, 5000)
    assert directory.asked == ["alice"]
    request = start_request(full("1.x", owner="bob"), user="bob")
    await plugin.entry_point(event(api, "start_request", request=request))
    assert request.rejected == "no uid for user bob (uid_source = ldap)"


@pytest_twisted.ensureDeferred
async def test_a_directory_down_refuses_starts_clearly(export):
    directory = FakeDirectory({"alice": (5001, 5000)})
    directory.down = True
    plugin, api = make_plugin(export, uid_source="ldap", users={}, directory=directory)
    request = start_request(full("1.sneetch"))
    await plugin.entry_point(event(api, "start_request", request=request))
    assert request.rejected == ("the VMs' file trees cannot be made: the LDAP directory is "
                                "unavailable (DirectoryUnavailable)")
    await register(plugin, api, full("1.sneetch"))
    assert not (export / "global").exists()


@pytest.mark.parametrize("answer", [("1", 2), (-1, 5), (2**32, 1), (True, 1), "1000:1000",
                                    (1, 2, 3)])
def test_directory_answers_that_are_not_ids_are_ignored(answer):
    assert LdapIds("/unused", FakeDirectory({"alice": answer})).user_ids("alice") is None


def test_the_ldap_source_loads_the_ldap_plugins_directory_lazily(tmp_path, monkeypatch):
    """``load_directory(ldap_config).user_ids(owner)`` of
    usher.plugins.ldap.directory, imported at the first lookup."""
    import sys
    import types
    loaded = []
    module = types.ModuleType("usher.plugins.ldap.directory")
    module.DirectoryUnavailable = DirectoryUnavailable

    def load_directory(path):
        loaded.append(path)
        return FakeDirectory({"alice": (7, 8)})
    module.load_directory = load_directory
    package = sys.modules.get("usher.plugins.ldap") or types.ModuleType("usher.plugins.ldap")
    monkeypatch.setitem(sys.modules, "usher.plugins.ldap", package)
    monkeypatch.setitem(sys.modules, "usher.plugins.ldap.directory", module)
    ids = LdapIds(str(tmp_path / "ldap.config"))
    assert loaded == []
    assert ids.user_ids("alice") == (7, 8)
    assert ids.user_ids("bob") is None
    assert loaded == [str(tmp_path / "ldap.config")]


# -- after a recovery ---------------------------------------------------------------------

def seed_trees(export, trees):
    for tree in trees:
        layout.ensure_tree(str(export), tree, 1234, 2345, 0o755)


@pytest_twisted.ensureDeferred
async def test_after_recovery_live_trees_exist_and_trees_of_vms_gone_get_their_policy(export):
    seed_trees(export, layout.vm_trees("alice", "sneetch", "1.sneetch")
               + layout.vm_trees("alice", "sneetch", "2.sneetch")
               + layout.vm_trees("alice", "gone", "1.gone")
               + layout.vm_trees("bob", "old", "1.old"))
    (export / "local/alice/Not-A-VM").mkdir()
    (export / "cluster/alice/UPPER").mkdir()
    clock = task.Clock()
    clock.advance(WHEN)
    api = FakeAPI(clock)
    api.recovering = True
    api.recovered = defer.Deferred()
    plugin = filesystem.Plugin(config(export, local_cleanup="delete"), api)
    clock.advance(0)
    assert not plugin.reconciled.called          # waits until the state is rebuilt
    # The VMs that came back: 1.sneetch, and 3.sneetch whose trees are missing.
    add_vm(api, full("1.sneetch"))
    add_vm(api, full("3.sneetch"))
    api.recovered.callback(None)
    outcome = await plugin.reconciled
    assert outcome["made"] == [full("3.sneetch")]
    assert (export / "local/alice/3.sneetch/etc/rc1.d").is_dir()
    assert (export / "local/alice/1.sneetch").is_dir()
    assert not (export / "local/alice/2.sneetch").exists()
    assert not (export / "local/alice/1.gone").exists()
    assert not (export / "local/bob").exists()
    assert (export / "cluster/alice/sneetch").is_dir()
    assert (export / f"archive/cluster/alice/gone.{STAMP}").is_dir()
    assert (export / f"archive/cluster/bob/old.{STAMP}").is_dir()
    assert outcome["cleaned"]["local/alice/2.sneetch"] == "deleted"
    # What names no VM or cluster is left alone, global trees too.
    assert sorted(outcome["unattributed"]) == ["cluster/alice/UPPER", "local/alice/Not-A-VM"]
    assert (export / "local/alice/Not-A-VM").is_dir()
    assert (export / "global/bob/etc").is_dir()


@pytest_twisted.ensureDeferred
async def test_without_a_recovery_unknown_trees_are_left_alone(export):
    seed_trees(export, layout.vm_trees("alice", "gone", "1.gone"))
    plugin, api = make_plugin(export, local_cleanup="delete", cluster_cleanup="delete")
    api.clock.advance(0)
    outcome = await plugin.reconciled
    assert outcome["cleaned"] == {}
    assert (export / "local/alice/1.gone").is_dir()


@pytest_twisted.ensureDeferred
async def test_keep_policies_clean_nothing_after_recovery(export):
    seed_trees(export, layout.vm_trees("alice", "gone", "1.gone"))
    clock = task.Clock()
    api = FakeAPI(clock)
    api.recovering = True
    plugin = filesystem.Plugin(config(export, local_cleanup="keep", cluster_cleanup="keep"),
                               api)
    clock.advance(0)
    assert (await plugin.reconciled)["cleaned"] == {}
    assert (export / "cluster/alice/gone").is_dir()


# -- hostile configuration ----------------------------------------------------------------

def write_config(tmp_path, text):
    path = tmp_path / "filesystem.config"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def registry():
    clock = task.Clock()
    api = FakeAPI(clock)
    return PluginRegistry(EventChains(clock), api, load_config=load_plugin_config)


@pytest.mark.parametrize("text, message", [
    ("export_root = srv/export\n", "export_root: 'srv/export' is not an absolute path"),
    ("export_root = {missing}\n", "export_root: {missing} does not exist"),
    ("export_root = {file}\n", "export_root: {file} is not a directory"),
    ("export_root = {export}\nuid_source = static\n[users]\nalice = 1000\n",
     "[users] alice: '1000' is not UID:GID"),
    ("export_root = {export}\nuid_source = static\n[users]\nRoot = 0:0\n",
     "[users] Root: invalid user name 'Root'"),
    ("export_root = {export}\nuid_source = static\ndefault_ids = nobody\n",
     "default_ids: 'nobody' is not UID:GID"),
    ("export_root = {export}\n[users]\nalice = 1:1\n",
     "[users]/default_ids are read only with uid_source = static"),
    ("export_root = {export}\nuid_source = ldap\nldap_config = {missing}\n",
     "ldap_config: {missing} does not exist"),
    ("export_root = {export}\nmode = rwxr-xr-x\n", "mode: 'rwxr-xr-x' is not an octal"),
    ("export_root = {export}\nmode = 0077\n", "mode: 0077 must give the owner rwx"),
    ("export_root = {export}\narchive_root = {export}/local/old\n",
     "archive_root: {export}/local/old is inside the trees'"),
    ("export_root = {export}\narchive_root = {missing}/deeper/archive\n",
     "archive_root: {missing}/deeper does not exist"),
])
def test_hostile_configuration_names_the_file_and_the_key(tmp_path, export, text, message):
    (tmp_path / "file").write_text("")
    values = {"export": export, "missing": tmp_path / "missing", "file": tmp_path / "file"}
    path = write_config(tmp_path, text.format(**values))
    with pytest.raises(ConfigError) as raised:
        registry().register("filesystem", "register_vm", path)
    assert str(raised.value).startswith(f"{path}: "), raised.value
    assert message.format(**values) in str(raised.value)


@pytest.mark.parametrize("text, where", [
    ("local_cleanup = shred\n", "local_cleanup: 'shred' is not one of: keep, archive, delete"),
    ("cluster_cleanup = Archive\n", "cluster_cleanup: 'Archive' is not one of"),
    ("uid_source = nis\n", "uid_source: 'nis' is not one of: nss, static, ldap"),
    ("export_roots = /srv\n", "export_roots: unknown option (did you mean export_root?)"),
])
def test_unknown_values_are_refused_with_the_file_line_and_key(tmp_path, export, text, where):
    path = write_config(tmp_path, f"export_root = {export}\n" + text)
    with pytest.raises(ConfigError) as raised:
        registry().register("filesystem", "register_vm", path)
    assert str(raised.value).startswith(f"{path}:2: "), raised.value
    assert where in str(raised.value)


def test_a_good_configuration_registers(tmp_path, export):
    path = write_config(tmp_path, f"""\
        export_root = {export}
        uid_source = static
        local_cleanup = delete
        [users]
        alice = 1000:1000
        """)
    plugin = registry().register("filesystem", "register_vm", path)
    assert plugin.order == 55
    assert plugin.settings.ids.users == {"alice": (1000, 1000)}
    assert plugin.settings.archive_root == os.path.join(str(export), "archive")
