"""One SQL database for the SQL plugin: SQLite (standard library, the
embedded default) or PostgreSQL (psycopg 3), behind one small interface.

Synchronous: a ``Store`` is used from one thread at a time (the plugin's
``DatabaseWorker`` thread, or the ``usher ipam`` / ``usher report`` admin
commands), never on the reactor.

- ``Store.open(url)``: ``sqlite:///abs/path.db``, ``sqlite:///:memory:``
  (tests), or ``postgresql://user@host:port/dbname`` (any libpq URI).
- ``store.migrate()``: creates or upgrades the schema (``schema.py``).
- ``with store.transaction() as tx:`` then ``tx.execute(sql, params)``,
  ``tx.query(sql, params) -> [tuple]``, ``tx.insert(sql, params) -> id`` (SQL
  ending ``RETURNING id``). SQL is written with ``?`` placeholders; the store
  spells them ``%s`` for PostgreSQL. Transactions are SERIALIZABLE
  (PostgreSQL) or ``BEGIN IMMEDIATE`` (SQLite: one writer at a time).
- ``store.run(function, *args)``: ``function(tx, *args)`` in a transaction,
  run again (at most ``retries`` times, with a short back-off) when the
  engine reports a serialization failure, a deadlock or a busy database,
  and once on a fresh connection when the connection was lost.

Errors: ``Conflict`` (a constraint refused the change: the caller's fault),
``DatabaseUnavailable`` (no connection, or the engine failed: try later),
both ``DatabaseError``.
"""

import sqlite3
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

from usher.plugins.sql.schema import MIGRATIONS, SCHEMA_VERSION, render

# Runs of a transaction that met a serialization failure or a busy database.
DEFAULT_RETRIES = 8
# Seconds a connection attempt (PostgreSQL) or a wait for SQLite's write
# lock may take.
CONNECT_TIMEOUT = 5
# pg_advisory_xact_lock key: two processes migrating at once take turns.
MIGRATION_LOCK = 0x75736865


class DatabaseError(Exception):
    """What the store raises."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached or failed: nothing was done; try later."""


class Conflict(DatabaseError):
    """A constraint of the schema refused the change (a duplicate name,
    an address already held ...)."""


class TryAgain(Exception):
    """A transaction to run again (the engine asks, or the function
    raises it: e.g. an address another transaction took meanwhile)."""


