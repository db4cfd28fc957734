"""Benchmarks, one module each, selected as a list (`benchmark=[ppl,perf]`); the contract is in `base.py`."""
