"""Benchmark suite for rear_ds (`python -m bench.run --help`). Numbers, never pass/fail."""
