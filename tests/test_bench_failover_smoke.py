"""The failover benchmark (``make bench-failover``, bench/failover.py) at toy
scale: the session's PostgreSQL, two real usherctrl processes of a standby
pair, a fleet of 3 real LNMs, 30 VMs, two kills -9 alternating which
controller is active. It checks that the figure, the new term and the table
come out, never how fast."""

import pytest_twisted
from twisted.internet import reactor

from bench.failover import QUICK, FailoverBench


@pytest_twisted.ensureDeferred
async def test_the_failover_benchmark_produces_the_figure(tmp_path, postgres):
    lines = []
    bench = FailoverBench(reactor, QUICK, str(tmp_path), lines.append, postgres=postgres)
    await bench.run()
    assert bench.errors == {}, (bench.errors, lines[-5:])
    results = bench.results
    assert results["kills"] == QUICK.kills
    assert results["serving_s"] > 0 and results["active_s"] > 0
    # Each kill: the other controller took over with a higher term.
    terms = [k["term"] for k in results["each"]]
    assert terms == sorted(set(terms))
    assert [k["new_active"] for k in results["each"]] == ["ctrl-b", "ctrl-a"]
    summary = bench.summary()
    assert "listed running" in summary and "target" in summary and "new term" in summary
