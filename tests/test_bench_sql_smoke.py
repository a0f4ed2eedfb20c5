"""The SQL benchmark (``make bench-sql``, bench/sql.py) at toy scale: both
sides (without the SQL plugin, with it on the session's PostgreSQL server)
with a real controller process, a fleet of 3 real LNMs and 2 starts of 30
VMs each. It checks that both figures and the ratio come out and every VM
got its address, never how fast."""

import pytest_twisted
from twisted.internet import reactor

from bench.sql import QUICK, SqlBench


@pytest_twisted.ensureDeferred
async def test_the_sql_benchmark_produces_both_figures_and_the_ratio(tmp_path, postgres):
    lines = []
    bench = SqlBench(reactor, QUICK, str(tmp_path), lines.append, postgres=postgres)
    await bench.run()
    assert bench.errors == {}, (bench.errors, lines[-5:])
    results = bench.results
    assert results["without_sql_s"] > 0 and results["with_sql_s"] > 0
    assert results["ratio"] == results["with_sql_s"] / results["without_sql_s"]
    assert bench.leases == QUICK.start_vms * QUICK.repeats
    assert "ratio (with / without)" in bench.summary()
