"""The batch benchmark (``make bench-batch``, bench/batch.py) on a short
trace: 20 jobs on 3 LNMs with a real controller, real LNMs and a real
usherbatchd process. It checks that every job ran and ended and that the
report has both sides, never how good the figures are."""

import os

import pytest_twisted
from twisted.internet import reactor

from bench.batch import QUICK, BatchBench


@pytest_twisted.ensureDeferred
async def test_the_batch_benchmark_runs_the_trace_and_reports_against_the_baseline(tmp_path):
    lines = []
    bench = BatchBench(reactor, QUICK, str(tmp_path), lines.append)
    await bench.run()
    assert bench.errors == {}, (bench.errors, lines[-5:])
    ours, base = bench.results["usherbatchd"], bench.results["baseline"]
    assert ours["jobs"].get("done", 0) + ours["jobs"].get("timeout", 0) == QUICK.jobs
    assert base["jobs"] == ours["jobs_done"] == QUICK.jobs
    assert 0 < ours["utilisation_vcpus"] <= 1 and 0 < base["utilisation_vcpus"] <= 1
    assert "one job per host" in bench.summary()
    with open(os.path.join(str(tmp_path), "logs", "usherbatchd.log"), encoding="utf-8") as f:
        log = f.read()
    assert "Traceback" not in log, log[-3000:]
