"""The trees under the export root, made, listed and cleaned up without ever
following a symbolic link (blocking: run off the reactor).

Layout (``export_root`` is the site's NFS export)::

    global/OWNER            -> the VM's /net/global
    cluster/OWNER/CLUSTER   -> /net/cluster
    local/OWNER/SHORT       -> /net/local  (SHORT: the VM's short name, 1.sneetch)

each holding ``etc/init.d`` and ``etc/rc0.d`` .. ``etc/rc6.d``, owned by the
user. ``global``, ``cluster``, ``local`` and the per-owner directories above
the trees belong to root (mode 0755): users write only inside their trees.

Users own their trees and write them over NFS, so anything below the export
root may be a symbolic link planted to make root act elsewhere
(``cluster/alice/sneetch -> /etc``, ``etc -> /``). Therefore: paths are
built only from names checked with ``usher.naming``; the export root is
opened once and every directory below it is opened relative to its parent's
descriptor with ``O_NOFOLLOW | O_DIRECTORY`` (a link is refused, never
followed); ownership and mode are set on the opened descriptor; a tree is
archived with ``rename`` between two opened directories (a link is moved as
itself) and deleted with the descriptor-based ``shutil.rmtree``, which does
not follow links (a link in the tree's place is unlinked).
"""

import contextlib
import errno
import os
import shutil
import stat
import time

from usher.errors import InvalidRequest
from usher.naming import check_label, check_short_name, check_user

KINDS = ("global", "cluster", "local")
ETC_DIRS = ("init.d",) + tuple(f"rc{level}.d" for level in range(7))
POLICIES = ("keep", "archive", "delete")
# Directories the plugin owns (kinds, per-owner levels, the archive's).
ROOT_MODE = 0o755
ARCHIVE_MODE = 0o700

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(Exception):
    """A path component below the export root is a symbolic link or not a
    directory: nothing is done through it."""


class Tree:
    """One tree: ``kind`` and its labels (``owner`` [, cluster or short name]),
    checked with usher.naming before anything is built from them."""

    __slots__ = ("kind", "owner", "name")

    def __init__(self, kind, owner, name=None):
        if kind not in KINDS:
            raise InvalidRequest(f"unknown tree kind {kind!r}")
        check_user(owner)
        if kind == "global":
            if name is not None:
                raise InvalidRequest("a global tree has no name")
        elif kind == "cluster":
            check_label(name, "cluster name")
        else:
            check_short_name(name)
        self.kind, self.owner, self.name = kind, owner, name

    @property
    def parts(self):
        return (self.kind, self.owner) + ((self.name,) if self.name is not None else ())

    def __eq__(self, other):
        return isinstance(other, Tree) and self.parts == other.parts

    def __hash__(self):
        return hash(self.parts)

    def __repr__(self):
        return "/".join(self.parts)


def vm_trees(owner, cluster, short):
    """-> the three trees of one VM (global, cluster, local)."""
    return [Tree("global", owner), Tree("cluster", owner, cluster), Tree("local", owner, short)]


# -- descriptors -----------------------------------------------------------------------

