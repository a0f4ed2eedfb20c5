"""Filesystem: prepares each VM's /net/global, /net/cluster and /net/local trees under an NFS export.

The paper's UCSD deployment ("Support Services": the NAS). Under the site's
``export_root`` (what it exports over NFS) each VM of user OWNER, cluster
CLUSTER, short name SHORT (``1.sneetch``) has three trees, owned by the
user's uid and gid, each with the System V ``etc/init.d`` and
``etc/rc0.d`` .. ``etc/rc6.d`` that the guest's ``usher-net-rc`` runs after
the system's own start-up::

    global/OWNER            mounted in the VM on /net/global
    cluster/OWNER/CLUSTER   on /net/cluster
    local/OWNER/SHORT       on /net/local

- ``start_request`` (order 55: after placement, before the SQL plugin's
  reservations): a start is refused, with the reason, when the export root
  is not usable (missing, not a directory, read-only) or an owner has no
  uid ("no uid for user X (uid_source = ...)"): no VM starts without its
  trees.
- ``register_vm``, ``vm_adopted``: the three trees made if missing
  (idempotent); a failure is logged and the start goes on.
- ``vm_removed``: the VM's local tree gets ``local_cleanup`` and, with the
  cluster's last VM, the cluster tree ``cluster_cleanup``: ``keep``,
  ``archive`` (renamed under ``archive_root`` with a UTC time stamp) or
  ``delete``. The global tree is never removed.
- After a controller recovery has settled: the trees of every VM that came
  back are made if missing and, with ``archive`` or ``delete``, trees of VMs
  and clusters that did not come back get their policy -- only trees whose
  names make a VM or cluster name; anything else is left alone.

Users write their trees over NFS, so the plugin (root) never follows a
symbolic link below the export root (``layout``). Uids come from NSS, the
configuration or LDAP (``owners``). Sample configuration:
``etc/plugins/filesystem.config``; the guest side is in ``guest/``.
"""

from twisted.internet import defer
from twisted.logger import Logger

from usher.errors import InvalidRequest
from usher.naming import split
from usher.plugins.filesystem import layout
from usher.plugins.filesystem.owners import IdsUnavailable
from usher.plugins.filesystem.settings import CONFIG_SPEC, DEFAULT_ORDER, Settings

__all__ = ["CONFIG_SPEC", "DEFAULT_ORDER", "Plugin"]

log = Logger()


