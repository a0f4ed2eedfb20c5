"""usher-cluster-ldap: add, change and delete the users and groups of one virtual cluster's LDAP branch.

For use inside a cluster's VMs (the paper: "scripts for installation on a
user's VM filesystems to modify cluster LDAP entries"). It binds as the
cluster's owner with their Usher credentials (the password from a prompt,
or the first line of standard input with ``--bind-password-stdin``; never
from the command line) and edits only entries in ``ou=people`` and
``ou=groups`` of ``ou=CLUSTER,ou=OWNER,ou=clusters,BASE``; the directory's
access rules (``usher ldap acl``) refuse anything else anyway.

Standalone: this one file needs only Python 3 and ldap3. In a VM::

    pip install ldap3
    install -m 755 vmtool.py /usr/local/bin/usher-cluster-ldap

and write ``/etc/usher-cluster-ldap.conf`` (``key = value`` lines, ``#``
comments)::

    url = ldaps://ldap.example.org        # or ldap://... with start_tls = yes
    base_dn = dc=usher,dc=local
    owner = alice                         # whose cluster (and who binds)
    cluster = sneetch
    ca_file = /etc/ssl/certs/site-ca.pem  # the CA of the server's certificate
    # start_tls = no      bind_user = OWNER      timeout = 10
    # uid_min = 20000     gid_min = 20000        default_gid = 100
    # insecure = no       (yes: a password over plain ldap:// to another host)

Commands: ``useradd NAME [--uid N] [--gid N] [--shell S] [--home H]
[--name TEXT] [--password-stdin]``, ``usermod NAME ...``, ``passwd NAME``,
``userdel NAME``, ``groupadd NAME [--gid N]``, ``groupmod NAME
--add-member U / --remove-member U``, ``groupdel NAME``, ``list``.
Exit status: 0 done, 1 refused or failed (said why), 2 usage or
configuration error.
"""

import argparse
import base64
import configparser
import getpass as getpass_module
import hashlib
import ipaddress
import os
import re
import ssl
import sys
from urllib.parse import urlsplit

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn

DEFAULT_CONFIG = "/etc/usher-cluster-ldap.conf"
CONFIG_ENV = "USHER_CLUSTER_LDAP_CONF"
PROG = "usher-cluster-ldap"
OPTIONS = {"url", "base_dn", "owner", "cluster", "ca_file", "start_tls", "bind_user",
           "timeout", "uid_min", "gid_min", "default_gid", "insecure"}
REQUIRED = ("url", "base_dn", "owner", "cluster")
# Account and group names: as Usher's user names (and useradd's default rule).
NAME_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
CLUSTER_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
PATH_RE = re.compile(r"/[A-Za-z0-9._/+-]*")
ADMIN_GROUP = "admin"
MAX_ID = 2 ** 31 - 1

# LDAP result codes this tool explains.
INVALID_CREDENTIALS = 49
INSUFFICIENT_ACCESS = 50
NO_SUCH_OBJECT = 32
ALREADY_EXISTS = 68
UNWILLING = 53


class ToolError(Exception):
    """Refused or failed: the message says why (exit 1)."""

    status = 1


class UsageError(ToolError):
    """Bad arguments or configuration (exit 2)."""

    status = 2


def check_name(name, what="name"):
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid {what} {name!r}: a lower-case letter or _, then at most 31 "
                         "lower-case letters, digits, _ or -")
    return name


def check_path(path, what):
    if not PATH_RE.fullmatch(path or "") or "/../" in path + "/" or "//" in path:
        raise UsageError(f"invalid {what} {path!r}: an absolute path of letters, digits and "
                         "._+-/")
    return path


def check_id(value, what):
    if value is None:
        return None
    if not 1 <= value <= MAX_ID:
        raise UsageError(f"invalid {what} {value}: 1 .. {MAX_ID}")
    return value


def check_text(value, what):
    if value is None:
        return None
    if not value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value) or len(value) > 200:
        raise UsageError(f"invalid {what}: printable text of at most 200 characters")
    return value


def ssha(password):
    """``{SSHA}`` of a password (salted SHA-1, what slapd checks natively)."""
    salt = os.urandom(16)
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


