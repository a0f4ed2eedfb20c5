"""Where the controller keeps what it persists (the LNMs it knows with their
holds, the affinity rules, the leases plugin's leases): one seam,
``IStateStore``, with two implementations.

- ``FileStateStore``: today's files in ``state_dir`` (``<name>.json``,
  rewritten atomically by ``usher.persist``), the default of one controller.
- ``PgStateStore``: the table ``usher_state`` of the HA database (README, "A
  standby controller"). Every write is fenced by the term of leadership: it
  commits only while ``usher_leadership.term`` is still this controller's
  term, so a deposed leader's write fails (``StaleTerm``) and it steps down.

Both are write-behind: ``save(name, data)`` returns at once with a Deferred
that fires once that data (or newer) is durable; saves made while one write
runs share the next (a burst is one or two writes). The blocking work runs in
a thread (``run``: ``f, *args -> Deferred``), never on the reactor; a
``FileStateStore`` without ``run`` writes synchronously (as the LNM list
always has). ``load(name)`` is synchronous: files are read at start-up, a
``PgStateStore`` serves what ``load_all()`` fetched (off the reactor) when
the controller became active.
"""

import copy
import json
import os

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from usher.errors import StaleTerm
from usher.persist import read_json, remove_leftovers, write_json_atomic

log = Logger()

# Names of the state kept (a file <name>.json, a row of usher_state).
LNMS = "lnms"
AFFINITY = "affinity"
LEASES = "leases"

# The temporary-file prefixes of today's files (lnms.json has its own).
_PREFIXES = {LNMS: ".lnms."}


class IStateStore(Interface):
    def load(name):
        """-> the data saved under ``name``, None if none. Raises OSError
        or ValueError for a file that cannot be read (the caller decides)."""

    def save(name, data):
        """Persist ``data`` (JSON-able, copied now) under ``name``, soon ->
        Deferred fired once it (or newer data) is durable; fails with the
        write's error (``StaleTerm`` for a fenced write)."""

    def flushed():
        """-> Deferred fired once every save so far is done."""


class _Coalescer:
    """One write at a time per name; the latest data wins."""

    def __init__(self, write):
        self._write = write            # (name, data) -> Deferred
        self._pending = {}             # name -> data not written yet
        self._waiters = {}             # name -> [Deferred] of those saves
        self._running = {}             # name -> Deferred of the write running

    def save(self, name, data):
        self._pending[name] = copy.deepcopy(data)
        d = defer.Deferred()
        self._waiters.setdefault(name, []).append(d)
        if name not in self._running:
            self._next(name)
        return d

    def _next(self, name):
        data = self._pending.pop(name)
        waiters = self._waiters.pop(name, [])
        try:
            running = self._write(name, data)
        except Exception:
            running = defer.fail()
        self._running[name] = running

        def done(result):
            del self._running[name]
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(None)
            if name in self._pending:
                self._next(name)
            return None
        running.addBoth(done)

    @defer.inlineCallbacks
    def flushed(self):
        while self._running:
            try:
                yield next(iter(self._running.values()))
            except Exception:
                pass


@implementer(IStateStore)
class FileStateStore:
    """``<state_dir>/<name>.json``. ``run``: the thread runner (None: write
    synchronously); may also be given later as a zero-argument function
    returning it (``run_getter``), e.g. the plugin API's ``run_in_thread``."""

    def __init__(self, state_dir, run=None, *, run_getter=None):
        self.state_dir = state_dir
        self._run = run
        self._run_getter = run_getter
        self._writes = _Coalescer(self._write)

    def path(self, name):
        return os.path.join(self.state_dir, f"{name}.json")

    def load(self, name):
        path = self.path(name)
        remove_leftovers(path, prefix=_PREFIXES.get(name))
        return read_json(path, None)

    def _write(self, name, data):
        run = self._run or (self._run_getter() if self._run_getter else None)
        args = (self.path(name), data)
        kwargs = {"prefix": _PREFIXES.get(name)}
        if run is None:
            write_json_atomic(*args, **kwargs)
            return defer.succeed(None)
        return run(lambda: write_json_atomic(*args, **kwargs))

    def save(self, name, data):
        return self._writes.save(name, data)

    def flushed(self):
        return self._writes.flushed()


