"""The report's decision logic on hand-built jobs: the seed blog's published numbers, constraints,
ties within noise, and reading a run's metrics back into a row."""

from __future__ import annotations

import math
from types import SimpleNamespace

from qsweep import stats
from qsweep.report import decide, figures, render
from qsweep.report.decide import ReportConfig
from qsweep.report.rows import DatasetAccuracy, JobRow, Value, row_from_run


def binomial(p: float, n: int) -> stats.Estimate:
    return stats.Estimate(p, math.sqrt(p * (1 - p) / n), n)


def job(method: str, engine: str, math500: float, tok_s: dict[int, float], size_mb: float,
        baseline: float = 0.776) -> JobRow:  # fmt: skip
    """A seed-blog job: math_500 accuracy on 500 samples, compared unpaired with bf16's published score
    (only the summary numbers were published), and its output tok/s by concurrency."""
    score = binomial(math500, 500)
    accuracy = DatasetAccuracy(Value(score.mean, score.stderr), 500)
    is_baseline = method == "bf16"
    if not is_baseline:
        cmp = stats.compare_estimates(score, binomial(baseline, 500))
        accuracy.delta = Value(cmp.delta, cmp.stderr)
        accuracy.recovery, accuracy.within_noise = cmp.recovery, cmp.within_noise
    return JobRow(name=f"qwen3-4b/{method}/{engine}", model="qwen3-4b", method=method, engine=engine,
                  status="FINISHED", run_id=method + engine, is_baseline=is_baseline, size_mb=size_mb,
                  accuracy={"math_500": accuracy}, curves={"perf_output_tok_s": tok_s})  # fmt: skip


def seed_blog() -> list[JobRow]:
    """anchors.md: Qwen3-4B-Instruct-2507 on an RTX 4090, math_500 (n=500) and output tok/s."""
    return [
        job("bf16", "vllm", 0.776, {1: 88.8, 10: 669.3, 100: 1579.0}, 8000),
        job("gptq-w4a16", "vllm", 0.782, {1: 166.5, 10: 1058.7, 100: 1805.6}, 2600),
        job("iq4_xs", "vllm", 0.758, {1: 174.0, 10: 412.0, 100: 1225.5}, 2200),
        job("iq4_xs", "llamacpp", 0.758, {1: 212.8, 10: 209.9, 100: 204.0}, 2200),
    ]


def pick(picks: list[decide.Pick], workload: str) -> decide.Pick:
    return next(p for p in picks if p.workload == workload)


def test_seed_blog_bf16_vs_gptq_on_math_500_is_noise_and_no_single_winner_is_named():
    rows = seed_blog()
    gptq = rows[1].accuracy["math_500"]
    # "GPTQ beats bf16" (0.782 vs 0.776 on 500 samples): the interval of the difference holds 0
    assert gptq.within_noise and gptq.delta.ci95[0] < 0 < gptq.delta.ci95[1]
    picks, left_out = decide.recommend(rows, ReportConfig())
    assert left_out == {}
    quality = pick(picks, "best quality")
    assert quality.winner is None and {r.method for r in quality.leaders} == {"bf16", "gptq-w4a16", "iq4_xs"}
    assert "no single winner" in quality.sentence()
    statements = decide.noise_statements(rows)
    assert any("qwen3-4b/gptq-w4a16/vllm` on math_500: +0.006" in s and "noise" in s for s in statements)


def test_seed_blog_workloads_one_user_goes_to_llamacpp_saturation_is_too_close_to_call():
    picks, _ = decide.recommend(seed_blog(), ReportConfig())
    # one user: llama-server's 212.8 tok/s is clear of IQ4_XS on vLLM (174.0) even with 5% noise each
    assert pick(picks, "single user").winner.name == "qwen3-4b/iq4_xs/llamacpp"
    # 100 users: W4A16's 1805.6 vs bf16's 1579.0 is inside the noise of one run each: both named
    saturation = pick(picks, "throughput at saturation")
    assert saturation.winner is None
    assert [r.method for r in saturation.leaders] == ["gptq-w4a16", "bf16"]
    # measured three times with little spread, the same gap is a difference
    repeated, _ = decide.recommend(_with_spread(10.0), ReportConfig())
    assert pick(repeated, "throughput at saturation").winner.method == "gptq-w4a16"
    # the same file on two engines: a tie, said as such
    assert [r.method for r in pick(picks, "smallest footprint").leaders] == ["iq4_xs", "iq4_xs"]


