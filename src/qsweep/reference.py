"""The baseline's results, evaluated once and reused: every quantized job compares itself with the
unquantized model (`method=none`) on the same model, engine and benchmark settings.

A baseline job stores its per-sample results in the artifact cache. A quantized job looks them up;
when they are missing (no baseline in the sweep, or it runs later) the job serves the baseline once
itself and stores them, under the cache's lock, so concurrent jobs never evaluate it twice.
Benchmarks compare through `Benchmark.compare(samples, baseline_samples)`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qsweep import compat
from qsweep.benchmarks.base import Benchmark
from qsweep.cache import ArtifactCache
from qsweep.context import BenchmarkResult, JobContext
from qsweep.engines.base import Engine
from qsweep.measure import StageClock, headline, serve_and_measure
from qsweep.methods.baseline import BaselineMethod
from qsweep.models import PreparedModel
from qsweep.plan import JobPlan
from qsweep.settings import result_settings, unquantized

log = logging.getLogger(__name__)

KIND = "baseline-results"


def key(
    model_fingerprint: str, engine: Engine, engine_cfg: Any, bench_name: str, bench_cfg: Any, ctx: JobContext
) -> dict:
    """Everything a baseline result depends on: the model, the engine's result settings (fields not
    marked `neutral` or `speed_only`; those marked `quantizes` at their defaults: the baseline
    quantizes nothing), environment and kernel path, the benchmark and its settings."""
    versions = ctx.stage_env(engine.env).package_versions() if engine.env else {}
    # `kind` was a config field when these keys were first written: kept so stored results stay valid.
    settings = {"kind": engine.name, **result_settings(unquantized(engine_cfg))}
    return {
        "model": model_fingerprint,
        "engine": json.loads(json.dumps(settings, default=str)),
        "engine_env": sorted(f"{k}=={v}" for k, v in versions.items()),
        "benchmark": bench_name,
        "settings": json.loads(json.dumps(dataclasses.asdict(bench_cfg), default=str)),
        "kernels": engine.kernels(engine_cfg, ctx),  # another CPU's kernels give other figures
    }


def store(cache: ArtifactCache, parts: dict, samples: dict) -> None:
    """Keep the baseline's samples; values under keys ending in `_npy` are files, copied along."""

    def write(tmp: Path) -> dict:
        kept = dict(samples)
        for name, value in samples.items():
            if name.endswith("_npy"):
                shutil.copyfile(value, tmp / f"{name}.npy")
                kept[name] = f"{name}.npy"
        (tmp / "samples.json").write_text(json.dumps(kept))
        return {}

    cache.entry(KIND, parts, write, what=f"baseline {parts['benchmark']} results")


def load(cache: ArtifactCache, parts: dict) -> dict | None:
    entry = cache.lookup(KIND, parts)
    if entry is None:
        return None
    samples = json.loads((entry.path / "samples.json").read_text())
    return {k: str(entry.path / v) if k.endswith("_npy") else v for k, v in samples.items()}


def discard_files(samples: dict | None) -> None:
    """Remove a job's own sample files (big) once compared or stored."""
    for name, value in (samples or {}).items():
        if name.endswith("_npy"):
            Path(value).unlink(missing_ok=True)


def evaluate_baseline(
    missing: Mapping[str, tuple[dict, Benchmark, Any]],
    model: PreparedModel,
    fmt: str,
    engine: Engine,
    engine_cfg: Any,
    ctx: JobContext,
) -> None:
    """Serve the baseline once and store the results of every benchmark in `missing`
    (name -> (key, benchmark, config)); entries are written atomically, so no lock is needed."""
    log.info("  evaluating the baseline once for comparison: %s", ", ".join(missing))
    # `results` stays the job's: a benchmark that reads an earlier one's (accuracy at the load
    # test's capacity) runs on the baseline as it ran on the job, for a like-for-like comparison.
    sub = dataclasses.replace(ctx, log_dir=ctx.log_dir / "baseline", notes=[], results=ctx.results)
    artifact = BaselineMethod().build(BaselineMethod.Config(), model, fmt, sub)
    benchmarks = {name: (benchmark, cfg) for name, (_, benchmark, cfg) in missing.items()}

    def keep(name: str, result) -> None:
        if result.samples is not None:
            store(ctx.artifact_cache, missing[name][0], result.samples)
            discard_files(result.samples)

    # The job's own clock times the whole comparison; these stages are logged, not recorded.
    serve_and_measure(engine, engine_cfg, artifact, benchmarks, sub, StageClock("baseline_"), on_result=keep)


def stamp(cache: ArtifactCache, parts: dict) -> str | None:
    """Which stored baseline results these are (key and build time), or None if there are none:
    a comparison made with them is reused only while they stay the same."""
    entry = cache.lookup(KIND, parts)
    return f"{entry.manifest['key']}@{entry.manifest['built_at']}" if entry else None


def baseline_key(plan: JobPlan, model_fingerprint: str, name: str, ctx: JobContext) -> dict:
    """The key of the baseline's results that benchmark `name` of this job compares with."""
    return key(model_fingerprint, plan.engine, plan.engine_cfg, name, plan.benchmarks[name][1], ctx)


def keep(plan: JobPlan, model: PreparedModel, name: str, result: BenchmarkResult, ctx: JobContext) -> None:
    """What a job does with a result's per-sample data once measured: the reference baseline keeps
    it for every quantized job to compare with; any other job keeps it only until compared."""
    if result.samples is None:
        return
    if plan.is_reference_baseline:
        store(ctx.artifact_cache, baseline_key(plan, model.fingerprint, name, ctx), result.samples)
    if not plan.quantizes:  # a baseline with other settings is not what others compare with
        discard_files(result.samples)


def compare(
    plan: JobPlan, model: PreparedModel, name: str, result: BenchmarkResult, ctx: JobContext
) -> tuple[dict[str, float], str] | None:
    """A quantized job's result against the stored baseline results of the same benchmark and
    settings: (metrics, stamp of the baseline results), or None while those are missing. The job's
    own sample files are removed once compared."""
    parts = baseline_key(plan, model.fingerprint, name, ctx)
    base = load(ctx.artifact_cache, parts)
    baseline = stamp(ctx.artifact_cache, parts)
    if base is None or baseline is None or result.samples is None:
        return None  # the job's sample files are kept for a comparison once the baseline is there
    metrics = plan.benchmarks[name][0].compare(result.samples, base)
    discard_files(result.samples)
    if metrics:
        log.info("  %s vs baseline: %s", name, headline(metrics))
    return metrics, baseline


def evaluate_missing_baseline(
    plan: JobPlan, model: PreparedModel, results: Mapping[str, BenchmarkResult], ctx: JobContext
) -> None:
    """Serve the baseline once and store its results for every benchmark in `results` that has none
    stored yet (no baseline job in the sweep, or it runs later)."""
    missing = {
        name: (baseline_key(plan, model.fingerprint, name, ctx), *plan.benchmarks[name])
        for name in results
        if load(ctx.artifact_cache, baseline_key(plan, model.fingerprint, name, ctx)) is None
    }
    # The baseline in the form this engine serves, which need not be the quantized artifact's.
    fmt = compat.serving_format(BaselineMethod(), plan.engine)
    if missing and fmt is None:
        ctx.note(f"engine {plan.engine.name} cannot serve the baseline: nothing to compare with")
    elif missing and fmt is not None:
        evaluate_baseline(missing, model, fmt, plan.engine, unquantized(plan.engine_cfg), ctx)
