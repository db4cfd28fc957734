"""Hydra's parallel launchers with the fake plug-ins: joblib's worker processes and submitit's local
one (SLURM's sibling on one machine) run a sweep's jobs; the pre-flight runs once in the
controller, there is one parent run, and the summary and exit code come from the jobs' recorded
outcomes. Slow-marked: every worker is a new Python process importing qsweep and MLflow (~10 s of
CPU a sweep), which the fast suite's minute cannot hold."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from test_orchestration import Case, migrated_store

pytestmark = pytest.mark.slow


@pytest.fixture
def case_factory(tmp_path_factory):
    template = migrated_store(tmp_path_factory.mktemp("template"))
    return lambda: Case(tmp_path_factory.mktemp("launcher"), template, real_processes=True)


def test_joblib_launcher_with_a_failing_job_exits_1_and_closes_the_parent_run(case_factory, tmp_path):
    """Also GPU slots across worker processes, on a device list the test gives: each job holds one
    of two 'GPUs' and sees only it, and jobs that overlap in time hold different ones."""
    case = case_factory()
    done = case.sweep(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "method=none,fake-broken,fake-q4",
        "engine=fake",
        "benchmark=[ppl,fakebench]",
        "gpus.ids=[fake-gpu-0,fake-gpu-1]",
        "engine.gpus=1",
        "benchmark.fakebench.sleep_s=2",  # the two workers' jobs overlap
        f"gpus.lock_dir={tmp_path / 'gpu-locks'}",
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Joblib.Parallel" in done.stdout  # the launcher really ran the jobs
    assert done.stderr.strip().splitlines()[-1] == "qsweep: 1 job(s) failed: fake-model/fake-broken/fake"
    _, parents, jobs = case.runs()
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert sorted(r.info.status for r in jobs.values()) == ["FAILED", "FINISHED", "FINISHED"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in jobs.values())
    q4 = jobs["fake-model/fake-q4/fake"].data.metrics
    assert q4["ppl_ratio"] > 1 and "fake_delta" in q4  # compared, whichever of the two ran first
    client = case.runs()[0]
    spans, serving = {}, {}
    for name, run in jobs.items():
        gpu = run.data.params["job.gpus"]
        assert gpu in ("fake-gpu-0", "fake-gpu-1") and run.data.params["job.gpu_count"] == "1"
        spans[name] = (run.info.start_time, run.info.end_time)
        if run.info.status == "FINISHED":  # what the server saw: its own device only
            log = Path(
                client.download_artifacts(run.info.run_id, "logs/server.log", str(tmp_path))
            ).read_text()
            assert f"CUDA_VISIBLE_DEVICES={gpu}\n" in log
            since = int(re.search(r"serving since (\d+)", log).group(1))
            serving[name] = (since, int(re.search(r"stopped at (\d+)", log).group(1)), gpu)
    # the jobs ran side by side (a run starts before its job waits for a GPU: its span is not the
    # GPU's), and servers that ran at the same time ran on different GPUs
    assert any(a[0] < b[1] and b[0] < a[1] for a, b in itertools.combinations(spans.values(), 2))
    at_once = [(a, b) for a, b in itertools.combinations(serving.values(), 2) if a[0] < b[1] and b[0] < a[1]]
    assert all(a[2] != b[2] for a, b in at_once), serving


def test_submitit_local_runs_each_job_in_a_process_of_its_own_under_one_parent_run(case_factory):
    """submitit's local launcher: pre-flight once in the controller, every job in a submitted
    process, one parent run, the summary, and exit code 1 for the failed job."""
    case = case_factory()
    jobs_ = ("method=none,fake-broken,fake-q4", "engine=fake", "benchmark=[fakebench]")
    done = case.sweep("-m", "hydra/launcher=submitit_local", *jobs_)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in done.stdout
    assert done.stdout.count("3 job(s) composed and checked") == 1  # the pre-flight ran once
    assert done.stderr.strip().splitlines()[-1] == "qsweep: 1 job(s) failed: fake-model/fake-broken/fake"
    _, parents, jobs = case.runs()
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert {n: r.info.status for n, r in jobs.items()} == {"fake-model/none/fake": "FINISHED",
        "fake-model/fake-broken/fake": "FAILED", "fake-model/fake-q4/fake": "FINISHED"}  # fmt: skip
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in jobs.values())
    pids = {r.data.tags["qsweep.pid"] for r in jobs.values()}
    assert len(pids) == 3 and parents[0].data.tags["qsweep.pid"] not in pids  # not the controller
