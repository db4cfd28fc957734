"""Benchmark results, reused by content: a sweep measures only what it does not have yet.

A result's key holds everything that decides it: the artifact's key (model identity, method
settings, calibration data, tool versions), the engine's settings that change results and its
environment's versions, the benchmark's name, settings (those not marked `neutral`), data content
and stage environment. A timing result (`Benchmark.measures_time`) is keyed by the machine too:
CPU model and cores, GPUs, the engine's build and its speed-only settings (slots, batch size).

Results live in the artifact cache (kind `results`): metrics, curves and tables, and the MLflow run
that measured them. A run that reuses a result logs its metrics, curves and tables again (small, and
what the MLflow UI compares) and points to the measuring run for the rest (`qsweep.reused.<name>`
tag): raw tool outputs and logs are not copied twice. A quantized job's comparison with the
baseline is kept beside its result (kind `result-deltas`), keyed by the result and by the baseline
results it was compared with, so a re-measured baseline invalidates it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qsweep import envs, reference
from qsweep.cache import ArtifactCache, content_key
from qsweep.context import BenchmarkResult, JobContext
from qsweep.plan import JobPlan
from qsweep.settings import result_settings

RESULTS = "results"
DELTAS = "result-deltas"
RESULT_FILE = "result.json"


def hardware() -> dict[str, Any]:
    """What a timing depends on besides the software: CPU model and cores, GPU models and count."""
    gpus = [gpu.get("name", "?") for gpu in envs.gpu_info()]
    return {
        "cpu": envs.cpu_model() or "unknown",
        "cpu_cores": os.cpu_count(),
        "gpus": gpus,
        "gpu_count": len(gpus),
    }


def _versions(env: envs.StageEnv | None) -> list[str]:
    return sorted(f"{k}=={v}" for k, v in env.package_versions().items()) if env else []


def key(plan: JobPlan, artifact_key: str | None, name: str, ctx: JobContext) -> dict | None:
    """The key of benchmark `name`'s result in this job on the artifact of content key
    `artifact_key`; None if it cannot be reused (an artifact without one)."""
    if artifact_key is None:
        return None
    benchmark, cfg = plan.benchmarks[name]
    timing = benchmark.measures_time
    engine_env = ctx.stage_env(plan.engine.env) if plan.engine.env else None
    parts: dict[str, Any] = {
        "artifact": artifact_key,
        "engine": {"kind": plan.engine.name, **result_settings(plan.engine_cfg, timing=timing)},
        "engine_env": _versions(engine_env),
        "benchmark": name,
        "settings": result_settings(cfg, timing=timing),
        "data": benchmark.data_key(cfg, ctx),
        "benchmark_env": _versions(ctx.stage_env(benchmark.env) if benchmark.env else None),
        "kernels": plan.engine.kernels(plan.engine_cfg, ctx),
    }
    if timing:
        info = engine_env.info() if engine_env else {}
        parts["hardware"] = hardware()
        parts["build"] = {k: info.get(k) for k in ("fingerprint", "llama_cpp_build", "cmake_args")}
    return json.loads(json.dumps(parts, default=str))


@dataclass
class StoredResult:
    """A result kept for reuse, and the MLflow run that measured it."""

    metrics: dict[str, float]
    curves: dict[str, dict[int, float]]
    tables: dict[str, list[dict]]
    run_id: str
    built_at: str = ""

    def as_result(self) -> BenchmarkResult:
        return BenchmarkResult(metrics=dict(self.metrics), curves=self.curves, tables=self.tables)


def save(cache: ArtifactCache, parts: dict, result: BenchmarkResult, run_id: str) -> None:
    """Keep a result (replacing an older one under the same key: a forced rerun measured anew)."""
    payload = {"metrics": result.metrics, "curves": result.curves, "tables": result.tables, "run_id": run_id}

    def write(tmp: Path) -> dict:
        (tmp / RESULT_FILE).write_text(json.dumps(payload, default=str))
        return {"run_id": run_id}

    cache.entry(RESULTS, parts, write, what=f"{parts['benchmark']} result", replace=True)


def load(cache: ArtifactCache, parts: dict) -> StoredResult | None:
    entry = cache.lookup(RESULTS, parts)
    if entry is None:
        return None
    try:
        payload = json.loads((entry.path / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None  # unreadable: measured again, and replaced
    curves = {
        name: {int(step): value for step, value in points.items()}
        for name, points in payload["curves"].items()
    }
    return StoredResult(
        payload["metrics"], curves, payload["tables"], payload["run_id"], entry.manifest["built_at"]
    )


def _deltas_key(parts: dict, baseline: str, revision: int) -> dict:
    key: dict[str, Any] = {"result": content_key(parts), "baseline": baseline}
    if revision:  # left out at 0, so comparisons stored before revisions existed stay valid
        key["compare_revision"] = revision
    return key


def save_deltas(
    cache: ArtifactCache, parts: dict, baseline: str, deltas: dict[str, float], revision: int = 0
) -> None:
    """Keep a comparison with the baseline; `revision`: the benchmark's `compare_revision`."""

    def write(tmp: Path) -> dict:
        (tmp / RESULT_FILE).write_text(json.dumps(deltas))
        return {}

    cache.entry(
        DELTAS,
        _deltas_key(parts, baseline, revision),
        write,
        what="comparison with the baseline",
        replace=True,
    )


def load_deltas(
    cache: ArtifactCache, parts: dict, baseline: str, revision: int = 0
) -> dict[str, float] | None:
    entry = cache.lookup(DELTAS, _deltas_key(parts, baseline, revision))
    if entry is None:
        return None
    try:
        return json.loads((entry.path / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Reuse:
    """A stored result a job takes instead of measuring, and its stored comparison with the baseline."""

    result: StoredResult
    deltas: dict[str, float]


def find_reusable(
    plan: JobPlan, model_fingerprint: str, keys: dict[str, dict | None], ctx: JobContext
) -> dict[str, Reuse]:
    """The benchmarks of this job whose results exist (and are not to be redone). A comparing
    benchmark needs more: on a quantized job its comparison with the current baseline results, on
    the reference baseline those baseline results themselves (quantized jobs compare with them)."""
    found: dict[str, Reuse] = {}
    for name, (benchmark, _) in plan.benchmarks.items():
        parts = keys[name]
        if parts is None or plan.forces(name):
            continue
        stored = load(ctx.artifact_cache, parts)
        if stored is None:
            continue
        deltas: dict[str, float] | None = {}
        if benchmark.compares:
            baseline = reference.baseline_key(plan, model_fingerprint, name, ctx)
            base = reference.stamp(ctx.artifact_cache, baseline)
            if not plan.quantizes:
                deltas = None if plan.is_reference_baseline and base is None else {}
            else:
                revision = benchmark.compare_revision
                deltas = load_deltas(ctx.artifact_cache, parts, base, revision) if base else None
        if deltas is not None:
            found[name] = Reuse(stored, deltas)
    return found
