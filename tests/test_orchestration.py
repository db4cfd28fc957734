"""Whole sweeps through the real CLI, Hydra and MLflow in seconds, with the fake plug-ins of
fakeplugins.py loaded the way a third party's are: pre-flight, skips, failures, baseline reuse and
deltas, gates, the summary, the exit code, signals, and Hydra's joblib launcher."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, cli_env, run_cli
from fakeplugins import write_fake_checkpoint

# A tiny local checkpoint, a short local text, every job on the fake engines.
TEXT = REPO / "README.md"


@pytest.fixture
def model(tmp_path):
    return write_fake_checkpoint(tmp_path / "fake-model")


def fake_sweep(tmp_path, model, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    common = ["model=local", f"model.path={model}"]
    if any(a.startswith("benchmark=") and "ppl" in a for a in args):  # a short text, short chunks
        common += [f"benchmark.ppl.text.path={TEXT}", "benchmark.ppl.n_ctx=128", "benchmark.ppl.max_tokens=1024"]
    return run_cli(*args, *common, tmp=tmp_path, timeout_s=timeout_s, fakes=True)


def runs(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("qsweep")
    every = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in every if r.data.tags.get("qsweep.kind") == "sweep"]
    jobs = {r.info.run_name: r for r in every if r.data.tags.get("qsweep.kind") == "job"}
    return client, parents, jobs


def test_sweep_skips_compares_gates_and_summarizes(tmp_path, model):
    done = fake_sweep(
        tmp_path, model, "-m", "method=none,fake-q4,fake-q2", "engine=fake,fakeapi",
        "benchmark=[ppl,fakebench]", "gates.ppl_ratio_max=1.2",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "6 job(s) composed and checked" in out
    assert "will skip fake-q4 x fakeapi: fakeapi serves hf artifacts; method fake-q4 makes fake" in out
    # a benchmark the engine cannot run is known at pre-flight, before anything is built
    assert "will skip benchmark ppl in fake-model/none/fakeapi: engine fakeapi cannot run it" in out
    assert out.index("will skip benchmark ppl") < out.index("stage model")
    assert "evaluating the baseline once" not in out  # the baseline job ran first and stored its results

    client, parents, jobs = runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(jobs) == 6
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in jobs.values())
    assert {n for n, r in jobs.items() if "qsweep.skipped" in r.data.tags} == {
        "fake-model/fake-q4/fakeapi",
        "fake-model/fake-q2/fakeapi",
    }
    base, q4, q2 = (jobs[f"fake-model/{m}/fake"].data for m in ("none", "fake-q4", "fake-q2"))
    assert q4.metrics["ppl_base"] == base.metrics["ppl"] and q2.metrics["ppl_base"] == base.metrics["ppl"]
    assert 1 < q4.metrics["ppl_ratio"] < q2.metrics["ppl_ratio"]
    assert q4.metrics["ppl_ratio_ci_low"] < q4.metrics["ppl_ratio"] < q4.metrics["ppl_ratio_ci_high"]
    assert q4.metrics["fake_delta"] == pytest.approx(q4.metrics["fake_score"] - base.metrics["fake_score"])
    assert "ppl_ratio" not in base.metrics and "fake_delta" not in base.metrics
    # gates: only the 2-bit fake misses the perplexity limit
    assert q2.tags["qsweep.gates_missed"].startswith("ppl_ratio 2.") and "qsweep.gates_missed" not in q4.tags
    # names come from the group choices; the engine was sized for fakebench's concurrency
    assert q4.params["method.name"] == q4.params["choice.method"] == "fake-q4"
    assert q4.params["served.slots"] == "3"
    api_only = jobs["fake-model/none/fakeapi"].data
    assert "ppl" not in api_only.metrics and "fake_score" in api_only.metrics
    assert api_only.tags["qsweep.skipped_benchmarks"].startswith("ppl: engine fakeapi cannot run it")
    # the controller's own log of each job is attached to its run
    log_file = client.download_artifacts(jobs["fake-model/fake-q4/fake"].info.run_id, "logs/qsweep.log", str(tmp_path))
    text = open(log_file).read()
    assert "stage model" in text and "vs baseline: ppl_base=" in text and "fake-model/none" not in text
    # the summary: every job, skipped ones and missed gates said
    summary = out[out.index("sweep summary:") :]
    assert all(name in summary for name in jobs) and summary.count("SKIPPED") == 2
    assert "MISSED GATES: ppl_ratio" in summary


def test_a_quantized_job_first_evaluates_the_baseline_once(tmp_path, model):
    done = fake_sweep(tmp_path, model, "-m", "method=fake-q4,fake-q2,none", "engine=fake", "benchmark=[ppl,fakebench]")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("evaluating the baseline once for comparison: ppl, fakebench") == 1
    _, _, jobs = runs(tmp_path)
    base = jobs["fake-model/none/fake"].data.metrics
    for method in ("fake-q4", "fake-q2"):
        quant = jobs[f"fake-model/{method}/fake"].data.metrics
        assert quant["ppl_base"] == base["ppl"] and quant["fake_delta"] < 0


def test_failures_are_recorded_the_sweep_goes_on_and_the_exit_code_says_so(tmp_path, model):
    done = fake_sweep(tmp_path, model, "-m", "method=none,fake-broken,fake-q4", "engine=fake", "benchmark=[ppl]")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "qsweep: 1 job(s) failed: fake-model/fake-broken/fake"
    assert "Traceback" not in done.stdout + done.stderr
    _, parents, jobs = runs(tmp_path)
    assert parents[0].info.status == "FAILED"
    statuses = {name: r.info.status for name, r in jobs.items()}
    assert statuses == {
        "fake-model/none/fake": "FINISHED",
        "fake-model/fake-broken/fake": "FAILED",
        "fake-model/fake-q4/fake": "FINISHED",
    }
    assert jobs["fake-model/fake-broken/fake"].data.tags["qsweep.error"] == "fake quantizer failed on purpose"


def test_a_benchmark_failing_keeps_what_was_measured_before_it(tmp_path, model):
    done = fake_sweep(tmp_path, model, "method=none", "engine=fake", "benchmark=[ppl,fakebench]",
                      "benchmark.fakebench.fail=true")  # fmt: skip
    assert done.returncode == 1 and "1 job(s) failed: fake-model/none/fake" in done.stderr
    _, parents, jobs = runs(tmp_path)
    assert parents == []  # a single job: no sweep run
    run = jobs["fake-model/none/fake"]
    assert run.info.status == "FAILED" and run.data.tags["qsweep.error"] == "fake benchmark failed on purpose"
    assert "ppl" in run.data.metrics and "time_benchmark_ppl_s" in run.data.metrics


def test_engine_that_cannot_start_fails_its_job_cleanly(tmp_path, model):
    done = fake_sweep(tmp_path, model, "-m", "method=none", "engine=fake", "engine.crash_on_start=true",
                      "benchmark=[fakebench]")  # fmt: skip
    assert done.returncode == 1
    _, parents, jobs = runs(tmp_path)
    assert parents[0].info.status == "FAILED"
    assert "fake server exited with code 1 while starting" in jobs["fake-model/none/fake"].data.tags["qsweep.error"]


def test_joblib_launcher_with_a_failing_job_exits_1_and_closes_the_parent_run(tmp_path, model):
    done = fake_sweep(
        tmp_path, model, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "method=none,fake-broken,fake-q4", "engine=fake", "benchmark=[ppl,fakebench]",
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Joblib.Parallel" in done.stdout  # the launcher really ran the jobs
    assert done.stderr.strip().splitlines()[-1] == "qsweep: 1 job(s) failed: fake-model/fake-broken/fake"
    _, parents, jobs = runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert sorted(r.info.status for r in jobs.values()) == ["FAILED", "FINISHED", "FINISHED"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in jobs.values())
    q4 = jobs["fake-model/fake-q4/fake"].data.metrics
    assert 1 < q4["ppl_ratio"] and "fake_delta" in q4  # compared, whichever of the two ran first


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_benchmark_is_handled_by_the_job(tmp_path, model, sig):
    cmd = [
        sys.executable, "-m", "qsweep", "-m", "method=none,fake-q4", "engine=fake", "benchmark=[fakebench]",
        "benchmark.fakebench.sleep_s=60", "model=local", f"model.path={model}",
        f"paths.mlruns={tmp_path / 'mlruns'}", f"paths.outputs={tmp_path / 'outputs'}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(fakes=True), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            if "stage benchmark_fakebench ..." in line or time.monotonic() > deadline:
                break
        time.sleep(1)  # well inside the benchmark's 60 s
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    assert "interrupted" in rest and "stage benchmark_fakebench:" in rest  # the stage ended in `finally`
    _, parents, jobs = runs(tmp_path)
    assert [r.info.status for r in jobs.values()] == ["KILLED"] and parents[0].info.status == "KILLED"
