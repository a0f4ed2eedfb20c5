"""Status reports as deltas (issue 16; usher.protocol, report_status): the
LNM's monitor sends in full only the VMs whose figures changed and names the
others as kept; the controller keeps their figures, refreshing their times,
asks back what it cannot keep, refuses malformed kept lists, and still takes
an older LNM's full reports (as an LNM still reports in full to an older
controller). First on the controller's Monitoring and its PB entry point,
then a real Monitor reporting over PB (iosim) to a real Controller.
"""

import uuid

import pytest
from twisted.internet import defer, task
from twisted.spread import pb
from twisted.test import iosim

from usher import records, states
from usher.controller import lnm_input, monitoring as monitoring_module
from usher.controller.core import Controller
from usher.controller.lnm_input import LNMLimits
from usher.controller.lnm_link import NodeReporter
from usher.controller.monitoring import Monitoring
from usher.controller.state import GlobalState, LNMInfo
from usher.errors import InvalidRequest
from usher.lnm.link import RemoteReporter
from usher.lnm.monitor import FULL_REPORT_EVERY, Monitor, StatusDeltas
from usher.naming import MAX_NAME
from usher.protocol import FIGURES

from tests.grid import DOMAIN


def full(short, owner="alice"):
    return f"{short}.{owner}.{DOMAIN}"


def node_report(sampled_at=50.0, cpu=(10.0, 8.0, 5.0)):
    report = dict.fromkeys(FIGURES)
    report.update(cpu=list(cpu), vms=2, cpus=8, memory_mib=16384, free_memory_mib=15000,
                  sampled_at=sampled_at, sample_interval=5.0, source="libvirt")
    return report


def vm_report(name, cpu=(50.0, 40.0, 30.0), sampled_at=50.0):
    report = dict.fromkeys(FIGURES)
    report.update(cpu=list(cpu), name=name, state=states.RUN, sampled_at=sampled_at,
                  source="libvirt")
    return report


class Setup:
    def __init__(self, lnms=("lnm1", "lnm2"), vms_per_lnm=2, **kwargs):
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.state = GlobalState(DOMAIN)
        self.names = {}
        for lnm in lnms:
            self.state.lnms[lnm] = LNMInfo(lnm, {"cpus": 8}, handle=object())
            self.names[lnm] = [full(f"{i}.on{lnm}") for i in range(1, vms_per_lnm + 1)]
            for name in self.names[lnm]:
                self.state.add(self.state.new_record(name, state="run", lnm=lnm,
                                                     memory_mib=256, vcpus=1))
        self.monitoring = Monitoring(self.state, self.clock, **kwargs)

    def report(self, lnm, node, vms, kept=()):
        resend = []
        held = self.monitoring.report(lnm, node, vms, kept, resend)
        return held, resend


# --- the controller's Monitoring -------------------------------------------------------

def test_kept_figures_stay_and_refresh_their_times():
    s = Setup(history_interval=60.0)
    a, b = s.names["lnm1"]
    assert s.report("lnm1", node_report(50.0), [vm_report(a), vm_report(b, sampled_at=45.0)])
    s.clock.advance(15)
    assert s.monitoring.vm_status(a)["age"] == 15.0
    held, resend = s.report("lnm1", node_report(65.0), [], [a, b])
    assert (held, resend) == (2, [])
    for name, sampled_at in ((a, 65.0), (b, 60.0)):   # moved with the node's
        status = s.monitoring.vm_status(name)
        assert status["cpu"] == [50.0, 40.0, 30.0] and status["source"] == "libvirt"
        assert status["age"] == 0.0 and status["sampled_at"] == sampled_at
        assert s.monitoring.vm_load(name).age == 0.0
    assert sorted(s.monitoring.busiest_vms(["lnm1"])) == [(a, 50.0), (b, 50.0)]
    # The history goes on from kept figures (one row a minute).
    for at in (80.0, 95.0, 110.0, 125.0):
        s.clock.advance(15)
        s.report("lnm1", node_report(at), [], [a, b])
    assert [row[1]["cpu"] for row in s.monitoring.vm_history_rows(a)] == [50.0, 50.0]


