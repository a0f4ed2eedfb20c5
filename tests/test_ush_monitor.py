"""ush's monitoring views (list -s, list_lnm -s, top) on figures shaped by a
real Controller: a client double that forwards to it, so the columns are
tested against what the controller really sends."""

import importlib
import io
import json

import pytest
from twisted.internet import defer, task

from usher.controller.core import Controller
from usher.controller.state import LNMInfo
from usher.protocol import FIGURES

try:
    ush = importlib.import_module("usher.clients.ush")
    ush_monitor = importlib.import_module("usher.clients.ush.monitor")
except ImportError:  # before packaging: the source tree's clients/ package
    ush = importlib.import_module("clients.ush")
    ush_monitor = importlib.import_module("clients.ush.monitor")

DOMAIN = "usher.test"
USER = "alice"


def full(short):
    return f"{short}.{USER}.{DOMAIN}"


def figures(**values):
    report = dict.fromkeys(FIGURES)
    report.update({key: list(value) for key, value in values.items()})
    return report


def build_controller():
    clock = task.Clock()
    clock.advance(100)
    controller = Controller(domain=DOMAIN, clock=clock)
    state = controller.state
    for lnm in ("lnm1", "lnm2", "lnm3"):
        state.lnms[lnm] = LNMInfo(lnm, {"cpus": 8, "memory_mib": 16384}, handle=object())
    for short, lnm, vm_state in (("1.web", "lnm1", "run"), ("2.web", "lnm1", "run"),
                                 ("3.web", "lnm2", "run"), ("4.web", "lnm2", "shutoff")):
        state.add(state.new_record(full(short), state=vm_state, lnm=lnm, memory_mib=512,
                                   vcpus=2))
    node1 = figures(cpu=(45.25, 30.0, 12.5), net_rx=(1536.0, 1000.0, 900.0),
                    net_tx=(3 * 1024 ** 2, 1.0, 1.0), disk_read=(0.0, 0.0, 0.0),
                    disk_write=(20 * 1024 ** 2, 0.0, 0.0), memory_used=(2048.0, 2000.0, 1900.0))
    node1.update(vms=2, cpus=8, memory_mib=16384, free_memory_mib=14000, sampled_at=99.0,
                 sample_interval=5.0, source="simulated:wave", simulated_load="wave")
    controller.lnm_status_report("lnm1", node1, [
        dict(figures(cpu=(180.0, 150.0, 90.0), net_rx=(1536.0, 1.0, 1.0),
                     net_tx=(512.0, 1.0, 1.0), memory_used=(300.0, 300.0, 300.0)),
             name=full("1.web"), source="simulated:wave"),
        dict(figures(cpu=(1200.5, 900.0, 10.0)), name=full("2.web"), source="simulated:wave"),
    ])
    # lnm2 reports from a driver without statistics: every figure unavailable.
    node2 = figures()
    node2.update(vms=1, cpus=8, memory_mib=16384, free_memory_mib=None, source=None)
    controller.lnm_status_report("lnm2", node2, [dict(figures(), name=full("3.web"))])
    clock.advance(2)
    return controller


class ControllerClient:
    """The UsherClient API, answered by a real Controller in process."""

    def __init__(self, controller, host, port, username, password):
        self.controller = controller
        self.connected = False
        self.user = None
        self.domain = DOMAIN
        self.vms = {}
        self.top_calls = []

    def on_change(self, callback):
        return lambda: None

    def on_connection(self, callback):
        return lambda: None

    def connect(self):
        self.connected, self.user = True, USER
        return defer.succeed({"user": USER, "admin": False, "domain": DOMAIN})

    def disconnect(self):
        self.connected = False
        return defer.succeed(None)

    def list(self, selection=None, status=False, remote=False):
        return defer.ensureDeferred(self.controller.list(USER, False, selection, status))

    def list_lnm(self, patterns=(), status=False):
        return defer.succeed(self.controller.list_lnm(USER, False, patterns, status))

    def top(self, patterns=(), count=10):
        self.top_calls.append((list(patterns), count))
        return defer.ensureDeferred(self.controller.top(USER, False, patterns, count))


