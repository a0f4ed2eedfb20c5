"""LDAP: a branch in the site's directory for each virtual cluster, holding its owner as an admin.

The paper's UCSD deployment ("Support Services" -> "LDAP"): "for each
virtual cluster a user creates, a branch in the directory" through which
the user's one global entry (their Usher credentials) logs them into the
cluster's VMs. Against an OpenLDAP ``slapd`` (``url``, ``base_dn``; the
plugin binds as ``bind_dn`` with the password of ``bind_password_file``).

- ``register_vm`` and ``vm_adopted``: the cluster's branch
  ``ou=CLUSTER,ou=OWNER,ou=clusters,BASE`` is made if missing (the owner's
  container, ``ou=people`` with the owner as an alias of
  ``uid=OWNER,ou=people,BASE``, ``ou=groups`` with ``cn=admin`` holding the
  owner). The start waits for it at most a few seconds (``BRANCH_WAIT``,
  within the plugin's ``timeout``): a directory down or slow is logged and
  the start goes on; the branch follows when the directory is back.
- ``vm_removed``, when it was the cluster's last VM:
  ``cluster_branch_policy = delete`` (default) removes the whole branch,
  accounts the user added with the in-VM tool (``usher-cluster-ldap``)
  included; ``keep`` leaves it.
- After the controller's recovery has settled, and every
  ``reconcile_interval`` seconds: every cluster with VMs has its branch
  (made or completed); under ``delete`` branches of clusters without VMs go.

Every directory call runs off the reactor (``api.run_blocking``), each
bounded by ``call_timeout``. A directory that is down is logged once per
outage and retried with backoff (``RETRY_INITIAL`` .. ``RETRY_MAX`` s) by a
full reconciliation. The logic is in ``branches``; the directory client in
``directory``; the users' authentication module in ``auth``; the access
rules in ``acl``. Sample configuration: ``etc/plugins/ldap.config``.
"""

from twisted.internet import defer, task
from twisted.logger import Logger

from usher.plugins.ldap.branches import BranchKeeper
from usher.plugins.ldap.config import CONFIG_SPEC, DEFAULT_ORDER  # noqa: F401 (the loader's)
from usher.plugins.ldap.directory import Directory, DirectoryConfig, DirectoryUnavailable

logger = Logger()

# Seconds a start waits for its cluster's branch at most (less when the
# plugin's own ``timeout`` is shorter): the branch is not needed before the
# guest boots, and a slow directory must not slow down starts.
BRANCH_WAIT = 5.0
# Seconds between the probes of a directory that is down (doubling).
RETRY_INITIAL = 1.0
RETRY_MAX = 60.0
CONFIG_SOURCE = "the ldap plugin's configuration"


class Plugin:
    name = "ldap"

    def __init__(self, config, api, *, directory=None):
        self.api = api
        self.clock = api.clock
        self.config = dict(config)
        self.directory = directory if directory is not None else Directory(
            DirectoryConfig.from_plugin_config(config, source=CONFIG_SOURCE))
        self.keeper = BranchKeeper(
            self.directory, run_blocking=api.run_blocking, clock=api.clock, live=self._live,
            policy=config.get("cluster_branch_policy") or "delete",
            retry_initial=RETRY_INITIAL, retry_max=RETRY_MAX)
        timeout = config.get("timeout")
        self.branch_wait = min(BRANCH_WAIT, 0.8 * timeout) if timeout else BRANCH_WAIT
        self.reconcile_interval = config.get("reconcile_interval") or 60.0
        self._loop = task.LoopingCall(self._periodic)
        self._loop.clock = api.clock
        self._stopped = False
        # Fires (with the first reconciliation's Reconciled, None if the
        # directory was down) once the plugin reconciled after recovery.
        self.reconciled = defer.Deferred()
        defer.Deferred.fromCoroutine(self._after_settled()).addErrback(
            lambda f: logger.failure("LDAP plugin: reconciling the cluster branches after "
                                     "recovery failed", f))

    def _live(self):
        """-> the (owner, cluster) of every VM in the global state."""
        return {(record.get("owner"), record.get("cluster"))
                for record in self.api.state.vms.values()}

    # -- reconciliation ------------------------------------------------------------------

    async def _after_settled(self):
        await self.api.settled()
        if self._stopped:
            return
        # From now on the state is whole: a cluster without VMs has none.
        self.keeper.ready = True
        result = None
        try:
            result = await self.keeper.reconcile()
        except DirectoryUnavailable:
            pass          # logged as an outage; its probe reconciles when the directory is back
        except Exception:
            pass          # logged where it happened; the periodic reconciliation tries again
        finally:
            if not self._stopped:
                self._loop.start(self.reconcile_interval, now=False)
            if not self.reconciled.called:
                self.reconciled.callback(result)

    def _periodic(self):
        if self.keeper.down:
            return None   # the outage's probe reconciles
        d = self.keeper.reconcile()
        d.addErrback(lambda _f: None)   # logged where it happened
        return d

    def stop(self):
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        self.keeper.stop()

    # -- events --------------------------------------------------------------------------

    def entry_point(self, event):
        handler = getattr(self, "_on_" + event.name, None)
        if handler is None:
            return None
        return handler(event)

    async def _ensure_branch(self, event):
        record = event.vm
        owner, cluster = record.get("owner"), record.get("cluster")
        waited = self.keeper.request(owner, cluster)
        waited.addTimeout(self.branch_wait, self.clock)
        try:
            await waited
        except defer.TimeoutError:
            logger.warn("LDAP plugin: the branch of cluster {cluster} ({owner}) is not ready "
                        "after {seconds} s; {vm} starts meanwhile, the branch follows",
                        cluster=cluster, owner=owner, seconds=self.branch_wait,
                        vm=record.get("name"))
        except Exception:
            pass          # an outage (logged once) or an error logged where it happened

    _on_register_vm = _ensure_branch
    _on_vm_adopted = _ensure_branch

    def _on_vm_removed(self, event):
        # Its job looks at the global state when it runs: the branch goes
        # only if no VM of the cluster is left (or came since).
        record = event.vm
        self.keeper.sync(record.get("owner"), record.get("cluster"))