def _with_spread(std: float) -> list[JobRow]:
    rows = seed_blog()
    for row in rows:
        row.repeats = 3
        row.curves["perf_output_tok_s_std"] = {c: std for c in row.curves["perf_output_tok_s"]}
    return rows


def test_constraints_leave_jobs_out_with_the_reason():
    rows = seed_blog()
    rows[2].memory_mb, rows[3].memory_mb = 9000, 3000
    for row in rows[:2]:
        row.memory_mb = 20000 if row.method == "bf16" else 4000
    picks, left_out = decide.recommend(rows, ReportConfig(min_recovery=0.99, max_memory_mb=10000))
    assert left_out["qwen3-4b/iq4_xs/vllm"].startswith("recovery 0.977 < 0.99")
    assert left_out["qwen3-4b/bf16/vllm"] == "memory 20000 MB > 10000 MB"
    assert pick(picks, "single user").winner.name == "qwen3-4b/gptq-w4a16/vllm"
    # every job measured its memory: the footprint is peak memory, not file size
    assert pick(picks, "smallest footprint").measure == "peak server memory"
    nobody, out = decide.recommend(rows, ReportConfig(min_recovery=1.5))
    assert len(out) == 4 and "no recommendation" in pick(nobody, "single user").sentence()


def test_a_latency_objective_ranks_by_capacity_then_by_throughput_there():
    rows = seed_blog()
    for row, (capacity, tok_s) in zip(
        rows, [(20, 900.0), (40, 1300.0), (40, 1250.0), (1, 210.0)], strict=True
    ):
        row.capacity, row.capacity_tok_s, row.objective = capacity, tok_s, "p99_ttft<=2000ms"
    saturation = pick(decide.recommend(rows, ReportConfig())[0], "throughput at saturation")
    assert saturation.measure == "users served within p99_ttft<=2000ms"
    # 40 users each; 1300 vs 1250 tok/s there is within 5% noise: both named
    assert saturation.winner is None and {r.method for r in saturation.leaders} == {"gptq-w4a16", "iq4_xs"}
    label, speeds = figures.speed_axis(rows, ReportConfig())
    # the Pareto chart's speed: the throughput at each job's capacity (capacities often tie)
    assert label == "output tok/s at each job's capacity within p99_ttft<=2000ms"
    assert speeds["qwen3-4b/bf16/vllm"].mean == 900.0


