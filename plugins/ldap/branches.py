"""Keeping each virtual cluster's LDAP branch in step with the VMs.

A cluster ``(owner, cluster)`` with at least one VM in the global state has
its branch (``ou=CLUSTER,ou=OWNER,ou=clusters,BASE``, made by
``Directory.ensure_cluster_branch``); under the ``delete`` policy a branch
whose cluster has no VM left is removed, whole subtree, accounts the user
added included (``keep``: left for the user or the site to remove).

Every change is computed, not remembered: a job for one cluster looks at the
global state when it runs and makes the directory match (so a start that
comes while the last VM's removal is on its way keeps the branch, and any
number of events for one cluster coalesce into at most one job running and
one waiting). Jobs of one cluster never overlap; those of different
clusters run side by side on the plugin threads (``run_blocking``).

An unreachable directory (``DirectoryUnavailable``) is one outage: logged
once, then probed with exponential backoff (``retry_initial`` ..
``retry_max``) by a full reconciliation, which catches up with whatever
changed meanwhile; while it lasts, requests fail at once instead of tying up
threads. Nothing here blocks the reactor or has a clock of its own: the
plugin gives ``run_blocking`` and ``clock`` (tests: synchronous calls and
``task.Clock``).
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from usher.errors import UsherError
from usher.naming import check_label, check_user
from usher.plugins.ldap.directory import DirectoryUnavailable

log = Logger()

POLICY_DELETE = "delete"
POLICY_KEEP = "keep"
POLICIES = (POLICY_DELETE, POLICY_KEEP)

# What a job did to its cluster's branch.
ENSURED = "ensured"      # the cluster has VMs: the branch is there (made if missing)
REMOVED = "removed"      # no VM left, policy delete: the branch is gone
LEFT = "left"            # no VM left, policy keep (or not yet settled): untouched


def checked_key(owner, cluster):
    """-> (owner, cluster) if both are names the directory may hold, else
    None (defence in depth: the controller validated them already)."""
    try:
        return check_user(owner), check_label(cluster, "cluster name")
    except UsherError:
        return None


class _Job:
    """One cluster's work: whether a call is on its way, whether another run
    was asked for meanwhile, and who waits for the outcome."""

    __slots__ = ("running", "again", "waiters")

    def __init__(self):
        self.running = False
        self.again = False
        self.waiters = []


class Reconciled:
    """What a reconciliation did: the clusters whose branch it made sure of,
    removed, and those it could not handle."""

    def __init__(self):
        self.ensured = []
        self.removed = []
        self.failed = []

    def __repr__(self):
        return (f"<Reconciled ensured={self.ensured} removed={self.removed} "
                f"failed={self.failed}>")


class BranchKeeper:
    """The cluster branches of one directory.

    ``directory``: a ``Directory`` (blocking; only called through
    ``run_blocking``). ``live()``: -> the set of ``(owner, cluster)`` of the
    VMs in the global state, read on the reactor. Removals wait until
    ``ready`` is set (the controller's state is rebuilt): before that a
    cluster may look empty only because its VMs are not back yet.
    """

    def __init__(self, directory, *, run_blocking, clock, live, policy=POLICY_DELETE,
                 retry_initial=1.0, retry_max=60.0):
        if policy not in POLICIES:
            raise ValueError(f"unknown cluster branch policy {policy!r}")
        self.directory = directory
        self.run_blocking = run_blocking
        self.clock = clock
        self.live = live
        self.policy = policy
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.ready = False
        self.down_since = None        # clock time the outage began, None: reachable
        self.last_error = None
        self._delay = retry_initial
        self._probe_call = None
        self._jobs = {}               # (owner, cluster) -> _Job
        self._reconciling = None      # Deferred of the reconciliation under way
        self._reconcile_next = None   # Deferred of the one asked for meanwhile
        self._idle_waiters = []
        self._stopped = False

    @property
    def down(self):
        return self.down_since is not None

    # -- one cluster ---------------------------------------------------------------

    def request(self, owner, cluster):
        """Make the branch of ``(owner, cluster)`` match the global state.
        -> Deferred firing with ENSURED, REMOVED or LEFT once it does, or
        failing (``DirectoryUnavailable`` at once while the directory is
        down: the outage's probe catches up later). Cancelling the Deferred
        (a bounded wait) leaves the work going on."""
        key = checked_key(owner, cluster)
        if key is None:
            log.error("LDAP plugin: VM of owner {owner!r}, cluster {cluster!r}: not names a "
                      "directory entry may have; its cluster branch is left alone",
                      owner=owner, cluster=cluster)
            return defer.fail(UsherError(f"invalid owner or cluster name: {owner!r}, "
                                         f"{cluster!r}"))
        if self._stopped:
            return defer.fail(UsherError("the LDAP plugin is stopped"))
        if self.down:
            return defer.fail(DirectoryUnavailable(
                f"the directory is unavailable ({self.last_error}); the branch of "
                f"{cluster} ({owner}) follows when it is back"))
        job = self._jobs.setdefault(key, _Job())

        def forget(waiter):
            if waiter in job.waiters:
                job.waiters.remove(waiter)
        waiter = defer.Deferred(canceller=forget)
        job.waiters.append(waiter)
        if job.running:
            job.again = True
        else:
            self._run(key, job)
        return waiter

    def sync(self, owner, cluster):
        """``request`` without waiting: failures are logged where they happen."""
        self.request(owner, cluster).addErrback(lambda _f: None)

    def _run(self, key, job):
        job.running = True
        job.again = False
        owner, cluster = key
        if key in self.live():
            action, call = ENSURED, self.directory.ensure_cluster_branch
        elif self.policy == POLICY_DELETE and self.ready:
            action, call = REMOVED, self.directory.remove_cluster_branch
        else:
            self._finished(key, job, LEFT, None)
            return
        d = self.run_blocking(call, owner, cluster)
        d.addCallbacks(lambda changed: self._finished(key, job, action, changed),
                       lambda failure: self._failed(key, job, action, failure))
        d.addErrback(lambda failure: log.failure(
            "LDAP plugin: handling the outcome for the branch of {cluster} ({owner}) failed",
            failure, owner=owner, cluster=cluster))

    def _finished(self, key, job, action, changed):
        owner, cluster = key
        if action != LEFT:
            self._reachable()
        if changed:
            log.info("LDAP plugin: cluster branch of {cluster} ({owner}) {action}",
                     owner=owner, cluster=cluster,
                     action="made" if action == ENSURED else "removed")
        self._settle(key, job, lambda waiter: waiter.callback(action))

    def _failed(self, key, job, action, failure):
        owner, cluster = key
        if failure.check(DirectoryUnavailable):
            self._outage(failure.value)
        else:
            log.failure("LDAP plugin: the branch of cluster {cluster} ({owner}) could not be "
                        "{what}", failure, owner=owner, cluster=cluster,
                        what="made" if action == ENSURED else "removed")
        self._settle(key, job, lambda waiter: waiter.errback(failure))

    def _settle(self, key, job, outcome):
        job.running = False
        if job.again and not self._stopped and not self.down:
            self._run(key, job)      # its waiters want the state after the last event
            return
        waiters, job.waiters = job.waiters, []
        del self._jobs[key]
        for waiter in waiters:
            outcome(waiter)
        self._maybe_idle()

    # -- the whole directory -------------------------------------------------------------

    def reconcile(self):
        """Make every branch match the global state: each cluster with VMs
        has its branch (made or completed); under ``delete`` (once ``ready``)
        each branch without VMs goes. -> Deferred of a ``Reconciled``;
        ``DirectoryUnavailable`` at once while the directory is down. One at
        a time: asked during one, the next runs after it."""
        if self._stopped:
            return defer.fail(UsherError("the LDAP plugin is stopped"))
        if self.down:
            return defer.fail(DirectoryUnavailable(
                f"the directory is unavailable ({self.last_error})"))
        return self._reconcile_soon()

    def _reconcile_soon(self):
        """-> a Deferred of the reconciliation under way, or of the next one
        (started when the one under way ends: it may have read the state
        before what the caller wants reconciled)."""
        follower = defer.Deferred()
        if self._reconciling is None:
            self._reconciling = [follower]
            self._start_reconcile()
        else:
            if self._reconcile_next is None:
                self._reconcile_next = []
            self._reconcile_next.append(follower)
        return follower

    def _start_reconcile(self):
        d = defer.Deferred.fromCoroutine(self._reconcile())
        d.addBoth(self._reconciled)

    def _reconciled(self, result):
        followers, self._reconciling = self._reconciling, None
        following, self._reconcile_next = self._reconcile_next, None
        if following is not None:
            if self._stopped:
                for waiter in following:
                    waiter.errback(UsherError("the LDAP plugin is stopped"))
            else:
                self._reconciling = following
                self._start_reconcile()
        for waiter in followers:
            if not waiter.called:          # (unless its holder gave up waiting)
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
        self._maybe_idle()

    async def _reconcile(self):
        try:
            existing = await self.run_blocking(self.directory.cluster_branches)
        except DirectoryUnavailable as e:
            self._outage(e)
            raise
        except Exception:
            log.failure("LDAP plugin: the cluster branches could not be listed")
            raise
        self._reachable()
        if self._stopped:
            raise UsherError("the LDAP plugin is stopped")
        keys = set()
        for owner, cluster in self.live():
            key = checked_key(owner, cluster)
            if key is not None:
                keys.add(key)
        if self.policy == POLICY_DELETE and self.ready:
            for owner, cluster in existing:
                key = checked_key(owner, cluster)
                if key is None:
                    log.warn("LDAP plugin: a cluster branch with a name Usher never makes is "
                             "left alone: {owner!r}, {cluster!r}", owner=owner, cluster=cluster)
                else:
                    keys.add(key)
        keys = sorted(keys)
        outcomes = await defer.DeferredList([self.request(*key) for key in keys],
                                            consumeErrors=True)
        result = Reconciled()
        for key, (ok, value) in zip(keys, outcomes):
            if not ok:
                result.failed.append(key)
            elif value == ENSURED:
                result.ensured.append(key)
            elif value == REMOVED:
                result.removed.append(key)
        made = sorted(set(result.ensured) - {tuple(k) for k in existing})
        if made or result.removed or result.failed:
            log.info("LDAP plugin: cluster branches reconciled with the VMs: {made} made, "
                     "{removed} removed, {failed} failed", made=len(made),
                     removed=len(result.removed), failed=len(result.failed))
        return result

    # -- outages ---------------------------------------------------------------------------

    def _outage(self, error):
        self.last_error = str(error)
        if self.down or self._stopped:
            return
        self.down_since = self.clock.seconds()
        self._delay = self.retry_initial
        log.error("LDAP plugin: the directory is unavailable ({error}); cluster branches "
                  "are made and removed when it is back (next try in {delay} s)",
                  error=self.last_error, delay=self._delay)
        self._schedule_probe()

    def _schedule_probe(self):
        if self._probe_call is None or not self._probe_call.active():
            self._probe_call = self.clock.callLater(self._delay, self._probe)

    def _probe(self):
        self._probe_call = None
        if self._stopped:
            return
        d = self._reconcile_soon()

        def still_down(failure):
            if self.down and not self._stopped:
                self._delay = min(self._delay * 2, self.retry_max)
                self._schedule_probe()
        d.addErrback(still_down)

    def _reachable(self):
        if not self.down:
            return
        log.info("LDAP plugin: the directory is back after {seconds} s; reconciling the "
                 "cluster branches", seconds=round(self.clock.seconds() - self.down_since, 1))
        self.down_since = None
        self._delay = self.retry_initial
        if self._probe_call is not None and self._probe_call.active():
            self._probe_call.cancel()
        self._probe_call = None
        if self._reconciling is None:
            # Back through a single cluster's call: catch up with the rest.
            self._reconcile_soon().addErrback(lambda _f: None)

    # -- life ----------------------------------------------------------------------------

    @property
    def busy(self):
        return bool(self._jobs) or self._reconciling is not None

    def idle(self):
        """-> Deferred firing once no job or reconciliation is under way."""
        if not self.busy:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def _maybe_idle(self):
        if self.busy:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def stop(self):
        self._stopped = True
        if self._probe_call is not None and self._probe_call.active():
            self._probe_call.cancel()
        self._probe_call = None
