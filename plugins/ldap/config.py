"""The options of an LDAP configuration file (``etc/plugins/ldap.config``).

One file serves the LDAP plugin (``usher.plugins.ldap``), the controller's
``ldap`` authentication module (``[ctrl] ldap_config``), ``usher user
--ldap-config`` and the filesystem plugin's ``uid_source = ldap``; every
option is documented in the sample file.

``call_timeout`` bounds each directory call (connect, then each answer);
it is not the plugin's per-event ``timeout``, which every plugin
configuration has (``usher.controller.plugins.COMMON_OPTIONS``).

``DirectoryConfig`` is a checked file (``load_config(path)``), what the
directory client (``usher.plugins.ldap.directory``) needs.
"""

from __future__ import annotations

import dataclasses
import os

import ldap3
from ldap3.core import exceptions as ldap_errors
from ldap3.utils.dn import parse_dn

from usher import naming
from usher.errors import ConfigError, InvalidRequest
from usher.plugins.ldap import acl

DEFAULT_ORDER = 70
DEFAULT_CONFIG_FILE = "/etc/usher/plugins/ldap.config"
DEFAULT_URL = "ldap://127.0.0.1:389"
DEFAULT_BASE_DN = "dc=usher,dc=local"

CONFIG_SPEC = f"""
order = integer(default={DEFAULT_ORDER})
url = string(default='{DEFAULT_URL}')
base_dn = string(default='{DEFAULT_BASE_DN}')
bind_dn = string(default=None)
bind_password_file = path(default='/etc/usher/ldap.password')
call_timeout = float(gt=0, default=5.0)
ca_file = path(default=None)
admin_group = string(default='usher-admins')
uid_min = integer(min=1, default=10000)
default_gid = integer(min=0, default=100)
home_template = string(default='/home/{{user}}')
login_shell = string(default='/bin/bash')
cluster_admin_gid = integer(min=0, default=10000)
cluster_branch_policy = option('delete', 'keep', default='delete')
reconcile_interval = float(gt=0, default=60.0)
"""


@dataclasses.dataclass(frozen=True)
class DirectoryConfig:
    """What the directory client needs, checked (from an ldap.config)."""

    url: str
    base_dn: str
    bind_dn: str
    bind_password: str = dataclasses.field(repr=False)
    call_timeout: float = 5.0
    admin_group: str = "usher-admins"
    uid_min: int = 10000
    default_gid: int = 100
    home_template: str = "/home/{user}"
    login_shell: str = "/bin/bash"
    cluster_admin_gid: int = 10000
    cluster_branch_policy: str = "delete"
    reconcile_interval: float = 60.0
    ca_file: str | None = None
    source: str = DEFAULT_CONFIG_FILE

    @classmethod
    def from_plugin_config(cls, config, source=DEFAULT_CONFIG_FILE) -> DirectoryConfig:
        """From a mapping checked against ``CONFIG_SPEC``; ConfigError naming
        ``source`` and the key for anything unusable."""
        def bad(key, problem):
            return ConfigError(f"{source}: {key}: {problem}")

        url = str(config.get("url") or "").strip().rstrip("/")
        if not url.startswith(("ldap://", "ldaps://")) or "@" in url:
            raise bad("url", f"{url!r} is not an ldap://HOST[:PORT] or ldaps://HOST[:PORT] URL")
        try:
            ldap3.Server(url, get_info=ldap3.NONE)
        except ldap_errors.LDAPException as e:
            raise bad("url", f"{url!r}: {e}") from None
        try:
            base_dn = acl.check_base_dn(config.get("base_dn") or "")
        except ValueError as e:
            raise bad("base_dn", str(e)) from None
        bind_dn = config.get("bind_dn") or acl.service_dn(base_dn)
        try:
            parse_dn(bind_dn)
        except Exception:
            raise bad("bind_dn", f"{bind_dn!r} is not a DN") from None
        password_file = config.get("bind_password_file")
        if not password_file:
            raise bad("bind_password_file", "not set: the service account's password file")
        try:
            with open(password_file, encoding="utf-8") as f:
                bind_password = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise bad("bind_password_file",
                      f"cannot read {password_file}: {getattr(e, 'strerror', None) or e}") \
                from None
        if not bind_password:
            raise bad("bind_password_file", f"{password_file} holds no password")
        admin_group = config.get("admin_group") or "usher-admins"
        try:
            naming.check_user(admin_group)
        except InvalidRequest:
            raise bad("admin_group", f"{admin_group!r} is not a group name") from None
        template = config.get("home_template") or "/home/{user}"
        if "{user}" not in template or not template.startswith("/") \
                or template.replace("{user}", "").count("{"):
            raise bad("home_template", f"{template!r}: an absolute path holding {{user}}")
        shell = config.get("login_shell") or "/bin/bash"
        if not shell.startswith("/"):
            raise bad("login_shell", f"{shell!r} is not an absolute path")
        ca_file = config.get("ca_file")
        if ca_file and not os.path.isfile(ca_file):
            raise bad("ca_file", f"{ca_file}: no such file")
        return cls(
            url=url, base_dn=base_dn, bind_dn=bind_dn, bind_password=bind_password,
            call_timeout=float(config.get("call_timeout") or 5.0), admin_group=admin_group,
            uid_min=int(config.get("uid_min") or 10000),
            default_gid=int(config.get("default_gid", 100)), home_template=template,
            login_shell=shell, cluster_admin_gid=int(config.get("cluster_admin_gid", 10000)),
            cluster_branch_policy=config.get("cluster_branch_policy") or "delete",
            reconcile_interval=float(config.get("reconcile_interval") or 60.0),
            ca_file=ca_file, source=os.fspath(source))


def load_config(path=DEFAULT_CONFIG_FILE) -> DirectoryConfig:
    """Read and check an ``ldap.config`` file -> DirectoryConfig (ConfigError).
    The plugin's common options (``timeout``, ``interval``) are accepted too:
    it is the plugin's file."""
    from usher.config import load_plugin_config, parse_spec
    from usher.controller.plugins import COMMON_OPTIONS
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such LDAP configuration file")
    spec = {**COMMON_OPTIONS, **parse_spec(CONFIG_SPEC)}
    return DirectoryConfig.from_plugin_config(load_plugin_config(spec, path), source=path)
