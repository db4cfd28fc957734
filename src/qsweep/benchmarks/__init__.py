"""Benchmarks, one module each, selected as a list (`benchmark=[ppl]`). A module exposes `Config`
and `run(cfg, served, ctx)` returning a dict of metrics or a `context.BenchmarkResult`."""

from qsweep.registry import Registry

BENCHMARKS = Registry(
    "benchmark",
    {
        "ppl": "qsweep.benchmarks.ppl",
        "perf": "qsweep.benchmarks.perf",
        "accuracy": "qsweep.benchmarks.accuracy",
        "kld": "qsweep.benchmarks.kld",
    },
)
