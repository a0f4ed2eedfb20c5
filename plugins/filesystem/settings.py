"""The filesystem plugin's options, read and checked once: a bad value is a
ConfigError naming the key (the plugin registry adds the file)."""

import os
import re

from usher.errors import ConfigError, InvalidRequest
from usher.naming import check_user
from usher.plugins.filesystem.layout import KINDS
from usher.plugins.filesystem.owners import LdapIds, NssIds, StaticIds, parse_ids

DEFAULT_ORDER = 55
DEFAULT_EXPORT_ROOT = "/srv/usher/export"
DEFAULT_LDAP_CONFIG = "/etc/usher/plugins/ldap.config"

CONFIG_SPEC = f"""
order = integer(default={DEFAULT_ORDER})
export_root = string(default='{DEFAULT_EXPORT_ROOT}')
uid_source = option('nss', 'static', 'ldap', default='nss')
ldap_config = string(default='{DEFAULT_LDAP_CONFIG}')
default_ids = string(default=None)
local_cleanup = option('keep', 'archive', 'delete', default='archive')
cluster_cleanup = option('keep', 'archive', 'delete', default='archive')
archive_root = string(default=None)
mode = string(default='0755')
[users]
__many__ = string
"""

MODE_RE = re.compile(r"0?[0-7]{3}")


class Settings:
    """What the plugin works with: ``export_root``, ``archive_root``,
    ``local_cleanup``, ``cluster_cleanup``, ``mode`` (an int) and ``ids``
    (the uid source: ``user_ids(owner)``, ``source``)."""

    def __init__(self, export_root, archive_root, local_cleanup, cluster_cleanup, mode, ids):
        self.export_root = export_root
        self.archive_root = archive_root
        self.local_cleanup = local_cleanup
        self.cluster_cleanup = cluster_cleanup
        self.mode = mode
        self.ids = ids

    @classmethod
    def from_config(cls, config, directory=None):
        """Check a loaded configuration (``CONFIG_SPEC``) -> Settings.
        ``directory``: the LDAP Directory to ask (tests), instead of
        loading ``ldap_config``. Looks at the file system (a few stat calls)
        to refuse an export root that is not there now."""
        export_root = _absolute(config.get("export_root", DEFAULT_EXPORT_ROOT), "export_root")
        if not os.path.exists(export_root):
            raise ConfigError(f"export_root: {export_root} does not exist (create it, and "
                              "export it over NFS, before starting the controller)")
        if not os.path.isdir(export_root):
            raise ConfigError(f"export_root: {export_root} is not a directory")
        local_cleanup = config.get("local_cleanup", "archive")
        cluster_cleanup = config.get("cluster_cleanup", "archive")
        archive_root = config.get("archive_root")
        archive_root = (os.path.join(export_root, "archive") if archive_root is None
                        else _absolute(archive_root, "archive_root"))
        if "archive" in (local_cleanup, cluster_cleanup):
            _check_archive_root(export_root, archive_root)
        mode = _mode(config.get("mode", "0755"))
        ids = _id_source(config, directory)
        return cls(export_root, archive_root, local_cleanup, cluster_cleanup, mode, ids)


def _absolute(path, key):
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"{key}: an absolute path is needed")
    path = path.strip()
    if not os.path.isabs(path):
        raise ConfigError(f"{key}: {path!r} is not an absolute path")
    if "\0" in path:
        raise ConfigError(f"{key}: the path holds a NUL character")
    return os.path.normpath(path)


def _inside(path, directory):
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _check_archive_root(export_root, archive_root):
    for kind in KINDS:
        if _inside(archive_root, os.path.join(export_root, kind)):
            raise ConfigError(f"archive_root: {archive_root} is inside the trees' "
                              f"{os.path.join(export_root, kind)} (use a directory of its own)")
    if _inside(export_root, archive_root):
        raise ConfigError(f"archive_root: {archive_root} holds the export root {export_root}")
    existing = archive_root
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing != archive_root and existing != os.path.dirname(archive_root):
        raise ConfigError(f"archive_root: {os.path.dirname(archive_root)} does not exist "
                          "(the plugin makes only the archive root itself)")
    if os.stat(existing).st_dev != os.stat(export_root).st_dev:
        raise ConfigError(f"archive_root: {archive_root} is not on the export root's file "
                          "system (trees are archived by renaming them)")


def _mode(text):
    text = (text or "").strip()
    if not MODE_RE.fullmatch(text):
        raise ConfigError(f"mode: {text!r} is not an octal permission mode such as 0755")
    mode = int(text, 8)
    if mode & 0o700 != 0o700:
        raise ConfigError(f"mode: {text} must give the owner rwx (0700) on their trees")
    return mode


def _id_source(config, directory):
    source = config.get("uid_source", "nss")
    users = {}
    for owner, value in (config.get("users") or {}).items():
        try:
            check_user(owner)
        except InvalidRequest as e:
            raise ConfigError(f"[users] {owner}: {e}") from None
        try:
            users[owner] = parse_ids(value)
        except ValueError as e:
            raise ConfigError(f"[users] {owner}: {e}") from None
    default = config.get("default_ids")
    if default is not None:
        try:
            default = parse_ids(default)
        except ValueError as e:
            raise ConfigError(f"default_ids: {e}") from None
    if source == "static":
        return StaticIds(users, default)
    if users or default is not None:
        raise ConfigError(f"[users]/default_ids are read only with uid_source = static "
                          f"(uid_source is {source})")
    if source == "ldap":
        ldap_config = _absolute(config.get("ldap_config", DEFAULT_LDAP_CONFIG), "ldap_config")
        if directory is None and not os.path.isfile(ldap_config):
            raise ConfigError(f"ldap_config: {ldap_config} does not exist (the LDAP plugin's "
                              "configuration, for uid_source = ldap)")
        return LdapIds(ldap_config, directory)
    return NssIds()
