"""Benchmarks: `make perf` (bench.py), one measurement per process (measure.py)."""
