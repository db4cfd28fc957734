"""One job of a sweep: prepare the model, quantize (cached), serve, run the benchmarks, log it all.

All side effects of a job happen here and in the plug-ins it calls. A job records its own outcome
in MLflow (FINISHED / FAILED / KILLED) and never raises a failure into Hydra, so the sweep goes on
and Hydra's end-of-sweep callback still runs; the CLI turns failures into the exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qsweep import compat, gates, models, reference, tracking
from qsweep.benchmarks import BENCHMARKS, perf
from qsweep.cache import ArtifactCache
from qsweep.context import BenchmarkResult, JobContext
from qsweep.engines import ENGINES
from qsweep.envs import StageEnv
from qsweep.errors import QsweepError
from qsweep.methods import METHODS

FAILED_JOBS: list[str] = []  # names of jobs that failed in this process, for the exit code


@contextlib.contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"[qsweep] stage {name} ...", flush=True)
    started = time.monotonic()
    try:
        yield
    finally:
        timings[f"time_{name}_s"] = elapsed = time.monotonic() - started
        print(f"[qsweep] stage {name}: {elapsed:.1f} s", flush=True)


def selected_benchmarks(cfg: DictConfig) -> dict[str, object]:
    return {name: OmegaConf.to_object(node) for name, node in cfg.benchmark.items() if node is not None}


def fit_engine_to_load(engine, engine_cfg, benchmarks: dict[str, object]) -> tuple[object, dict]:
    """The fair serving preset: the engine sized for the load test's largest concurrency, and the
    settings that changed (logged as `served.*` params)."""
    load = benchmarks.get("perf")
    if load is None:
        return engine_cfg, {}
    fitted = engine.fit_to_load(engine_cfg, max(load.concurrency), perf.tokens_per_request(load))
    before, after = dataclasses.asdict(engine_cfg), dataclasses.asdict(fitted)
    changed = {k: v for k, v in after.items() if before[k] != v}
    if changed:
        print(f"[qsweep]   serving preset for concurrency {max(load.concurrency)}: {changed}", flush=True)
    return fitted, changed


def headline(metrics: dict[str, float]) -> str:
    """The metrics worth a terminal line (standard errors and intervals stay in MLflow)."""
    detail = ("_stderr", "_err", "_n", "_ci_low", "_ci_high")
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith(detail) or k == "ppl_err")


def compare_with_baseline(
    results: dict[str, BenchmarkResult], benchmarks: dict, model, method_cfg, engine, engine_cfg, fmt, ctx
) -> dict[str, float]:
    """Store the baseline's per-sample results, or compare this job's with them (see reference.py)."""
    comparable = {
        name: result
        for name, result in results.items()
        if result.samples is not None and hasattr(BENCHMARKS.get(name), "compare")
    }
    keys = {name: reference.key(model, engine.ENV, engine_cfg, name, benchmarks[name]) for name in comparable}
    if method_cfg.kind == "baseline":
        for name, result in comparable.items():
            if method_cfg == type(method_cfg)():  # the default baseline: what quantized jobs compare with
                reference.store(ctx.artifact_cache, keys[name], result.samples)
            reference.discard_files(result.samples)
        return {}
    missing = {
        name: (keys[name], benchmarks[name])
        for name in comparable
        if reference.load(ctx.artifact_cache, keys[name]) is None
    }
    if missing:
        reference.evaluate_baseline(missing, model, fmt, engine, engine_cfg, ctx)
    deltas: dict[str, float] = {}
    for name, result in comparable.items():
        base = reference.load(ctx.artifact_cache, keys[name])
        if base is not None:
            deltas.update(BENCHMARKS.get(name).compare(result.samples, base))
        reference.discard_files(result.samples)
    if deltas:
        print(f"[qsweep]   vs baseline: {headline(deltas)}", flush=True)
    return deltas


def run_job(cfg: DictConfig) -> str:
    """Run one job and return its final MLflow status."""
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    ctx = JobContext(
        ArtifactCache(Path(cfg.paths.artifact_cache)),
        ArtifactCache(Path(cfg.paths.model_cache)),
        job_dir / "logs",
    )
    model_cfg = OmegaConf.to_object(cfg.model)
    method_cfg, engine_cfg = OmegaConf.to_object(cfg.method), OmegaConf.to_object(cfg.engine)
    name = f"{models.display_name(model_cfg)}/{method_cfg.name}/{engine_cfg.name}"

    client, experiment_id = tracking.client_for(cfg)
    parent = tracking.parent_run_id(Path(hydra_cfg.sweep.dir)) if hydra_cfg.mode == RunMode.MULTIRUN else None
    choices = dict(hydra_cfg.runtime.choices)
    tags = {
        **tracking.environment_tags(),
        "qsweep.kind": "job",
        "qsweep.job_dir": str(job_dir),
        **{f"choice.{k}": str(v) for k, v in choices.items() if not k.startswith("hydra")},
    }
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    tracking.log_params(client, run_id, tracking.run_params(cfg, choices))
    client.log_dict(run_id, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "config.yaml")
    print(f"[qsweep] job {name}: MLflow run {run_id}", flush=True)

    reason = compat.skip_reason(cfg)
    if reason:  # an unsupported method x engine pair: recorded, not a failure
        client.set_tag(run_id, "qsweep.skipped", reason)
        client.set_terminated(run_id, "FINISHED")
        print(f"[qsweep] job {name} skipped: {reason}", flush=True)
        return "SKIPPED"
    if caveat := compat.caveat(cfg):
        ctx.note(caveat)

    timings: dict[str, float] = {}
    status, error = "FINISHED", ""
    try:
        method, engine = METHODS.get(method_cfg.kind), ENGINES.get(engine_cfg.kind)
        benchmarks = selected_benchmarks(cfg)
        with stage("model", timings):
            model = models.prepare(model_cfg, ctx.model_cache, ctx.log_dir)
        client.set_tag(run_id, "model.cache_hit", str(model.cache_hit).lower())

        with stage("quantize", timings):
            artifact = method.build(method_cfg, model, compat.serving_format(cfg), ctx)
        tracking.log_metrics(client, run_id, artifact.metrics)
        tracking.log_params(client, run_id, artifact.params)
        client.set_tag(run_id, "artifact.cache_hit", str(artifact.cache_hit).lower())
        client.log_dict(run_id, artifact.info, "artifact_info.json")
        for log_name, path in artifact.logs.items():
            client.log_artifact(run_id, str(path), f"quantize_logs/{Path(log_name).stem}")
        used = {
            models.PREPARE_ENV,
            method.ENV,
            engine.ENV,
            *(getattr(BENCHMARKS.get(b), "ENV", None) for b in benchmarks),
        }
        for env_name in sorted(used - {None}):
            info = StageEnv(env_name).info()
            for key, value in tracking.stage_env_tags(env_name, info).items():
                client.set_tag(run_id, key, value)
            if "llama_cpp_build" in info:
                client.set_tag(run_id, "llama_cpp.build", info["llama_cpp_build"])
            client.log_text(run_id, "\n".join(info.get("packages", [])), f"envs/{env_name}-packages.txt")

        engine_cfg, preset = fit_engine_to_load(engine, engine_cfg, benchmarks)
        tracking.log_params(client, run_id, {f"served.{k}": str(v) for k, v in preset.items()})
        with stage("serve", timings), engine.serve(engine_cfg, artifact, ctx) as served:
            reply, latency = served.complete(engine_cfg.smoke_prompt, engine_cfg.smoke_max_tokens)
            print(f"[qsweep]   serving: {engine_cfg.smoke_prompt!r} -> {reply.strip()[:80]!r}", flush=True)
            tracking.log_metrics(
                client, run_id, {"server_start_s": served.start_s, "smoke_latency_s": latency}
            )
            client.log_text(
                run_id, f"prompt: {engine_cfg.smoke_prompt}\nreply: {reply}\n", "smoke_completion.txt"
            )
            results: dict[str, BenchmarkResult] = {}
            for bench_name, bench_cfg in benchmarks.items():  # all on one server
                with stage(f"benchmark_{bench_name}", timings):
                    result = BENCHMARKS.get(bench_name).run(bench_cfg, served, ctx)
                if not isinstance(result, BenchmarkResult):
                    result = BenchmarkResult(metrics=result)
                tracking.log_result(client, run_id, result)
                print(f"[qsweep]   {bench_name}: {headline(result.metrics)}", flush=True)
                results[bench_name] = result

        with stage("compare", timings):  # after the server stopped: may serve the baseline itself
            deltas = compare_with_baseline(
                results, benchmarks, model, method_cfg, engine, engine_cfg, compat.serving_format(cfg), ctx
            )
        tracking.log_metrics(client, run_id, deltas)
        measured = {k: v for r in results.values() for k, v in r.metrics.items()} | deltas | artifact.metrics
        missed = gates.evaluate(OmegaConf.to_object(cfg.gates), measured)
        if missed:
            client.set_tag(run_id, "qsweep.gates_missed", "; ".join(missed))
            ctx.note("missed gates: " + "; ".join(missed))
    except KeyboardInterrupt:
        status, error = "KILLED", "interrupted"
        raise
    except QsweepError as err:
        status, error = "FAILED", str(err)
    except Exception as err:  # a bug or an unexpected tool failure: keep the traceback with the run
        status, error = "FAILED", f"{type(err).__name__}: {err}"
        client.log_text(run_id, traceback.format_exc(), "error_traceback.txt")
    finally:
        _finish(client, run_id, parent, status, error, timings, ctx)
    if status == "FAILED":
        FAILED_JOBS.append(name)
        print(f"qsweep: job {name} failed: {error}", flush=True)
    return status


def _finish(
    client, run_id: str, parent: str | None, status: str, error: str, timings: dict, ctx: JobContext
) -> None:
    """Attach logs, timings and notes, close the run; never let logging hide the job's own error."""
    try:
        tracking.log_metrics(client, run_id, timings)
        if error:
            client.set_tag(run_id, "qsweep.error", error[:5000])
        if ctx.notes:
            client.set_tag(run_id, "qsweep.notes", "\n".join(ctx.notes)[:5000])
        if ctx.log_dir.is_dir():
            for path in sorted(ctx.log_dir.iterdir()):
                if path.is_file():
                    client.log_artifact(run_id, str(path), "logs")
        client.set_terminated(run_id, status)
        if status == "KILLED" and parent:
            client.set_terminated(parent, "KILLED")
    except Exception as err:  # MLflow itself failing must not mask what happened to the job
        print(
            f"qsweep: could not finish MLflow run {run_id}: {err}; job details: {json.dumps(timings)}",
            flush=True,
        )
