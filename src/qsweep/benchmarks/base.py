"""The benchmark contract: how a plug-in measures a served model.

To add a benchmark: a module in this package with a `Config` dataclass and a `Benchmark[Config]` subclass
registered with `@BENCHMARKS.register("<name>")`, a YAML option conf/benchmark/<name>.yaml
(`# @package benchmark.<name>`, `defaults: [<name>_schema, _self_]`), a test and a row in docs/guide.md.
Its config gets its place in the `benchmark` container from the registration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from qsweep.context import BenchmarkResult, JobContext
from qsweep.engines.served import Load, ServedModel, describe
from qsweep.envs import StageEnvSpec
from qsweep.plugins import C, Plugin, Registry


class Benchmark(Plugin[C], ABC):
    """Runs against a served model and returns metrics; compares itself with the baseline."""

    env: ClassVar[StageEnvSpec | None] = None  # a stage environment its tool runs in
    # Capability protocols (engines/served.py) the served model must implement, all of them...
    requires: ClassVar[tuple[type, ...]] = ()
    # ...and at least one of these, if any are listed.
    requires_any: ClassVar[tuple[type, ...]] = ()
    # It measures speed: its results also depend on the machine and the engine's speed-only
    # settings, and are reused only on the same hardware and kernels (see `reusable`).
    measures_time: ClassVar[bool] = False
    # Raised when `compare` returns new or different metrics: stored comparisons with the baseline
    # made by an older revision are then made again, not reused.
    compare_revision: ClassVar[int] = 0

    def check(self, cfg: C) -> None:  # noqa: B027 - optional: most plug-ins have nothing to check
        """Side-effect-free validation at pre-flight; raise QsweepError with one line naming the fix."""

    def after(self, cfg: C) -> tuple[str, ...]:
        """Benchmarks whose results this one reads (`ctx.results`): they run before it in the job."""
        return ()

    def check_selection(self, cfg: C, selected: Mapping[str, Any]) -> None:  # noqa: B027 - optional
        """Pre-flight check against the job's other selected benchmarks (name -> config); raise
        QsweepError naming the fix."""

    def load(self, cfg: C) -> Load:
        """What it asks of the engine: the engine is sized for the largest load of a job's benchmarks."""
        return Load()

    @property
    def compares(self) -> bool:
        """Whether it compares a job with the baseline (it overrides `compare`)."""
        return type(self).compare is not Benchmark.compare

    def data_key(self, cfg: C, ctx: JobContext) -> dict:
        """The content of the data it reads (a text's hash, a dataset file's), for the key its
        results are reused under; settings are in the key already."""
        return {}

    def reusable(self, result: BenchmarkResult) -> bool:
        """Whether a result may stand for this benchmark in later sweeps (no: a timing taken on a
        busy machine)."""
        return True

    def unmet(self, capabilities: frozenset[type]) -> str | None:
        """Why an engine with these capabilities cannot run it, or None."""
        missing = [cap for cap in self.requires if cap not in capabilities]
        if missing:
            return "needs " + " and ".join(describe(cap) for cap in missing)
        if self.requires_any and not capabilities & set(self.requires_any):
            return "needs " + " or ".join(describe(cap) for cap in self.requires_any)
        return None

    def within(self, cfg: C, capabilities: frozenset[type]) -> tuple[C | None, str | None]:
        """The part of its settings an engine with these capabilities can run (None: no part), and
        why the rest is left out (None: nothing is); asked at pre-flight once `unmet` found no
        capability missing. For a benchmark of several tasks that need different capabilities."""
        return cfg, None

    @abstractmethod
    def run(self, cfg: C, served: ServedModel, ctx: JobContext) -> BenchmarkResult:
        """Measure; per-sample data the baseline comparison needs goes in `BenchmarkResult.samples`."""

    def compare(self, samples: dict, baseline: dict) -> dict[str, float]:
        """Metrics of this job against the baseline's samples of the same benchmark and settings
        (deltas, ratios, intervals); called only when `run` returned samples."""
        return {}


BENCHMARKS: Registry[Benchmark[Any]] = Registry("benchmark", Benchmark, group="benchmark")
