"""HA: restarts elsewhere the VMs of a lost LNM, only once its host is fenced.

The policy beside the core's mechanism (``usher.controller.fencing``, which
refuses to restart a VM whose host is not fenced, whatever asks). Register it
on ``lnm_disconnected``, ``lnm_connected``, ``lnm_hold_changed`` and
``timer``:

- an LNM that stays away ``grace`` seconds with lost VMs has its host's
  fence agent run (``fence_command``, an argv with ``{lnm}`` and
  ``{hostname}``, per host in ``[hosts]``), off the reactor, within
  ``fence_timeout``: exit 0 fences it (``api.confirm_fenced`` with the first
  line of its output as the evidence); a failure is logged and tried again
  with backoff (``retry_initial`` doubling up to ``retry_max``), and never
  restarts anything. Without a command the plugin waits for the
  administrator's ``fenced`` confirmation. Never on silence alone.
- once an LNM is fenced (by its agent or by an administrator), its lost VMs
  are restarted elsewhere by priority (VM argument ``ha_priority`` 0-1000,
  0 = never; default ``default_priority``), at most
  ``max_restarts_per_minute``, the rest queued; a VM that could not be
  placed is tried again after ``retry_restart_after``.
- ``stale_copies`` (``delete`` or ``hold``; ``destroy``, the name before
  issue 17, is read as ``delete``): the core's policy for the
  copies a fenced host still has when it comes back; a host back but still
  fenced is checked again at each review (copies removed by hand release it).
- query ``ha.status`` (administrators): hosts, fencing attempts, the queue.

Sample configuration: ``etc/plugins/ha.config``.
"""

from twisted.internet import defer
from twisted.logger import Logger

from usher import states
from usher.errors import ConfigError, PermissionDenied, UsherError
from usher.controller.fencing import STALE_POLICY_ALIASES
from usher.plugins.ha.agent import FenceOutcome, check_command, command_for, run_fence_command
from usher.plugins.ha.policy import MAX_PRIORITY, RestartQueue, priority_of

log = Logger()

CONFIG_SPEC = f"""
order = integer(default=95)
interval = float(gt=0, default=5.0)
grace = float(min=0, default=60.0)
fence_command = list(default=list())
fence_timeout = float(gt=0, default=60.0)
retry_initial = float(gt=0, default=10.0)
retry_max = float(gt=0, default=300.0)
max_fence_attempts = integer(min=0, default=0)
default_priority = integer(min=0, max={MAX_PRIORITY}, default=500)
max_user_priority = integer(min=0, max={MAX_PRIORITY}, default=500)
max_restarts_per_minute = integer(min=1, default=20)
retry_restart_after = float(gt=0, default=60.0)
stale_copies = option('delete', 'hold', 'destroy', default='delete')
[hosts]
[[__many__]]
fence_command = list(default=None)
hostname = string(default=None)
"""


class HostWatch:
    """What the plugin knows of one LNM that is away."""

    def __init__(self, since):
        self.since = since
        self.attempts = 0
        self.next_try = None
        self.last_error = None
        self.attempting = False
        self.gave_up = False


