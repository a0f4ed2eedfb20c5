"""A private OpenLDAP slapd for the tests: started by the tests themselves.

``/usr/sbin/slapd`` (Debian package ``slapd``) runs in the foreground from an
old-style ``slapd.conf`` under a fresh temporary directory, listening on a
free loopback port only (``ldap://127.0.0.1:PORT/``), with the schemas core,
cosine, nis and inetorgperson, one ``mdb`` database for ``base_dn``, a root
DN with a password (it bypasses the access rules: the tests' own tool) and
**the shipped access rules** (``etc/ldap/usher-acl.conf`` for the default
base ``dc=usher,dc=local``, the generator's output for any other).

The first start loads the base entries of an Usher directory: the base,
``ou=people``, ``ou=groups``, ``ou=clusters``, the service account
``cn=usher,BASE`` (password ``service_password``, also written to
``service_password_file``) and the admin group ``cn=usher-admins,ou=groups``.

Nothing is skipped: a slapd that cannot be found or started raises
``SlapdUnavailable`` naming the package, the command and the server's log.
``stop()`` and ``start()`` may be called again mid-test (the "directory
down" tests); the data survives a stop. Stopped by PID, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from urllib.parse import quote

import ldap3

from usher.plugins.ldap import acl

SLAPD = "/usr/sbin/slapd"
SCHEMA_DIR = "/etc/ldap/schema"
MODULE_DIR = "/usr/lib/ldap"
SCHEMAS = ("core", "cosine", "nis", "inetorgperson")
HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED_ACL = os.path.join(os.path.dirname(HERE), "etc", "ldap", "usher-acl.conf")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

ROOT_PASSWORD = "root-secret"
SERVICE_PASSWORD = "service-secret"
ADMIN_GROUP = "usher-admins"
ADMIN_GROUP_GID = 10001


class SlapdUnavailable(RuntimeError):
    """The test server could not be found or started (says why)."""


def find_slapd() -> str:
    path = SLAPD if os.path.exists(SLAPD) else shutil.which("slapd")
    if not path:
        raise SlapdUnavailable(
            "OpenLDAP's slapd is not installed (no /usr/sbin/slapd): `make setup` installs "
            "the Debian packages slapd and ldap-utils")
    for schema in SCHEMAS:
        if not os.path.exists(os.path.join(SCHEMA_DIR, f"{schema}.schema")):
            raise SlapdUnavailable(f"no {SCHEMA_DIR}/{schema}.schema: reinstall the Debian "
                                   "package slapd")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlapdServer:
    """One private slapd. ``url``, ``base_dn``, ``root_dn``/``root_password``,
    ``service_dn``/``service_password``/``service_password_file``,
    ``admin_group``; ``plugin_config(path)`` writes an ``ldap.config`` for it."""

    def __init__(self, base_dir=None, *, base_dn: str = acl.DEFAULT_BASE_DN,
                 cn_config: bool = False, argv_prefix=()):
        """``cn_config``: a cn=config server (``slapd -F``, converted by
        slaptest) without access rules on its database, for ``ldapmodify``
        with the shipped LDIF over ldapi:// as root (SASL EXTERNAL).

        ``argv_prefix``: run slapd under it, e.g. ``("ip", "netns", "exec",
        NS)``: its ``url`` (127.0.0.1) is then that namespace's, and this
        object reaches it over its ldapi:// socket, which a path names in every
        network namespace."""
        self.slapd = find_slapd()
        self.cn_config = cn_config
        self.argv_prefix = tuple(argv_prefix)
        self.base_dn = acl.check_base_dn(base_dn)
        self.dir = tempfile.mkdtemp(prefix="usher-slapd-", dir=base_dir)
        self.db_dir = os.path.join(self.dir, "db")
        os.mkdir(self.db_dir, 0o700)
        self.conf_file = os.path.join(self.dir, "slapd.conf")
        self.log_file = os.path.join(self.dir, "slapd.log")
        self.root_dn = f"cn=admin,{self.base_dn}"
        self.root_password = ROOT_PASSWORD
        self.service_dn = acl.service_dn(self.base_dn)
        self.service_password = SERVICE_PASSWORD
        self.service_password_file = os.path.join(self.dir, "service.password")
        with open(self.service_password_file, "w", encoding="utf-8") as f:
            f.write(self.service_password + "\n")
        os.chmod(self.service_password_file, 0o600)
        self.admin_group = ADMIN_GROUP
        self.config_dir = os.path.join(self.dir, "slapd.d")
        self.ldapi = "ldapi://" + quote(os.path.join(self.dir, "ldapi"), safe="")
        self.port = None
        self.process = None
        self.loaded = False

    @property
    def _socket_path(self) -> str:
        return os.path.join(self.dir, "ldapi")

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    # -- configuration ----------------------------------------------------------------

    def _access_rules_file(self) -> str:
        if self.base_dn == acl.DEFAULT_BASE_DN:
            return SHIPPED_ACL
        path = os.path.join(self.dir, "usher-acl.conf")
        with open(path, "w", encoding="utf-8") as f:
            f.write(acl.slapd_conf(self.base_dn))
        return path

    def _write_conf(self):
        lines = [f"include {SCHEMA_DIR}/{schema}.schema" for schema in SCHEMAS]
        lines += [
            f"pidfile {self.dir}/slapd.pid",
            f"argsfile {self.dir}/slapd.args",
            f"modulepath {MODULE_DIR}",
            "moduleload back_mdb",
        ]
        if self.cn_config:
            lines += ["database config",
                      "access to * by dn.exact=gidNumber=0+uidNumber=0,cn=peercred,"
                      "cn=external,cn=auth manage by * none"]
        lines += [
            "database mdb",
            "maxsize 67108864",
            f"suffix \"{self.base_dn}\"",
            f"rootdn \"{self.root_dn}\"",
            f"rootpw {self.root_password}",
            f"directory {self.db_dir}",
            "index objectClass eq",
            "index uid,memberUid eq",
        ]
        if not self.cn_config:
            lines.append(f"include {self._access_rules_file()}")
        with open(self.conf_file, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        if self.cn_config and not os.path.isdir(self.config_dir):
            os.mkdir(self.config_dir, 0o700)
            # slaptest writes cn=config, then fails to open the database that
            # slapd makes at its first start (and with -u it writes nothing).
            self._tool("slaptest", [os.path.join(os.path.dirname(self.slapd), "slaptest"),
                                    "-f", self.conf_file, "-F", self.config_dir],
                       done_when=os.path.join(self.config_dir, "cn=config.ldif"))

    def _tool(self, step, argv, stdin=None, done_when=None):
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                  timeout=60, cwd=self.dir)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SlapdUnavailable(f"{step}: {' '.join(argv)}: {e} (the Debian packages "
                                   "slapd and ldap-utils provide it)") from e
        if done.returncode != 0 and not (done_when and os.path.exists(done_when)):
            raise SlapdUnavailable(f"{step} failed (exit {done.returncode}): {' '.join(argv)}"
                                   f"\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done.stdout

    def ldapmodify(self, ldif: str) -> str:
        """Apply an LDIF change to cn=config as root over ldapi:// (cn_config only)."""
        return self._tool("ldapmodify", ["ldapmodify", "-Q", "-Y", "EXTERNAL", "-H", self.ldapi],
                          stdin=ldif)

    def plugin_config(self, path, **options) -> str:
        """Write an ``ldap.config`` for this server (``options`` override or add
        keys) -> its path."""
        values = {"url": self.url, "base_dn": self.base_dn, "bind_dn": self.service_dn,
                  "bind_password_file": self.service_password_file,
                  "admin_group": self.admin_group, "call_timeout": 5.0}
        values.update(options)
        with open(path, "w", encoding="utf-8") as f:
            for key, value in values.items():
                f.write(f"{key} = {value}\n")
        return os.fspath(path)

    # -- life cycle ---------------------------------------------------------------------

    def start(self, attempts: int = 3):
        """Start the server (and load the base entries the first time); returns
        once it answers. Keeps its port across restarts (URLs stay valid)."""
        if self.running:
            return self
        self._write_conf()
        last = None
        for _ in range(attempts):
            port = self.port or free_port()
            try:
                self._launch(port)
            except SlapdUnavailable as e:
                last = e
                self.port = None        # perhaps taken meanwhile: another one
                continue
            if not self.loaded:
                self._load_base_entries()
                self.loaded = True
            return self
        raise last

    def _launch(self, port):
        by_socket = self.cn_config or bool(self.argv_prefix)
        urls = f"ldap://127.0.0.1:{port}/" + (f" {self.ldapi}" if by_socket else "")
        config = ["-F", self.config_dir] if self.cn_config else ["-f", self.conf_file]
        argv = [*self.argv_prefix, self.slapd, *config, "-h", urls, "-d", "256"]
        log = open(self.log_file, "ab")
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, cwd=self.dir)
        except OSError as e:
            raise SlapdUnavailable(f"{' '.join(argv)}: {e}") from e
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                raise SlapdUnavailable(
                    f"slapd exited at start-up: {' '.join(argv)}\n--- log ---\n{self.log_tail()}")
            try:
                if self.argv_prefix:
                    with socket.socket(socket.AF_UNIX) as unix:
                        unix.settimeout(1)
                        unix.connect(self._socket_path)
                else:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                self.port = port
                return
            except OSError:
                time.sleep(0.05)
        self._kill()
        raise SlapdUnavailable(f"slapd did not listen within {START_TIMEOUT} s: "
                               f"{' '.join(argv)}\n--- log ---\n{self.log_tail()}")

    def stop(self):
        """Stop the server by its PID (SIGTERM, then SIGKILL); the data stays."""
        if self.process is None:
            return
        try:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._kill()
        self.process = None

    def _kill(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def destroy(self):
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, size=3000) -> str:
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as f:
                return f.read()[-size:]
        except OSError:
            return "(no server log)"

    # -- entries ------------------------------------------------------------------------

    def connect(self, user=None, password=None) -> ldap3.Connection:
        """A bound ldap3 connection (the root DN unless ``user``, a DN, is given)."""
        server = ldap3.Server(self.ldapi if self.argv_prefix else self.url, connect_timeout=5,
                              get_info=ldap3.NONE)
        connection = ldap3.Connection(
            server, user=user or self.root_dn,
            password=self.root_password if user is None else password,
            receive_timeout=10, raise_exceptions=False)
        if not connection.bind():
            raise SlapdUnavailable(f"cannot bind as {user or self.root_dn}: "
                                   f"{connection.result.get('description')}")
        return connection

    def _load_base_entries(self):
        base = self.base_dn
        first_value = base.split(",", 1)[0].split("=", 1)[1]
        entries = [
            (base, ["dcObject", "organization"], {"dc": first_value, "o": "Usher"}),
            (f"ou=people,{base}", ["organizationalUnit"], {"ou": "people"}),
            (f"ou=groups,{base}", ["organizationalUnit"], {"ou": "groups"}),
            (f"ou=clusters,{base}", ["organizationalUnit"], {"ou": "clusters"}),
            (self.service_dn, ["organizationalRole", "simpleSecurityObject"],
             {"cn": "usher", "userPassword": self.service_password,
              "description": "Usher's service account"}),
            (f"cn={self.admin_group},ou=groups,{base}", ["posixGroup"],
             {"cn": self.admin_group, "gidNumber": ADMIN_GROUP_GID}),
        ]
        connection = self.connect()
        try:
            for dn, classes, attributes in entries:
                if not connection.add(dn, classes, attributes):
                    raise SlapdUnavailable(f"cannot add {dn}: {connection.result}")
        finally:
            connection.unbind()

    def add_user(self, name, password, *, uid_number=20000, admin=False):
        """A user entry as ``usher user add`` makes it (as root: for tests)."""
        from ldap3.utils.hashed import hashed
        dn = f"uid={name},ou=people,{self.base_dn}"
        connection = self.connect()
        try:
            ok = connection.add(dn, ["inetOrgPerson", "posixAccount"], {
                "uid": name, "cn": name, "sn": name, "uidNumber": uid_number,
                "gidNumber": 100, "homeDirectory": f"/home/{name}",
                "userPassword": hashed(ldap3.HASHED_SALTED_SHA, password)})
            if not ok:
                raise SlapdUnavailable(f"cannot add {dn}: {connection.result}")
            if admin:
                connection.modify(f"cn={self.admin_group},ou=groups,{self.base_dn}",
                                  {"memberUid": [(ldap3.MODIFY_ADD, [name])]})
        finally:
            connection.unbind()
        return dn