def _redacted(url):
    """``url`` without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


class Transaction:
    """One open transaction: ``execute``, ``query``, ``insert``."""

    def __init__(self, store, cursor):
        self._store = store
        self._cursor = cursor
        self.engine = store.engine

    def execute(self, sql, params=()):
        """-> the number of rows changed."""
        self._store._execute(self._cursor, sql, params)
        return self._cursor.rowcount

    def query(self, sql, params=()):
        self._store._execute(self._cursor, sql, params)
        return [tuple(row) for row in self._cursor.fetchall()]

    def lock(self, table):
        """Let no other transaction write ``table`` until this one ends.
        PostgreSQL: first in the transaction, before its snapshot is taken,
        so that it sees what the previous holder committed (otherwise
        SERIALIZABLE makes it run again). SQLite: nothing to do (BEGIN
        IMMEDIATE lets one writer in at a time)."""
        if self.engine == "postgresql":
            self.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")

    def insert(self, sql, params=()):
        """An INSERT ... RETURNING id -> that id."""
        self._store._execute(self._cursor, sql, params)
        return self._cursor.fetchone()[0]


class Store:
    """One database (see the module docstring). ``Store.open(url)``."""

    def __init__(self, url, *, retries=DEFAULT_RETRIES, sleep=time.sleep):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme == "sqlite":
            self.engine = "sqlite"
            self._path = url[len("sqlite://"):]
            if self._path.startswith("/:memory:"):
                self._path = ":memory:"
            if not self._path or (self._path != ":memory:" and not self._path.startswith("/")):
                raise DatabaseError(f"{url}: a SQLite URL is sqlite:///absolute/path.db "
                                    "(or sqlite:///:memory:)")
        elif scheme in ("postgresql", "postgres"):
            self.engine = "postgresql"
        else:
            raise DatabaseError(f"{_redacted(url)}: the database URL must start with "
                                "sqlite:/// or postgresql://")
        self.url = url
        self.retries = retries
        self._sleep = sleep
        self._connection = None
        self._sql = {}
        self._engine_errors()

    @classmethod
    def open(cls, url, **kwargs):
        return cls(url, **kwargs)

    def describe(self):
        return _redacted(self.url)

    # -- connections --------------------------------------------------------------

    def _engine_errors(self):
        if self.engine == "sqlite":
            self._integrity = (sqlite3.IntegrityError,)
            self._unavailable = (sqlite3.OperationalError, sqlite3.DatabaseError)
            self._retry = ()
            self._psycopg = None
            return
        try:
            import psycopg
            from psycopg import errors
        except ImportError as e:
            raise DatabaseError(f"PostgreSQL needs psycopg 3 (pip install "
                                f"'psycopg[binary]'): {e}") from None
        self._psycopg = psycopg
        self._integrity = (psycopg.IntegrityError,)
        self._retry = (errors.SerializationFailure, errors.DeadlockDetected,
                       errors.LockNotAvailable)
        self._unavailable = (psycopg.OperationalError, psycopg.InterfaceError)

    def _connect(self):
        if self._connection is not None:
            return self._connection
        try:
            if self.engine == "sqlite":
                connection = sqlite3.connect(self._path, timeout=CONNECT_TIMEOUT,
                                             isolation_level=None, check_same_thread=False)
                connection.execute("PRAGMA foreign_keys = ON")
                if self._path != ":memory:":
                    connection.execute("PRAGMA journal_mode = WAL")
            else:
                psycopg = self._psycopg
                connection = psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT,
                                             autocommit=False)
                connection.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        except self._unavailable as e:
            raise DatabaseUnavailable(f"{self.describe()}: {_first_line(e)}") from None
        self._connection = connection
        return connection

    def close(self):
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # closing a broken connection: nothing to save
                pass

    # -- statements -----------------------------------------------------------------

    def _spelled(self, sql):
        if self.engine == "sqlite":
            return sql
        spelled = self._sql.get(sql)
        if spelled is None:
            spelled = self._sql[sql] = sql.replace("%", "%%").replace("?", "%s")
        return spelled

    def _execute(self, cursor, sql, params):
        try:
            cursor.execute(self._spelled(sql), tuple(params))
        except Exception as e:
            raise self._translated(e) from None

    def _translated(self, error):
        """An engine's exception -> the store's."""
        text = _first_line(error)
        if isinstance(error, self._integrity):
            return Conflict(text)
        if isinstance(error, self._retry):
            return TryAgain(text)
        if self.engine == "sqlite":
            if isinstance(error, sqlite3.OperationalError):
                if "locked" in text or "busy" in text:
                    return TryAgain(text)
                if text.startswith(("no such", "near ", "table ", "index ")) or "syntax" in text:
                    return DatabaseError(f"{self.describe()}: {text}")
            elif not isinstance(error, sqlite3.DatabaseError):
                return error
        elif not isinstance(error, self._unavailable):
            if isinstance(error, self._psycopg.Error):
                return DatabaseError(f"{self.describe()}: {text}")
            return error
        return DatabaseUnavailable(f"{self.describe()}: {text}")

    @contextmanager
    def transaction(self):
        """A transaction, committed when the block ends, rolled back if it
        raises. No retry (``run`` retries)."""
        connection = self._connect()
        try:
            if self.engine == "sqlite":
                cursor = connection.cursor()
                self._execute(cursor, "BEGIN IMMEDIATE", ())
            else:
                cursor = connection.cursor()
        except DatabaseUnavailable:
            self.close()
            raise
        try:
            yield Transaction(self, cursor)
        except BaseException as e:
            self._rollback(connection)
            if isinstance(e, DatabaseUnavailable):
                self.close()
            raise
        self._commit(connection, cursor)

    def _commit(self, connection, cursor):
        try:
            if self.engine == "sqlite":
                cursor.execute("COMMIT")
            else:
                connection.commit()
        except Exception as e:
            self._rollback(connection)
            error = self._translated(e)
            if isinstance(error, DatabaseUnavailable):
                self.close()
            raise error from None

    def _rollback(self, connection):
        try:
            if self.engine == "sqlite":
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
            else:
                connection.rollback()
        except Exception:  # the connection is gone: so is the transaction
            self.close()

    def run(self, function, *args, **kwargs):
        """``function(tx, *args, **kwargs)`` in a transaction -> its result;
        run again on a serialization failure (bounded) and once more on a
        fresh connection when the connection was lost."""
        reconnected = False
        attempt = 0
        while True:
            try:
                with self.transaction() as tx:
                    return function(tx, *args, **kwargs)
            except TryAgain as e:
                attempt += 1
                if attempt > self.retries:
                    raise DatabaseUnavailable(
                        f"{self.describe()}: the transaction kept conflicting with others "
                        f"({attempt} tries): {e}") from None
                self._sleep(min(0.5, 0.005 * 2 ** attempt))
            except DatabaseUnavailable:
                if reconnected or self._connection is not None:
                    raise
                # A connection lost since the last transaction: one more
                # try on a new one (the failed transaction was rolled back).
                reconnected = True

    # -- schema -------------------------------------------------------------------------

    def version(self):
        """-> the schema version of the database (0: none yet)."""
        def read(tx):
            return _schema_version(tx)
        return self.run(read)

    def migrate(self):
        """Create or upgrade the schema to ``SCHEMA_VERSION`` (one
        transaction) -> the version before."""
        def upgrade(tx):
            if self.engine == "postgresql":
                tx.query("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = _schema_version(tx)
            if current > SCHEMA_VERSION:
                raise DatabaseError(
                    f"{self.describe()}: the schema is version {current}, newer than this "
                    f"Usher's {SCHEMA_VERSION}: upgrade Usher")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    tx.execute(render(statement, self.engine))
            if current == 0:
                tx.execute("INSERT INTO schema_version (version) VALUES (?)",
                           (SCHEMA_VERSION,))
            elif current < SCHEMA_VERSION:
                tx.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            return current
        return self.run(upgrade)


def _schema_version(tx):
    if tx.engine == "sqlite":
        exists = tx.query("SELECT name FROM sqlite_master WHERE type = 'table' "
                          "AND name = 'schema_version'")
    else:
        exists = tx.query("SELECT to_regclass('schema_version')")
        exists = [row for row in exists if row[0] is not None]
    if not exists:
        return 0
    rows = tx.query("SELECT version FROM schema_version")
    return rows[0][0] if rows else 0


def _first_line(error):
    text = str(error).strip() or error.__class__.__name__
    return text.splitlines()[0]
