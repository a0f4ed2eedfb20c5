"""The filesystem plugin's trees on a real directory (tmp_path, as root, so
ownership is real): the layout, idempotence, the clean-up policies, the
listing after recovery -- and symbolic links planted by users, which must
never make the plugin create, chown, move or delete anything outside the
export root."""

import os
import stat

import pytest

from usher.errors import InvalidRequest
from usher.plugins.filesystem import layout
from usher.plugins.filesystem.layout import Tree, UnsafePath

UID, GID = 1234, 2345
ETC = ["init.d"] + [f"rc{n}.d" for n in range(7)]
# 2024-03-05 06:07:08 UTC
WHEN = 1709618828


@pytest.fixture
def root(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    return export


@pytest.fixture
def outside(tmp_path):
    """A directory standing for /etc: what a planted link points at."""
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "passwd").write_text("root:x:0:0\n")
    (victim / "sub").mkdir()
    return victim


def snapshot(directory):
    """Every path below ``directory`` with its owner, mode and content."""
    seen = {}
    for top, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(top, name)
            info = os.lstat(path)
            content = open(path).read() if stat.S_ISREG(info.st_mode) else None
            seen[os.path.relpath(path, directory)] = (info.st_uid, info.st_gid,
                                                      stat.S_IMODE(info.st_mode), content)
    info = os.lstat(directory)
    seen["."] = (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode), None)
    return seen


def owner_of(path):
    info = os.lstat(path)
    return info.st_uid, info.st_gid


def make(root, tree, mode=0o755):
    return layout.ensure_tree(str(root), tree, UID, GID, mode)


# -- the layout ------------------------------------------------------------------------

def test_a_vms_three_trees_with_the_etc_structure_owned_by_the_user(root):
    for tree in layout.vm_trees("alice", "sneetch", "1.sneetch"):
        make(root, tree)
    for top in ("global/alice", "cluster/alice/sneetch", "local/alice/1.sneetch"):
        assert owner_of(root / top) == (UID, GID)
        assert stat.S_IMODE(os.lstat(root / top).st_mode) == 0o755
        assert sorted(os.listdir(root / top / "etc")) == sorted(ETC)
        for sub in ETC:
            assert owner_of(root / top / "etc" / sub) == (UID, GID)
    # Above the trees: root's, so users cannot rename or replace their trees.
    for upper in ("global", "cluster", "cluster/alice", "local", "local/alice"):
        assert owner_of(root / upper) == (0, 0)
        assert stat.S_IMODE(os.lstat(root / upper).st_mode) == 0o755


def test_the_mode_is_the_configured_one_whatever_the_umask(root):
    old = os.umask(0o077)
    try:
        make(root, Tree("global", "alice"), mode=0o750)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(root / "global/alice").st_mode) == 0o750
    assert stat.S_IMODE(os.lstat(root / "global/alice/etc/rc3.d").st_mode) == 0o750


def test_making_is_idempotent_and_leaves_the_users_files_and_modes(root):
    tree = Tree("cluster", "alice", "sneetch")
    assert "cluster/alice/sneetch" in make(root, tree)
    script = root / "cluster/alice/sneetch/etc/init.d/web"
    script.write_text("#!/bin/sh\n")
    os.chmod(root / "cluster/alice/sneetch/etc/rc2.d", 0o700)
    os.rmdir(root / "cluster/alice/sneetch/etc/rc5.d")
    assert make(root, tree) == ["cluster/alice/sneetch/etc/rc5.d"]
    assert make(root, tree) == []
    assert script.read_text() == "#!/bin/sh\n"
    assert stat.S_IMODE(os.lstat(root / "cluster/alice/sneetch/etc/rc2.d").st_mode) == 0o700


def test_a_tree_of_another_owner_is_given_back_to_its_user(root):
    make(root, Tree("global", "alice"))
    os.chown(root / "global/alice", 0, 0)
    make(root, Tree("global", "alice"))
    assert owner_of(root / "global/alice") == (UID, GID)


