"""Leadership of an active/standby pair of controllers, held through
PostgreSQL (README, "A standby controller"; ``[ctrl] ha_database``).

The leader holds a session-level advisory lock (``pg_try_advisory_lock``) on
one dedicated connection, with TCP keepalives set on both sides so that a
dead peer's session ends within seconds and the lock with it. On winning
the lock it takes a new TERM, ``usher_leadership.term + 1`` (terms only
grow); every state write of the store is fenced by it
(``usher.controller.store.PgStateStore``) and the LNMs obey only the highest
term they have seen (``usher.protocol``, "Controller terms").

``Leadership`` is the small state machine on the reactor:

    standby --(lock won, term taken)--> acquiring --> active
    active --(no successful check for ha_lost_after, the term moved on,
              a fenced write)--> stepping_down --> standby

Every ``check_interval`` a standby tries the lock and an active one checks
that the term is still its own. The blocking database work (``LeadershipDB``,
psycopg) runs in the controller's thread pool, never on the reactor.
"""

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger()

# The advisory lock's key ("usher" in ASCII).
LOCK_KEY = 0x7573686572

STANDBY = "standby"
ACQUIRING = "acquiring"
ACTIVE = "active"
STEPPING_DOWN = "stepping_down"

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS usher_leadership ("
    " id integer PRIMARY KEY CHECK (id = 1),"
    " term bigint NOT NULL DEFAULT 0,"
    " holder text,"
    " since timestamptz)",
    "INSERT INTO usher_leadership (id, term) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
)


def connect(dsn, *, lost_after=5.0, application_name="usherctrl"):
    """A psycopg connection (autocommit) with TCP keepalives on both sides
    and timeouts bounded by ``lost_after``."""
    import psycopg
    seconds = max(1, int(lost_after))
    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=max(2, seconds),
                           keepalives=1, keepalives_idle=1, keepalives_interval=1,
                           keepalives_count=max(2, seconds), tcp_user_timeout=seconds * 1000,
                           application_name=application_name)
    for setting, value in (("tcp_keepalives_idle", 1), ("tcp_keepalives_interval", 1),
                           ("tcp_keepalives_count", max(2, seconds)),
                           ("tcp_user_timeout", seconds * 1000),
                           ("statement_timeout", seconds * 1000)):
        conn.execute(f"SET {setting} = {int(value)}")
    return conn


