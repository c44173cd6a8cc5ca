"""Benchmark machinery (survey §9): ground-truth credit metrics."""
