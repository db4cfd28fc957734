"""The evidence of a report: one `JobRow` per job, read back from its MLflow run.

Every number a report shows comes from a run's metrics (and, for curves, its metric history by
concurrency); nothing is measured here. A job that reused all its results from earlier runs has no
server of its own: its memory figure comes from the run it reused (`qsweep.reused_from`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from qsweep import stats

# perf curves drawn and tabled, by concurrency (metric history, step = concurrency)
CURVES = ("perf_output_tok_s", "perf_ttft_ms_p50", "perf_ttft_ms_p99", "perf_tpot_ms_p50", "perf_tpot_ms_p99")
MEMORY = ("server_gpu_memory_mb", "server_peak_rss_mb")  # the first present is the job's memory


@dataclass(frozen=True)
class Value:
    """A figure and its standard error (nan: unknown), with its 95% interval."""

    mean: float
    stderr: float = math.nan

    @property
    def ci95(self) -> tuple[float, float]:
        if math.isnan(self.stderr):
            return self.mean, self.mean
        return self.mean - stats.Z95 * self.stderr, self.mean + stats.Z95 * self.stderr


@dataclass
class DatasetAccuracy:
    """One dataset's primary accuracy, and against the baseline where compared."""

    score: Value
    n: int = 0
    delta: Value | None = None  # paired where both scored the same samples
    recovery: float = math.nan
    within_noise: bool | None = None
    flips_to_wrong: int | None = None
    flips_to_right: int | None = None

    @property
    def recovery_ci(self) -> tuple[float, float]:
        """The delta's 95% interval as a recovery interval (1 + delta / baseline)."""
        if self.delta is None or math.isnan(self.recovery) or not self.recovery:
            return math.nan, math.nan
        base = self.score.mean - self.delta.mean
        low, high = self.delta.ci95
        return (1 + low / base, 1 + high / base) if base else (math.nan, math.nan)


@dataclass
class JobRow:
    """What the report knows of one job."""

    name: str
    model: str
    method: str
    engine: str
    status: str
    run_id: str
    is_baseline: bool = False
    reused_from: str = ""
    skipped: str = ""
    sweep_run_id: str = ""
    bits_per_weight: float = math.nan
    size_mb: float = math.nan
    memory_mb: float = math.nan
    memory_kind: str = ""  # "GPU" or "RSS"
    ppl: Value | None = None
    ppl_ratio: float = math.nan
    ppl_ratio_ci: tuple[float, float] = (math.nan, math.nan)
    ppl_within_noise: bool | None = None
    kld_mean: Value | None = None
    kld_p99: float = math.nan
    accuracy: dict[str, DatasetAccuracy] = field(default_factory=dict)
    curves: dict[str, dict[int, float]] = field(default_factory=dict)  # CURVES (+ _std) by concurrency
    repeats: int = 1
    capacity: float = math.nan  # highest concurrency meeting the objective (0: not even one user)
    capacity_tok_s: float = math.nan
    objective: str = ""
    busy: bool = False  # a load test measured while other work kept the CPUs busy
    suspect: str = ""  # why its figures cannot be right (`sanity`), if they cannot
    gpu_count: int | None = None  # GPUs the job held (param `job.gpu_count`); None: not recorded
    kernels: str = ""  # the engine's kernel path on the machine that ran it (tag `engine.kernels`)

    def speed(self, concurrency: int | None = None) -> Value | None:
        """Output tok/s at a concurrency (default: the highest measured), with the standard error
        of the mean over the load test's repeats where it ran more than once."""
        curve = self.curves.get("perf_output_tok_s") or {}
        if not curve:
            return None
        level = max(curve) if concurrency is None else concurrency
        if level not in curve:
            return None
        std = (self.curves.get("perf_output_tok_s_std") or {}).get(level, math.nan)
        stderr = std / math.sqrt(self.repeats) if self.repeats > 1 and not math.isnan(std) else math.nan
        return Value(curve[level], stderr)

    @property
    def levels(self) -> list[int]:
        return sorted(self.curves.get("perf_output_tok_s") or {})

    def quality(self) -> tuple[str, Value] | None:
        """The job's quality relative to the baseline (1 = as good): the mean accuracy recovery over
        its datasets where measured, else the inverse perplexity ratio; with its standard error."""
        recoveries = [(a.recovery, a) for a in self.accuracy.values() if not math.isnan(a.recovery)]
        if recoveries:
            mean = sum(r for r, _ in recoveries) / len(recoveries)
            # a recovery's standard error: its delta's, over the baseline's score
            errors = [
                a.delta.stderr / (a.score.mean - a.delta.mean) if a.score.mean != a.delta.mean else 0.0
                for _, a in recoveries
                if a.delta is not None
            ] or [math.nan]
            return "recovery", Value(mean, math.sqrt(sum(e * e for e in errors)) / len(errors))
        if self.is_baseline and (self.accuracy or self.ppl):
            return ("recovery" if self.accuracy else "1/ppl ratio"), Value(1.0, 0.0)
        if not math.isnan(self.ppl_ratio):
            low, high = self.ppl_ratio_ci
            known = low and high and not math.isnan(low)
            stderr = (1 / low - 1 / high) / (2 * stats.Z95) if known else math.nan
            return "1/ppl ratio", Value(1 / self.ppl_ratio, stderr)
        return None


def _float(metrics: dict, key: str) -> float:
    value = metrics.get(key)
    return float(value) if value is not None else math.nan


def _value(metrics: dict, key: str, err_key: str) -> Value | None:
    return Value(float(metrics[key]), _float(metrics, err_key)) if key in metrics else None


