"""The benchmark harness (``make bench``, bench/run.py) at toy scale: a real
controller process, a fleet of 5 real LNMs in this process, 100 VMs, real
clients (some in processes of their own), seconds instead of minutes. It
checks that every figure is produced and nothing failed, never how fast:
the figures themselves are for ``make bench`` on a quiet machine."""

import pytest_twisted
from twisted.internet import reactor

from bench import report
from bench.run import QUICK, Bench


@pytest_twisted.ensureDeferred
async def test_the_harness_produces_every_figure_without_errors(tmp_path):
    lines = []
    bench = Bench(reactor, QUICK, str(tmp_path), lines.append, settle_heap=False)
    await bench.run()
    assert bench.errors == {}, (bench.errors, lines[-5:])
    assert set(bench.results) == {key for key, *_rest in report.FIGURES}
    assert bench.results["ops_errors"] == 0
    # (Idle CPU over a toy window may well be 0 clock ticks.)
    assert all(value > 0 for key, value in bench.results.items()
               if key not in ("ops_errors", "ctrl_idle_cpu_pct"))
    assert bench.results["ctrl_idle_cpu_pct"] >= 0
    assert bench.details["lost_vms"] > 0 and bench.details["notify_changes"] > 0
    table = report.table(bench.results, scale={"start_vms": QUICK.start_vms,
                                                "start_lnms": QUICK.start_lnms,
                                                "vms": QUICK.vms, "lnms": QUICK.lnms,
                                                "idle_clients": QUICK.idle_clients,
                                                "notify_rate": QUICK.notify_rate,
                                                "ops_clients": QUICK.ops_clients,
                                                "ops_duration": QUICK.ops_duration})
    assert "not measured" not in table and "100 VMs" in table