class LeadershipDB:
    """The blocking side (called in a thread): one dedicated connection
    that holds the lock while this controller leads."""

    def __init__(self, connect):
        self._connect = connect           # () -> psycopg connection
        self.conn = None

    def _connection(self):
        if self.conn is None or self.conn.closed:
            self.conn = self._connect()
        return self.conn

    def try_acquire(self, name):
        """-> (term, holder): term None when another session holds the lock
        (holder: who, as far as the table says)."""
        from psycopg import errors as pgerrors
        try:
            conn = self._connection()
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]
            if not got:
                try:
                    row = conn.execute(
                        "SELECT holder, term FROM usher_leadership WHERE id = 1").fetchone()
                except pgerrors.UndefinedTable:
                    row = None
                return None, (row[0] if row else None)
            for statement in SCHEMA:
                conn.execute(statement)
            term = conn.execute(
                "UPDATE usher_leadership SET term = term + 1, holder = %s, since = now() "
                "WHERE id = 1 RETURNING term", (name,)).fetchone()[0]
            return term, name
        except Exception:
            self.close()
            raise

    def check(self, term):
        """-> is ``term`` still the current one (and this session alive)?"""
        try:
            row = self.conn.execute("SELECT term FROM usher_leadership WHERE id = 1").fetchone()
        except Exception:
            self.close()
            raise
        return bool(row) and row[0] == term

    def close(self):
        """Drop the connection (and with it the lock)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


class Leadership(service.Service):
    """``db``: a ``LeadershipDB`` (or a double with ``try_acquire(name)``,
    ``check(term)``, ``close()``); ``run(f, *args) -> Deferred`` runs them
    off the reactor. ``on_active(term) -> Deferred|None`` opens for
    business (its failure steps down); ``on_standby(reason) ->
    Deferred|None`` stops commanding."""

    def __init__(self, db, run, *, name, clock, check_interval=1.0, lost_after=5.0,
                 on_active=None, on_standby=None):
        self.db = db
        self.run = run
        self.name = name
        self.clock = clock
        self.check_interval = check_interval
        self.lost_after = lost_after
        self.on_active = on_active
        self.on_standby = on_standby
        self.state = STANDBY
        self.term = 0
        self.holder = None           # the active one's name, as last seen
        self.last_ok = None
        self.transitions = []        # (state, term) in order (tests, logs)
        self._busy = None            # the Deferred of the database call running
        self._loop = None
        self._failing = False
        self._cycling = False

    # -- life cycle ------------------------------------------------------------

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.check_interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        d = defer.succeed(None)
        if self.state == ACTIVE:
            d = self.step_down("the controller is stopping")
        # The thread pools stop with the controller: the connection is
        # closed here (it only sends the session's end).
        return d.addBoth(lambda _: self.db.close())

    @property
    def active(self):
        return self.state == ACTIVE

    def _set(self, state):
        previous, self.state = self.state, state
        # A standby's tries (standby -> acquiring -> standby each check) are
        # logged once.
        quiet = {previous, state} <= {STANDBY, ACQUIRING}
        if quiet and self._cycling:
            return
        self._cycling = quiet
        self.transitions.append((state, self.term))
        log.info("HA: {name} is {state} (term {term})", name=self.name, state=state,
                 term=self.term)

    # -- the periodic step -----------------------------------------------------

    def tick(self):
        if self.state == ACTIVE and self.clock.seconds() - self.last_ok > self.lost_after:
            self.step_down(f"no successful check of the database for {self.lost_after:g} s")
            return
        if self._busy is not None:
            return
        if self.state == STANDBY:
            self._set(ACQUIRING)
            self._call(self.db.try_acquire, self.name).addCallbacks(
                self._acquired, self._not_acquired)
        elif self.state == ACTIVE:
            self._call(self.db.check, self.term).addCallbacks(self._checked,
                                                             self._check_failed)

    def _call(self, f, *args):
        d = self.run(f, *args)
        self._busy = d

        def done(result):
            if self._busy is d:
                self._busy = None
            return result
        return d.addBoth(done)

    def _acquired(self, result):
        term, holder = result
        self.holder = holder
        if self.state != ACQUIRING:
            return None
        if term is None:
            self._set(STANDBY)
            return None
        if term <= self.term:
            log.error("HA: the database gave term {got}, not above {term}: standing by",
                      got=term, term=self.term)
            self._set(STANDBY)
            return self.run(self.db.close)
        self.term = term
        self.last_ok = self.clock.seconds()
        self._failing = False
        self._set(ACTIVE)
        d = defer.maybeDeferred(self.on_active, term) if self.on_active else defer.succeed(None)

        def could_not(failure):
            log.failure("HA: could not open for business in term {term}", failure,
                        term=term)
            return self.step_down("opening for business failed")
        return d.addErrback(could_not)

    def _not_acquired(self, failure):
        if not self._failing:
            log.warn("HA: {name} cannot reach the HA database: {error}", name=self.name,
                     error=failure.getErrorMessage())
        self._failing = True
        if self.state == ACQUIRING:
            self._set(STANDBY)

    def _checked(self, still_ours):
        if self.state != ACTIVE:
            return None
        if not still_ours:
            return self.step_down("the database holds a newer term")
        self.last_ok = self.clock.seconds()
        self._failing = False
        return None

    def _check_failed(self, failure):
        if not self._failing:
            log.warn("HA: the check of the database failed (term {term}): {error}",
                     term=self.term, error=failure.getErrorMessage())
        self._failing = True

    # -- stepping down ---------------------------------------------------------

    def fenced(self, error):
        """A state write of this term was refused: step down at once."""
        if self.state == ACTIVE:
            self.step_down(f"a state write was refused: {error}")

    def step_down(self, reason):
        if self.state != ACTIVE:
            return defer.succeed(None)
        log.warn("HA: {name} steps down from term {term}: {reason}", name=self.name,
                 term=self.term, reason=reason)
        self._set(STEPPING_DOWN)
        d = (defer.maybeDeferred(self.on_standby, reason) if self.on_standby
             else defer.succeed(None))
        d.addErrback(lambda f: log.failure("HA: stepping down", f))
        # The lock goes with the connection (never reused while active).
        d.addBoth(lambda _: self.run(self.db.close) if self.running else self.db.close())
        d.addErrback(lambda _f: None)

        def standby(_):
            self._busy = None
            self._set(STANDBY)
        return d.addCallback(standby)
