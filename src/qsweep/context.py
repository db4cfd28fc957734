"""What a running job hands to its plug-ins: the caches, where to write logs, and its results so far."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qsweep.cache import ArtifactCache
from qsweep.envs import CpuWait, StageEnv, StageEnvSpec

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    artifact_cache: ArtifactCache
    model_cache: ArtifactCache
    log_dir: Path  # this job's own folder; every file here is logged to its MLflow run
    envs_dir: Path  # where the stage environments are (`paths.envs`)
    notes: list[str] = field(default_factory=list)  # things the user should know; tagged on the run
    # Metrics measured or reused so far in this job, for a benchmark that reads an earlier one's
    # (`Benchmark.after`), e.g. accuracy at the load test's capacity.
    results: dict[str, float] = field(default_factory=dict)
    smoke_reply: str | None = None  # the server's answer to the smoke prompt, for the sanity checks
    cpu_wait: CpuWait = CpuWait.spin  # how the tools' threads wait (`cpu_wait`); see `timing`
    # A benchmark that times things is about to run: tools started now spin, as they do by default.
    timing: bool = False

    def log(self, name: str) -> Path:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self.log_dir / name

    def stage_env(self, spec: StageEnvSpec) -> StageEnv:
        """A stage environment, in this job's `paths.envs`, whose tools wait as `cpu_wait` says."""
        return StageEnv(spec.name, self.envs_dir, CpuWait.spin if self.timing else self.cpu_wait)

    @contextlib.contextmanager
    def timed(self, timing: bool = True) -> Iterator[None]:
        """`timing` for the block: stage environments made in it give tools that spin."""
        before, self.timing = self.timing, timing
        try:
            yield
        finally:
            self.timing = before

    def note(self, text: str) -> None:
        """Tell the user now, and keep it with the run (tag `qsweep.notes`)."""
        log.warning("  note: %s", text)
        self.notes.append(text)


@dataclass
class Artifact:
    """What a method produced for an engine to serve."""

    format: str  # "gguf" (a file) or "hf" (a checkpoint directory)
    path: Path
    cache_hit: bool
    # Its content key: everything it was built from (model, method settings, data, tool versions).
    # Results measured on it are reused under it; None means never reuse them.
    key: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)  # how it was built, also when it came from the cache
    # The source model's transformers tokenizer, for a GGUF file: lets the job tell when llama.cpp
    # splits a text differently from it (and so from vLLM).
    hf_tokenizer: Path | None = None

    @property
    def tokenizer_dir(self) -> Path | None:
        """A directory transformers can load this model's tokenizer from."""
        return self.path if self.format == "hf" else self.hf_tokenizer


@dataclass
class BenchmarkResult:
    """What a benchmark hands back: metrics, curves, tables and files for MLflow."""

    metrics: dict[str, float]
    curves: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> {step: value}
    tables: dict[str, list[dict]] = field(default_factory=dict)  # artifact file -> rows
    files: dict[str, Path] = field(default_factory=dict)  # artifact folder -> file or folder to keep
    # Per-sample data a quantized job compares against the baseline's (see qsweep.reference).
    samples: dict | None = None