def test_sent_and_kept_together_and_what_is_neither_loses_its_figures():
    s = Setup(vms_per_lnm=3)
    a, b, c = s.names["lnm1"]
    s.report("lnm1", node_report(), [vm_report(n) for n in (a, b, c)])
    held, resend = s.report("lnm1", node_report(65.0), [vm_report(a, cpu=(1.0, 2.0, 3.0))],
                            [b])
    assert (held, resend) == (2, [])
    assert s.monitoring.vm_status(a)["cpu"] == [1.0, 2.0, 3.0]
    assert s.monitoring.vm_status(b)["cpu"] == [50.0, 40.0, 30.0]
    assert s.monitoring.vm_status(c) == {} and len(s.monitoring) == 2


def test_a_kept_name_the_controller_cannot_keep_is_asked_back():
    s = Setup()
    a, b = s.names["lnm1"]
    s.report("lnm1", node_report(), [vm_report(a)])
    # b has no figures here (e.g. after a controller restart); nobody.knows
    # is no VM of the state.
    nobody = "nobody.knows"
    held, resend = s.report("lnm1", node_report(), [], [a, b, nobody])
    assert held == 1 and resend == [b, nobody]
    assert s.monitoring.vm_status(b) == {} and s.monitoring.vm_status(nobody) == {}
    held, resend = s.report("lnm1", node_report(), [vm_report(b)], [a])
    assert (held, resend) == (2, []) and s.monitoring.vm_status(b)["cpu"] == [50.0, 40.0,
                                                                              30.0]


def test_a_kept_name_of_a_vm_on_another_lnm_does_not_touch_its_figures():
    s = Setup()
    other = s.names["lnm2"][0]
    s.report("lnm2", node_report(), [vm_report(other, cpu=(7.0, 7.0, 7.0))])
    s.clock.advance(15)
    held, resend = s.report("lnm1", node_report(), [], [other])
    assert (held, resend) == (0, [other])
    status = s.monitoring.vm_status(other)
    assert status["cpu"] == [7.0, 7.0, 7.0] and status["age"] == 15.0
    assert s.monitoring.vm_load(other) is not None
    # Figures sent for it are not taken either, and asked back the same way.
    assert s.report("lnm1", node_report(), [vm_report(other)]) == (0, [other])
    assert s.monitoring.vm_status(other)["cpu"] == [7.0, 7.0, 7.0]


def test_a_vm_moved_away_is_not_kept_from_its_old_host():
    s = Setup()
    a = s.names["lnm1"][0]
    s.report("lnm1", node_report(), [vm_report(a)])
    s.state.update(a, lnm="lnm2")            # migrated; lnm2 has not reported yet
    assert s.report("lnm1", node_report(), [], [a]) == (0, [a])
    assert s.monitoring.vm_status(a) == {}   # the old host's figures went
    # Nor are the old host's figures kept by the new one.
    s.state.update(a, lnm="lnm1")
    s.report("lnm1", node_report(), [vm_report(a)])
    s.state.update(a, lnm="lnm2")
    assert s.report("lnm2", node_report(), [], [a]) == (0, [a])


@pytest.mark.parametrize("kept, message", [
    ("x", "kept VMs must be a list"),
    ([1], "strings of 1 to 253"),
    ([None], "strings of 1 to 253"),
    ([["a"]], "strings of 1 to 253"),
    ([""], "strings of 1 to 253"),
    (["x" * (MAX_NAME + 1)], "strings of 1 to 253"),
    (["a.b", "a.b"], "named twice"),
])
def test_malformed_kept_lists_are_refused_whole_and_change_nothing(kept, message):
    s = Setup()
    a, b = s.names["lnm1"]
    s.report("lnm1", node_report(cpu=(1.0, 1.0, 1.0)), [vm_report(a), vm_report(b)])
    s.clock.advance(15)
    with pytest.raises(InvalidRequest, match=message):
        s.report("lnm1", node_report(cpu=(2.0, 2.0, 2.0)), [vm_report(a)], kept)
    assert s.monitoring.lnm_status("lnm1")["cpu"] == [1.0, 1.0, 1.0]
    assert s.monitoring.vm_status(b)["age"] == 15.0


def test_a_vm_both_sent_and_kept_is_refused():
    s = Setup()
    a, b = s.names["lnm1"]
    s.report("lnm1", node_report(), [vm_report(a), vm_report(b)])
    with pytest.raises(InvalidRequest, match="named twice"):
        s.report("lnm1", node_report(), [vm_report(a, cpu=(1.0, 1.0, 1.0))], [a, b])
    assert s.monitoring.vm_status(a)["cpu"] == [50.0, 40.0, 30.0]