@pytest.mark.parametrize("kind, owner, name", [
    ("local", "alice", ".."), ("local", "alice", "../../etc"), ("local", "alice", "a/b"),
    ("cluster", "alice", "."), ("cluster", "alice", "sneetch.x"), ("cluster", "alice", ""),
    ("global", "../root", None), ("global", "Alice", None), ("local", "alice", "1..x"),
    ("archive", "alice", None), ("cluster", "alice", "x\n"), ("local", "alice", None),
])
def test_names_that_could_escape_are_refused_before_any_path_is_made(kind, owner, name):
    with pytest.raises(InvalidRequest):
        Tree(kind, owner, name)


# -- clean-up policies -----------------------------------------------------------------

def test_keep_leaves_the_tree(root):
    make(root, Tree("local", "alice", "1.sneetch"))
    assert layout.cleanup_tree(str(root), Tree("local", "alice", "1.sneetch"), "keep",
                               str(root / "archive"), WHEN) == "kept"
    assert (root / "local/alice/1.sneetch/etc/rc0.d").is_dir()


def test_archive_renames_under_the_archive_root_with_a_utc_time_stamp(root):
    tree = Tree("local", "alice", "1.sneetch")
    make(root, tree)
    (root / "local/alice/1.sneetch/notes").write_text("kept in the archive")
    archive = root / "archive"
    outcome = layout.cleanup_tree(str(root), tree, "archive", str(archive), WHEN)
    target = archive / "local/alice/1.sneetch.20240305T060708Z"
    assert outcome == f"archived to {target}"
    assert (target / "notes").read_text() == "kept in the archive"
    assert owner_of(target) == (UID, GID)
    assert not (root / "local/alice/1.sneetch").exists()
    # The empty per-owner directory goes; the kind directory stays.
    assert not (root / "local/alice").exists() and (root / "local").is_dir()
    assert stat.S_IMODE(os.lstat(archive).st_mode) == layout.ARCHIVE_MODE
    # The same tree archived again in the same second: a name of its own.
    make(root, tree)
    again = layout.cleanup_tree(str(root), tree, "archive", str(archive), WHEN)
    assert again.endswith("1.sneetch.20240305T060708Z-1")
    assert sorted(os.listdir(archive / "local/alice")) == [
        "1.sneetch.20240305T060708Z", "1.sneetch.20240305T060708Z-1"]


def test_delete_removes_the_tree_and_only_it(root):
    make(root, Tree("cluster", "alice", "sneetch"))
    make(root, Tree("cluster", "alice", "other"))
    (root / "cluster/alice/sneetch/etc/init.d/job").write_text("x")
    assert layout.cleanup_tree(str(root), Tree("cluster", "alice", "sneetch"), "delete",
                               str(root / "archive"), WHEN) == "deleted"
    assert os.listdir(root / "cluster/alice") == ["other"]
    assert layout.cleanup_tree(str(root), Tree("cluster", "alice", "sneetch"), "delete",
                               str(root / "archive"), WHEN) == "absent"


def test_a_tree_never_made_is_absent(root):
    assert layout.cleanup_tree(str(root), Tree("local", "bob", "1.x"), "archive",
                               str(root / "archive"), WHEN) == "absent"


# -- symbolic links planted by users ---------------------------------------------------

def test_a_linked_cluster_tree_is_not_followed_when_making(root, outside):
    make(root, Tree("cluster", "alice", "other"))
    os.symlink(outside, root / "cluster/alice/sneetch")
    before = snapshot(outside)
    with pytest.raises(UnsafePath):
        make(root, Tree("cluster", "alice", "sneetch"))
    assert snapshot(outside) == before


@pytest.mark.parametrize("planted", ["global", "local/alice", "cluster/alice"])
@pytest.mark.parametrize("action", ["make", "archive", "delete"])
def test_a_linked_directory_above_the_trees_is_not_followed(root, outside, planted, action):
    # What the trees' names would reach through the link is there, outside.
    for name in ("alice", "sneetch", "1.sneetch"):
        (outside / name).mkdir()
    (root / planted).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, root / planted)
    before = snapshot(outside)
    for tree in layout.vm_trees("alice", "sneetch", "1.sneetch"):
        with pytest.raises(UnsafePath) if planted in repr(tree) else _nothing():
            if action == "make":
                make(root, tree)
            else:
                layout.cleanup_tree(str(root), tree, action, str(root / "archive"), WHEN)
    assert snapshot(outside) == before
    assert os.path.islink(root / planted)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_etc_linked_to_slash_is_not_followed(root, outside):
    make(root, Tree("global", "alice"))
    top = root / "global/alice"
    for sub in os.listdir(top / "etc"):
        os.rmdir(top / "etc" / sub)
    os.rmdir(top / "etc")
    os.symlink(outside, top / "etc")         # etc -> / in effect
    before = snapshot(outside)
    with pytest.raises(UnsafePath):
        make(root, Tree("global", "alice"))
    assert snapshot(outside) == before
    assert not (outside / "init.d").exists()