SCHEMA = """
CREATE TABLE IF NOT EXISTS usher_state (
    name text PRIMARY KEY,
    data jsonb NOT NULL,
    term bigint NOT NULL,
    updated timestamptz NOT NULL DEFAULT now())
"""


def redact_dsn(dsn):
    """A libpq connection string with any password replaced (for logs)."""
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo
        params = conninfo_to_dict(dsn)
        if "password" in params:
            params["password"] = "***"
        return make_conninfo(**params)
    except Exception:
        return "(a connection string that does not parse)"


@implementer(IStateStore)
class PgStateStore:
    """The table ``usher_state`` (name, data jsonb, term, updated).
    ``connect()`` -> a psycopg connection (called in a thread); ``run``
    the thread runner; ``term()`` -> this controller's term of leadership;
    ``on_fenced(error)`` is called (on the reactor) when a write is fenced
    off or the database refuses it."""

    def __init__(self, connect, run, *, term, on_fenced=None):
        self._connect = connect
        self._run = run
        self._term = term
        self.on_fenced = on_fenced
        self._conn = None
        self._cache = {}
        self._writes = _Coalescer(self._write)
        self.writes = 0

    # -- the thread side ---------------------------------------------------------

    def _connection(self):
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
            self._conn.autocommit = True
            self._conn.execute(SCHEMA)
        return self._conn

    def _drop_connection(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _load_all_blocking(self):
        try:
            rows = self._connection().execute("SELECT name, data FROM usher_state").fetchall()
        except Exception:
            self._drop_connection()
            raise
        return {name: data for name, data in rows}

    def _write_blocking(self, name, text, term):
        from psycopg import errors as pgerrors
        try:
            conn = self._connection()
            with conn.transaction():
                row = conn.execute(
                    "SELECT term FROM usher_leadership WHERE id = 1 FOR SHARE").fetchone()
                current = row[0] if row else None
                if current != term:
                    raise StaleTerm(f"the write of {name} was fenced off: this controller's "
                                    f"term is {term}, the database's {current}")
                conn.execute(
                    "INSERT INTO usher_state (name, data, term, updated) "
                    "VALUES (%s, %s::jsonb, %s, now()) ON CONFLICT (name) DO UPDATE "
                    "SET data = EXCLUDED.data, term = EXCLUDED.term, updated = now()",
                    (name, text, term))
        except StaleTerm:
            raise
        except pgerrors.UndefinedTable:
            raise StaleTerm(f"the write of {name} was fenced off: no leadership "
                            "table") from None
        except Exception:
            self._drop_connection()
            raise

    # -- the reactor side --------------------------------------------------------

    def load_all(self):
        """Fetch every saved state (off the reactor) -> Deferred; ``load``
        then serves it."""
        d = self._run(self._load_all_blocking)

        def got(rows):
            self._cache = rows
            return rows
        return d.addCallback(got)

    def load(self, name):
        data = self._cache.get(name)
        return copy.deepcopy(data) if data is not None else None

    def _write(self, name, data):
        self._cache[name] = data
        text = json.dumps(data, sort_keys=True)
        d = self._run(self._write_blocking, name, text, self._term())

        def written(_):
            self.writes += 1

        def failed(failure):
            log.error("the state {name} could not be written to the HA database: {error}",
                      name=name, error=failure.getErrorMessage())
            if self.on_fenced is not None:
                self.on_fenced(failure.value)
            return failure
        return d.addCallbacks(written, failed)

    def save(self, name, data):
        return self._writes.save(name, data)

    def flushed(self):
        return self._writes.flushed()

    def close(self):
        """Drop the connection (in a thread)."""
        return self._run(self._drop_connection)
