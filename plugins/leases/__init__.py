"""Leases: a renewable lifetime for each VM, with warnings to its owner and an expiry action.

A start may ask for a lease with the request argument ``lease`` (``ush
start --lease 2h``); the site's policy gives one by default
(``default_lease``), bounds it (``max_lease``) and may require one
(``required``: a start without is refused, saying how to ask). The lease
of each VM (``{owner, expires, warned}``) is kept in ``leases.json`` of the
controller's state directory and survives a restart; leases of VMs that did
not come back are dropped once the controller has settled.

On ``timer`` (every ``interval`` seconds): the owner's clients are told
(``api.notify_user``, a ``[notice]`` line in ush, a message in the browser)
when a lease comes within each ``warn_before`` threshold (e.g. ``1h,
10m``); when it ends the policy's ``action`` (``shutdown``, ``hibernate``,
``destroy``: a hard power-off, the VM kept; ``delete``: the VM removed, powered
off first if it runs) runs through ``api.op_on`` as the system, and the owner is told
what became of the VM. A VM its action cannot reach (its LNM away) keeps
its lease and is tried again at the next tick.

Queries: ``leases.list`` (``vms`` or ``cluster``; own VMs, administrators
everyone's) and ``leases.renew`` (``vms`` or ``cluster`` and ``duration``:
the lease then ends ``duration`` from now, never more than ``max_lease``;
only the owner or an administrator). ush: ``lease``, ``lease renew``.

Register on ``start_request``, ``start_complete``, ``vm_removed`` and
``timer``; sample configuration: ``etc/plugins/leases.config``.
"""

import collections

from twisted.internet import defer
from twisted.logger import Logger

from usher.cliargs import format_duration
from usher.errors import Rejected, UsherError
from usher.plugins.leases.policy import ACTION_ARGS, AT_REST, LeasePolicy
from usher.plugins.leases.queries import list_args, renew_args
from usher.plugins.leases.store import LeaseStore

log = Logger()

DEFAULT_ORDER = 30
DEFAULT_INTERVAL = 60.0

CONFIG_SPEC = f"""
order = integer(default={DEFAULT_ORDER})
interval = float(gt=0, default={DEFAULT_INTERVAL})
default_lease = string(default=None)
max_lease = string(default=None)
required = boolean(default=False)
warn_before = list(default=list('1h', '10m'))
action = option('shutdown', 'hibernate', 'destroy', 'delete', default='shutdown')
"""

NOTICE_KIND = "lease"
# VMs one op_on of an expiry names (a selection's budget is far larger).
EXPIRY_BATCH = 500
# VM names one notice shows; the rest are counted.
SHOWN = 5
# Seconds a start's asked-for lease waits for the start's outcome.
PENDING_FOR = 3600.0

ACTED = {"shutdown": "shut down", "hibernate": "hibernated", "destroy": "powered off",
         "delete": "deleted"}


def _names(names):
    names = sorted(names)
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


