"""Benchmark `perf`: a concurrency load test with `evalscope perf` against the served endpoint.

Random prompts of exactly `input_tokens` tokens built on the model's own tokenizer, `ignore_eos` so
every request generates `output_tokens`, warm-up requests before timing, and every concurrency level
repeated `repeats` times (reported as mean and standard deviation). Per level: output and total
tok/s, requests/s, TTFT / TPOT / ITL mean, p50, p90, p99 and the success rate, logged with
step=concurrency so the MLflow UI draws curves.

With a latency objective (`slo`), the highest concurrency that meets it (`perf_capacity`) is found
by evalscope's own SLA auto-tune (`--sla-auto-tune`, a doubling then binary search), on the same
server, after the levels.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from qsweep import envs, procs, stats
from qsweep.benchmarks.base import BENCHMARKS, Benchmark
from qsweep.context import BenchmarkResult, JobContext
from qsweep.engines.served import ChatEndpoint, Load, ServedModel
from qsweep.errors import QsweepError
from qsweep.settings import neutral

log = logging.getLogger(__name__)

# evalscope's benchmark_summary.json keys -> qsweep metric names (per concurrency level)
SUMMARY = {
    "Output Throughput (tok/s)": "output_tok_s",
    "Total Throughput (tok/s)": "total_tok_s",
    "Req Throughput (req/s)": "requests_s",
    "Avg TTFT (ms)": "ttft_ms_mean",
    "Avg TPOT (ms)": "tpot_ms_mean",
    "Avg ITL (ms)": "itl_ms_mean",
    "Avg Latency (s)": "latency_s_mean",
    "Avg Input Tokens": "input_tokens_mean",
    "Avg Output Tokens": "output_tokens_mean",
}
# Share of all CPUs busy, just before a level runs with the server idle, above which the machine is
# shared: speed figures then measure the other work too (on 2 cores, beside a quantization job,
# llama-server took 78 s per 64-token request).
BUSY_NOTE_ABOVE = 0.25
# benchmark_percentile.json columns and rows kept
PERCENTILE_COLUMNS = {"TTFT (ms)": "ttft_ms", "TPOT (ms)": "tpot_ms", "ITL (ms)": "itl_ms"}
PERCENTILE_ROWS = {"50%": "p50", "90%": "p90", "99%": "p99"}


@dataclass
class Objective:
    """A latency objective: limits on a load level's figures (null: no limit). The capacity is the
    highest concurrency at which every request succeeds and every limit set holds."""

    ttft_p99_ms: float | None = None
    ttft_mean_ms: float | None = None
    tpot_mean_ms: float | None = None
    tpot_p99_ms: float | None = None
    latency_p99_s: float | None = None
    max_concurrency: int = 16  # the search's upper bound; the engine is sized for it
    runs: int = 1  # runs averaged at each probed concurrency (evalscope's sla_num_runs)

    def criteria(self) -> dict[str, str]:
        """The limits set, as evalscope's --sla-params criteria (metric -> '<=value unit')."""
        return {
            metric: f"<={value}{unit}"
            for metric, unit, value in (
                ("p99_ttft", "ms", self.ttft_p99_ms),
                ("avg_ttft", "ms", self.ttft_mean_ms),
                ("avg_tpot", "ms", self.tpot_mean_ms),
                ("p99_tpot", "ms", self.tpot_p99_ms),
                ("p99_latency", "s", self.latency_p99_s),
            )
            if value is not None
        }

    def describe(self) -> str:
        """`p99_ttft<=500ms, avg_tpot<=50ms`: how the objective reads in the report."""
        return ", ".join(f"{metric}{limit}" for metric, limit in self.criteria().items())


@dataclass
class Config:
    concurrency: list[int] = field(default_factory=lambda: [1, 4])
    requests_per_level: int = 2  # requests at each level = this x concurrency (the seed: ~2x)
    input_tokens: int = 128  # the seed used 1024 in / 1024 out on a GPU
    output_tokens: int = 64
    warmup_requests: int = 1  # sent before each timed level, not counted
    repeats: int = 1  # each level run this many times: mean and standard deviation
    stream: bool = True  # TTFT / ITL need streaming
    timeout_s: int = neutral(3600)
    # A latency objective: with a limit set, the capacity under it is searched after the levels.
    slo: Objective = field(default_factory=Objective)


def _own_ticks() -> int:
    """CPU ticks used so far by this process and its descendants (the server, a tool), reaped
    children included."""
    total = 0
    for pid in procs.process_tree(os.getpid()):
        try:
            # the command name (2nd field) may hold spaces: parse after its closing parenthesis
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            # utime + stime, and cutime + cstime: its children that have exited and been reaped
            total += sum(int(v) for v in fields[11:15])
        except (OSError, ValueError, IndexError):
            continue
    return total