# -- configuration --------------------------------------------------------------------------

class Config:
    def __init__(self, values, source):
        self.source = source
        unknown = sorted(set(values) - OPTIONS)
        if unknown:
            raise UsageError(f"{source}: unknown key {unknown[0]!r} (known: "
                             f"{', '.join(sorted(OPTIONS))})")
        for key in REQUIRED:
            if not values.get(key):
                raise UsageError(f"{source}: key {key!r} is missing")
        self.url = values["url"]
        scheme = urlsplit(self.url).scheme.lower()
        if scheme not in ("ldap", "ldaps") or not urlsplit(self.url).hostname:
            raise UsageError(f"{source}: url: {self.url!r} is not an ldap:// or ldaps:// URL")
        self.ldaps = scheme == "ldaps"
        try:
            parts = parse_dn(values["base_dn"])
        except Exception:
            parts = None
        if not parts:
            raise UsageError(f"{source}: base_dn: {values['base_dn']!r} is not a DN")
        self.base_dn = values["base_dn"]
        self.owner = self._name(values, "owner")
        self.bind_user = self._name(values, "bind_user") if values.get("bind_user") \
            else self.owner
        self.cluster = values["cluster"]
        if not CLUSTER_RE.fullmatch(self.cluster):
            raise UsageError(f"{source}: cluster: {self.cluster!r} is not a cluster name "
                             "(a DNS label)")
        self.ca_file = values.get("ca_file") or None
        if self.ca_file and not os.path.isfile(self.ca_file):
            raise UsageError(f"{source}: ca_file: no such file {self.ca_file}")
        self.start_tls = self._flag(values, "start_tls")
        self.insecure = self._flag(values, "insecure")
        self.timeout = self._number(values, "timeout", 10, float)
        self.uid_min = self._number(values, "uid_min", 20000, int)
        self.gid_min = self._number(values, "gid_min", 20000, int)
        self.default_gid = self._number(values, "default_gid", 100, int)
        if self.ldaps and self.start_tls:
            raise UsageError(f"{source}: start_tls: not with an ldaps:// URL")
        host = urlsplit(self.url).hostname
        if not (self.ldaps or self.start_tls or self.insecure or _loopback(host)):
            raise UsageError(f"{source}: url: {self.url} would send the password in clear to "
                             f"{host}: use ldaps://, start_tls = yes, or insecure = yes")

    def _name(self, values, key):
        try:
            return check_name(values[key], key)
        except UsageError as e:
            raise UsageError(f"{self.source}: {key}: {e}") from None

    def _flag(self, values, key):
        value = (values.get(key) or "no").strip().lower()
        if value not in ("yes", "no", "true", "false", "on", "off", "1", "0"):
            raise UsageError(f"{self.source}: {key}: {value!r} is not yes or no")
        return value in ("yes", "true", "on", "1")

    def _number(self, values, key, default, kind):
        if not values.get(key):
            return default
        try:
            number = kind(values[key])
        except ValueError:
            raise UsageError(f"{self.source}: {key}: {values[key]!r} is not a number") from None
        if number <= 0:
            raise UsageError(f"{self.source}: {key}: must be positive")
        return number

    @property
    def branch_dn(self):
        return f"ou={self.cluster},ou={self.owner},ou=clusters,{self.base_dn}"

    @property
    def people_dn(self):
        return f"ou=people,{self.branch_dn}"

    @property
    def groups_dn(self):
        return f"ou=groups,{self.branch_dn}"

    @property
    def bind_dn(self):
        return f"uid={self.bind_user},ou=people,{self.base_dn}"


def _loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror})") from None
    parser = configparser.ConfigParser(inline_comment_prefixes=("#",), interpolation=None,
                                       default_section="_defaults")
    try:
        parser.read_string("[tool]\n" + text, source=path)
    except configparser.Error as e:
        line = getattr(e, "lineno", None)
        where = f"line {line - 1}: " if line else ""
        raise UsageError(f"{path}: {where}{e.message.splitlines()[0]}") from None
    return Config(dict(parser["tool"]), path)


# -- the directory ------------------------------------------------------------------------

