"""The baseline's results, evaluated once and reused: every quantized job compares itself with the
unquantized model (`method=none`) on the same model, engine and benchmark settings.

A baseline job stores its per-sample results in the artifact cache. A quantized job looks them up;
when they are missing (no baseline in the sweep, or it runs later) the job serves the baseline once
itself and stores them, under the cache's lock, so concurrent jobs never evaluate it twice.
Benchmarks that compare expose `compare(samples, baseline_samples) -> metrics`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from qsweep.cache import ArtifactCache
from qsweep.context import BenchmarkResult, JobContext
from qsweep.envs import StageEnv
from qsweep.models import PreparedModel

KIND = "baseline-results"
# Engine settings that do not change a result: where it listens, how long to wait, how many at once.
VOLATILE = {"host", "port", "startup_timeout_s", "request_timeout_s", "smoke_prompt", "smoke_max_tokens",
            "fit_to_load", "parallel", "ctx_size", "max_num_seqs", "kv_cache_gb", "name"}  # fmt: skip


def key(model: PreparedModel, engine_env: str, engine_cfg, bench_name: str, bench_cfg) -> dict:
    versions = StageEnv(engine_env).package_versions()
    settings = {k: v for k, v in dataclasses.asdict(engine_cfg).items() if k not in VOLATILE}
    return {
        "model": model.fingerprint,
        "engine": json.loads(json.dumps(settings, default=str)),
        "engine_env": sorted(f"{k}=={v}" for k, v in versions.items()),
        "benchmark": bench_name,
        "settings": json.loads(json.dumps(dataclasses.asdict(bench_cfg), default=str)),
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


def discard_files(samples: dict) -> None:
    """Remove a job's own sample files (big) once compared or stored."""
    for name, value in samples.items():
        if name.endswith("_npy"):
            Path(value).unlink(missing_ok=True)


def evaluate_baseline(
    missing: dict[str, tuple[dict, object]],
    model: PreparedModel,
    fmt: str,
    engine,
    engine_cfg,
    ctx: JobContext,
) -> None:
    """Serve the baseline once and store the results of every benchmark in `missing`
    (name -> (key, config)); the caller's cache lock is not needed: entries are written atomically."""
    from qsweep.benchmarks import BENCHMARKS
    from qsweep.methods import baseline

    print(f"[qsweep]   evaluating the baseline once for comparison: {', '.join(missing)}", flush=True)
    artifact = baseline.build(baseline.Config(), model, fmt, ctx)
    sub = JobContext(ctx.artifact_cache, ctx.model_cache, ctx.log_dir / "baseline")
    with engine.serve(engine_cfg, artifact, sub) as served:
        for name, (parts, bench_cfg) in missing.items():
            result = BENCHMARKS.get(name).run(bench_cfg, served, sub)
            if isinstance(result, BenchmarkResult) and result.samples is not None:
                store(ctx.artifact_cache, parts, result.samples)
                discard_files(result.samples)
