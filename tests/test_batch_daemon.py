"""usherbatchd's scheduler against an in-memory cluster double (the
IClusterLink seam) on a task.Clock: the spool, job states, packing, walltime,
cancel, consolidation as jobs end, power down only of hosts with no VM at
all (other users' too), power up on demand, and the report."""

import os

import pytest_twisted
from twisted.internet import defer, task
from zope.interface import implementer

from usher.clients.batchd import jobs
from usher.clients.batchd.cli import main as cli_main
from usher.clients.batchd.hooks import HookResult
from usher.clients.batchd.link import IClusterLink
from usher.clients.batchd.scheduler import Scheduler
from usher.clients.batchd.settings import BatchSettings
from usher.clients.batchd.spool import Spool

DOMAIN = "example"
USER = "batchd"


@implementer(IClusterLink)
class FakeCluster:
    """Hosts and VMs in memory; the controller's answers, roughly."""

    def __init__(self, names, cpus=16, memory=16384):
        self.lnms = {n: {"name": n, "connected": True, "cpus": cpus, "memory_mib": memory,
                         "hostname": f"{n}.site", "holds": {}} for n in names}
        self.vms = {}
        self.calls = []

    def full_name(self, short):
        return f"{short}.{USER}.{DOMAIN}"

    def snapshot(self):
        return defer.succeed(([dict(v) for v in self.lnms.values()],
                              [dict(v) for v in self.vms.values()]))

    def start(self, short, lnm, args):
        self.calls.append(("start", short, lnm))
        name = self.full_name(short)
        if self.lnms[lnm]["holds"]:
            return defer.succeed({"started": [], "failed": [{"name": name, "error": "held"}]})
        self.vms[name] = {"name": name, "owner": USER, "state": "run", "lnm": lnm,
                          "vcpus": args["vcpus"], "memory_mib": args["memory_mib"],
                          "args": args}
        return defer.succeed({"started": [{"name": name, "lnm": lnm}], "failed": []})

    def stop(self, short, hard):
        self.calls.append(("destroy" if hard else "shutdown", short))
        self.vms[self.full_name(short)]["state"] = "shutoff"
        return defer.succeed({"done": [], "failed": []})

    def remove(self, short):
        self.calls.append(("remove", short))
        self.vms.pop(self.full_name(short), None)
        return defer.succeed({})

    def migrate(self, short, lnm):
        self.calls.append(("migrate", short, lnm))
        vm = self.vms[self.full_name(short)]
        source, vm["lnm"] = vm["lnm"], lnm
        return defer.succeed({"migrated": [{"name": vm["name"], "from": source, "to": lnm}]})

    def maintenance(self, lnm, on, reason):
        self.calls.append(("maintenance", lnm, on))
        holds = self.lnms[lnm]["holds"]
        if on:
            holds["maintenance"] = {"reason": reason}
        else:
            holds.pop("maintenance", None)
        return defer.succeed({"lnm": lnm, "maintenance": on})

    # what the guests and other users do
    def guest_shuts_off(self, short):
        self.vms[self.full_name(short)]["state"] = "shutoff"

    def add_foreign(self, name, lnm, vcpus=1):
        self.vms[name] = {"name": name, "owner": "bob", "state": "run", "lnm": lnm,
                          "vcpus": vcpus, "memory_mib": 512}

    def on(self, name):
        return sorted(v["name"].split(".")[0] for v in self.vms.values() if v["lnm"] == name)


class FakeHooks:
    def __init__(self):
        self.runs = []
        self.ok = True

    def run(self, argv, **fields):
        self.runs.append([w.format(**fields) for w in argv])
        return defer.succeed(HookResult(self.ok, "" if self.ok else "failed"))


def immediate(f, *args):
    return defer.maybeDeferred(f, *args)


def make(tmp_path, cluster, **options):
    values = dict(queue_dir=str(tmp_path / "queue"), state_dir=str(tmp_path / "state"),
                  poll_interval=1.0, idle_before_power_off=5.0, consolidate_min_remaining=0.0,
                  power_off_command=["power-off", "{hostname}"],
                  power_on_command=["power-on", "{lnm}"])
    values.update(options)
    settings = BatchSettings(**values)
    clock = task.Clock()
    hooks = FakeHooks()
    scheduler = Scheduler(settings, cluster, Spool(settings.queue_dir, settings.state_dir), hooks,
                          clock, blocking=immediate)
    return scheduler, clock, hooks, settings