class Branch:
    """The cluster's branch, seen through a connection bound as ``bind_user``."""

    def __init__(self, config, connection):
        self.config = config
        self.conn = connection

    # lookups

    def _search(self, base, what, attributes, dereference=False):
        # Not dereferenced: the owner's alias is an alias here, not their entry.
        ok = self.conn.search(base, what, search_scope=ldap3.LEVEL, attributes=attributes,
                              dereference_aliases=ldap3.DEREF_SEARCH if dereference
                              else ldap3.DEREF_NEVER)
        if not ok and self.conn.result["result"] == NO_SUCH_OBJECT:
            raise ToolError(f"the cluster {self.config.cluster} of {self.config.owner} has no "
                            f"LDAP branch ({self.config.branch_dn}): Usher makes it when the "
                            "cluster starts")
        if not ok and self.conn.result["result"] != 0:
            self._refused(f"reading {base}")
        return list(self.conn.entries)

    def users(self):
        return self._search(self.config.people_dn, "(objectClass=*)",
                            ["uid", "uidNumber", "gidNumber", "homeDirectory", "loginShell",
                             "cn", "objectClass", "aliasedObjectName"])

    def uid_numbers(self):
        """-> the uidNumbers of the cluster's accounts, the owner's (through
        the alias) included."""
        return {int(v) for e in self._search(self.config.people_dn, "(objectClass=*)",
                                             ["uidNumber"], dereference=True)
                for v in _values(e, "uidNumber")}

    def groups(self):
        return self._search(self.config.groups_dn, "(objectClass=posixGroup)",
                            ["cn", "gidNumber", "memberUid"])

    def user(self, name):
        found = self._search(self.config.people_dn, f"(uid={escape_filter_chars(name)})",
                             ["uid", "uidNumber", "objectClass", "aliasedObjectName"])
        return found[0] if found else None

    def group(self, name):
        found = self._search(self.config.groups_dn, f"(cn={escape_filter_chars(name)})",
                             ["cn", "gidNumber", "memberUid"])
        return found[0] if found else None

    def user_dn(self, name):
        return f"uid={name},{self.config.people_dn}"

    def group_dn(self, name):
        return f"cn={name},{self.config.groups_dn}"

    @staticmethod
    def next_id(own, used, floor):
        """-> the number after the highest of the cluster's own (``own``), from
        ``floor`` on, that is not in ``used`` (as useradd: never one of a
        deleted account again while a higher one exists)."""
        number = max([floor - 1] + list(own)) + 1
        while number in used:
            number += 1
        return number

    # changes

    def _check(self, ok, what, dn):
        if ok:
            return
        code = self.conn.result["result"]
        if code == ALREADY_EXISTS:
            raise ToolError(f"{what}: {dn} already exists")
        if code == NO_SUCH_OBJECT:
            raise ToolError(f"{what}: no such entry {dn}")
        self._refused(what)

    def _refused(self, what):
        code = self.conn.result["result"]
        text = self.conn.result.get("description") or str(code)
        if code in (INSUFFICIENT_ACCESS, UNWILLING):
            raise ToolError(f"{what}: refused by the directory's access rules: "
                            f"{self.config.bind_user} may not change {self.config.branch_dn} "
                            f"(insufficient access)")
        message = self.conn.result.get("message") or ""
        raise ToolError(f"{what}: the directory refused ({text}{': ' + message if message else ''})")

    def add(self, dn, object_classes, attributes, what):
        self._check(self.conn.add(dn, object_classes, attributes), what, dn)

    def modify(self, dn, changes, what):
        self._check(self.conn.modify(dn, changes), what, dn)

    def delete(self, dn, what):
        self._check(self.conn.delete(dn), what, dn)


def _values(entry, attribute):
    if attribute not in entry:
        return []
    return list(entry[attribute].values)


def _is_alias(entry):
    return "alias" in [c.lower() for c in _values(entry, "objectClass")]