def cpu_sample() -> tuple[int, int, int] | None:
    """All CPUs' ticks, idle ticks, and the ticks of this process and its descendants (reaped
    ones included) so far, from Linux /proc; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        return sum(ticks[:8]), idle, _own_ticks()  # guest time is already counted in user
    except (OSError, ValueError, IndexError):
        return None


def busy_between(before: tuple[int, int, int] | None, after: tuple[int, int, int] | None) -> float | None:
    """Fraction of all CPUs' time between two samples spent busy by processes other than this one
    and its descendants (an engine finishing earlier work is not another job)."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    busy = (after[0] - before[0]) - (after[1] - before[1]) - (after[2] - before[2])
    return min(1.0, max(0.0, busy / (after[0] - before[0])))


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy with other work over the next `seconds`."""
    before = cpu_sample()
    time.sleep(seconds)
    return busy_between(before, cpu_sample())


def level_progress(log: Path) -> str:
    """Which level evalscope is on and how far, from its progress bar in the log."""
    found = procs.last_match(log, r"Processing\[parallel_(\d+)_number_(\d+)\]:\s*(\d+)%")
    return f"(concurrency {found[0]}: {found[2]}% of {found[1]} requests)" if found else ""


def level_metrics(level_dir: Path) -> dict[str, float]:
    """One evalscope level directory (`parallel_P_number_N/`) as qsweep's metrics."""
    summary = json.loads((level_dir / "benchmark_summary.json").read_text())
    metrics = {name: float(summary[key]) for key, name in SUMMARY.items() if key in summary}
    total = summary.get("Total Requests") or 0
    metrics["success_rate"] = (summary.get("Success Requests") or 0) / total if total else 0.0
    percentile_file = level_dir / "benchmark_percentile.json"
    rows = json.loads(percentile_file.read_text()) if percentile_file.is_file() else []
    for row in rows:
        suffix = PERCENTILE_ROWS.get(row.get("Percentiles"))
        for column, name in PERCENTILE_COLUMNS.items():
            if suffix and row.get(column) is not None:
                metrics[f"{name}_{suffix}"] = float(row[column])
    return metrics