def _open_dir(parent_fd, name, where):
    try:
        return os.open(name, _OPEN_DIR, dir_fd=parent_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(f"{where}/{name} is a symbolic link or not a directory") from None
        raise


@contextlib.contextmanager
def _closing(fd):
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def opened_root(path):
    """The export root (or archive root), chosen by the site: opened as it is
    named; what is below it is never reached through a link."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    with _closing(fd):
        yield fd


def _ensure_dir(parent_fd, name, where, uid, gid, mode, fix_owner):
    """Make ``name`` under ``parent_fd`` if missing -> its descriptor.
    Made now: owner and mode set. Already there: its owner corrected when
    ``fix_owner`` (its mode is the user's business)."""
    made = False
    try:
        os.mkdir(name, mode, dir_fd=parent_fd)
        made = True
    except FileExistsError:
        pass
    fd = _open_dir(parent_fd, name, where)
    try:
        if made:
            os.chmod(fd, mode)             # fchmod: the umask is not the site's
        if made or fix_owner:
            info = os.fstat(fd)
            if (info.st_uid, info.st_gid) != (uid, gid):
                os.chown(fd, uid, gid)     # fchown: the directory opened, not a name
    except BaseException:
        os.close(fd)
        raise
    return fd, made


@contextlib.contextmanager
def _walk_to(root_fd, names, where, make=None):
    """Open ``names`` one below the other from ``root_fd`` -> the last
    descriptor. ``make``: (uid, gid, mode) to create missing ones (root's)."""
    fds = []
    try:
        fd = root_fd
        for name in names:
            if make is None:
                fd = _open_dir(fd, name, where)
            else:
                fd, _made = _ensure_dir(fd, name, where, *make, fix_owner=False)
            fds.append(fd)
            where = f"{where}/{name}"
        yield fd
    finally:
        for opened in reversed(fds):
            os.close(opened)


# -- the export root ---------------------------------------------------------------------

def export_root_problem(path):
    """-> why the export root cannot hold trees now (missing, not a
    directory, read-only, not writable), or None."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "it does not exist"
    except OSError as e:
        return f"it cannot be examined ({e.strerror})"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory"
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "it is on a read-only file system"
    except OSError as e:
        return f"it cannot be examined ({e.strerror})"
    if not os.access(path, os.W_OK | os.X_OK):
        return "it is not writable"
    return None


# -- making ------------------------------------------------------------------------------

def ensure_tree(export_root, tree, uid, gid, mode):
    """Make ``tree`` with its ``etc/`` structure if missing, owned by
    ``uid:gid`` (idempotent) -> the directories made (relative paths)."""
    made = []
    with opened_root(export_root) as root_fd:
        above, top = tree.parts[:-1], tree.parts[-1]
        with _walk_to(root_fd, above, export_root, make=(0, 0, ROOT_MODE)) as parent_fd:
            where = "/".join((export_root,) + above)
            fd, new = _ensure_dir(parent_fd, top, where, uid, gid, mode, fix_owner=True)
            with _closing(fd):
                if new:
                    made.append(repr(tree))
                etc_fd, new = _ensure_dir(fd, "etc", f"{where}/{top}", uid, gid, mode,
                                          fix_owner=False)
                with _closing(etc_fd):
                    if new:
                        made.append(f"{tree!r}/etc")
                    for name in ETC_DIRS:
                        sub_fd, new = _ensure_dir(etc_fd, name, f"{where}/{top}/etc", uid, gid,
                                                  mode, fix_owner=False)
                        os.close(sub_fd)
                        if new:
                            made.append(f"{tree!r}/etc/{name}")
    return made


# -- listing -----------------------------------------------------------------------------

def _subdirs(fd):
    """Names of the real directories (not links) in the directory ``fd``."""
    with os.scandir(fd) as entries:
        return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))


def list_trees(export_root):
    """-> (set of Tree found, list of names left alone because no VM
    name can be made of them). Links and files are never trees."""
    found, unattributed = set(), []
    with opened_root(export_root) as root_fd:
        for kind in KINDS:
            try:
                kind_fd = _open_dir(root_fd, kind, export_root)
            except (FileNotFoundError, UnsafePath):
                continue
            with _closing(kind_fd):
                for owner in _subdirs(kind_fd):
                    if kind == "global":
                        _attribute(found, unattributed, kind, owner, None)
                        continue
                    try:
                        owner_fd = _open_dir(kind_fd, owner, f"{export_root}/{kind}")
                    except (FileNotFoundError, UnsafePath):
                        continue
                    with _closing(owner_fd):
                        for name in _subdirs(owner_fd):
                            _attribute(found, unattributed, kind, owner, name)
    return found, unattributed


def _attribute(found, unattributed, kind, owner, name):
    try:
        found.add(Tree(kind, owner, name))
    except InvalidRequest:
        unattributed.append("/".join(p for p in (kind, owner, name) if p is not None))


# -- cleaning up -------------------------------------------------------------------------

def utc_stamp(seconds):
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(seconds))


def cleanup_tree(export_root, tree, policy, archive_root, seconds):
    """Apply ``policy`` to ``tree`` -> what was done: "kept", "absent",
    "deleted" or "archived to PATH". Nothing outside the export root (and
    the archive root) is touched whatever links the tree holds."""
    if policy not in POLICIES:
        raise ValueError(f"unknown clean-up policy {policy!r}")
    if policy == "keep":
        return "kept"
    above = tree.parts[:-1]
    with opened_root(export_root) as root_fd:
        with contextlib.ExitStack() as stack:
            try:
                parent_fd = stack.enter_context(_walk_to(root_fd, above, export_root))
            except FileNotFoundError:
                return "absent"
            outcome = _cleanup_at(parent_fd, tree, policy, archive_root, seconds)
        if outcome != "absent":
            _remove_if_empty(root_fd, above)
    return outcome


def _cleanup_at(parent_fd, tree, policy, archive_root, seconds):
    top = tree.parts[-1]
    try:
        info = os.stat(top, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return "absent"
    if policy == "archive":
        return "archived to " + _archive(parent_fd, tree, archive_root, utc_stamp(seconds))
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(top, dir_fd=parent_fd)
    else:                          # a link or file in the tree's place: itself only
        os.unlink(top, dir_fd=parent_fd)
    return "deleted"


def _archive(parent_fd, tree, archive_root, stamp):
    above, top = tree.parts[:-1], tree.parts[-1]
    with opened_root(_made_archive_root(archive_root)) as archive_fd:
        with _walk_to(archive_fd, above, archive_root,
                      make=(0, 0, ARCHIVE_MODE)) as target_fd:
            for attempt in range(1000):
                name = f"{top}.{stamp}" + (f"-{attempt}" if attempt else "")
                try:
                    os.stat(name, dir_fd=target_fd, follow_symlinks=False)
                except FileNotFoundError:
                    os.rename(top, name, src_dir_fd=parent_fd, dst_dir_fd=target_fd)
                    return "/".join((archive_root,) + above + (name,))
            raise FileExistsError(f"{archive_root}: no free archive name for {tree!r}")


def _made_archive_root(archive_root):
    try:
        os.mkdir(archive_root, ARCHIVE_MODE)
    except FileExistsError:
        pass
    return archive_root


def _remove_if_empty(root_fd, above):
    """The per-owner directory a tree was in goes when it is empty (never a
    kind directory: ``global``, ``cluster``, ``local`` stay)."""
    if len(above) < 2:
        return
    with contextlib.suppress(FileNotFoundError, UnsafePath):
        with _walk_to(root_fd, above[:-1], "") as parent_fd:
            with contextlib.suppress(OSError):   # not empty, or not a directory
                os.rmdir(above[-1], dir_fd=parent_fd)
