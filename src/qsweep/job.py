"""One job of a sweep, as a pipeline of named stages: model, quantize, serve and benchmarks,
compare with the baseline, gates.

The job's plan (`plan.py`) says what to do; the plug-ins do it; `tracking.JobRecorder` records it.
A job records its own outcome (FINISHED / FAILED / KILLED) and never raises a failure into Hydra,
so the sweep goes on under any launcher; the sweep's exit code comes from the recorded outcomes
(`sweep.py`). SIGINT and SIGTERM are the job's to handle while it runs (`procs.stop_on_signals`).
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qsweep import devices, gates, models, procs, reference, results, sanity
from qsweep.context import Artifact, BenchmarkResult, JobContext
from qsweep.errors import QsweepError
from qsweep.measure import Served, StageClock, serve_and_measure
from qsweep.models import PreparedModel
from qsweep.plan import JobPlan, benchmark_order, given_keys, plan_job, sweep_label, typed
from qsweep.sweep import JobOutcome, parent_run_id, sweep_began, sweep_swept_keys
from qsweep.tracking import JobRecorder

log = logging.getLogger(__name__)


def run_job(cfg: DictConfig) -> JobOutcome:
    """Run one job under Hydra and return its recorded outcome."""
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    with procs.stop_on_signals():
        overrides = list(hydra_cfg.overrides.task)
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")}
        label, parent = "", None
        try:
            if multirun:
                label = sweep_label(overrides, sweep_swept_keys(Path(hydra_cfg.sweep.dir)))
                parent = parent_run_id(Path(hydra_cfg.sweep.dir))
            plan = plan_job(
                cfg, hydra_cfg.runtime.choices, benchmark_order(overrides), given_keys(overrides), label
            )
        except Exception as err:  # noqa: BLE001 - the pre-flight passed: the world changed since (a port taken)
            if procs.stop_requested():
                raise KeyboardInterrupt("interrupted while planning") from err
            error = str(err) if isinstance(err, QsweepError) else f"{type(err).__name__}: {err}"
            model = unplanned_model_name(cfg, choices)
            name = f"{model}/{choices.get('method')}/{choices.get('engine')}{label}"
            run_id = JobRecorder.unplanned(cfg, name, choices, job_dir, parent, f"at plan time: {error}")
            log.error("job %s failed at plan time: %s", name, error)
            return JobOutcome(name, "FAILED", run_id)
        # rerun=[quantize] rebuilds what was built before this sweep began, once per sweep.
        began = sweep_began(Path(hydra_cfg.sweep.dir)) if multirun else time.time()
        ctx = plan.context(job_dir / "logs", rebuild_before=began if plan.forces("quantize") else None)
        try:
            record = JobRecorder.start(cfg, plan, job_dir, parent)
        except QsweepError as err:  # its run is closed FAILED with the reason
            if procs.stop_requested():
                raise KeyboardInterrupt("interrupted while recording the job's settings") from err
            log.error("job %s failed: %s", plan.name, err)
            return JobOutcome(plan.name, "FAILED", None)
        if plan.skip_reason:  # an unsupported method x engine pair: recorded, not a failure
            record.skipped(plan.skip_reason)
            log.info("job %s skipped: %s", plan.name, plan.skip_reason)
            return JobOutcome(plan.name, "SKIPPED", record.run_id)
        failed = record.failed_siblings() if plan.fail_fast and parent else []
        if failed:  # fail_fast: the sweep stops at its first failure; the rest are not run
            record.skipped(f"not run: fail_fast=true and job {failed[0]} failed")
            log.info("job %s not run: fail_fast=true and job %s failed", plan.name, failed[0])
            return JobOutcome(plan.name, "SKIPPED", record.run_id)
        return run_stages(plan, ctx, record, job_dir)


def unplanned_model_name(cfg: DictConfig, choices: dict) -> str:
    """The model's name as a plan gives it (a local checkpoint's folder), where the config allows."""
    try:
        return models.display_name(typed(cfg, "model"), str(choices.get("model")))
    except Exception:  # noqa: BLE001 - the name of a job whose config is the problem
        return str(choices.get("model"))


def run_stages(plan: JobPlan, ctx: JobContext, record: JobRecorder, job_dir: Path) -> JobOutcome:
    """The stages, each timed; whatever happens, the run is closed with its status, logs and notes."""
    for name, why in plan.skipped_benchmarks.items():
        ctx.note(f"benchmark {name} skipped: {why}")
    if plan.caveat:
        ctx.note(plan.caveat)
    for note in plan.notes:
        ctx.note(note)
    clock = StageClock()
    status, error, trace = "FINISHED", "", None
    held = contextlib.ExitStack()  # the job's GPUs, released when its run is closed
    try:
        record.devices(held.enter_context(devices.job_gpus(plan.gpus, plan.gpu_slots)))
        with clock.stage("model"):
            model = models.prepare(plan.model, plan.model_name, ctx)
            if not plan.model.path:  # a prepared or downloaded checkpoint: its own config.json, again
                notes = plan.check_checkpoint(model.path)
                for note in notes if not plan.shape.widths else []:  # else said at pre-flight
                    ctx.note(note)
        record.model(model)

        with clock.stage("quantize"):
            assert plan.fmt is not None  # a pair no format joins is skipped before its run starts
            artifact = plan.method.build(plan.method_cfg, model, plan.fmt, ctx)
        record.artifact(artifact)
        record.stage_envs([(spec, ctx.stage_env(spec)) for spec in plan.stage_envs()])
        record.kernels(plan.engine.kernels(plan.engine_cfg, ctx))

        measured = artifact.metrics | measure(plan, model, artifact, ctx, record, clock)
        suspect = sanity.job_reasons(measured, ctx.smoke_reply, plan.method.is_baseline)
        if suspect:
            record.suspect(suspect)
            for reason in suspect:
                ctx.note(f"suspect result: {reason}")
        missed = gates.evaluate(plan.gates, measured)
        if missed:
            record.gates_missed(missed)
            ctx.note("missed gates: " + "; ".join(missed))
    except KeyboardInterrupt:
        status, error = "KILLED", "interrupted"
        raise
    except Exception as err:
        if procs.stop_requested():  # the signal came out of a library as another exception
            status, error = "KILLED", "interrupted"
            raise KeyboardInterrupt(error) from err
        if isinstance(err, QsweepError):
            status, error = "FAILED", str(err)
        else:  # a bug or an unexpected tool failure: keep the traceback with the run
            status, error, trace = "FAILED", f"{type(err).__name__}: {err}", traceback.format_exc()
    finally:
        record.finish(status, error, trace, clock.timings, ctx.notes, log_files(ctx, job_dir))
        held.close()
    if status == "FAILED":
        log.error("job %s failed: %s", plan.name, error)
    return JobOutcome(plan.name, status, record.run_id)


def measure(
    plan: JobPlan,
    model: PreparedModel,
    artifact: Artifact,
    ctx: JobContext,
    record: JobRecorder,
    clock: StageClock,
) -> dict[str, float]:
    """The benchmarks' results: those that exist are reused, the others measured on one server
    start (none if every result exists) and compared with the baseline. Returns every metric."""
    keys = {name: results.key(plan, artifact.key, name, ctx) for name in plan.benchmarks}
    reused = results.find_reusable(plan, model.fingerprint, keys, ctx)
    measured = ctx.results  # what later benchmarks may read (Benchmark.after)
    for name, found in reused.items():
        record.reused(name, found.result, found.deltas)
        measured |= found.result.metrics | found.deltas
    if reused:
        sources = ", ".join(f"{name} (run {found.result.run_id})" for name, found in reused.items())
        log.info("  reused: %s", sources)
        record.reuse_summary(reused, len(plan.benchmarks))
    to_run = {name: bench for name, bench in plan.benchmarks.items() if name not in reused}
    if not to_run:
        log.info("  every result exists: no server started")
        return measured
    saved: set[str] = set()
    uncompared: dict[str, BenchmarkResult] = {}

    def compare(name: str, result: BenchmarkResult) -> bool:
        """Compare with the baseline's stored results, and keep the comparison; False if none yet."""
        compared = reference.compare(plan, model, name, result, ctx)
        if compared is None:
            return False
        deltas, baseline = compared
        record.metrics(deltas)
        measured.update(deltas)
        key = keys[name]
        if name in saved and key is not None:
            revision = plan.benchmarks[name][0].compare_revision
            results.save_deltas(ctx.artifact_cache, key, baseline, deltas, revision)
        return True

    def keep(name: str, result: BenchmarkResult) -> None:
        """Record and store each result as soon as it is measured: a later failure keeps it."""
        record.result(result)
        measured.update(result.metrics)
        key = keys[name]
        if key is not None and plan.benchmarks[name][0].reusable(result):
            results.save(ctx.artifact_cache, key, result, record.run_id)
            saved.add(name)
        reference.keep(plan, model, name, result, ctx)
        if plan.quantizes and result.samples is not None and not compare(name, result):
            uncompared[name] = result  # the baseline's results are not there yet

    if plan.preset:
        log.info("  serving preset for the benchmarks' load: %s", plan.preset)
        record.preset(plan.preset)

    def memory(metrics: dict[str, float]) -> None:
        record.metrics(metrics)
        measured.update(metrics)

    def served(up: Served) -> None:
        record.served(up)
        ctx.smoke_reply = up.reply

    serve_and_measure(
        plan.engine,
        plan.engine_cfg,
        artifact,
        to_run,
        ctx,
        clock,
        on_served=served,
        on_result=keep,
        on_memory=memory,
    )
    if uncompared:
        with clock.stage("compare"):  # after the server stopped: serves the baseline itself
            reference.evaluate_missing_baseline(plan, model, uncompared, ctx)
            for name, result in uncompared.items():
                if not compare(name, result):
                    reference.discard_files(result.samples)
    return measured


def log_files(ctx: JobContext, job_dir: Path) -> list[Path]:
    """The job's logs (servers, tools) and the controller's own log of it (Hydra's job log file)."""
    files = sorted(p for p in ctx.log_dir.iterdir() if p.is_file()) if ctx.log_dir.is_dir() else []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == job_dir:
            handler.flush()
            files.append(Path(handler.baseFilename))
    return files
