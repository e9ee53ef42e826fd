"""Tests of catkit.reproduce (a package so test module names do not clash with tests/test_*.py)."""