def connect(config, password):
    """-> a Connection bound as the configured user; ToolError saying why not."""
    tls = None
    if config.ldaps or config.start_tls:
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=config.ca_file)
    server = ldap3.Server(config.url, use_ssl=config.ldaps, tls=tls, get_info=ldap3.NONE,
                          connect_timeout=config.timeout)
    conn = ldap3.Connection(server, user=config.bind_dn, password=password,
                            receive_timeout=config.timeout, raise_exceptions=False,
                            auto_bind=ldap3.AUTO_BIND_NONE)
    try:
        conn.open()
        if config.start_tls and not conn.start_tls():
            raise ToolError(f"{config.url}: StartTLS failed ({conn.result.get('description')})")
        if not conn.bind():
            if conn.result["result"] == INVALID_CREDENTIALS:
                raise ToolError(f"wrong credentials for {config.bind_user} (the user's Usher "
                                "password)")
            raise ToolError(f"{config.url}: binding as {config.bind_user} failed "
                            f"({conn.result.get('description')})")
    except LDAPException as e:
        raise ToolError(f"the directory at {config.url} is unreachable "
                        f"({e.__class__.__name__})") from None
    return conn


# -- commands ------------------------------------------------------------------------------

def _password(args, io, prompt, confirm=False):
    if args.password_stdin:
        return io.line("the new password")
    first = io.getpass(prompt)
    if confirm and io.getpass("Again: ") != first:
        raise ToolError("the passwords differ")
    if not first:
        raise ToolError("empty password")
    return first


def cmd_useradd(branch, args, io):
    config = branch.config
    name = check_name(args.name, "user name")
    uid = check_id(args.uid, "uid")
    gid = check_id(args.gid, "gid") or config.default_gid
    home = check_path(args.home or f"/home/{name}", "home directory")
    shell = check_path(args.shell or "/bin/bash", "shell")
    full = check_text(args.full_name, "name") or name
    password = _password(args, io, f"Password for {name}: ", confirm=True) \
        if args.password_stdin or args.password else None
    if branch.user(name) is not None:
        raise ToolError(f"user {name} already exists in cluster {config.cluster}")
    used = branch.uid_numbers()
    if uid is None:
        own = {int(v) for e in branch.users() for v in _values(e, "uidNumber")}
        uid = branch.next_id(own, used, config.uid_min)
    elif uid in used:
        raise ToolError(f"uid {uid} is already used in cluster {config.cluster}")
    attributes = {"uid": name, "cn": full, "sn": full, "uidNumber": uid, "gidNumber": gid,
                  "homeDirectory": home, "loginShell": shell}
    if password is not None:
        attributes["userPassword"] = ssha(password)
    branch.add(branch.user_dn(name), ["inetOrgPerson", "posixAccount"], attributes,
               f"adding user {name}")
    io.say(f"user {name} added (uid {uid}, gid {gid})"
           + ("" if password is not None else "; no password yet: set one with passwd"))


def _own_user(branch, name):
    """-> the entry of an account of the cluster; the owner's alias refused."""
    entry = branch.user(name)
    if entry is None:
        raise ToolError(f"no such user {name} in cluster {branch.config.cluster}")
    if _is_alias(entry):
        raise ToolError(f"{name} is the cluster owner (an alias of the global entry): change "
                        "it with Usher's own tools")
    return entry


def cmd_usermod(branch, args, io):
    name = check_name(args.name, "user name")
    changes = {}
    if args.uid is not None:
        changes["uidNumber"] = check_id(args.uid, "uid")
    if args.gid is not None:
        changes["gidNumber"] = check_id(args.gid, "gid")
    if args.home is not None:
        changes["homeDirectory"] = check_path(args.home, "home directory")
    if args.shell is not None:
        changes["loginShell"] = check_path(args.shell, "shell")
    if args.full_name is not None:
        changes["cn"] = changes["sn"] = check_text(args.full_name, "name")
    if not changes:
        raise UsageError("usermod: nothing to change (give --uid, --gid, --home, --shell or "
                         "--name)")
    _own_user(branch, name)
    if "uidNumber" in changes:
        current = _values(_own_user(branch, name), "uidNumber")
        if changes["uidNumber"] in branch.uid_numbers() - {int(v) for v in current}:
            raise ToolError(f"uid {changes['uidNumber']} is already used in cluster "
                            f"{branch.config.cluster}")
    branch.modify(branch.user_dn(name),
                  {key: [(ldap3.MODIFY_REPLACE, [value])] for key, value in changes.items()},
                  f"changing user {name}")
    io.say(f"user {name} changed: {', '.join(sorted(changes))}")


