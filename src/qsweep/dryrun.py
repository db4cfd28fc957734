"""`dry_run=true`: what every job of a sweep would do, found without doing any of it and without
writing anything (no cache entry, no MLflow run): skipped (why), reused (from which runs), or to
run (which artifacts are cached and which must be built, which benchmarks measured), with a
duration estimated from the stage times of earlier runs of the same job where they exist."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qsweep import models, results
from qsweep.errors import QsweepError
from qsweep.plan import JobPlan


class History:
    """The earlier runs of each job (by run name) in the sweep's MLflow store, newest first; none
    when the store does not exist yet (reading it must not create it)."""

    def __init__(self, plan: JobPlan):
        self.runs: dict[str, list] = {}
        uri = plan.tracking.uri or f"sqlite:///{Path(plan.paths.mlruns).resolve() / 'mlflow.db'}"
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(plan.tracking.experiment)
        if experiment is None:
            return
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string="tags.`qsweep.kind` = 'job'",
            order_by=["attributes.start_time DESC"],
            max_results=5000,
        )
        for run in found:
            self.runs.setdefault(run.info.run_name, []).append(run)

    def latest(self, job: str, metric: str, **tags: str) -> float | None:
        """The newest value of `metric` among the job's runs (with these tags), or None."""
        for run in self.runs.get(job, []):
            if metric in run.data.metrics and all(run.data.tags.get(k) == v for k, v in tags.items()):
                return run.data.metrics[metric]
        return None

    def estimate(self, job: str, prepare_model: bool, build: bool, benchmarks: list[str]) -> float | None:
        """Seconds the job should take, from its earlier runs' stage times; None where a stage it
        needs was never timed."""
        parts: list[float | None] = []
        if prepare_model:
            parts.append(self.latest(job, "time_model_s", **{"model.cache_hit": "false"}))
        if build:
            parts.append(self.latest(job, "quantize_s"))  # the build time, logged on cache hits too
        if benchmarks:
            parts.append(self.latest(job, "server_start_s"))
            parts += [self.latest(job, f"time_benchmark_{name}_s") for name in benchmarks]
        return None if None in parts else sum(p for p in parts if p is not None)


@dataclass
class Forecast:
    """What one job would do."""

    name: str
    status: str  # skip, reuse, run, cannot run here, cannot tell
    details: list[str] = field(default_factory=list)
    estimate_s: float | None = None


def forecast(plan: JobPlan, history: History) -> Forecast:
    if plan.skip_reason:
        return Forecast(plan.name, "skip", [plan.skip_reason])
    ctx = plan.context(Path(tempfile.gettempdir()) / "qsweep-dry-run")  # nothing is logged there
    try:
        fingerprint, model_ready = models.identify(plan.model, ctx)
        assert plan.fmt is not None  # a pair no format joins is skipped above
        artifact = plan.method.plan(plan.method_cfg, fingerprint, plan.fmt, ctx)
        keys = {name: results.key(plan, artifact.key, name, ctx) for name in plan.benchmarks}
        reuse = results.find_reusable(plan, fingerprint, keys, ctx)
    except QsweepError as err:
        return Forecast(plan.name, "cannot tell", [str(err)])
    rebuild = plan.forces("quantize")
    steps = [f"model: {'prepared' if model_ready else 'to prepare'}"]
    steps += [
        f"{what}: {'to rebuild' if rebuild else 'cached' if hit else 'to build'}"
        for what, hit in artifact.steps
    ]
    measures = [name for name in plan.benchmarks if name not in reuse]
    outcome = [
        f"{name}: reused from run {reuse[name].result.run_id}" for name in plan.benchmarks if name in reuse
    ]
    outcome += [f"{name}: to measure" for name in measures]
    outcome += [f"{name}: skipped ({why})" for name, why in plan.skipped_benchmarks.items()]
    details = ["; ".join(steps), "; ".join(outcome)] if outcome else ["; ".join(steps)]
    unavailable = plan.unavailable(ctx)
    if unavailable:
        return Forecast(plan.name, "cannot run here", ["; ".join(unavailable), *details])
    build = rebuild or not all(hit for _, hit in artifact.steps)
    if not (measures or build or not model_ready):
        return Forecast(plan.name, "reuse", details, 0.0)
    return Forecast(plan.name, "run", details, history.estimate(plan.name, not model_ready, build, measures))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "no estimate (no earlier run timed every stage it needs)"
    return f"about {seconds:.0f} s" if seconds < 120 else f"about {seconds / 60:.1f} min"


def report(plans: list[JobPlan]) -> list[str]:
    """The dry run's lines: one per job, its details indented, and the totals."""
    history = History(plans[0]) if plans else None
    forecasts = [forecast(plan, history) for plan in plans] if history else []
    lines = ["dry run: nothing is built, measured or recorded"]
    for f in forecasts:
        head = f"{f.name}: {f.status}" + (f", {duration(f.estimate_s)}" if f.status == "run" else "")
        lines += [head, *(f"    {detail}" for detail in f.details)]
    counts = {
        status: sum(f.status == status for f in forecasts)
        for status in dict.fromkeys(f.status for f in forecasts)
    }
    to_run = [f.estimate_s for f in forecasts if f.status == "run"]
    total = (
        f" ({duration(sum(t for t in to_run if t is not None))} to run)"
        if to_run and None not in to_run
        else ""
    )
    lines.append(
        f"{len(forecasts)} job(s): " + ", ".join(f"{n} {status}" for status, n in counts.items()) + total
    )
    return lines
