"""The daemon's loop: every ``poll_interval`` it reads the spool, looks at
the cluster (``IClusterLink.snapshot``), moves each job along its states
(``jobs``), asks the policy (``policy``) what to start, move and power, and
does it; then it records the figures (``accounting``) and writes its state
and status files. File work runs in the daemon's thread pool; migrations
and power changes run beside the loop, bounded and tracked."""

import time

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from usher.errors import LinkFailure, UsherError
from usher.states import RUN, SHUTOFF

from . import accounting, jobs, policy
from .jobs import Job
from .link import POWER_REASON
from .spool import user_name

log = Logger()

# VM states that hold a host's resources (usher.controller.capacity).
HOLDING = frozenset({"run", "paused", "starting", "migrating", "lost", "unknown"})
# VMs whose host is in doubt or changing: they may land on any host.
IN_DOUBT = frozenset({"migrating", "lost", "unknown"})
# Ended jobs kept in the state file (the oldest are dropped).
MAX_ENDED = 10000


class Scheduler(service.Service):
    def __init__(self, settings, link, spool, hooks, clock, pool=None, blocking=None):
        self.settings = settings
        self.link = link
        self.spool = spool
        self.hooks = hooks
        self.clock = clock
        # blocking(f, *args) -> Deferred: file work off the reactor.
        self.blocking = blocking or (lambda f, *a: threads.deferToThreadPool(clock, pool, f, *a))
        self.jobs = {}              # id -> Job
        self.seq = 0
        self.meter = accounting.Meter()
        self.powered_down = {}      # lnm -> {"since": t}: hosts we powered down
        self.powering = {}          # lnm -> "off" | "on" while a change is under way
        self.migrating = {}         # job id -> target lnm
        self.removing = set()       # job ids whose ended VM is being deleted
        self.empty_since = {}
        self.hosts = {}             # the last picture (name -> policy.Host)
        self.lnm_info = {}
        self.last_error = None
        self.reservation = None
        self._loop = None
        self._tick_running = None
        self._background = set()

    # -- service -----------------------------------------------------------------

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self._tick_safely)
        self._loop.clock = self.clock
        d = self._loop.start(self.settings.poll_interval, now=False)
        d.addErrback(lambda f: log.failure("usherbatchd: the scheduling loop stopped", f))

    async def load(self):
        """Read the state file (a restart continues where it stopped)."""
        await self.blocking(self.spool.prepare)
        state = await self.blocking(self.spool.load, "jobs.json", None)
        if state:
            self.seq = int(state.get("seq", 0))
            self.jobs = {d["id"]: Job.from_dict(d) for d in state.get("jobs", [])}
            self.meter = accounting.Meter(state.get("meter"))
            self.powered_down = dict(state.get("powered_down") or {})

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        pending = [d for d in (self._tick_running,) if d is not None] + list(self._background)
        return defer.DeferredList(pending, consumeErrors=True) if pending else None

    def _tick_safely(self):
        if self._tick_running is not None:
            return None        # the previous tick is still at work
        d = defer.Deferred.fromCoroutine(self.tick())
        self._tick_running = d

        def done(result):
            self._tick_running = None
            return result
        d.addErrback(lambda f: log.failure("usherbatchd: a scheduling round failed", f))
        d.addBoth(done)
        return None

    def _spawn(self, coroutine, what):
        d = defer.Deferred.fromCoroutine(coroutine)
        self._background.add(d)
        d.addErrback(lambda f: log.failure("usherbatchd: {what} failed", f, what=what))
        d.addBoth(lambda _: self._background.discard(d))

    # -- one round ---------------------------------------------------------------

    async def tick(self):
        now = self.clock.seconds()
        await self._read_spool(now)
        try:
            lnms, vms = await self.link.snapshot()
        except UsherError as e:
            self.last_error = f"cannot see the cluster: {e}"
            log.warn("usherbatchd: {error}", error=self.last_error)
            await self._save(now)
            return
        self.last_error = None
        records = {r["name"]: r for r in vms if isinstance(r, dict) and "name" in r}
        await self._follow_jobs(now, records)
        self.hosts = self._picture(now, lnms, records)
        await self._plan_and_act(now)
        self._sample(now)
        await self._save(now)

    async def _read_spool(self, now):
        try:
            new, refused = await self.blocking(self.spool.take_new, self.settings)
            cancels = await self.blocking(self.spool.take_cancels)
        except OSError as e:
            log.error("usherbatchd: cannot read the queue {dir}: {error}",
                      dir=self.spool.queue_dir, error=e)
            return
        for name, why in refused:
            log.warn("usherbatchd: job file {name} refused: {why}", name=name, why=why)
        queued = sum(1 for j in self.jobs.values() if j.state == jobs.QUEUED)
        for job_id, uid, _mtime, fields in new:
            if job_id in self.jobs:
                continue
            if queued >= self.settings.max_queued:
                log.warn("usherbatchd: job {id} refused: {n} jobs already queued (max_queued)",
                         id=job_id, n=queued)
                continue
            self.seq += 1
            queued += 1
            self.jobs[job_id] = Job(id=job_id, owner=user_name(uid), submitted=now, seq=self.seq,
                                    uid=uid, **fields)
            log.info("usherbatchd: job {id} queued ({vcpus} vCPUs, {memory} MiB, walltime "
                     "{walltime:g} s) for {owner}", id=job_id, vcpus=fields["vcpus"],
                     memory=fields["memory_mib"], walltime=fields["walltime"],
                     owner=user_name(uid))
        for job_id, uid in cancels:
            job = self.jobs.get(job_id)
            if job is None or job.ended_state:
                continue
            if uid not in (0, job.uid):
                log.warn("usherbatchd: uid {uid} may not cancel job {id} of {owner}",
                         uid=uid, id=job_id, owner=job.owner)
                continue
            if job.state == jobs.QUEUED:
                job.move(jobs.CANCELLED, now)
            elif job.state == jobs.RUNNING:
                await self._stop(job, now, jobs.CANCELLED)
            else:
                job.stop_reason = jobs.CANCELLED      # acted on once it runs
            log.info("usherbatchd: job {id} cancelled", id=job_id)

    def _vm(self, job):
        return f"{job.id}.{self.settings.cluster}"

    def _full(self, job):
        return self.link.full_name(self._vm(job))

    async def _follow_jobs(self, now, records):
        for job in list(self.jobs.values()):
            rec = records.get(self._full(job))
            state = rec.get("state") if rec else None
            if job.state == jobs.STARTING:
                if job.id in self._starting:
                    continue
                if state is not None and state != SHUTOFF:
                    job.move(jobs.RUNNING, now, lnm=rec.get("lnm"), started=job.started or now)
                else:
                    job.move(jobs.QUEUED, now)
            if job.state == jobs.RUNNING:
                if rec is None:
                    job.move(jobs.FAILED, now, error="its VM vanished")
                elif state == SHUTOFF:
                    job.move(jobs.DONE, now)
                    log.info("usherbatchd: job {id} done", id=job.id)
                else:
                    job.lnm = rec.get("lnm") or job.lnm
                    if job.stop_reason == jobs.CANCELLED:
                        await self._stop(job, now, jobs.CANCELLED)
                    elif now >= job.expected_end:
                        await self._stop(job, now, jobs.TIMEOUT)
            elif job.state == jobs.STOPPING:
                if rec is None or state == SHUTOFF:
                    job.move(job.stop_reason or jobs.TIMEOUT, now)
                    log.info("usherbatchd: job {id} ended ({state})", id=job.id, state=job.state)
                elif now - (job.stop_sent or now) >= self.settings.stop_grace:
                    await self._call(self.link.stop(self._vm(job), True), job, "destroy")
                    job.stop_sent = now
            if job.ended_state and rec is not None and job.id not in self.removing:
                self._spawn(self._remove(job), f"removing the VM of job {job.id}")
        self._forget_old()

    async def _stop(self, job, now, reason):
        job.move(jobs.STOPPING, now, stop_reason=reason, stop_sent=now)
        log.info("usherbatchd: stopping job {id} ({why})", id=job.id,
                 why="walltime reached" if reason == jobs.TIMEOUT else "cancelled")
        await self._call(self.link.stop(self._vm(job), False), job, "shutdown")

    async def _remove(self, job):
        self.removing.add(job.id)
        try:
            await self.link.remove(self._vm(job))
        except UsherError as e:
            log.warn("usherbatchd: cannot remove the VM of job {id}: {error}", id=job.id, error=e)
        finally:
            self.removing.discard(job.id)

    async def _call(self, d, job, what):
        try:
            return await d
        except UsherError as e:
            log.warn("usherbatchd: {what} of job {id}: {error}", what=what, id=job.id, error=e)
            return None

    def _forget_old(self):
        ended = sorted((j for j in self.jobs.values() if j.ended_state), key=lambda j: j.seq)
        for job in ended[:max(0, len(ended) - MAX_ENDED)]:
            del self.jobs[job.id]

    # -- the picture -----------------------------------------------------------------

    def _picture(self, now, lnms, records):
        by_vm = {self._full(j): j for j in self.jobs.values() if not j.ended_state}
        hosts = {}
        for info in lnms:
            name = info.get("name")
            if not isinstance(name, str):
                continue
            self.lnm_info[name] = info
            holds = dict(info.get("holds") or {})
            # A host we powered down that an administrator has put in
            # maintenance of their own meanwhile is theirs: never powered up.
            ours = name in self.powered_down and not _held_by_others(holds)
            hosts[name] = policy.Host(
                name=name, cpus=int(info.get("cpus") or 0),
                memory_mib=int(info.get("memory_mib") or 0),
                usable=bool(info.get("connected")) and not holds and not ours
                and name not in self.powering,
                powered_down=ours, reserved_cpus=self.settings.reserved_cpus,
                reserved_memory_mib=self.settings.reserved_memory_mib)
        for name, rec in records.items():
            host = hosts.get(rec.get("lnm"))
            if host is None:
                continue
            job = by_vm.get(name)
            holding = rec.get("state") in HOLDING
            host.vms[name] = policy.Slot(
                vcpus=int(rec.get("vcpus") or 0) if holding else 0,
                memory_mib=int(rec.get("memory_mib") or 0) if holding else 0,
                job=job.id if job else None,
                movable=bool(job and job.state == jobs.RUNNING and rec.get("state") == RUN
                             and job.id not in self.migrating))
        for job in self.jobs.values():
            # A start under way holds its host before the controller lists the VM.
            if job.state == jobs.STARTING and job.lnm in hosts:
                hosts[job.lnm].vms.setdefault(self._full(job), policy.Slot(
                    job.vcpus, job.memory_mib, job.id))
            target = self.migrating.get(job.id)
            if target in hosts:
                hosts[target].vms.setdefault(self._full(job) + "#incoming", policy.Slot(
                    job.vcpus, job.memory_mib, job.id))
        for name, host in hosts.items():
            if host.empty:
                self.empty_since.setdefault(name, now)
            else:
                self.empty_since.pop(name, None)
            host.empty_since = self.empty_since.get(name)
        return hosts

    # -- plans -------------------------------------------------------------------------

    async def _plan_and_act(self, now):
        queue = sorted((j for j in self.jobs.values() if j.state == jobs.QUEUED),
                       key=lambda j: j.seq)
        running = [j for j in self.jobs.values() if j.state in jobs.ACTIVE]
        draining = {src for src in (self.jobs[j].lnm for j in self.migrating
                                    if j in self.jobs)}
        plan = policy.plan_starts(queue, self.hosts, running, now, avoid=draining)
        self.reservation = plan.reservation
        await self._start_all(plan.starts, now)
        busy = {host for _, host in plan.starts}
        room = self.settings.max_migrations - len(self.migrating)
        if room > 0 and not self.powering:
            for job, source, target in policy.plan_consolidation(
                    self.hosts, self.jobs, now, max_moves=room,
                    min_remaining=self.settings.consolidate_min_remaining, avoid=busy):
                self.migrating[job.id] = target
                self._spawn(self._migrate(job, source, target), f"migrating job {job.id}")
        if self.powering:
            return       # one power change at a time: the picture is moving
        up = policy.plan_power_up(self.hosts, plan.reservation, queue, now,
                                  power_on_after=self.settings.power_on_after)
        if up is not None:
            self.powering[up] = "on"
            self._spawn(self._power_up(up), f"powering up {up}")
            return
        if self.migrating or plan.reservation is not None:
            return
        for lnm in policy.plan_power_down(self.hosts, now,
                                          idle_before=self.settings.idle_before_power_off,
                                          min_powered_on=self.settings.min_powered_on,
                                          busy=busy):
            self.powering[lnm] = "off"
            self._spawn(self._power_down(lnm), f"powering down {lnm}")

    async def _start_all(self, starts, now):
        self._starting = set()
        calls = []
        for job, lnm in starts:
            job.move(jobs.STARTING, now, lnm=lnm, attempts=job.attempts + 1)
            self._starting.add(job.id)
            calls.append(self._start(job, lnm, now))
        if calls:
            await defer.gatherResults([defer.Deferred.fromCoroutine(c) for c in calls],
                                      consumeErrors=True)
        self._starting = set()

    _starting = frozenset()

    async def _start(self, job, lnm, now):
        args = dict(job.args, vcpus=job.vcpus, memory_mib=job.memory_mib, guaranteed="yes")
        try:
            result = await self.link.start(self._vm(job), lnm, args)
        except LinkFailure as e:
            if e.sent:
                log.warn("usherbatchd: start of job {id}: {error}; looking again next round",
                         id=job.id, error=e)
                return      # stays starting: the next snapshot tells
            return self._start_failed(job, now, str(e))
        except UsherError as e:
            return self._start_failed(job, now, str(e))
        started = result.get("started") or []
        if started:
            job.move(jobs.RUNNING, now, lnm=started[0].get("lnm", lnm), started=now, error=None)
            log.info("usherbatchd: job {id} started on {lnm}", id=job.id, lnm=job.lnm)
        else:
            failed = result.get("failed") or [{}]
            self._start_failed(job, now, failed[0].get("error") or "not started")

    def _start_failed(self, job, now, why):
        if job.attempts >= self.settings.max_start_attempts:
            job.move(jobs.FAILED, now, error=why)
            log.error("usherbatchd: job {id} failed to start {n} times: {why}", id=job.id,
                      n=job.attempts, why=why)
        else:
            job.move(jobs.QUEUED, now, lnm=None, error=why)
            log.warn("usherbatchd: job {id} not started ({why}); queued again", id=job.id,
                     why=why)

    # -- background work ---------------------------------------------------------

    async def _migrate(self, job, source, target):
        try:
            result = await self.link.migrate(self._vm(job), target)
            moved = result.get("migrated") or []
            if moved:
                job.lnm = moved[0].get("to", target)
                log.info("usherbatchd: job {id} moved {src} -> {dst} (consolidation)",
                         id=job.id, src=source, dst=job.lnm)
            else:
                why = (result.get("failed") or [{}])[0].get("error")
                log.warn("usherbatchd: job {id} not moved to {dst}: {why}", id=job.id,
                         dst=target, why=why)
        except UsherError as e:
            log.warn("usherbatchd: migration of job {id} to {dst}: {error}", id=job.id,
                     dst=target, error=e)
        finally:
            self.migrating.pop(job.id, None)

    def _fields(self, lnm):
        return {"lnm": lnm,
                "hostname": self.settings.hostname(lnm, (self.lnm_info.get(lnm) or {})
                                                   .get("hostname"))}

    async def _power_down(self, lnm):
        try:
            await self.link.maintenance(lnm, True, POWER_REASON)
            # A VM may have landed between the picture and the hold: look again.
            _lnms, vms = await self.link.snapshot()
            present = sorted(v["name"] for v in vms if v.get("lnm") == lnm)
            # A VM on its way (migrating) or whose host is in doubt (lost,
            # unknown: a move whose outcome is unknown may still land here)
            # names its source, not this host: while any is, nothing is
            # powered down.
            present += sorted(v["name"] for v in vms
                              if v.get("state") in IN_DOUBT and v.get("lnm") != lnm)
            if present:
                log.info("usherbatchd: not powering down {lnm}: it has VMs ({vms})", lnm=lnm,
                         vms=", ".join(present[:5]))
                await self.link.maintenance(lnm, False, POWER_REASON)
                return
            argv = self.settings.hook("power_off", lnm)
            if argv is not None:
                result = await self.hooks.run(argv, **self._fields(lnm))
                if not result.ok:
                    log.error("usherbatchd: power_off_command for {lnm} failed: {detail}",
                              lnm=lnm, detail=result.detail)
                    await self.link.maintenance(lnm, False, POWER_REASON)
                    self.empty_since[lnm] = self.clock.seconds()    # not again at once
                    return
            self.powered_down[lnm] = {"since": time.time()}
            # Saved at once: a daemon that dies now must still know the host
            # is off (else it would never power it up again).
            await self._save(self.clock.seconds())
            log.info("usherbatchd: {lnm} powered down (empty)", lnm=lnm)
        except UsherError as e:
            log.warn("usherbatchd: powering down {lnm}: {error}", lnm=lnm, error=e)
        finally:
            self.powering.pop(lnm, None)

    async def _power_up(self, lnm):
        try:
            argv = self.settings.hook("power_on", lnm)
            if argv is not None:
                result = await self.hooks.run(argv, **self._fields(lnm))
                if not result.ok:
                    log.error("usherbatchd: power_on_command for {lnm} failed: {detail}",
                              lnm=lnm, detail=result.detail)
                    return
            deadline = self.clock.seconds() + self.settings.power_on_timeout
            while True:
                lnms, _vms = await self.link.snapshot()
                info = next((i for i in lnms if i.get("name") == lnm), None)
                if info is not None and info.get("connected"):
                    break
                if self.clock.seconds() >= deadline:
                    log.error("usherbatchd: {lnm} did not attach within {t:g} s of "
                              "power_on_command", lnm=lnm, t=self.settings.power_on_timeout)
                    return
                await task.deferLater(self.clock, self.settings.poll_interval, lambda: None)
            if not _held_by_others(dict(info.get("holds") or {})):
                # Only our own hold: an administrator's maintenance stays.
                await self.link.maintenance(lnm, False, POWER_REASON)
            self.powered_down.pop(lnm, None)
            self.empty_since.pop(lnm, None)
            log.info("usherbatchd: {lnm} powered up for the queue", lnm=lnm)
        except UsherError as e:
            log.warn("usherbatchd: powering up {lnm}: {error}", lnm=lnm, error=e)
        finally:
            self.powering.pop(lnm, None)

    # -- figures and files -----------------------------------------------------------------

    def _sample(self, now):
        on = [h for h in self.hosts.values() if not h.powered_down
              and self.lnm_info.get(h.name, {}).get("connected")]
        running = [j for j in self.jobs.values() if j.state in (jobs.RUNNING, jobs.STOPPING)]
        self.meter.sample(now, capacity_vcpus=sum(h.cpus for h in on),
                          capacity_memory=sum(h.memory_mib for h in on),
                          used_vcpus=sum(j.vcpus for j in running),
                          used_memory=sum(j.memory_mib for j in running),
                          hosts_on=len(on),
                          hosts_in_use=len({j.lnm for j in running if j.lnm}))

    def report(self):
        hosts = list(self.hosts.values())
        return accounting.report(self.meter, list(self.jobs.values()), len(hosts),
                                 max((h.cpus for h in hosts), default=0),
                                 max((h.memory_mib for h in hosts), default=0))

    def status(self, now):
        return {"updated": time.time(), "error": self.last_error,
                "jobs": [j.to_dict() for j in sorted(self.jobs.values(), key=lambda j: j.seq)],
                "hosts": {n: {"cpus": h.cpus, "memory_mib": h.memory_mib, "usable": h.usable,
                              "powered_down": h.powered_down, "vms": len(h.vms),
                              "job_vms": sum(1 for s in h.vms.values() if s.job),
                              "used_vcpus": h.used_vcpus, "used_memory_mib": h.used_memory,
                              "changing": self.powering.get(n)}
                          for n, h in sorted(self.hosts.items())},
                "report": self.report()}

    async def _save(self, now):
        state = {"seq": self.seq, "jobs": [j.to_dict() for j in self.jobs.values()],
                 "meter": self.meter.to_dict(), "powered_down": self.powered_down}
        try:
            await self.blocking(self.spool.save, "jobs.json", state)
            await self.blocking(self.spool.save, "status.json", self.status(now), True)
        except OSError as e:
            log.error("usherbatchd: cannot write its state in {dir}: {error}",
                      dir=self.spool.state_dir, error=e)


def _held_by_others(holds):
    """Is the host held by anyone but usherbatchd (an administrator's
    maintenance, a fenced host ...)?"""
    for kind, details in holds.items():
        if kind != "maintenance" or (details or {}).get("reason") != POWER_REASON:
            return True
    return False
