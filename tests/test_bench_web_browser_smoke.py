"""The browser benchmark (``make bench-web-browser``, bench/web_browser.py)
at toy scale: a real controller, 3 real LNMs, 40 VMs, usherweb as its own
process, a real headless Chromium; then 1,000 VMs on the fake API. It checks
that every figure comes out, never how fast."""

import pytest
import pytest_twisted
from twisted.internet import reactor

from bench.web import QUICK
from bench.web_browser import BrowserBench

pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")


@pytest_twisted.ensureDeferred
async def test_the_browser_benchmark_produces_every_figure(tmp_path):
    lines = []
    bench = BrowserBench(reactor, QUICK, str(tmp_path), lines.append, fake_vms=1000)
    await bench.run()
    assert bench.errors == {}, (bench.errors, lines[-5:])
    r = bench.results
    for key in ("table_after_login_s", "table_reload_s", "change_shown_median_s",
                "change_shown_max_s", "fake_table_after_login_s",
                "fake_change_shown_median_s"):
        assert r[key] > 0, key
    assert 0 < r["fake_rows_in_dom"] < 100
    assert "40-VM table shown" in bench.summary()
