"""Usher's benchmarks: ``make bench`` (``python -m bench.run``)."""
