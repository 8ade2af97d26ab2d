"""Evaluation: the benchmarks' measures as plain NumPy functions."""