def test_a_run_reads_back_into_a_row():
    metrics = {
        "ppl": 14.2, "ppl_err": 0.3, "ppl_ratio": 1.087, "ppl_ratio_ci_low": 1.054,
        "ppl_ratio_ci_high": 1.117, "ppl_within_noise": 0.0,
        "kld_mean": 0.031, "kld_mean_stderr": 0.001, "kld_p99": 0.4,
        "bits_per_weight": 5.3, "artifact_size_mb": 91.0, "server_peak_rss_mb": 412.0,
        "math_500": 0.55, "math_500_stderr": 0.05, "math_500_n": 100.0,
        "acc_math_500_accuracy": 0.55, "acc_math_500_accuracy_stderr": 0.05, "acc_math_500_accuracy_n": 100.0,
        "math_500_delta": -0.02, "math_500_delta_stderr": 0.015, "math_500_recovery": 0.965,
        "math_500_within_noise": 1.0, "math_500_flips_to_wrong": 5.0, "math_500_flips_to_right": 3.0,
        "perf_capacity": 3.0, "perf_capacity_output_tok_s": 60.0,
    }  # fmt: skip
    params = {"benchmark.perf.repeats": "2", "benchmark.perf.slo.ttft_p99_ms": "500.0",
              "benchmark.perf.slo.tpot_mean_ms": "None"}  # fmt: skip
    tags = {"choice.model": "smollm2-135m", "choice.method": "gguf-iq4_xs", "choice.engine": "llamacpp"}
    run = SimpleNamespace(
        info=SimpleNamespace(run_name="smollm2-135m/gguf-iq4_xs/llamacpp", status="FINISHED", run_id="r1"),
        data=SimpleNamespace(metrics=metrics, params=params, tags=tags),
    )
    row = row_from_run(run, {"perf_output_tok_s": {1: 70.0, 4: 110.0}, "perf_output_tok_s_std": {4: 4.0}}, {})
    assert (row.method, row.engine, row.is_baseline, row.memory_mb, row.memory_kind) == (
        "gguf-iq4_xs", "llamacpp", False, 412.0, "RSS")  # fmt: skip
    acc = row.accuracy["math_500"]
    assert (acc.score.mean, acc.n, acc.flips_to_wrong, acc.flips_to_right, acc.within_noise) == (
        0.55, 100, 5, 3, True)  # fmt: skip
    assert acc.recovery_ci[0] < acc.recovery < acc.recovery_ci[1]
    assert row.objective == "p99_ttft<=500.0ms" and row.capacity == 3
    assert row.speed(4).stderr == 4.0 / math.sqrt(2) and row.speed() == row.speed(4)
    kind, quality = row.quality()
    assert kind == "recovery" and quality.mean == 0.965
    header, body = render.table([row])
    cells = dict(zip(header, body[0], strict=True))
    assert cells["math_500 flips ↓/↑"] == "5/3" and cells["math_500 Δ / recovery"] == "-0.020 ~noise / 0.965"
    assert cells["KLD mean / p99"] == "0.0310 / 0.4000" and cells["capacity (users)"] == "3"


def test_two_sweeps_side_by_side_flag_noise():
    assert render.change(Value(100.0), Value(103.0), 0.05, 1).endswith("~noise")  # 3% on 5% noise
    assert "~noise" not in render.change(Value(100.0), Value(130.0), 0.05, 1)
    assert render.change(Value(0.5, 0.01), Value(0.45, 0.01), 0.0) == "0.500 → 0.450 (-10.0%)"
    assert render.change(None, Value(1.0), 0.0) == "-"


def test_frontier_keeps_the_non_dominated_points():
    points = [(1.0, 1.0), (2.0, 0.9), (1.5, 0.8), (3.0, 0.5), (0.5, 0.95)]
    assert figures.frontier(points) == [(1.0, 1.0), (2.0, 0.9), (3.0, 0.5)]


def test_runs_on_different_gpu_counts_or_kernel_paths_are_flagged_as_not_like_for_like():
    """Params `job.gpu_count` and tag `engine.kernels` (llama.cpp's system info) read back from runs;
    a section mixing counts, or one engine's kernel paths, says so; one that does not, says nothing."""
    avx2 = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | OPENMP = 1 | REPACK = 1 |"
    avx512 = avx2.replace("REPACK = 1 |", "AVX512 = 1 | AVX512_VNNI = 1 |")

    def row(name: str, gpus: str, kernels: str) -> JobRow:
        run = SimpleNamespace(
            info=SimpleNamespace(run_name=name, status="FINISHED", run_id=name),
            data=SimpleNamespace(metrics={}, params={"job.gpu_count": gpus},
                                 tags={"choice.engine": "llamacpp", "engine.kernels": kernels}),
        )  # fmt: skip
        return row_from_run(run, {}, {})

    same = [row("a", "1", avx2), row("b", "1", avx2)]
    assert (same[0].gpu_count, same[0].kernels) == (1, avx2) and decide.like_for_like(same) == []
    mixed = [row("a", "1", avx2), row("b", "2", avx512), row("c", "1", avx512)]
    gpus, kernels = decide.like_for_like(mixed)
    assert "1 GPU(s): `a`, `c`; 2 GPU(s): `b`" in gpus
    assert "llamacpp ran on different kernel paths (REPACK: `a`; AVX512 AVX512_VNNI: `b`, `c`)" in kernels
    section = render.Section("m", mixed, [], {}, [], decide.like_for_like(mixed))
    assert "### Not like for like" in render.markdown("t", [section], "", None)
    assert "<h3>Not like for like</h3>" in render.html_page("t", [section], "", None)
