"""Benchmarks, one module each, selected as a list (`benchmark=[ppl]`). A module exposes `Config`
and `run(cfg, served, ctx) -> dict of metrics`."""

from qsweep.registry import Registry

BENCHMARKS = Registry("benchmark", {"ppl": "qsweep.benchmarks.ppl"})