def test_the_name_regex_runs_only_for_names_not_placed_on_the_lnm(monkeypatch):
    s = Setup()
    a, b = s.names["lnm1"]
    checked = []

    def counting(name):
        checked.append(name)
        return real(name)

    real = monitoring_module.is_host_vm_name
    monkeypatch.setattr(monitoring_module, "is_host_vm_name", counting)
    other = s.names["lnm2"][0]
    assert s.report("lnm1", node_report(), [vm_report(a), vm_report(b), vm_report(other),
                                            vm_report("stray.example.org")]) == \
        (2, [other, "stray.example.org"])
    assert checked == [other, "stray.example.org"]
    # A malformed name is still refused as before.
    with pytest.raises(InvalidRequest, match="a VM's figures without a valid name"):
        s.report("lnm1", node_report(), [vm_report(a), vm_report("bad name!")])
    with pytest.raises(InvalidRequest, match="a VM's figures without a valid name"):
        s.report("lnm1", node_report(), [{"name": ["a"]}])


# --- the PB entry point -------------------------------------------------------------------

LIMITS = LNMLimits(max_vms=4)


def make_controller(vms=2):
    clock = task.Clock()
    clock.advance(1000)
    controller = Controller(domain=DOMAIN, clock=clock, lnm_limits=LIMITS)
    controller.state.lnms["lnm1"] = LNMInfo("lnm1", {}, handle=object())
    names = [full(f"{i}.web") for i in range(1, vms + 1)]
    for name in names:
        controller.state.add(controller.state.new_record(name, state="run", lnm="lnm1"))
    return controller, clock, names


def outcome(d):
    results = []
    d.addBoth(results.append)
    [result] = results
    return result


def test_an_old_style_full_report_still_works_and_is_answered_with_a_dict():
    controller, clock, (a, b) = make_controller()
    reporter = NodeReporter(controller, "lnm1")
    answer = outcome(reporter.remote_report_status(
        records.encode_object(node_report()), records.encode_chunks([vm_report(a),
                                                                     vm_report(b)])))
    assert answer == {"resend": []}
    assert controller.monitoring.vm_status(a)["cpu"] == [50.0, 40.0, 30.0]
    clock.advance(15)
    # Then a delta.
    answer = outcome(reporter.remote_report_status(
        records.encode_object(node_report(65.0)), records.encode_chunks([]),
        records.encode_chunks([a, "gone.example.org"])))
    assert answer == {"resend": ["gone.example.org"]}
    assert controller.monitoring.vm_status(a)["age"] == 0.0
    assert controller.monitoring.vm_status(b) == {}


@pytest.mark.parametrize("vms, kept, message", [
    (0, "kept", "list of JSON chunks"),
    (0, [7], "each chunk must be a string"),
    (0, ["[1]"], "strings of 1 to 253"),
    (0, ['["a", null]'], "strings of 1 to 253"),
    (0, ['{"a": 1}'], "JSON chunk"),
    (0, [records.encode_chunks(["x" * (MAX_NAME + 1)])[0]], "strings of 1 to 253"),
    (0, ["[]"] * (LIMITS.bulk_chunks + 1), "chunks, more than"),
    (0, records.encode_chunks([f"{i}.x" for i in range(5)]), "more than the 4 allowed"),
    (2, records.encode_chunks([f"{i}.x" for i in range(3)]), "more than the 4 allowed"),
    (0, records.encode_chunks(["a.x", "a.x"]), "kept VM twice"),
])
def test_oversize_or_malformed_kept_lists_are_refused_at_the_boundary(vms, kept, message):
    controller, clock, names = make_controller()
    reporter = NodeReporter(controller, "lnm1")
    outcome(reporter.remote_report_status(records.encode_object(node_report()),
                                          records.encode_chunks([vm_report(n)
                                                                 for n in names])))
    clock.advance(15)
    failure = outcome(reporter.remote_report_status(
        records.encode_object(node_report(cpu=(1.0, 1.0, 1.0))),
        records.encode_chunks([vm_report(n) for n in names[:vms]]), kept))
    assert failure.check(InvalidRequest), failure
    assert message in failure.getErrorMessage()
    assert controller.monitoring.lnm_status("lnm1")["cpu"] == [10.0, 8.0, 5.0]
    assert controller.monitoring.vm_status(names[0])["age"] == 15.0