@BENCHMARKS.register("perf")
class LoadTest(Benchmark[Config]):
    """A concurrency load test with evalscope perf: throughput, TTFT / TPOT / ITL by concurrency."""

    env = envs.EVALSCOPE
    requires = (ChatEndpoint,)
    measures_time = True

    def check(self, cfg: Config) -> None:
        if not cfg.concurrency or min(cfg.concurrency) < 1:
            raise QsweepError("benchmark.perf.concurrency needs positive levels, e.g. [1,4]")
        if cfg.input_tokens < 1 or cfg.output_tokens < 1 or cfg.requests_per_level < 1 or cfg.repeats < 1:
            raise QsweepError(
                "benchmark.perf needs input_tokens, output_tokens, requests_per_level, repeats >= 1"
            )
        limits = [v for v in dataclasses.astuple(cfg.slo)[:5] if v is not None]
        if any(v <= 0 for v in limits) or cfg.slo.max_concurrency < 1 or cfg.slo.runs < 1:
            raise QsweepError(
                "benchmark.perf.slo needs positive limits (e.g. slo.ttft_p99_ms=500), "
                "max_concurrency >= 1 and runs >= 1"
            )

    def load(self, cfg: Config) -> Load:
        # A request's prompt and output, plus room for the chat template's few tokens.
        highest = max(max(cfg.concurrency), cfg.slo.max_concurrency if cfg.slo.criteria() else 1)
        return Load(concurrency=highest, tokens_per_request=cfg.input_tokens + cfg.output_tokens + 16)

    def reusable(self, result: BenchmarkResult) -> bool:
        """Not a load test measured while other work kept the CPUs busy (it got a note then)."""
        busy = max(
            result.metrics.get("perf_cpu_busy_before", 0.0), result.metrics.get("perf_cpu_busy_during", 0.0)
        )
        return busy <= BUSY_NOTE_ABOVE

    def run(self, cfg: Config, served: ServedModel, ctx: JobContext) -> BenchmarkResult:
        """Every level of the load test, `repeats` times, through evalscope perf."""
        self.check(cfg)
        env = ctx.stage_env(envs.EVALSCOPE)
        env.require()
        tokenizer = served.artifact.tokenizer_dir
        if tokenizer is None:
            raise QsweepError(
                "benchmark perf needs the model's transformers tokenizer; this artifact has none"
            )
        out = ctx.log_dir / "perf"
        # evalscope's progress logger breaks on a disabled tqdm
        environ = env.environ(
            progress_bars=True, HF_HUB_OFFLINE="1", MODELSCOPE_OFFLINE="1", HF_DATASETS_OFFLINE="1"
        )
        levels = sorted(set(cfg.concurrency))
        numbers = [cfg.requests_per_level * c for c in levels]
        runs: dict[int, list[dict[str, float]]] = {c: [] for c in levels}
        busy = cpu_busy()
        started = cpu_sample()
        if busy is not None and busy > BUSY_NOTE_ABOVE:
            ctx.note(
                f"{busy:.0%} of the CPUs ({os.cpu_count()}) were busy with other work before the load test: "
                "its speed figures are lower than this machine gives alone; stop other jobs and rerun"
            )
        for repeat in range(cfg.repeats):
            name = f"repeat{repeat}"
            shutil.rmtree(out / name, ignore_errors=True)  # evalscope refuses to overwrite an earlier run
            log.info(
                "  perf %d/%d: concurrency %s, requests %s, %d in / %d out",
                repeat + 1, cfg.repeats, levels, numbers, cfg.input_tokens, cfg.output_tokens,
            )  # fmt: skip
            cmd = [
                env.root / "bin" / "evalscope", "perf",
                *request_args(cfg, served, tokenizer),
                "--parallel", *map(str, levels),
                "--number", *map(str, numbers),
                "--seed", str(repeat),
                "--outputs-dir", out,
                "--name", name,
            ]  # fmt: skip
            run_evalscope(cmd, "perf.log", "evalscope perf", cfg, ctx, environ)
            for c, n in zip(levels, numbers, strict=True):
                level_dir = out / name / f"parallel_{c}_number_{n}"
                if not (level_dir / "benchmark_summary.json").is_file():
                    raise QsweepError(
                        f"evalscope perf wrote no results for concurrency {c}: see logs/perf.log"
                    )
                runs[c].append(level_metrics(level_dir))
        result = summarize(runs, cfg, out)
        during = busy_between(started, cpu_sample())
        if busy is not None:
            result.metrics["perf_cpu_busy_before"] = busy
        if during is not None:
            result.metrics["perf_cpu_busy_during"] = during
            if during > BUSY_NOTE_ABOVE:
                ctx.note(
                    f"{during:.0%} of the CPUs ({os.cpu_count()}) were busy with other work during the load "
                    "test: its speed figures measure that work too; stop other jobs and rerun"
                )
        if cfg.slo.criteria():
            search = find_capacity(cfg, served, ctx, tokenizer, environ)
            result.metrics.update(search.metrics)
            result.tables["perf_slo_probes.json"] = search.tables["perf_slo_probes.json"]
        return result


def run_evalscope(cmd: list, log_name: str, what: str, cfg: Config, ctx: JobContext, environ: dict) -> None:
    """One evalscope perf command, logged to `log_name`, its progress told from that log."""
    procs.run(
        cmd,
        log_path=ctx.log(log_name),
        timeout_s=cfg.timeout_s,
        what=what,
        env=environ,
        cwd=ctx.log_dir,
        progress=lambda: level_progress(ctx.log(log_name)),
    )


def request_args(cfg: Config, served: ServedModel, tokenizer: Path) -> list:
    """evalscope perf's arguments for the endpoint and the requests, shared by levels and search."""
    return [
        "--url", f"{served.api_base()}/completions",
        "--api", "openai",
        "--model", served.model_name or "qsweep",
        "--tokenizer-path", tokenizer,
        "--dataset", "random",
        "--min-prompt-length", str(cfg.input_tokens),
        "--max-prompt-length", str(cfg.input_tokens),
        "--min-tokens", str(cfg.output_tokens),
        "--max-tokens", str(cfg.output_tokens),
        "--extra-args", json.dumps({"ignore_eos": True}),
        "--warmup-num", str(cfg.warmup_requests),
        "--sleep-interval", "0",
        "--read-timeout", str(cfg.timeout_s),
        "--no-timestamp",
        "--stream" if cfg.stream else "--no-stream",
        # aiohttp reuses keep-alive connections that llama-server has already closed, and a
        # request then fails with "Server disconnected" (seen at concurrency 3): one connection
        # per request, as a fresh client would open.
        "--headers", "Connection=close",
    ]  # fmt: skip