class Plugin:
    name = "ha"

    def __init__(self, config, api):
        self.api = api
        self.grace = config["grace"]
        self.fence_timeout = config["fence_timeout"]
        self.retry_initial = config["retry_initial"]
        self.retry_max = config["retry_max"]
        self.max_fence_attempts = config["max_fence_attempts"]
        self.default_priority = config["default_priority"]
        self.max_user_priority = config["max_user_priority"]
        self.fence_command = check_command(config["fence_command"], "fence_command")
        self.hosts_config = {}
        for lnm, section in (config.get("hosts") or {}).items():
            command = check_command(section.get("fence_command"),
                                    f"hosts/{lnm}/fence_command")
            self.hosts_config[lnm] = {"fence_command": command,
                                      "hostname": section.get("hostname")}
        if self.retry_max < self.retry_initial:
            raise ConfigError("retry_max: must not be below retry_initial")
        self.queue = RestartQueue(per_minute=config["max_restarts_per_minute"],
                                  retry_after=config["retry_restart_after"])
        self.never = {}             # name -> LNM: lost, fenced, priority 0
        self.watching = {}          # LNM -> HostWatch
        self._tasks = set()         # Deferreds of fence attempts and restarts under way
        self._restarting = False
        api.fencing.stale_copies = STALE_POLICY_ALIASES.get(config["stale_copies"],
                                                            config["stale_copies"])
        api.register_query("ha.status", self.status)

    def stop(self):
        self.api.fencing.stale_copies = "delete"
        for d in list(self._tasks):
            d.cancel()

    # -- events ----------------------------------------------------------------

    def entry_point(self, event):
        now = self.api.clock.seconds()
        if event.name == "lnm_disconnected":
            self.watching.setdefault(event.lnm, HostWatch(now))
        elif event.name == "lnm_connected":
            self._host_back(event.lnm)
            return None
        elif event.name == "lnm_hold_changed" and event.kind != "fenced":
            return None
        self.review(now)
        return None

    def _host_back(self, lnm):
        self.watching.pop(lnm, None)
        for name in self.queue.names():
            if self.api.state.vms.get(name, {}).get("lnm") == lnm:
                self.queue.discard(name)
        for name, where in list(self.never.items()):
            if where == lnm:
                del self.never[name]

    def _lost_on(self, lnm):
        info = self.api.state.lnms.get(lnm)
        if info is None:
            return []
        return sorted(n for n in info.vms
                      if self.api.state.vms.get(n, {}).get("state") == states.LOST)

    def review(self, now):
        """Every LNM that is away: fence it when its grace is over, queue the
        lost VMs of fenced ones; then restart what the rate allows."""
        fencing = self.api.fencing
        for lnm, info in sorted(self.api.state.lnms.items()):
            if info.connected:
                self.watching.pop(lnm, None)
                if fencing.fenced(lnm):
                    # Back, with stale copies kept (stale_copies = hold, or
                    # in doubt): see whether they are gone by now.
                    fencing.clean_up(lnm)
                continue
            lost = self._lost_on(lnm)
            if not lost and not fencing.fenced(lnm):
                continue
            watch = self.watching.setdefault(lnm, HostWatch(now))
            if fencing.evidence_valid(lnm):
                self._queue_lost(lnm, lost, now)
            elif lost and now >= watch.since + self.grace:
                # Not fenced, or fenced before and back since: fresh evidence first.
                self._maybe_fence(lnm, watch, now)
        for name in self.queue.names():
            rec = self.api.state.vms.get(name)
            if rec is None or rec["state"] != states.LOST or not fencing.evidence_valid(
                    rec["lnm"]):
                self.queue.discard(name)
        self._pump(now)

    def _queue_lost(self, lnm, lost, now):
        for name in lost:
            if name in self.queue or name in self.never:
                continue
            priority = priority_of(self.api.state.vms[name], self.default_priority,
                                   self.max_user_priority)
            if priority == 0:
                self.never[name] = lnm
                log.info("VM {vm} (ha_priority 0) is not restarted off fenced LNM {lnm}",
                         vm=name, lnm=lnm)
            else:
                self.queue.add(name, lnm, priority, now)

    # -- fencing ---------------------------------------------------------------------

    def _command_of(self, lnm):
        host = self.hosts_config.get(lnm, {})
        command = host.get("fence_command")
        return command if command is not None else self.fence_command

    def _hostname_of(self, lnm):
        host = self.hosts_config.get(lnm, {})
        if host.get("hostname"):
            return host["hostname"]
        info = self.api.state.lnms.get(lnm)
        return (info.info or {}).get("hostname") if info is not None else None

    def _maybe_fence(self, lnm, watch, now):
        command = self._command_of(lnm)
        if not command or watch.attempting or watch.gave_up:
            return
        if watch.next_try is not None and now < watch.next_try:
            return
        try:
            argv = command_for(command, lnm, self._hostname_of(lnm))
        except ValueError as e:
            self._fence_failed(lnm, watch, str(e), now)
            return
        watch.attempting = True
        watch.attempts += 1
        log.warn("LNM {lnm} has been away {seconds:.0f} s with lost VMs: running its fence "
                 "agent (attempt {attempt})", lnm=lnm, seconds=now - watch.since,
                 attempt=watch.attempts)
        self._background(self._fence(lnm, watch, argv))

    async def _fence(self, lnm, watch, argv):
        try:
            outcome = await self.api.run_blocking(run_fence_command, argv, self.fence_timeout)
        except defer.CancelledError:
            raise
        except Exception as e:
            log.failure("LNM {lnm}: the fence agent could not be run", lnm=lnm)
            outcome = FenceOutcome(False, error=f"the fence agent could not be run: {e}")
        finally:
            watch.attempting = False
        now = self.api.clock.seconds()
        if self.watching.get(lnm) is not watch:
            return               # the LNM came back meanwhile
        if not outcome.fenced:
            self._fence_failed(lnm, watch, outcome.error, now)
            return
        try:
            self.api.confirm_fenced(lnm, outcome.evidence, by=self.name)
        except UsherError as e:
            self._fence_failed(lnm, watch, f"not fenced: {e}", now)
            return
        watch.last_error = None
        self.review(now)

    def _fence_failed(self, lnm, watch, error, now):
        watch.last_error = error
        delay = min(self.retry_max, self.retry_initial * 2 ** max(0, watch.attempts - 1))
        watch.next_try = now + delay
        if self.max_fence_attempts and watch.attempts >= self.max_fence_attempts:
            watch.gave_up = True
            log.error("LNM {lnm}: fencing failed {count} times ({error}); giving up: nothing "
                      "is restarted until an administrator confirms it is off (ush fenced "
                      "{lnm})", lnm=lnm, count=watch.attempts, error=error)
        else:
            log.error("LNM {lnm}: not fenced ({error}); nothing is restarted; trying again "
                      "in {delay:g} s", lnm=lnm, error=error, delay=delay)

    # -- restarts ----------------------------------------------------------------------

    def _pump(self, now):
        if self._restarting or not len(self.queue):
            return
        batch = self.queue.take(now)
        if batch:
            self._restarting = True
            self._background(self._restart(batch))

    async def _restart(self, batch):
        try:
            result = await self.api.restart_elsewhere(batch, by=self.name)
        except defer.CancelledError:
            raise
        except Exception as e:
            log.failure("restarting {count} VMs off fenced hosts failed", count=len(batch))
            result = {"started": [], "failed": [{"name": n, "error": str(e)} for n in batch]}
        finally:
            self._restarting = False
        now = self.api.clock.seconds()
        for entry in result["started"]:
            self.queue.discard(entry["name"])
        for entry in result["failed"]:
            log.warn("VM {vm} not restarted elsewhere: {error}", vm=entry["name"],
                     error=entry["error"])
            self.queue.failed(entry["name"], entry["error"], now)
        self.review(now)

    def _background(self, coroutine):
        d = defer.Deferred.fromCoroutine(coroutine)
        if d.called:
            d.addErrback(self._background_failed)
            return
        self._tasks.add(d)

        def done(result):
            self._tasks.discard(d)
            return result
        d.addBoth(done).addErrback(self._background_failed)

    @staticmethod
    def _background_failed(failure):
        if not failure.check(defer.CancelledError):
            log.failure("HA plugin: background work failed", failure)

    # -- the query ----------------------------------------------------------------------

    async def status(self, user, admin, args):
        if not admin:
            raise PermissionDenied("ha.status is for administrators")
        now = self.api.clock.seconds()
        fencing = self.api.fencing
        items = []
        lnms = set(self.watching) | set(self.api.holds.with_kind("fenced"))
        for lnm in sorted(lnms):
            info = self.api.state.lnms.get(lnm)
            watch = self.watching.get(lnm)
            hold = self.api.holds.get(lnm, "fenced")
            items.append({
                "kind": "host", "lnm": lnm,
                "connected": bool(info is not None and info.connected),
                "lost": len(self._lost_on(lnm)),
                "away": round(now - watch.since, 1) if watch else None,
                "fence_command": bool(self._command_of(lnm)),
                "fence_attempts": watch.attempts if watch else 0,
                "fencing": bool(watch and watch.attempting),
                "next_attempt_in": (max(0.0, round(watch.next_try - now, 1))
                                    if watch and watch.next_try is not None
                                    and not watch.gave_up else None),
                "gave_up": bool(watch and watch.gave_up),
                "last_error": watch.last_error if watch else None,
                "fenced": hold})
        items.append({"kind": "queue", "waiting": self.queue.describe(now),
                      "never": sorted(self.never),
                      "restarts_last_minute": self.queue.recent(now),
                      "max_restarts_per_minute": self.queue.per_minute,
                      "stale_copies": fencing.stale_copies})
        return items
