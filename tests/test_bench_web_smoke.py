"""The web benchmark (``make bench-web``, bench/web.py) at toy scale: a real
controller, a fleet of 3 real LNMs, 40 VMs, usherweb as its own process over
HTTPS, 2 streaming sessions, one-second windows. It checks that every figure
comes out, never how fast."""

import pytest
import pytest_twisted
from twisted.internet import reactor

from bench.web import QUICK, WebBench

pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")


@pytest_twisted.ensureDeferred
async def test_the_web_benchmark_produces_every_figure(tmp_path):
    lines = []
    bench = WebBench(reactor, QUICK, str(tmp_path), lines.append)
    await bench.run()
    assert bench.errors == {}, (bench.errors, lines[-5:])
    results = bench.results
    for key in ("list_5000_s_1", "list_5000_s_2", "snapshot_s", "change_latency_median_s",
                "change_latency_max_s"):
        assert results[key] > 0
    assert results["cpu_idle_pct"] >= 0 and results["cpu_busy_pct"] >= 0
    assert results["changes_in_window"] > 0
    assert "CPU with 2 open streams" in bench.summary()