class Plugin:
    name = "filesystem"

    def __init__(self, config, api, *, directory=None):
        self.api = api
        self.clock = api.clock
        self.settings = Settings.from_config(config, directory=directory)
        # File work one operation at a time: a cluster's clean-up and a new
        # VM of the same cluster never interleave.
        self._lock = defer.DeferredLock()
        self._stopped = False
        self.reconciled = defer.Deferred()
        # After the controller's services have started (a recovery, if any,
        # has begun): whether this start-up is a recovery decides whether
        # trees of VMs that did not come back are cleaned up.
        self._reconcile_call = self.clock.callLater(0, self._begin_reconcile)

    def stop(self):
        self._stopped = True
        if self._reconcile_call.active():
            self._reconcile_call.cancel()

    async def flushed(self):
        """Wait until the file work queued so far is done (tests, tools)."""
        await self._lock.acquire()
        self._lock.release()

    def entry_point(self, event):
        handler = getattr(self, "_on_" + event.name, None)
        if handler is None:
            return None
        return defer.Deferred.fromCoroutine(handler(event))

    # -- helpers -----------------------------------------------------------------------

    def _vm(self, record):
        """-> (owner, cluster, short) of a managed VM's record, checked, or None."""
        parts = split(record.get("name") or "", self.api.state.domain)
        if parts is None:
            return None
        short, owner = parts
        if record.get("owner") not in (None, owner):
            log.warn("filesystem: {vm} is recorded for {owner}, its name says {named}: no "
                     "trees", vm=record.get("name"), owner=record.get("owner"), named=owner)
            return None
        cluster = record.get("cluster")
        try:
            layout.vm_trees(owner, cluster, short)
        except InvalidRequest as e:
            log.warn("filesystem: {vm}: {error}: no trees", vm=record.get("name"), error=str(e))
            return None
        return owner, cluster, short

    async def _locked(self, function, *args):
        await self._lock.acquire()
        try:
            return await function(*args)
        finally:
            self._lock.release()

    async def _ids(self, owner):
        """-> (uid, gid) or None; IdsUnavailable when the source is down."""
        return await self.api.run_blocking(self.settings.ids.user_ids, owner)

    def _no_ids(self, owner):
        return f"no uid for user {owner} (uid_source = {self.settings.ids.source})"

    # -- start_request -----------------------------------------------------------------

    async def _on_start_request(self, event):
        request = event.request
        if request.kind != "start" or not request.vms:
            return
        owners = set()
        for vm in request.vms:
            parts = split(vm, self.api.state.domain)
            owners.add(parts[1] if parts else request.user)
        root = self.settings.export_root
        problem = await self.api.run_blocking(layout.export_root_problem, root)
        if problem is not None:
            log.error("filesystem: export root {root}: {problem}; starts are refused",
                      root=root, problem=problem)
            request.reject(f"the VMs' file trees cannot be made: the export root is not "
                           f"usable ({problem})")
            return
        for owner in sorted(owners):
            try:
                ids = await self._ids(owner)
            except IdsUnavailable as e:
                log.warn("filesystem: no ids for {owner}: {error}", owner=owner, error=str(e))
                request.reject(f"the VMs' file trees cannot be made: {e}")
                return
            if ids is None:
                log.warn("filesystem: {reason}: start refused", reason=self._no_ids(owner))
                request.reject(self._no_ids(owner))
                return

    # -- making trees ------------------------------------------------------------------

    async def _on_register_vm(self, event):
        await self._prepare(event.vm, "register_vm")

    async def _on_vm_adopted(self, event):
        await self._prepare(event.vm, "vm_adopted")

    async def _prepare(self, record, why):
        vm = self._vm(record)
        if vm is None:
            return
        owner, cluster, short = vm
        try:
            ids = await self._ids(owner)
        except IdsUnavailable as e:
            log.error("filesystem: {vm} ({why}): trees not made: {error}",
                      vm=record["name"], why=why, error=str(e))
            return
        if ids is None:
            log.error("filesystem: {vm} ({why}): trees not made: {reason}",
                      vm=record["name"], why=why, reason=self._no_ids(owner))
            return
        await self._locked(self._make, record["name"], layout.vm_trees(owner, cluster, short),
                           ids)

    async def _make(self, vm, trees, ids):
        uid, gid = ids
        for tree in trees:
            try:
                made = await self.api.run_blocking(layout.ensure_tree, self.settings.export_root,
                                                   tree, uid, gid, self.settings.mode)
            except layout.UnsafePath as e:
                log.error("filesystem: {vm}: tree {tree} not made: {error} (a link planted "
                          "by a user?)", vm=vm, tree=repr(tree), error=str(e))
                continue
            except Exception:
                log.failure("filesystem: {vm}: tree {tree} could not be made", vm=vm,
                            tree=repr(tree))
                continue
            if made:
                log.info("filesystem: {vm}: made {tree} for {uid}:{gid}", vm=vm,
                         tree=repr(tree), uid=uid, gid=gid)

    # -- cleaning up -------------------------------------------------------------------

    async def _on_vm_removed(self, event):
        vm = self._vm(event.vm)
        if vm is None:
            return
        await self._locked(self._removed, event.vm["name"], *vm)

    def _cluster_has_vms(self, owner, cluster):
        return any(r.get("owner") == owner and r.get("cluster") == cluster
                   for r in self.api.state.vms.values())

    async def _removed(self, vm, owner, cluster, short):
        await self._cleanup(vm, layout.Tree("local", owner, short),
                            self.settings.local_cleanup)
        # Decided now, in the lock: a VM of the cluster started meanwhile keeps it.
        if not self._cluster_has_vms(owner, cluster):
            await self._cleanup(vm, layout.Tree("cluster", owner, cluster),
                                self.settings.cluster_cleanup)

    async def _cleanup(self, why, tree, policy):
        try:
            outcome = await self.api.run_blocking(
                layout.cleanup_tree, self.settings.export_root, tree, policy,
                self.settings.archive_root, self.clock.seconds())
        except layout.UnsafePath as e:
            log.error("filesystem: {why}: tree {tree} left alone: {error} (a link planted by "
                      "a user?)", why=why, tree=repr(tree), error=str(e))
            return None
        except Exception:
            log.failure("filesystem: {why}: clean-up ({policy}) of {tree} failed", why=why,
                        policy=policy, tree=repr(tree))
            return None
        if outcome not in ("kept", "absent"):
            log.info("filesystem: {why}: {tree} {outcome}", why=why, tree=repr(tree),
                     outcome=outcome)
        return outcome

    # -- after a recovery --------------------------------------------------------------

    def _begin_reconcile(self):
        recovering = bool(self.api.recovering)
        d = defer.Deferred.fromCoroutine(self._reconcile(recovering))
        d.addErrback(lambda f: log.failure("filesystem: reconciling the trees failed", f))

    async def _reconcile(self, recovering):
        await self.api.settled()
        if self._stopped:
            return
        outcome = await self._locked(self._reconcile_locked, recovering)
        if not self.reconciled.called:
            self.reconciled.callback(outcome)

    async def _reconcile_locked(self, recovering):
        """-> {"made": [vm ...], "cleaned": {tree: outcome}, "unattributed": [...]}."""
        found, unattributed = await self.api.run_blocking(layout.list_trees,
                                                          self.settings.export_root)
        live = {}
        for record in list(self.api.state.vms.values()):
            vm = self._vm(record)
            if vm is not None:
                live[record["name"]] = vm
        wanted = {tree for vm in live.values() for tree in layout.vm_trees(*vm)}
        made = []
        for name, (owner, cluster, short) in sorted(live.items()):
            trees = layout.vm_trees(owner, cluster, short)
            if all(tree in found for tree in trees):
                continue
            try:
                ids = await self._ids(owner)
            except IdsUnavailable as e:
                log.error("filesystem: {vm}: trees not made after recovery: {error}",
                          vm=name, error=str(e))
                continue
            if ids is None:
                log.error("filesystem: {vm}: trees not made after recovery: {reason}",
                          vm=name, reason=self._no_ids(owner))
                continue
            await self._make(name, trees, ids)
            made.append(name)
        cleaned = {}
        policies = {"local": self.settings.local_cleanup,
                    "cluster": self.settings.cluster_cleanup}
        stale = sorted((t for t in found - wanted if t.kind in policies
                        and policies[t.kind] != "keep"), key=repr)
        if recovering:
            for tree in stale:
                # A VM of it may have started while the listing ran.
                if tree.kind == "local" and f"{tree.name}.{tree.owner}." \
                        f"{self.api.state.domain}" in self.api.state.vms:
                    continue
                if tree.kind == "cluster" and self._cluster_has_vms(tree.owner, tree.name):
                    continue
                cleaned[repr(tree)] = await self._cleanup("after recovery", tree,
                                                          policies[tree.kind])
        elif stale:
            log.info("filesystem: {count} trees of no known VM left alone (the controller "
                     "did not recover: nothing says their VMs are gone)", count=len(stale))
        if unattributed:
            log.info("filesystem: left alone under {root}: {names} (no VM name can be made of "
                     "them)", root=self.settings.export_root, names=", ".join(unattributed))
        if made or cleaned:
            log.info("filesystem: after recovery, trees made for {made} VMs, {cleaned} cleaned "
                     "up", made=len(made), cleaned=len(cleaned))
        return {"made": made, "cleaned": cleaned, "unattributed": unattributed}
