"""What the one-figure benchmarks' command lines share (``bench.sql``,
``bench.web``, ``bench.web_browser``): ``--quick``, ``--vms``, ``--json``;
a temporary directory; the run on a reactor; the summary printed."""

import argparse
import json
import shutil
import tempfile

from bench import run as run_scale


def parser(prog, doc, vms_help):
    result = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument("--quick", action="store_true", help="toy scale, seconds long")
    result.add_argument("--vms", type=int, help=vms_help)
    result.add_argument("--json", help="also write the figures to this file")
    return result


def run(options, make_bench, prefix):
    """Run ``make_bench(reactor, directory, progress)`` (its ``results``,
    ``errors`` and ``summary()``) in a fresh directory -> exit status."""
    directory = tempfile.mkdtemp(prefix=prefix)
    try:
        bench = run_scale.run_on_reactor(
            lambda reactor, progress: make_bench(reactor, directory, progress), directory)
        print()
        print(bench.summary())
        if options.json:
            with open(options.json, "w", encoding="utf-8") as f:
                json.dump({"results": bench.results, "errors": bench.errors}, f, indent=1)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 1 if bench.errors else 0