def submit(settings, vcpus, walltime=100.0, memory=1024):
    spool = Spool(settings.queue_dir)
    spool.prepare()
    return spool.submit({"vcpus": vcpus, "memory_mib": memory, "walltime": walltime}, settings)


async def rounds(scheduler, clock, n=1, step=1.0):
    for _ in range(n):
        clock.advance(step)
        await scheduler.tick()


@pytest_twisted.ensureDeferred
async def test_jobs_run_packed_in_guaranteed_vms_and_end_when_their_vm_shuts_off(tmp_path):
    cluster = FakeCluster(["lnm1", "lnm2", "lnm3"])
    scheduler, clock, _hooks, settings = make(tmp_path, cluster, idle_before_power_off=1e9)
    await scheduler.load()
    ids = [submit(settings, 4) for _ in range(4)]
    await rounds(scheduler, clock)
    assert all(scheduler.jobs[i].state == jobs.RUNNING for i in ids)
    # 4 x 4 vCPUs fill one 16-CPU host: all on the same one.
    assert {scheduler.jobs[i].lnm for i in ids} == {"lnm1"}
    vm = cluster.vms[cluster.full_name(f"{ids[0]}.batch")]
    assert vm["args"]["guaranteed"] == "yes" and vm["vcpus"] == 4
    cluster.guest_shuts_off(f"{ids[0]}.batch")
    await rounds(scheduler, clock)
    assert scheduler.jobs[ids[0]].state == jobs.DONE
    assert ("remove", f"{ids[0]}.batch") in cluster.calls
    status = Spool(settings.queue_dir, settings.state_dir).read_status()
    assert {j["id"]: j["state"] for j in status["jobs"]}[ids[0]] == "done"


@pytest_twisted.ensureDeferred
async def test_walltime_shuts_the_job_down_then_destroys_it_after_the_grace(tmp_path):
    cluster = FakeCluster(["lnm1"])
    scheduler, clock, _hooks, settings = make(tmp_path, cluster, stop_grace=3.0)
    await scheduler.load()
    job_id = submit(settings, 2, walltime=5.0)
    await rounds(scheduler, clock)
    assert scheduler.jobs[job_id].state == jobs.RUNNING
    cluster.stop = lambda short, hard: (cluster.calls.append(("destroy" if hard else "shutdown",
                                                              short)) or defer.succeed({}))
    await rounds(scheduler, clock, 5)
    assert scheduler.jobs[job_id].state == jobs.STOPPING
    await rounds(scheduler, clock, 3)
    assert ("shutdown", f"{job_id}.batch") in cluster.calls
    assert ("destroy", f"{job_id}.batch") in cluster.calls
    cluster.guest_shuts_off(f"{job_id}.batch")
    await rounds(scheduler, clock)
    assert scheduler.jobs[job_id].state == jobs.TIMEOUT


@pytest_twisted.ensureDeferred
async def test_cancel_of_a_queued_and_a_running_job_and_not_of_someone_elses(tmp_path):
    cluster = FakeCluster(["lnm1"])
    scheduler, clock, _hooks, settings = make(tmp_path, cluster)
    await scheduler.load()
    running = submit(settings, 16)
    queued = submit(settings, 16)
    await rounds(scheduler, clock)
    assert scheduler.jobs[queued].state == jobs.QUEUED
    # The queued job is uid 4242's; the cancel files come from uid 4343
    # (the tests may run as root, who may cancel anything).
    scheduler.jobs[queued].uid = 4242
    scheduler.jobs[running].uid = 4343
    take = scheduler.spool.take_cancels
    scheduler.spool.take_cancels = lambda: [(job_id, 4343) for job_id, _uid in take()]
    spool = Spool(settings.queue_dir)
    spool.request_cancel(queued)
    spool.request_cancel(running)
    await rounds(scheduler, clock, 2)
    assert scheduler.jobs[running].state == jobs.CANCELLED
    # Not cancelled: it starts in the room the cancelled job left.
    assert scheduler.jobs[queued].state == jobs.RUNNING
    assert ("shutdown", f"{running}.batch") in cluster.calls


