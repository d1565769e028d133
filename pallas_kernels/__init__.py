"""Pallas kernels: one folder per op (ops.py, kernel.py, reference.py)."""