class Plugin:
    name = "leases"

    def __init__(self, config, api, *, clock=None):
        self.api = api
        self.clock = clock or api.clock
        self.policy = LeasePolicy(config)
        if self.policy.action == "destroy":
            # Before issue 17 destroy removed the VM; a configuration written
            # then now keeps expired VMs (and what they hold) for good.
            log.warn("leases: action = destroy powers an expired VM off and keeps it, with "
                     "its disk, IP address and DNS name (destroy no longer removes VMs); "
                     "for the expired VMs to be removed, set action = delete")
        self.store = LeaseStore(api)
        self._pending = {}          # VM -> (seconds, asked at): starts not complete yet
        self._acting = set()        # VMs whose expiry action is under way
        self._failed_told = set()   # VMs whose owner was told their action failed
        self._work = set()
        self._reconciled = False
        self.actions = []           # (action, names done) of every expiry, for tests
        api.register_query("leases.list", self.query_list)
        api.register_query("leases.renew", self.query_renew)

    @property
    def leases(self):
        return self.store.leases

    # -- events ----------------------------------------------------------------------

    def entry_point(self, event):
        handler = getattr(self, f"_on_{event.name}", None)
        if handler is None:
            return None
        return handler(event)

    def _on_start_request(self, event):
        request = event.request
        asked = request.args.pop("lease", None)
        # An HA restart elsewhere (``relocate``) is the same VM: it keeps its
        # lease, and the policy (required, default) does not apply to it; a
        # VM started again keeps the lease it has unless one is asked for.
        targets = [name for name in request.vms if name not in request.relocate
                   and (asked is not None or name not in self.store.leases)]
        if not targets:
            return
        seconds, refusal = self.policy.of_request(asked)
        if refusal is not None:
            request.reject(refusal)
            return
        if seconds is None:
            return
        now = self.clock.seconds()
        for name in targets:
            self._pending[name] = (seconds, now)
        request.note(f"lease: {format_duration(seconds)} (then "
                     f"{ACTED[self.policy.action]}; renew with 'lease renew')")

    def _on_start_complete(self, event):
        vm = event.vm
        name = vm["name"]
        pending = self._pending.pop(name, None)
        if pending is None or not event.ok:
            return
        seconds = pending[0]
        self._failed_told.discard(name)
        self.store.set(name, vm.get("owner"), self.clock.seconds() + seconds,
                       self.policy.already_warned(seconds))

    def _on_vm_removed(self, event):
        name = event.vm["name"]
        self._pending.pop(name, None)
        self._failed_told.discard(name)
        self.store.drop([name])

    def _on_timer(self, event):
        return defer.Deferred.fromCoroutine(self.tick())

    # -- the timer --------------------------------------------------------------------

    async def tick(self):
        """Warn of leases coming to an end and act on those that ended."""
        await self.store.loaded
        if self.api.recovering:
            return
        if not self._reconciled:
            await self.api.settled()
            self._reconcile()
        now = self.clock.seconds()
        self._pending = {n: p for n, p in self._pending.items() if now - p[1] < PENDING_FOR}
        warnings = collections.defaultdict(list)
        ended = []
        vms = self.api.state.vms
        for name, lease in list(self.leases.items()):
            rec = vms.get(name)
            if rec is None or name in self._acting:
                continue
            remaining = lease["expires"] - now
            if remaining <= 0:
                ended.append(name)
                continue
            crossed = [t for t in self.policy.warn_before
                       if remaining <= t and t not in lease["warned"]]
            if crossed:
                lease["warned"] = sorted(set(lease["warned"]) | set(crossed))
                warnings[lease["owner"]].append((name, remaining))
                self.store.save()
        for owner, told in sorted(warnings.items()):
            self._warn(owner, told)
        if ended:
            self._start_work(self._expire(ended))

    def _reconcile(self):
        vanished = [n for n in self.leases if n not in self.api.state.vms]
        if vanished:
            log.info("leases: dropping the leases of {count} VMs that did not come back: "
                     "{names}", count=len(vanished), names=_names(vanished))
            self.store.drop(vanished)
        self._reconciled = True

    def _warn(self, owner, told):
        soonest = min(remaining for _name, remaining in told)
        what = (f"the lease of {told[0][0]} ends" if len(told) == 1 else
                f"the leases of {len(told)} VMs end ({_names(n for n, _r in told)})")
        self._notify(owner, f"{what} in {format_duration(soonest)}; then "
                     f"{'it is' if len(told) == 1 else 'they are'} "
                     f"{ACTED[self.policy.action]}. Renew with: lease renew NAMES DURATION")

    def _notify(self, owner, message):
        try:
            self.api.notify_user(owner, NOTICE_KIND, message)
        except Exception:
            log.failure("leases: a notice for {owner} could not be sent", owner=owner)

    def _start_work(self, coroutine):
        d = defer.Deferred.fromCoroutine(coroutine)
        self._work.add(d)
        d.addErrback(lambda f: log.failure("leases: an expiry failed", f))
        d.addBoth(lambda _: self._work.discard(d))

    async def idle(self):
        """Wait until no expiry is under way (tests)."""
        while self._work:
            await defer.DeferredList(list(self._work))

    async def _expire(self, names):
        action = self.policy.action
        self._acting.update(names)
        try:
            vms = self.api.state.vms
            rest = {n for n in names if n in vms and vms[n]["state"] in AT_REST[action]}
            todo = sorted(n for n in names if n in vms and n not in rest)
            done, failed = set(rest), {}
            for i in range(0, len(todo), EXPIRY_BATCH):
                batch = todo[i:i + EXPIRY_BATCH]
                try:
                    result = await self.api.op_on(action, batch, ACTION_ARGS.get(action))
                except UsherError as e:
                    failed.update(dict.fromkeys(batch, str(e)))
                    continue
                done.update(d["name"] for d in result["done"])
                failed.update((f["name"], f["error"]) for f in result["failed"])
            # A VM that stopped by itself meanwhile has nothing left to do.
            for name in list(failed):
                rec = vms.get(name)
                if rec is None or rec["state"] in AT_REST[action]:
                    failed.pop(name)
                    done.add(name)
            self._ended(action, done, rest, failed)
        finally:
            self._acting.difference_update(names)

    def _ended(self, action, done, rest, failed):
        owners = {}
        for name in done | set(failed):
            lease = self.leases.get(name)
            if lease is not None:
                owners[name] = lease["owner"]
        self.store.drop(sorted(done))
        if done:
            self.actions.append((action, sorted(done)))
            log.info("leases: {count} leases ended, {action}: {names}", count=len(done),
                     action=ACTED[action], names=_names(done))
        by_owner = collections.defaultdict(lambda: ([], [], []))
        for name in done:
            by_owner[owners.get(name)][1 if name in rest else 0].append(name)
        for name in failed:
            if name not in self._failed_told:
                by_owner[owners.get(name)][2].append(name)
                self._failed_told.add(name)
        for owner, (acted, resting, unreached) in sorted(by_owner.items(),
                                                         key=lambda kv: kv[0] or ""):
            if owner is None:
                continue
            if acted:
                self._notify(owner, f"lease ended: {_names(acted)} "
                             f"{'was' if len(acted) == 1 else 'were'} {ACTED[action]}")
            if resting:
                self._notify(owner, f"lease ended: {_names(resting)} "
                             f"{'was' if len(resting) == 1 else 'were'} already at rest")
            if unreached:
                first = failed[sorted(unreached)[0]]
                self._notify(owner, f"lease ended, but {_names(unreached)} could not be "
                             f"{ACTED[action]} ({first}); tried again shortly")
        if failed:
            log.warn("leases: {count} VMs could not be {action} at the end of their lease "
                     "(tried again at the next tick): {names}", count=len(failed),
                     action=ACTED[action], names=_names(failed))

    # -- queries ----------------------------------------------------------------------

    def _row(self, rec, now):
        lease = self.leases.get(rec["name"])
        row = {"name": rec["name"], "owner": rec.get("owner"), "cluster": rec.get("cluster"),
               "state": rec.get("state"), "expires": None, "remaining": None,
               "action": self.policy.action}
        if lease is not None:
            row["expires"] = lease["expires"]
            row["remaining"] = max(0, int(lease["expires"] - now))
        return row

    async def query_list(self, user, admin, args):
        await self.store.loaded
        selected = list_args(self.api.state, self.api.state.domain, user, admin, args)
        now = self.clock.seconds()
        records = selected.records()
        if records is None:
            vms = self.api.state.vms
            records = [vms[n] for n, lease in self.leases.items() if n in vms and (
                lease["owner"] == user or (admin and selected.owner in (None, lease["owner"])))]
        return sorted((self._row(r, now) for r in records), key=lambda row: row["name"])

    async def query_renew(self, user, admin, args):
        await self.store.loaded
        selected, seconds = renew_args(self.api.state, self.api.state.domain, user, admin,
                                       args)
        refusal = self.policy.check(seconds)
        if refusal is not None:
            raise Rejected(refusal)
        records = selected.records()
        now = self.clock.seconds()
        for rec in records:
            name = rec["name"]
            self.store.set(name, rec.get("owner"), now + seconds,
                           self.policy.already_warned(seconds))
            self._failed_told.discard(name)
        log.info("leases: {user} renewed {count} leases for {duration}: {names}", user=user,
                 count=len(records), duration=format_duration(seconds),
                 names=_names(r["name"] for r in records))
        return sorted((self._row(r, now) for r in records), key=lambda row: row["name"])

    def stop(self):
        """The plugin goes: whatever expiry is under way finishes on its own."""