@pytest_twisted.ensureDeferred
async def test_jobs_consolidate_as_others_end_and_the_empty_host_is_powered_down(tmp_path):
    cluster = FakeCluster(["lnm1", "lnm2", "lnm3"])
    scheduler, clock, hooks, settings = make(tmp_path, cluster, min_powered_on=1)
    await scheduler.load()
    big = [submit(settings, 12) for _ in range(2)]
    small = [submit(settings, 4) for _ in range(2)]
    await rounds(scheduler, clock)
    lnm_of = {i: scheduler.jobs[i].lnm for i in big + small}
    assert lnm_of[small[0]] == lnm_of[big[0]] and lnm_of[small[1]] == lnm_of[big[1]]
    # The big job of the second host ends: its small job moves beside the first big one?
    # No room there (12 + 4 = 16 full): the small job of host 1 ends first instead.
    cluster.guest_shuts_off(f"{small[0]}.batch")
    cluster.guest_shuts_off(f"{big[1]}.batch")
    await rounds(scheduler, clock, 2)
    # The lone small job on the second host fits beside the first big job: it moves.
    assert ("migrate", f"{small[1]}.batch", lnm_of[big[0]]) in cluster.calls
    await rounds(scheduler, clock, 8)
    emptied = lnm_of[big[1]]
    assert cluster.on(emptied) == []
    assert ("maintenance", emptied, True) in cluster.calls
    assert ["power-off", f"{emptied}.site"] in hooks.runs
    assert emptied in scheduler.powered_down
    # Never the host with jobs on it, and min_powered_on keeps one on.
    assert lnm_of[big[0]] not in scheduler.powered_down


@pytest_twisted.ensureDeferred
async def test_a_host_with_another_users_vm_is_never_powered_down(tmp_path):
    cluster = FakeCluster(["lnm1", "lnm2", "lnm3"])
    cluster.add_foreign("web.bob.example", "lnm2")
    scheduler, clock, hooks, _settings = make(tmp_path, cluster, min_powered_on=0)
    await scheduler.load()
    await rounds(scheduler, clock, 10)
    assert "lnm2" not in scheduler.powered_down
    assert not any(run[1] == "lnm2.site" for run in hooks.runs)
    assert sorted(scheduler.powered_down) == ["lnm1", "lnm3"]


@pytest_twisted.ensureDeferred
async def test_a_vm_landing_during_power_down_keeps_the_host_on(tmp_path):
    cluster = FakeCluster(["lnm1", "lnm2"])
    scheduler, clock, hooks, _settings = make(tmp_path, cluster, min_powered_on=1)
    await scheduler.load()
    original = cluster.maintenance

    def maintenance(lnm, on, reason):
        if on:
            cluster.add_foreign("late.bob.example", lnm)      # placed just before the hold
        return original(lnm, on, reason)
    cluster.maintenance = maintenance
    await rounds(scheduler, clock, 8)
    assert hooks.runs == []
    assert scheduler.powered_down == {}
    assert all(not info["holds"] for info in cluster.lnms.values())


@pytest_twisted.ensureDeferred
async def test_no_host_is_powered_down_while_a_vm_may_be_landing_anywhere(tmp_path):
    """A migrating VM (or one whose move's outcome is unknown: lost) names
    its source; it may land on the empty host: nothing is powered down."""
    cluster = FakeCluster(["lnm1", "lnm2"])
    cluster.add_foreign("moving.bob.example", "lnm1")
    cluster.vms["moving.bob.example"]["state"] = "migrating"
    scheduler, clock, hooks, _settings = make(tmp_path, cluster, min_powered_on=1)
    await scheduler.load()
    await rounds(scheduler, clock, 8)
    assert hooks.runs == [] and scheduler.powered_down == {}
    assert all(not info["holds"] for info in cluster.lnms.values())
    cluster.vms["moving.bob.example"]["state"] = "run"     # it settled on lnm1
    await rounds(scheduler, clock, 8)
    assert sorted(scheduler.powered_down) == ["lnm2"]


@pytest_twisted.ensureDeferred
async def test_an_administrators_maintenance_of_a_powered_down_host_is_left_alone(tmp_path):
    cluster = FakeCluster(["lnm1", "lnm2"])
    scheduler, clock, hooks, settings = make(tmp_path, cluster, min_powered_on=1)
    await scheduler.load()
    await rounds(scheduler, clock, 7)
    assert sorted(scheduler.powered_down) == ["lnm2"]
    # The administrator takes the host for a repair: it is theirs now.
    cluster.lnms["lnm2"]["holds"]["maintenance"] = {"reason": "new PSU", "by": "root"}
    submit(settings, 12, walltime=1000)
    submit(settings, 12, walltime=1000)
    await rounds(scheduler, clock, 4)
    assert ["power-on", "lnm2"] not in hooks.runs
    assert cluster.lnms["lnm2"]["holds"]["maintenance"]["reason"] == "new PSU"


