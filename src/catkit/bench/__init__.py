"""Benchmark suites. Each times catkit and its anchor in the same process (DESIGN rule 5)."""

from catkit.bench.registry import SUITES, Suite, register, run_suite, time_cuda

__all__ = ["SUITES", "Suite", "register", "run_suite", "time_cuda"]