class Harness:
    def __init__(self, json_output=False, live=False):
        self.controller = build_controller()
        self.clock = task.Clock()
        self.out, self.err = io.StringIO(), io.StringIO()
        self.clients = []

        def factory(host, port, username, password):
            client = ControllerClient(self.controller, host, port, username, password)
            self.clients.append(client)
            return client

        self.shell = ush.Shell(factory, ush.UshSettings(username=USER, password="pw"),
                               out=self.out, err=self.err, clock=self.clock,
                               json_output=json_output)
        self.shell.live_output = live

    def run(self, *words):
        results = []
        defer.Deferred.fromCoroutine(self.shell.run_once(list(words))).addBoth(results.append)
        return results

    def output(self):
        return self.out.getvalue()


def table(output, first_title):
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_title))
    header = lines[start]
    rows = []
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("("):
            break
        rows.append(line)
    return header, rows


def cells(header, row, titles):
    """Cut a row at the header's column starts."""
    starts = [header.index(title) for title in titles]
    ends = starts[1:] + [None]
    return {title: row[start:end].strip() for title, start, end in zip(titles, starts, ends)}


def test_list_status_shows_averages_rates_and_unavailable_figures():
    h = Harness()
    assert h.run("list", "-s") == [0]
    header, rows = table(h.output(), "VM ")
    titles = ["VM", "state", "LNM", "cluster", "memory", "vcpus", "cpu% 1m", "5m", "15m",
              "net in/out", "disk r/w", "mem used"]
    assert header.split() == ["VM", "state", "LNM", "cluster", "memory", "vcpus", "cpu%",
                              "1m", "5m", "15m", "net", "in/out", "disk", "r/w", "mem",
                              "used"]
    by_name = {row.split()[0]: cells(header, row, titles) for row in rows}
    one = by_name[full("1.web")]
    assert (one["cpu% 1m"], one["5m"], one["15m"]) == ("180.0", "150.0", "90.0")
    assert one["net in/out"] == "1.5K/512" and one["disk r/w"] == "n/a"
    assert one["mem used"] == "300 MiB"
    two = by_name[full("2.web")]
    assert two["cpu% 1m"] == "1200.5" and two["net in/out"] == "n/a"
    three = by_name[full("3.web")]                  # a driver with no statistics
    assert three["cpu% 1m"] == three["net in/out"] == three["mem used"] == "n/a"
    four = by_name[full("4.web")]                   # shut off: no figures at all
    assert four["cpu% 1m"] == four["net in/out"] == "-"
    assert "simulated_load option" in h.output()
    # the columns the figures replace are not repeated as raw extra columns
    assert "age" not in header and "source" not in header and "sampled" not in header


def test_list_lnm_status_shows_host_figures_and_where_they_come_from():
    h = Harness()
    assert h.run("list_lnm", "-s") == [0]
    header, rows = table(h.output(), "LNM ")
    titles = ["LNM", "VMs", "CPUs", "memory", "committed", "connected", "measured free",
              "cpu% 1m", "5m", "15m", "net in/out", "disk r/w", "mem used", "figures",
              "stats age", "driver"]
    by_name = {row.split()[0]: cells(header, row, titles) for row in rows}
    lnm1 = by_name["lnm1"]
    assert (lnm1["cpu% 1m"], lnm1["5m"], lnm1["15m"]) == ("45.2", "30.0", "12.5")
    assert lnm1["net in/out"] == "1.5K/3.0M" and lnm1["disk r/w"] == "0/20M"
    assert lnm1["mem used"] == "2048 MiB" and lnm1["measured free"] == "14000 MiB"
    # committed: what placement counts (two running VMs of 512 MiB)
    assert lnm1["committed"] == "1024 MiB" and lnm1["stats age"] == "2s"
    assert lnm1["figures"] == "simulated:wave"
    lnm2 = by_name["lnm2"]
    assert lnm2["cpu% 1m"] == "n/a" and lnm2["figures"] == "none"
    assert lnm2["measured free"] == "-"
    assert lnm2["committed"] == "512 MiB"           # the shut-off VM holds none
    lnm3 = by_name["lnm3"]                          # never reported
    assert lnm3["cpu% 1m"] == "-" and lnm3["figures"] == "-"
    assert "simulated_load option" in h.output()