@pytest_twisted.ensureDeferred
async def test_a_failing_power_off_hook_releases_the_maintenance_hold(tmp_path):
    cluster = FakeCluster(["lnm1", "lnm2"])
    scheduler, clock, hooks, _settings = make(tmp_path, cluster, min_powered_on=1)
    hooks.ok = False
    await scheduler.load()
    await rounds(scheduler, clock, 7)
    assert hooks.runs and scheduler.powered_down == {}
    assert all(not info["holds"] for info in cluster.lnms.values())


@pytest_twisted.ensureDeferred
async def test_a_powered_down_host_is_powered_up_when_the_queue_needs_it(tmp_path):
    cluster = FakeCluster(["lnm1", "lnm2"])
    scheduler, clock, hooks, settings = make(tmp_path, cluster, min_powered_on=1)
    await scheduler.load()
    await rounds(scheduler, clock, 7)
    assert sorted(scheduler.powered_down) == ["lnm2"]
    first = submit(settings, 12, walltime=1000)
    second = submit(settings, 12, walltime=1000)
    await rounds(scheduler, clock)
    assert scheduler.jobs[first].state == jobs.RUNNING
    assert scheduler.jobs[second].state == jobs.QUEUED
    await rounds(scheduler, clock, 2)
    assert ["power-on", "lnm2"] in hooks.runs
    assert ("maintenance", "lnm2", False) in cluster.calls
    assert scheduler.powered_down == {}
    await rounds(scheduler, clock, 2)
    assert scheduler.jobs[second].state == jobs.RUNNING
    assert scheduler.jobs[second].lnm == "lnm2"


@pytest_twisted.ensureDeferred
async def test_state_survives_a_restart_and_the_report_compares_with_the_baseline(tmp_path):
    cluster = FakeCluster(["lnm1", "lnm2", "lnm3", "lnm4"])
    scheduler, clock, _hooks, settings = make(tmp_path, cluster, idle_before_power_off=1e9)
    await scheduler.load()
    ids = [submit(settings, 4, walltime=10.0) for _ in range(8)]
    await rounds(scheduler, clock)
    again, clock2, _h, _s = make(tmp_path, cluster, idle_before_power_off=1e9)
    clock2.advance(clock.seconds())
    await again.load()
    assert {i: again.jobs[i].state for i in ids} == {i: jobs.RUNNING for i in ids}
    await rounds(again, clock2, 12)
    assert all(again.jobs[i].state == jobs.TIMEOUT for i in ids)
    report = again.report()
    ours, base = report["usherbatchd"], report["baseline"]
    assert base["jobs"] == 8
    assert ours["mean_hosts_in_use"] < base["mean_hosts_in_use"]
    assert ours["utilisation_vcpus"] > 0


def test_the_cli_submits_checks_and_reports(tmp_path, capsys):
    config = tmp_path / "batchd.config"
    config.write_text(f"[batchd]\nqueue_dir = {tmp_path}/q\nstate_dir = {tmp_path}/s\n"
                      "max_vcpus = 8\n")
    os.makedirs(tmp_path / "q" / "new")
    assert cli_main(["--config", str(config), "submit", "--vcpus", "2", "--memory", "512",
                     "--walltime", "90", "--arg", "script=run.sh"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert os.path.exists(tmp_path / "q" / "new" / f"{job_id}.json")
    assert cli_main(["--config", str(config), "submit", "--vcpus", "9", "--memory", "512",
                     "--walltime", "90"]) == 2
    assert "vcpus must be an integer from 1 to 8" in capsys.readouterr().err
    assert cli_main(["--config", str(config), "status"]) == 1


def test_a_job_file_swapped_for_a_fifo_or_a_link_is_refused_without_blocking(tmp_path):
    spool = Spool(str(tmp_path / "queue"), str(tmp_path / "state"))
    spool.prepare()
    new = os.path.join(str(tmp_path / "queue"), "new")
    os.mkfifo(os.path.join(new, "j1.json"))
    target = tmp_path / "elsewhere.json"
    target.write_text('{"vcpus": 1, "memory_mib": 512, "walltime": 60}')
    os.symlink(str(target), os.path.join(new, "j2.json"))
    accepted, refused = spool.take_new(BatchSettings(queue_dir=str(tmp_path / "queue"),
                                                     state_dir=str(tmp_path / "state")))
    assert accepted == []
    assert sorted(name for name, _why in refused) == ["j1.json", "j2.json"]
    assert os.listdir(new) == []