def accuracy_of(metrics: dict) -> dict[str, DatasetAccuracy]:
    """Per dataset: the primary score (metric `<dataset>`, with `<dataset>_stderr` and `_n`) and its
    comparison with the baseline (`<dataset>_delta`, `_recovery`, `_flips_to_wrong`, ...)."""
    found: dict[str, DatasetAccuracy] = {}
    for name in sorted(k for k in metrics if not k.startswith("acc_")):
        prefix = f"acc_{name}_"
        if not any(k.startswith(prefix) for k in metrics):
            continue
        score = float(metrics[name])
        stderr = _float(metrics, f"{name}_stderr")
        n = int(metrics.get(f"{name}_n") or 0)
        if math.isnan(stderr):  # results stored before `<dataset>_stderr` was logged
            primary = next((k for k in metrics if k.startswith(prefix) and k.count("_") > 1
                            and metrics[k] == score and f"{k}_stderr" in metrics), None)  # fmt: skip
            stderr = _float(metrics, f"{primary}_stderr") if primary else math.nan
            n = int(metrics.get(f"{primary}_n") or 0) if primary else 0
        row = DatasetAccuracy(Value(score, stderr), n)
        if f"{name}_delta" in metrics:
            row.delta = Value(float(metrics[f"{name}_delta"]), _float(metrics, f"{name}_delta_stderr"))
            row.recovery = _float(metrics, f"{name}_recovery")
            row.within_noise = bool(metrics.get(f"{name}_within_noise"))
            if f"{name}_flips_to_wrong" in metrics:
                row.flips_to_wrong = int(metrics[f"{name}_flips_to_wrong"])
                row.flips_to_right = int(metrics[f"{name}_flips_to_right"])
        found[name] = row
    return found


def objective_of(params: dict) -> str:
    """The load test's latency objective, as its params say (empty: none)."""
    from qsweep.benchmarks.perf import Objective

    limits: dict[str, Any] = {}
    for f in dataclasses.fields(Objective):
        value = params.get(f"benchmark.perf.slo.{f.name}")
        if value not in (None, "", "None") and f.name not in ("max_concurrency", "runs"):
            limits[f.name] = float(value)
    return Objective(**limits).describe()


def row_from_run(run, curves: dict[str, dict[int, float]], fallback: dict[str, float]) -> JobRow:
    """A JobRow from an MLflow run, its perf curves and metrics of the run(s) it reused from."""
    m, tags, params = run.data.metrics, run.data.tags, run.data.params
    row = JobRow(
        name=run.info.run_name,
        model=tags.get("choice.model", params.get("model.name", "?")),
        method=tags.get("choice.method", params.get("method.name", "?")),
        engine=tags.get("choice.engine", params.get("engine.name", "?")),
        status="SKIPPED" if "qsweep.skipped" in tags else run.info.status,
        run_id=run.info.run_id,
        is_baseline=tags.get("qsweep.baseline", str(tags.get("choice.method") == "none").lower()) == "true",
        reused_from=tags.get("qsweep.reused_from", "") if tags.get("qsweep.reused") == "all" else "",
        skipped=tags.get("qsweep.skipped", ""),
        sweep_run_id=tags.get("mlflow.parentRunId", ""),
        bits_per_weight=_float(m, "bits_per_weight"),
        size_mb=_float(m, "artifact_size_mb"),
        ppl=_value(m, "ppl", "ppl_err"),
        ppl_ratio=_float(m, "ppl_ratio"),
        ppl_ratio_ci=(_float(m, "ppl_ratio_ci_low"), _float(m, "ppl_ratio_ci_high")),
        ppl_within_noise=bool(m["ppl_within_noise"]) if "ppl_within_noise" in m else None,
        kld_mean=_value(m, "kld_mean", "kld_mean_stderr"),
        kld_p99=_float(m, "kld_p99"),
        accuracy=accuracy_of(m),
        curves=curves,
        repeats=int(params.get("benchmark.perf.repeats") or 1),
        capacity=_float(m, "perf_capacity"),
        capacity_tok_s=_float(m, "perf_capacity_output_tok_s"),
        objective=objective_of(params),
        busy=max(m.get("perf_cpu_busy_before", 0.0), m.get("perf_cpu_busy_during", 0.0)) > 0.25,
        suspect=tags.get("qsweep.suspect", ""),
        gpu_count=int(params["job.gpu_count"]) if params.get("job.gpu_count", "").isdigit() else None,
        kernels=tags.get("engine.kernels", ""),
    )
    for key in MEMORY:
        value = m.get(key, fallback.get(key))
        if value is not None:
            row.memory_mb, row.memory_kind = float(value), "GPU" if "gpu" in key else "RSS"
            break
    return row


def load_rows(client, runs: list) -> list[JobRow]:
    """JobRows for these job runs, in their order, with curves from their metric histories."""
    rows = []
    for run in runs:
        curves: dict[str, dict[int, float]] = {}
        for key in (*CURVES, "perf_output_tok_s_std"):
            if key in run.data.metrics:
                history = client.get_metric_history(run.info.run_id, key)
                curves[key] = {int(point.step): float(point.value) for point in history}
        fallback: dict[str, float] = {}
        source = run.data.tags.get("qsweep.reused_from", "")
        if source and not any(key in run.data.metrics for key in MEMORY):
            for run_id in source.split(","):
                try:
                    fallback |= {k: v for k, v in client.get_run(run_id).data.metrics.items() if k in MEMORY}
                except Exception:  # noqa: BLE001 - a deleted source run: the memory stays unknown
                    continue
        rows.append(row_from_run(run, curves, fallback))
    return rows