def find_capacity(
    cfg: Config, served: ServedModel, ctx: JobContext, tokenizer: Path, environ: dict[str, str]
) -> BenchmarkResult:
    """The highest concurrency meeting the objective, by evalscope's SLA auto-tune (through
    stage_scripts/evalscope_sla.py, which keeps evalscope's decision): `perf_capacity` (0 when even
    one user misses it) and the figures measured there."""
    env = ctx.stage_env(envs.EVALSCOPE)
    out = ctx.log_dir / "perf" / "slo"
    shutil.rmtree(out, ignore_errors=True)
    decision = out / "sla_decision.json"
    log.info("  perf: capacity under %s (up to %d users)", cfg.slo.describe(), cfg.slo.max_concurrency)
    cmd = [
        *env.script("evalscope_sla.py"), decision,
        *request_args(cfg, served, tokenizer),
        "--parallel", "1", "--number", str(cfg.requests_per_level),
        "--seed", "0",
        "--outputs-dir", out,
        "--name", "search",
        "--sla-auto-tune", "--sla-variable", "parallel",
        "--sla-params", json.dumps([cfg.slo.criteria()]),
        "--sla-num-runs", str(cfg.slo.runs),
        "--sla-lower-bound", "1", "--sla-upper-bound", str(cfg.slo.max_concurrency),
        "--sla-number-multiplier", str(cfg.requests_per_level),
    ]  # fmt: skip
    run_evalscope(cmd, "perf_slo.log", "evalscope perf SLA search", cfg, ctx, environ)
    return capacity_result(json.loads(decision.read_text()))


def probe_metrics(probe: dict) -> dict[str, float]:
    """One probed concurrency's averaged figures, named as the levels' metrics are."""
    averaged = probe.get("averaged_result") or {}
    summary = averaged.get("metrics") or {}
    metrics = {name: float(summary[key]) for key, name in SUMMARY.items() if key in summary}
    columns = averaged.get("percentiles") or {}
    labels = columns.get("Percentiles", [])
    for column, name in PERCENTILE_COLUMNS.items():
        values = dict(zip(labels, columns.get(column) or [], strict=False))
        for label, suffix in PERCENTILE_ROWS.items():
            if values.get(label) is not None:
                metrics[f"{name}_{suffix}"] = float(values[label])
    return metrics


def capacity_result(decision: dict) -> BenchmarkResult:
    """evalscope's SLA decision as metrics: the selected concurrency and its probe's figures, and a
    table of every probe with whether it met the objective."""
    selection = (decision.get("selections") or [{}])[0]
    capacity = selection.get("selected_value") or 0
    probes = {int(p["value"]): p for p in decision.get("probes", [])}
    rows = []
    for value, probe in sorted(probes.items()):
        passed = all(probe.get("group_passes", {}).values()) and probe.get("request_gate_passed", False)
        rate = probe.get("success_rate", 0.0) / 100
        row = {"concurrency": value, "meets_objective": passed, "success_rate": rate}
        rows.append(row | probe_metrics(probe))
    metrics = {"perf_capacity": float(capacity), "perf_slo_probes": float(len(rows))}
    if capacity in probes:
        at = probe_metrics(probes[capacity])
        for name in ("output_tok_s", "ttft_ms_p99", "ttft_ms_mean", "tpot_ms_mean", "tpot_ms_p99"):
            if name in at:
                metrics[f"perf_capacity_{name}"] = at[name]
    return BenchmarkResult(metrics=metrics, tables={"perf_slo_probes.json": rows})


def summarize(runs: dict[int, list[dict[str, float]]], cfg: Config, out: Path) -> BenchmarkResult:
    """Mean (and standard deviation over repeats) of every metric at every level."""
    curves: dict[str, dict[int, float]] = {}
    rows = []
    for c, repeats in runs.items():
        row: dict[str, float] = {"concurrency": c}
        for key in repeats[0]:
            values = [r[key] for r in repeats if key in r and math.isfinite(r[key])]
            if not values:
                continue
            mean, std = stats.mean_std(values)
            curves.setdefault(f"perf_{key}", {})[c] = mean
            row[key] = mean
            if cfg.repeats > 1:
                curves.setdefault(f"perf_{key}_std", {})[c] = std
                row[f"{key}_std"] = std
        rows.append(row)
    low, high = min(runs), max(runs)
    metrics = {
        f"perf_output_tok_s_c{low}": curves["perf_output_tok_s"][low],
        f"perf_output_tok_s_c{high}": curves["perf_output_tok_s"][high],
        "perf_success_rate_min": min(curves["perf_success_rate"].values()),
    }
    if high != low and curves["perf_output_tok_s"][low] > 0:
        metrics["perf_scaling"] = curves["perf_output_tok_s"][high] / curves["perf_output_tok_s"][low]
    return BenchmarkResult(
        metrics=metrics, curves=curves, tables={"perf_table.json": rows}, files={"perf": out}
    )