def test_an_rc_directory_linked_outside_is_not_chowned_or_chmodded(root, outside):
    make(root, Tree("local", "alice", "1.sneetch"))
    rc3 = root / "local/alice/1.sneetch/etc/rc3.d"
    os.rmdir(rc3)
    os.symlink(outside / "sub", rc3)
    before = snapshot(outside)
    with pytest.raises(UnsafePath):
        make(root, Tree("local", "alice", "1.sneetch"))
    assert snapshot(outside) == before


def test_deleting_a_tree_full_of_links_removes_the_links_not_their_targets(root, outside):
    tree = Tree("cluster", "alice", "sneetch")
    make(root, tree)
    top = root / "cluster/alice/sneetch"
    os.symlink(outside, top / "etc/init.d/everything")
    os.symlink(outside / "passwd", top / "passwd")
    os.symlink("/", top / "slash")
    before = snapshot(outside)
    assert layout.cleanup_tree(str(root), tree, "delete", str(root / "archive"),
                               WHEN) == "deleted"
    assert snapshot(outside) == before
    assert not top.exists()


@pytest.mark.parametrize("policy", ["archive", "delete"])
def test_a_tree_replaced_by_a_link_loses_the_link_only(root, outside, policy):
    make(root, Tree("cluster", "alice", "keepme"))
    os.symlink(outside, root / "cluster/alice/sneetch")   # cluster/alice/sneetch -> /etc
    before = snapshot(outside)
    outcome = layout.cleanup_tree(str(root), Tree("cluster", "alice", "sneetch"), policy,
                                  str(root / "archive"), WHEN)
    assert snapshot(outside) == before
    assert not os.path.lexists(root / "cluster/alice/sneetch")
    if policy == "archive":
        moved = root / "archive/cluster/alice/sneetch.20240305T060708Z"
        assert outcome == f"archived to {moved}"
        assert os.path.islink(moved)         # the link itself, moved
    assert (root / "cluster/alice/keepme").is_dir()


def test_a_link_in_the_archive_root_is_not_followed(root, outside):
    tree = Tree("local", "alice", "1.sneetch")
    make(root, tree)
    (root / "archive/local").mkdir(parents=True)
    os.symlink(outside, root / "archive/local/alice")
    before = snapshot(outside)
    with pytest.raises(UnsafePath):
        layout.cleanup_tree(str(root), tree, "archive", str(root / "archive"), WHEN)
    assert snapshot(outside) == before
    assert (root / "local/alice/1.sneetch").is_dir()


# -- listing ---------------------------------------------------------------------------

def test_listing_finds_trees_and_leaves_what_names_no_vm(root, outside):
    for tree in layout.vm_trees("alice", "sneetch", "1.sneetch") + [
            Tree("local", "bob", "web.2.x"), Tree("cluster", "bob", "x")]:
        make(root, tree)
    (root / "local/alice/Not_A_VM").mkdir()
    (root / "local/alice/..hidden").mkdir()
    (root / "cluster/alice/stray-file").write_text("")
    os.symlink(outside, root / "local/alice/2.sneetch")
    os.symlink(outside, root / "cluster/carol")
    (root / "archive").mkdir()
    found, unattributed = layout.list_trees(str(root))
    assert found == {Tree("global", "alice"), Tree("cluster", "alice", "sneetch"),
                     Tree("local", "alice", "1.sneetch"), Tree("local", "bob", "web.2.x"),
                     Tree("cluster", "bob", "x")}
    assert sorted(unattributed) == ["local/alice/..hidden", "local/alice/Not_A_VM"]


def test_the_export_root_problems(tmp_path):
    assert layout.export_root_problem(str(tmp_path)) is None
    assert layout.export_root_problem(str(tmp_path / "gone")) == "it does not exist"
    (tmp_path / "file").write_text("")
    assert layout.export_root_problem(str(tmp_path / "file")) == "it is not a directory"
