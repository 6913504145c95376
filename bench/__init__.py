"""Benchmarks: ``python -m bench.capture`` and ``python -m bench.generate`` (see RESULTS.md)."""
