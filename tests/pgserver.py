"""A private PostgreSQL server for the tests: started by the tests themselves.

``initdb`` and ``pg_ctl`` (from ``/usr/lib/postgresql/*/bin``, the newest
version there, or ``$PATH``) run on a data directory under a fresh temporary
directory, listening on a free loopback port only (and a Unix socket in that
directory, never the system's). ``initdb`` refuses to run as root: as root the
commands run as the ``postgres`` user (``runuser``), who owns the directory.
Authentication is ``trust`` for the superuser ``usher``: the server is
reachable from 127.0.0.1 only and lives as long as the test session.

Nothing is skipped: a server that cannot be found or started raises
``PostgresUnavailable`` naming the step, the command and the server's log.
``stop()`` and ``start()`` may be called again mid-test (the "database stopped
mid-run" tests); the data survives a stop.
"""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile

SUPERUSER = "usher"
SERVICE_USER = "postgres"
COMMAND_TIMEOUT = 60


class PostgresUnavailable(RuntimeError):
    """The test server could not be found, initialised or started (says why)."""


def find_bin_dir():
    """The directory of ``initdb`` and ``pg_ctl`` -> path; PostgresUnavailable
    if PostgreSQL is not installed (``make setup`` installs it)."""
    def version(path):
        name = path.split(os.sep)[-3]
        return tuple(int(p) if p.isdigit() else 0 for p in name.split("."))
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(initdb)
    raise PostgresUnavailable(
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb, no initdb on "
        "PATH): `make setup` installs the Debian package postgresql")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One private server. ``url(database)`` is what the SQL plugin's
    ``database`` option takes."""

    def __init__(self, base_dir=None, *, bin_dir=None, argv_prefix=()):
        self.bin_dir = bin_dir or find_bin_dir()
        # Put before every command, e.g. ("ip", "netns", "exec", NS): the
        # server then lives in that network namespace (the real-QEMU test's
        # controller namespace), its 127.0.0.1 that namespace's.
        self.argv_prefix = tuple(argv_prefix)
        self.as_service_user = os.geteuid() == 0
        # A short path of its own under /tmp: the Unix socket's path must stay
        # under 108 bytes, and pytest's directories (0700, root's) are closed
        # to the postgres user.
        self.dir = tempfile.mkdtemp(prefix="usher-pg-", dir=base_dir)
        self.data_dir = os.path.join(self.dir, "data")
        self.log_file = os.path.join(self.dir, "server.log")
        if self.as_service_user:
            try:
                account = pwd.getpwnam(SERVICE_USER)
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root, and there is no {SERVICE_USER!r} user to run "
                    "initdb as (the Debian package postgresql creates it)") from None
            os.chown(self.dir, account.pw_uid, account.pw_gid)
        self.port = None
        self.initialised = False
        self.databases = set()

    # -- commands -----------------------------------------------------------------

    def _run(self, step, program, *args):
        argv = [os.path.join(self.bin_dir, program), *args]
        if self.as_service_user:
            argv = ["runuser", "-u", SERVICE_USER, "--", *argv]
        argv = [*self.argv_prefix, *argv]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, cwd=self.dir,
                                  timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PostgresUnavailable(f"{step}: {' '.join(argv)}: {e}") from e
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"{step} failed (exit {done.returncode}): {' '.join(argv)}\n"
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}\n--- server log ---\n"
                f"{self.log_tail()}")
        return done.stdout

    def log_tail(self, size=3000):
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as f:
                return f.read()[-size:]
        except OSError:
            return "(no server log)"

    # -- life cycle ------------------------------------------------------------------

    def start(self, attempts=3):
        """Initialise (first time) and start the server; returns once it
        accepts connections. Keeps its port across restarts (URLs stay
        valid); a port taken by someone else meanwhile is retried on another."""
        if not self.initialised:
            self._run("initdb", "initdb", "-D", self.data_dir, "-A", "trust", "-U",
                      SUPERUSER, "-E", "UTF8", "--no-locale", "--no-sync")
            self.initialised = True
        last = None
        for _ in range(attempts):
            port = self.port or free_port()
            options = (f"-k {self.dir} -p {port} -c listen_addresses=127.0.0.1 "
                       "-c fsync=off -c max_connections=200")
            try:
                self._run("pg_ctl start", "pg_ctl", "-D", self.data_dir, "-o", options,
                          "-l", self.log_file, "-w", "-t", "60", "start")
            except PostgresUnavailable as e:
                last = e
                self.port = None          # perhaps taken: another one
                continue
            self.port = port
            return self
        raise last

    def stop(self, mode="fast"):
        """``pg_ctl stop -m fast``: connections are cut at once (as a database
        that goes away does); the data stays for ``start()``."""
        if self.running:
            self._run("pg_ctl stop", "pg_ctl", "-D", self.data_dir, "-m", mode, "-w",
                      "stop")

    @property
    def running(self):
        return os.path.exists(os.path.join(self.data_dir, "postmaster.pid"))

    def destroy(self):
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- databases -------------------------------------------------------------------

    def create_database(self, name):
        """A new empty database -> its URL (``postgresql://usher@127.0.0.1:PORT/name``)."""
        self._run(f"createdb {name}", "createdb", "-h", "127.0.0.1", "-p", str(self.port),
                  "-U", SUPERUSER, name)
        self.databases.add(name)
        return self.url(name)

    def url(self, database):
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, database, sql):
        """Run SQL through psql -> its unaligned, tuples-only output."""
        return self._run("psql", "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U",
                         SUPERUSER, "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c",
                         sql)
