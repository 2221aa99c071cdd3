"""Benchmarks, run as modules from the repository root: ``python -m bench.fleet --help``.

Figures are printed, not asserted; docs/benchmarks.md keeps them. Not part of the wheel.
"""