def test_check_status_kept():
    assert lnm_input.check_status_kept(None, LIMITS) == ()
    assert lnm_input.check_status_kept(records.encode_chunks(["a", "b"]), LIMITS, 2) == \
        ["a", "b"]
    assert lnm_input.are_names([]) and not lnm_input.are_names([b"a"])


# --- a real Monitor over PB ----------------------------------------------------------------

class _Root(pb.Root):
    def __init__(self, reporter):
        self.reporter = reporter

    def remote_reporter(self):
        return self.reporter


class OldNodeReporter(NodeReporter):
    """A controller before issue 16: full reports only, answered True."""

    def remote_report_status(self, node, chunks):
        return NodeReporter.remote_report_status(self, node, chunks).addCallback(
            lambda _answer: True)


class Spy:
    """The LNM's reporter, noting what each status report sends."""

    def __init__(self, inner, sent):
        self.inner = inner
        self.sent = sent

    async def report_status(self, node, vms, kept=None):
        self.sent.append(([vm["name"] for vm in vms], kept))
        return await self.inner.report_status(node, vms, kept)


class Link:
    """lnm1's Monitor reporting over PB to a real Controller, on one
    task.Clock; the VMs' memory in use (KiB) is their one changing figure."""

    def __init__(self, shorts=("1.web", "2.web", "3.web"), reporter_class=NodeReporter,
                 full_every=FULL_REPORT_EVERY):
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.controller = Controller(domain=DOMAIN, clock=self.clock)
        state = self.controller.state
        state.lnms["lnm1"] = LNMInfo("lnm1", {}, handle=object())
        self.names = [full(short) for short in shorts]
        for name in self.names:
            state.add(state.new_record(name, state=states.RUN, lnm="lnm1"))
        self.used = {name: 256 * 1024 for name in self.names}
        self.uuids = {name: str(uuid.uuid4()) for name in self.names}
        self.reporter_class = reporter_class
        self.reporter = None
        self.sent = []
        self.monitor = Monitor(None, name="lnm1", clock=self.clock,
                               reporter_of=lambda: self.reporter,
                               full_report_every=full_every)
        self.attach()

    def attach(self):
        server = pb.PBServerFactory(_Root(self.reporter_class(self.controller, "lnm1")))
        client = pb.PBClientFactory()
        _, _, self.pump = iosim.connectedServerAndClient(
            lambda: server.buildProtocol(None), lambda: client.buildProtocol(None))
        roots, refs = [], []
        client.getRootObject().addCallback(roots.append)
        self.pump.flush()
        roots[0].callRemote("reporter").addCallback(refs.append)
        self.pump.flush()
        self.reporter = Spy(RemoteReporter(refs[0], clock=self.clock, timeout=30), self.sent)

    def sample(self):
        self.clock.advance(5)
        now = self.clock.seconds()
        domains = [{"name": name, "uuid": self.uuids[name], "state": states.RUN, "vcpus": 1,
                    "memory_kib": 1024 * 1024, "cpu_time_ns": 10 ** 9,
                    "memory_used_kib": used} for name, used in self.used.items()]
        node = {"cpus": 4, "memory_kib": 8 << 20, "memory_used_kib": 1 << 20,
                "memory_free_kib": 7 << 20, "cpu_busy_ns": 0,
                "cpu_total_ns": int(now * 4e9)}
        self.monitor.apply(node, domains, now)

    def report(self):
        """Sample for a report interval, report -> (names sent, kept)."""
        for _ in range(3):
            self.sample()
        results = []
        defer.Deferred.fromCoroutine(self.monitor.report()).addBoth(results.append)
        self.pump.flush()
        assert results == [None]
        return self.sent[-1]

    def status(self, name):
        return self.controller.monitoring.vm_status(name)