def cmd_passwd(branch, args, io):
    name = check_name(args.name, "user name")
    _own_user(branch, name)
    password = _password(args, io, f"New password for {name}: ", confirm=True)
    branch.modify(branch.user_dn(name), {"userPassword": [(ldap3.MODIFY_REPLACE, [ssha(password)])]},
                  f"setting the password of {name}")
    io.say(f"password of {name} set")


def cmd_userdel(branch, args, io):
    name = check_name(args.name, "user name")
    _own_user(branch, name)
    for group in branch.groups():
        if name in _values(group, "memberUid"):
            branch.modify(branch.group_dn(_values(group, "cn")[0]),
                          {"memberUid": [(ldap3.MODIFY_DELETE, [name])]},
                          f"removing {name} from group {_values(group, 'cn')[0]}")
    branch.delete(branch.user_dn(name), f"deleting user {name}")
    io.say(f"user {name} deleted")


def cmd_groupadd(branch, args, io):
    config = branch.config
    name = check_name(args.name, "group name")
    gid = check_id(args.gid, "gid")
    if branch.group(name) is not None:
        raise ToolError(f"group {name} already exists in cluster {config.cluster}")
    used = {int(v) for e in branch.groups() for v in _values(e, "gidNumber")}
    if gid is None:
        gid = branch.next_id(used, used, config.gid_min)
    elif gid in used:
        raise ToolError(f"gid {gid} is already used in cluster {config.cluster}")
    branch.add(branch.group_dn(name), ["posixGroup"], {"cn": name, "gidNumber": gid},
               f"adding group {name}")
    io.say(f"group {name} added (gid {gid})")


def _group(branch, name):
    entry = branch.group(name)
    if entry is None:
        raise ToolError(f"no such group {name} in cluster {branch.config.cluster}")
    return entry


def cmd_groupmod(branch, args, io):
    name = check_name(args.name, "group name")
    adding = [check_name(u, "member") for u in args.add_member or ()]
    removing = [check_name(u, "member") for u in args.remove_member or ()]
    if not adding and not removing:
        raise UsageError("groupmod: give --add-member or --remove-member")
    members = _values(_group(branch, name), "memberUid")
    owner = branch.config.owner
    if name == ADMIN_GROUP and owner in removing:
        raise ToolError(f"{owner} owns the cluster and stays in its {ADMIN_GROUP} group")
    changes = []
    for user in adding:
        if user in members:
            raise ToolError(f"{user} is already a member of {name}")
        if branch.user(user) is None:
            raise ToolError(f"no such user {user} in cluster {branch.config.cluster}")
    for user in removing:
        if user not in members:
            raise ToolError(f"{user} is not a member of {name}")
    if adding:
        changes.append((ldap3.MODIFY_ADD, adding))
    if removing:
        changes.append((ldap3.MODIFY_DELETE, removing))
    branch.modify(branch.group_dn(name), {"memberUid": changes}, f"changing group {name}")
    io.say(f"group {name}: " + "; ".join(
        part for part in (adding and f"added {', '.join(adding)}",
                          removing and f"removed {', '.join(removing)}") if part))


def cmd_groupdel(branch, args, io):
    name = check_name(args.name, "group name")
    if name == ADMIN_GROUP:
        raise ToolError(f"the {ADMIN_GROUP} group is Usher's: it goes with the cluster")
    _group(branch, name)
    branch.delete(branch.group_dn(name), f"deleting group {name}")
    io.say(f"group {name} deleted")


def cmd_list(branch, args, io):
    io.say(f"cluster {branch.config.cluster} of {branch.config.owner} "
           f"({branch.config.branch_dn})")
    io.say("users:")
    for entry in sorted(branch.users(), key=lambda e: _values(e, "uid")[:1]):
        name = (_values(entry, "uid") or ["?"])[0]
        if _is_alias(entry):
            io.say(f"  {name}  (owner: {(_values(entry, 'aliasedObjectName') or ['?'])[0]})")
            continue
        fields = [_values(entry, key)[:1] for key in
                  ("uidNumber", "gidNumber", "homeDirectory", "loginShell")]
        io.say("  " + "  ".join([name] + [(f or ["-"])[0] for f in fields]))
    io.say("groups:")
    for entry in sorted(branch.groups(), key=lambda e: _values(e, "cn")[:1]):
        members = ",".join(sorted(_values(entry, "memberUid"))) or "-"
        io.say(f"  {_values(entry, 'cn')[0]}  {(_values(entry, 'gidNumber') or ['-'])[0]}  "
               f"{members}")