def test_list_lnm_status_json_has_every_average():
    h = Harness(json_output=True)
    assert h.run("list_lnm", "-s", "lnm1") == [0]
    [lnm] = json.loads(h.output())
    assert lnm["status"]["cpu"] == [45.25, 30.0, 12.5]
    assert lnm["status"]["simulated_load"] == "wave" and lnm["status"]["age"] == 2.0


def test_top_once_lists_hosts_and_busiest_vms():
    h = Harness()
    assert h.run("top", "-c", "2") == [0]
    output = h.output()
    lnm_header, lnm_rows = table(output, "LNM ")
    assert [row.split()[0] for row in lnm_rows] == ["lnm1", "lnm2", "lnm3"]
    vm_header, vm_rows = table(output, "VM ")
    assert [row.split()[0] for row in vm_rows] == [full("2.web"), full("1.web")]
    assert "Busiest VMs (top 2 by 1-minute CPU)" in output
    assert h.clients[0].top_calls == [([], 2)]


def test_top_json_is_one_view_per_line_for_the_iterations_asked():
    h = Harness(json_output=True)
    results = h.run("top", "-i", "5", "--iterations", "3", "lnm2")
    h.clock.advance(5)
    h.clock.advance(5)
    assert results == [0]
    views = [json.loads(line) for line in h.output().splitlines()]
    assert len(views) == 3 and len(h.clients[0].top_calls) == 3
    for view in views:
        assert [lnm["name"] for lnm in view["lnms"]] == ["lnm2"]
    h = Harness(json_output=True)
    assert h.run("top") == [0]
    assert len(h.output().splitlines()) == 1        # without --iterations: one view


def test_top_live_at_the_prompt_stops_on_an_empty_line():
    h = Harness(live=True)
    h.shell.at_prompt = True
    h.shell.handle_line("connect")
    done = []
    h.shell.handle_line("top -i 2")
    for _ in range(3):
        h.clock.advance(2)
    assert len(h.clients[0].top_calls) == 4 and "Command 1 result:" not in h.output()
    assert "Enter or Ctrl-C gives the prompt back" in h.output()
    h.shell.handle_line("").addCallback(done.append)
    assert done == [True]
    assert "Command 1 result:\ntop stopped after 4 views." in h.output()
    h.clock.advance(10)
    assert len(h.clients[0].top_calls) == 4         # no more refreshes


def test_top_refreshes_on_its_clock_for_the_iterations_asked():
    h = Harness()
    results = h.run("top", "-i", "5", "--iterations", "3")
    assert results == [] and len(h.clients[0].top_calls) == 1     # waiting 5 s
    h.clock.advance(5)
    assert len(h.clients[0].top_calls) == 2
    h.clock.advance(5)
    assert results == [0] and len(h.clients[0].top_calls) == 3
    assert h.output().count("Busiest VMs") == 3


def test_top_live_redraws_until_interrupted():
    h = Harness(live=True)
    results = h.run("top")
    for _ in range(4):
        h.clock.advance(2)
    assert results == [] and len(h.clients[0].top_calls) == 5
    assert h.output().count(ush.CLEAR_SCREEN) == 5


@pytest.mark.parametrize("words, message", [
    (["top", "-c", "0"], "positive"),
    (["top", "-i", "soon"], "number of seconds"),
    (["top", "-i", "-1"], "positive number of seconds"),
    (["top", "~("], "malformed regular expression"),
])
def test_top_usage_errors_send_nothing(words, message):
    h = Harness()
    assert h.run(*words) == [ush.EXIT_USAGE]
    assert message in h.err.getvalue()
    assert h.clients == []


def test_rates_are_short_and_honest():
    assert ush_monitor.format_rate(0) == "0"
    assert ush_monitor.format_rate(1023) == "1023"
    assert ush_monitor.format_rate(1536) == "1.5K"
    assert ush_monitor.format_rate(12 * 1024 ** 2) == "12M"
    assert ush_monitor.format_rate(None) == "n/a"