def test_a_changed_vm_is_sent_in_full_the_unchanged_kept():
    link = Link()
    a, b, c = link.names
    assert link.report() == ([a, b, c], None)       # the first: full
    assert link.report() == ([], [a, b, c])         # idle: all kept
    link.clock.advance(1)
    link.used[b] = 512 * 1024
    assert link.report() == ([b], [a, c])
    assert link.status(b)["memory_used"][0] > 256.0        # its averages rise
    assert link.status(a)["memory_used"][0] == 256.0 and link.status(a)["age"] == 0.0
    sampled = link.controller.monitoring.lnm_status("lnm1")["sampled_at"]
    assert link.status(a)["sampled_at"] == sampled == link.monitor.sampled_at
    assert link.monitor.reports == 3


def test_a_vm_gone_from_the_lnm_loses_its_figures():
    link = Link()
    a, b, c = link.names
    link.report()
    link.report()
    del link.used[c]
    assert link.report() == ([], [a, b])
    assert link.status(c) == {} and link.status(a) != {}


def test_every_nth_report_is_full():
    link = Link(full_every=4)
    kinds = [link.report()[1] is None for _ in range(9)]
    assert kinds == [True, False, False, False, True, False, False, False, True]
    assert all(link.status(name)["age"] == 0.0 for name in link.names)


def test_after_reattach_the_first_report_is_full():
    link = Link()
    a, b, c = link.names
    link.report()
    assert link.report() == ([], [a, b, c])
    # The connection drops (the controller forgets the VMs' figures) and
    # the LNM attaches again.
    link.controller.monitoring.lnm_detached("lnm1")
    link.attach()
    assert link.report() == ([a, b, c], None)
    assert all(link.status(name) != {} for name in link.names)
    assert link.report() == ([], [a, b, c])


def test_a_kept_name_the_controller_does_not_know_is_asked_back_and_then_sent():
    link = Link()
    a, b, c = link.names
    link.report()
    # The controller no longer has b's figures (its record went and came
    # back; a restarted controller would be the same).
    record = dict(link.controller.state.vms[b])
    link.controller.state.remove(b)
    link.controller.state.add(link.controller.state.new_record(b, state=states.RUN,
                                                               lnm="lnm1"))
    assert record["lnm"] == "lnm1" and link.status(b) == {}
    assert link.report() == ([], [a, b, c])         # b asked back
    assert link.status(b) == {}
    assert link.report() == ([b], [a, c])           # and sent in full
    assert link.status(b)["memory_used"][0] == 256.0
    assert link.report() == ([], [a, b, c])


def test_after_a_failed_report_the_next_is_full():
    link = Link()
    a, b, c = link.names
    link.report()
    inner = link.reporter.inner

    class Failing:
        async def report_status(self, node, vms, kept=None):
            raise RuntimeError("timed out")

    link.reporter.inner = Failing()
    link.report()
    link.reporter.inner = inner
    assert link.report() == ([a, b, c], None)
    assert link.report() == ([], [a, b, c])


def test_an_lnm_reports_in_full_to_an_older_controller():
    link = Link(reporter_class=OldNodeReporter)
    for _ in range(5):
        assert link.report() == (link.names, None)
    assert link.monitor.reports == 5 and all(link.status(n) != {} for n in link.names)


def test_status_deltas_while_a_report_is_in_flight():
    deltas = StatusDeltas(full_every=4)
    reporter = object()
    node = {"sampled_at": 10.0}
    vm = dict.fromkeys(FIGURES) | {"name": "a.x", "state": "running",
                                          "sampled_at": 10.0, "source": None}
    sent, kept, pending = deltas.prepare(reporter, node, [vm])
    assert kept is None
    deltas.acknowledged(reporter, pending, {"resend": []})
    first = deltas.prepare(reporter, node, [vm])
    assert first[1] == ["a.x"]
    second = deltas.prepare(reporter, node, [vm])     # the first is unanswered
    assert second[1] is None
    # An answer for a reporter that is gone changes nothing.
    deltas.acknowledged(object(), {}, {"resend": []})
    assert deltas.acked == {"a.x": pending["a.x"]}
    with pytest.raises(ValueError):
        StatusDeltas(full_every=0)


def test_the_status_reports_bench_runs_at_toy_scale(capsys):
    from bench import status_reports
    status_reports.main(["--lnms", "3", "--vms", "4", "--rounds", "1"])
    out = capsys.readouterr().out
    for label in ("full", "delta, idle", "delta, 1 changed", "cycle (1 full in 4)"):
        assert label in out