COMMANDS = {"useradd": cmd_useradd, "usermod": cmd_usermod, "passwd": cmd_passwd,
            "userdel": cmd_userdel, "groupadd": cmd_groupadd, "groupmod": cmd_groupmod,
            "groupdel": cmd_groupdel, "list": cmd_list}


def parser():
    top = argparse.ArgumentParser(
        prog=PROG, description="Add, change and delete the users and groups of this "
        "virtual cluster's LDAP branch (as its owner).")
    top.add_argument("--config", help=f"configuration file (default ${CONFIG_ENV} or "
                     f"{DEFAULT_CONFIG})")
    top.add_argument("--bind-user", help="bind as this Usher user (default: the owner)")
    top.add_argument("--bind-password-stdin", action="store_true",
                     help="read your Usher password from the first line of standard input "
                     "(default: prompt)")
    commands = top.add_subparsers(dest="command", required=True)

    def account_options(command, password):
        command.add_argument("--uid", type=int)
        command.add_argument("--gid", type=int)
        command.add_argument("--shell")
        command.add_argument("--home")
        command.add_argument("--name", dest="full_name", help="the full name (cn)")
        if password:
            command.add_argument("--password", action="store_true",
                                 help="prompt for the account's password")
            command.add_argument("--password-stdin", action="store_true",
                                 help="read the account's password from the next line of "
                                 "standard input")
    add = commands.add_parser("useradd", help="add an account")
    add.add_argument("name")
    account_options(add, True)
    mod = commands.add_parser("usermod", help="change an account")
    mod.add_argument("name")
    account_options(mod, False)
    pw = commands.add_parser("passwd", help="set an account's password")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true",
                    help="read the password from the next line of standard input")
    commands.add_parser("userdel", help="delete an account").add_argument("name")
    gadd = commands.add_parser("groupadd", help="add a group")
    gadd.add_argument("name")
    gadd.add_argument("--gid", type=int)
    gmod = commands.add_parser("groupmod", help="add or remove members")
    gmod.add_argument("name")
    gmod.add_argument("--add-member", action="append", metavar="USER")
    gmod.add_argument("--remove-member", action="append", metavar="USER")
    commands.add_parser("groupdel", help="delete a group").add_argument("name")
    commands.add_parser("list", help="list the cluster's users and groups")
    return top


class _IO:
    def __init__(self, stdin, stdout, getpass):
        self.stdin = stdin
        self.stdout = stdout
        self._getpass = getpass

    def say(self, text):
        print(text, file=self.stdout)

    def line(self, what):
        text = self.stdin.readline()
        if not text:
            raise ToolError(f"no {what} on standard input")
        text = text.rstrip("\r\n")
        if not text:
            raise ToolError(f"empty {what} on standard input")
        return text

    def getpass(self, prompt):
        return self._getpass(prompt)


def main(argv=None, *, stdin=None, stdout=None, stderr=None, getpass=None):
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    io = _IO(stdin, stdout, getpass or getpass_module.getpass)
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return e.code
    try:
        config = load_config(args.config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
        if args.bind_user:
            config.bind_user = check_name(args.bind_user, "bind user")
        if args.bind_password_stdin:
            password = io.line(f"password of {config.bind_user}")
        else:
            password = io.getpass(f"Usher password of {config.bind_user}: ")
        if not password:
            raise ToolError("empty password")
        conn = connect(config, password)
        del password
        try:
            COMMANDS[args.command](Branch(config, conn), args, io)
        finally:
            conn.unbind()
    except ToolError as e:
        print(f"{PROG}: {e}", file=stderr)
        return e.status
    except LDAPException as e:
        print(f"{PROG}: the directory at {config.url} failed: {e.__class__.__name__}",
              file=stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
