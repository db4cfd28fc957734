"""Whole sweeps through the real CLI, Hydra and MLflow in seconds, with the fake plug-ins of
fakeplugins.py loaded the way a third party's are: pre-flight, skips, failures, baseline reuse and
deltas, gates, the summary, the exit code, signals, reuse of stored results and abandoned runs
(Hydra's parallel launchers are tests/test_launchers.py's).

Each scenario runs its sweeps in a folder and MLflow store of its own; the scenarios run three at a
time (they time nothing) before the tests check what they left."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import forkedcli
from conftest import REPO, cli_env, run_cli
from fakeplugins import write_fake_checkpoint
from qsweep.envs import HOME_ENV_VAR

TEXT = REPO / "docs" / "guide.md"  # a short local text for perplexity
SHORT_PPL = [f"benchmark.ppl.text.path={TEXT}", "benchmark.ppl.n_ctx=128", "benchmark.ppl.max_tokens=1024"]


@dataclass
class Case:
    """One scenario's folder, MLflow store and fake model."""

    tmp: Path
    template_store: Path | None = None
    # sweeps as real `python -m qsweep` processes rather than forks of a preloaded one (tests/
    # forkedcli.py): Hydra's joblib launcher hangs starting its workers from such a fork
    real_processes: bool = False

    @property
    def store(self) -> Path:
        return self.tmp / "mlruns"

    def args(self, *args: str) -> list[str]:
        if "dry_run=true" not in args:
            self.seed_store()
        with_ppl = any(a.startswith("benchmark=") and "ppl" in a for a in args)
        model = write_fake_checkpoint(self.tmp / "fake-model")
        # the decision report is the main scenario's to check; the others skip writing it (seconds)
        report = [] if any(a.startswith("report.at_end") for a in args) else ["report.at_end=false"]
        return [*args, "model=local", f"model.path={model}", *(SHORT_PPL if with_ppl else []), *report]

    def seed_store(self) -> None:
        """Start the store as a copy of an empty, migrated one: each fresh SQLite store otherwise
        costs a second of MLflow's schema migrations (the e2e tests start from nothing)."""
        if self.template_store and not self.store.exists():
            self.store.mkdir(parents=True)
            shutil.copyfile(self.template_store, self.store / "mlflow.db")

    def sweep(self, *args: str) -> subprocess.CompletedProcess:
        forked = not self.real_processes
        return run_cli(*self.args(*args), tmp=self.tmp, timeout_s=120, fakes=True, forked=forked)

    def start(self, *args: str) -> forkedcli.Forked:
        """A sweep in the background, its output merged and readable line by line."""
        paths = [f"paths.{name}={self.tmp / folder}" for name, folder in
                 (("mlruns", "mlruns"), ("artifact_cache", "cache"), ("outputs", "outputs"))]  # fmt: skip
        argv = [*self.args(*args), *paths]
        return forkedcli.start(argv, cli_env(fakes=True), REPO, self.tmp / "controllers")

    def runs(self):
        """The MLflow client, the sweeps' parent runs and the job runs by name (the latest of a name)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{self.store / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("qsweep")
        every = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
        parents = [r for r in every if r.data.tags.get("qsweep.kind") == "sweep"]
        jobs = {r.info.run_name: r for r in every if r.data.tags.get("qsweep.kind") == "job"}
        return client, parents, jobs


def wait_for(proc: forkedcli.Forked, text: str, timeout_s: float = 60) -> None:
    """Until the controller prints `text`; fails the test if it ends or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        if text in line:
            return
        assert time.monotonic() < deadline, f"no {text!r} from the controller in {timeout_s} s"
    raise AssertionError(f"the controller ended without printing {text!r}")


SCENARIOS: dict[str, Callable[[Case], Any]] = {}


def scenario(run: Callable[[Case], Any]) -> Callable[[Case], Any]:
    SCENARIOS[run.__name__] = run
    return run


def migrated_store(folder: Path) -> Path:
    """An MLflow SQLite store with its schema made and nothing in it."""
    from mlflow.tracking import MlflowClient

    path = folder / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[Case, Future]]:
    template = migrated_store(tmp_path_factory.mktemp("template"))
    cases = {name: Case(tmp_path_factory.mktemp(name), template) for name in SCENARIOS}
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(max_workers=3) as pool:
        patch.setenv(HOME_ENV_VAR, str(tmp_path_factory.mktemp("home")))
        futures = {name: pool.submit(run, cases[name]) for name, run in SCENARIOS.items()}
        for future in futures.values():
            future.exception()  # wait for all, inside the patched environment
    return {name: (cases[name], futures[name]) for name in SCENARIOS}


def outcome(outcomes, name: str) -> tuple[Case, Any]:
    case, future = outcomes[name]
    return case, future.result()  # a scenario that raised fails its test here


# --- a sweep with skips, baseline reuse, deltas and gates; then a rerun of one benchmark -------


MAIN = ("-m", "method=fake-q4,none,fake-q2", "engine=fake,fakeapi", "benchmark=[ppl,fakebench]",
        "gates.ppl_ratio_max=1.2", "report.at_end=true")  # fmt: skip


@scenario
def main_sweep(case: Case):
    """Dry run, sweep, dry runs again (as is, and redoing one benchmark), then that rerun."""
    dry_before = case.sweep(*MAIN, "dry_run=true")
    recorded_before = case.store.exists() or (case.tmp / "cache").exists()
    first = case.sweep(*MAIN)
    _, _, jobs = case.runs()
    with ThreadPoolExecutor(max_workers=2) as both:  # read-only: side by side
        after = both.submit(case.sweep, *MAIN, "dry_run=true")
        rerun = both.submit(case.sweep, *MAIN, "dry_run=true", "rerun=[fakebench]")
        dry_after, dry_rerun = after.result(), rerun.result()
    client, parents, _ = case.runs()
    runs_after_dry_runs = len(client.search_runs([parents[0].info.experiment_id]))
    again = case.sweep(*MAIN, "rerun=[fakebench]")
    _, parents, _ = case.runs()
    # the report of the second sweep against the first, on demand, from MLflow alone
    report_cmd = [sys.executable, "-m", "qsweep.report", "--sweep", parents[1].info.run_id,
                  "--against", parents[0].info.run_id, "--out", str(case.tmp / "on-demand"),
                  f"paths.mlruns={case.store}"]  # fmt: skip
    on_demand = subprocess.run(
        report_cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120
    )
    dry_runs = (dry_before, recorded_before, dry_after, dry_rerun, runs_after_dry_runs)
    return first, jobs, again, dry_runs, on_demand


def test_sweep_skips_compares_gates_and_summarizes(outcomes):
    """Six jobs. The 4-bit fake runs first, so it serves the baseline once itself for its
    comparison; the baseline job after it measures the same numbers independently; the 2-bit fake
    reuses the stored results. The API-only engine cannot serve fake artifacts nor score prompts."""
    case, (done, jobs, *_) = outcome(outcomes, "main_sweep")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "6 job(s) composed and checked" in out
    assert "will skip fake-q4 x fakeapi: fakeapi serves hf artifacts; method fake-q4 makes fake" in out
    # a benchmark the engine cannot run is known at pre-flight, before anything is built
    assert "will skip benchmark ppl in fake-model/none/fakeapi: engine fakeapi cannot run it" in out
    assert out.index("will skip benchmark ppl") < out.index("stage model")
    assert out.count("evaluating the baseline once for comparison: ppl, fakebench") == 1

    client, parents, _ = case.runs()
    assert len(jobs) == 6 and parents[0].info.status == "FINISHED"
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
    assert q2.metrics["fake_delta"] < q4.metrics["fake_delta"] < 0
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
    q4_run = jobs["fake-model/fake-q4/fake"].info.run_id
    text = Path(client.download_artifacts(q4_run, "logs/qsweep.log", str(case.tmp))).read_text()
    assert "stage model" in text and "vs baseline: ppl_base=" in text and "fake-model/fake-q2" not in text
    # the summary: every job, skipped ones and missed gates said
    summary = out[out.index("sweep summary:") :]
    assert all(name in summary for name in jobs) and summary.count("SKIPPED") == 2
    assert "MISSED GATES: ppl_ratio" in summary


def test_every_sweep_ends_with_a_report_in_its_folder_and_on_its_parent_run(outcomes):
    case, (done, jobs, again, _, on_demand) = outcome(outcomes, "main_sweep")
    client, parents, _ = case.runs()
    folder = Path(parents[0].data.tags["qsweep.sweep_dir"]) / "report"
    assert f"report: {folder / 'report.html'}" in done.stdout
    markdown = (folder / "report.md").read_text()
    # one row per job that ran (skipped pairs are not evidence), its quality against the baseline
    for name in ("fake-model/none/fake", "fake-model/fake-q4/fake", "fake-model/fake-q2/fake"):
        assert f"| {name} |" in markdown
    q4 = jobs["fake-model/fake-q4/fake"].data.metrics
    assert f"{q4['ppl_ratio']:.4f} [{q4['ppl_ratio_ci_low']:.4f}, {q4['ppl_ratio_ci_high']:.4f}]" in markdown
    assert (
        "**best quality**" in markdown and "![quality_vs_bits.png](figures/quality_vs_bits.png)" in markdown
    )
    csv_lines = (folder / "report.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,job,method,engine") and len(csv_lines) == 1 + 4  # 4 jobs ran
    assert (folder / "figures" / "quality_vs_bits.png").stat().st_size > 10_000
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/report.csv", "report/figures"} <= logged
    assert parents[0].data.tags["mlflow.note.content"].startswith("qsweep report")
    # the experiment opens as a model-training experiment in the MLflow UI
    assert client.get_experiment(parents[0].info.experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development")  # fmt: skip
    # on demand, from MLflow alone (its time is printed; docs/results.md: about a second): the change of every
    # headline figure since the first sweep
    assert on_demand.returncode == 0, on_demand.stderr[-3000:]
    assert "report written in" in on_demand.stdout + on_demand.stderr
    compared = (case.tmp / "on-demand" / "report.md").read_text()
    assert "against sweep " in compared and "| fake-model/fake-q4/fake | " in compared
    assert f"{q4['ppl']:.4f} → {q4['ppl']:.4f}" in compared  # ppl was reused: unchanged


def test_a_rerun_of_one_benchmark_reuses_every_other_result(outcomes):
    case, (_, first, again, _, _) = outcome(outcomes, "main_sweep")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (
        again.stdout.count("stage benchmark_fakebench ...") == 4 and "stage benchmark_ppl" not in again.stdout
    )
    _, parents, second = case.runs()
    assert len(parents) == 2 and all(r.data.tags["mlflow.parentRunId"] == parents[1].info.run_id
                                     for r in second.values())  # fmt: skip
    for name in ("fake-model/fake-q4/fake", "fake-model/none/fake", "fake-model/fake-q2/fake"):
        before, run = first[name].data, second[name].data
        assert (
            run.tags["qsweep.reused.ppl"] == first[name].info.run_id
            and "qsweep.reused.fakebench" not in run.tags
        )
        assert run.tags["qsweep.reused"] == "partly"
        assert (
            run.metrics["ppl"] == before.metrics["ppl"]
            and run.metrics["fake_score"] == before.metrics["fake_score"]
        )
    assert second["fake-model/fake-q2/fake"].data.tags["qsweep.gates_missed"].startswith("ppl_ratio 2.")
    assert "partly" in again.stdout[again.stdout.index("sweep summary:") :]


def test_dry_runs_say_what_would_be_built_reused_or_measured_and_record_nothing(outcomes):
    case, (_, jobs, _, (before, recorded_before, after, rerun, runs_after), _) = outcome(
        outcomes, "main_sweep"
    )
    for done in (before, after, rerun):
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # before anything ran: everything to build and measure, nothing to estimate from, nothing written
    assert not recorded_before
    assert "fake-model/fake-q4/fake: run, no estimate" in before.stdout
    assert (
        "fake quantized model: to build" in before.stdout
        and "ppl: to measure; fakebench: to measure" in before.stdout
    )
    assert "fake-model/fake-q4/fakeapi: skip" in before.stdout
    assert "ppl: skipped (engine fakeapi cannot run it" in before.stdout
    assert "6 job(s): 4 run, 2 skip" in before.stdout
    # after the sweep: every job would be reused, each from the run that measured it
    q4 = jobs["fake-model/fake-q4/fake"].info.run_id
    assert "fake-model/fake-q4/fake: reuse" in after.stdout and "fake quantized model: cached" in after.stdout
    assert f"ppl: reused from run {q4}; fakebench: reused from run {q4}" in after.stdout
    assert "6 job(s): 4 reuse, 2 skip" in after.stdout
    # redoing one benchmark: the jobs run, for as long as that benchmark and a server start took
    assert re.search(r"fake-model/fake-q4/fake: run, about \d+ s", rerun.stdout), rerun.stdout
    assert f"ppl: reused from run {q4}; fakebench: to measure" in rerun.stdout
    assert runs_after == 1 + 6  # the sweep's parent and jobs: the dry runs made no run


# --- secrets ----------------------------------------------------------------------------------

SECRETS = {"HF_TOKEN": "hf_qsweepTestSecret0123", "OPENAI_API_KEY": "sk-qsweepTestSecret4567"}
ARG_SECRET = "sk-qsweepArgSecret8910"


@scenario
def secrets(case: Case):
    args = case.args("-m", "method=none,fake-q4", "engine=fake", "benchmark=[fakebench]",
                     f"engine.extra_args=[--api-key,{ARG_SECRET}]")  # fmt: skip
    cmd = [sys.executable, "-m", "qsweep", *args, f"paths.mlruns={case.store}",
           f"paths.artifact_cache={case.tmp / 'cache'}", f"paths.outputs={case.tmp / 'outputs'}"]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env={**cli_env(fakes=True), **SECRETS}, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_no_secret_reaches_the_store(outcomes):
    """Tokens from the environment and a key given on the command line appear nowhere in the MLflow
    store (database, params, tags, artifacts, kept logs), although the fake server printed them."""
    case, done = outcome(outcomes, "secrets")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    _, _, jobs = case.runs()
    server_log = next((case.tmp / "outputs").rglob("server.log")).read_text()
    assert "fake-server --api-key ***" in server_log and "HF_TOKEN=***" in server_log  # kept, masked
    assert jobs["fake-model/fake-q4/fake"].data.params["engine.extra_args"] == "['--api-key', '***']"
    every = [*SECRETS.values(), ARG_SECRET]
    files = [path for path in case.store.rglob("*") if path.is_file()]
    leaked = [(path, s) for path in files for s in every if s.encode() in path.read_bytes()]
    assert not leaked, leaked
    assert len(files) > 10  # the database and the runs' artifacts were searched


# --- failures ---------------------------------------------------------------------------------


@scenario
def failures(case: Case):
    methods = "method=none,fake-broken,fake-q2,fake-q4"
    return case.sweep("-m", methods, "engine=fake", "benchmark=[ppl,fakebench]",
                      "benchmark.fakebench.fail_below_bits=3", "engine.degenerate_below_bits=5")  # fmt: skip


def test_a_result_that_cannot_be_right_is_flagged_not_reported_as_fine(outcomes):
    """The 4-bit fake's server answers '1 1 1 ...' (a broken checkpoint): the job finishes, its run
    is tagged suspect with the reason, and the summary says so; the baseline is not flagged."""
    case, done = outcome(outcomes, "failures")
    _, _, jobs = case.runs()
    q4 = jobs["fake-model/fake-q4/fake"]
    assert q4.info.status == "FINISHED"
    why = q4.data.tags["qsweep.suspect"]
    assert why.startswith("the smoke reply is degenerate ('1 1 1 1") and why.endswith("a broken checkpoint?")
    assert "qsweep.suspect" not in jobs["fake-model/none/fake"].data.tags
    row = next(line for line in done.stdout.splitlines() if line.startswith("fake-model/fake-q4/fake "))
    assert "SUSPECT: the smoke reply is degenerate" in row


@scenario
def fail_fast(case: Case):
    return case.sweep("-m", "method=none,fake-broken,fake-q4", "engine=fake", "benchmark=[fakebench]",
                      "fail_fast=true")  # fmt: skip


def test_fail_fast_stops_the_sweep_at_its_first_failure_and_marks_the_rest_not_run(outcomes):
    case, done = outcome(outcomes, "fail_fast")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    _, parents, jobs = case.runs()
    assert {name: r.info.status for name, r in jobs.items()} == {
        "fake-model/none/fake": "FINISHED",
        "fake-model/fake-broken/fake": "FAILED",
        "fake-model/fake-q4/fake": "FINISHED",  # recorded as skipped: a finished run with the reason
    }
    not_run = jobs["fake-model/fake-q4/fake"].data
    why = "not run: fail_fast=true and job fake-model/fake-broken/fake failed"
    assert not_run.tags["qsweep.skipped"] == why and "fake_score" not in not_run.metrics
    summary = done.stdout[done.stdout.index("sweep summary") :]
    assert parents[0].info.status == "FAILED" and "SKIPPED" in summary


def test_failures_are_recorded_the_sweep_goes_on_and_the_exit_code_says_so(outcomes):
    """A quantizer that fails, and a benchmark that fails after perplexity was measured (on the
    2-bit fake only): both jobs FAILED with their errors, the failed benchmark's job keeps the
    perplexity, the other jobs run, the parent run is FAILED and the exit code 1."""
    case, done = outcome(outcomes, "failures")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == "qsweep: 2 job(s) failed: fake-model/fake-broken/fake, fake-model/fake-q2/fake"
    assert "Traceback" not in done.stdout + done.stderr
    _, parents, jobs = case.runs()
    assert parents[0].info.status == "FAILED"
    statuses = {name: r.info.status for name, r in jobs.items()}
    assert statuses == {
        "fake-model/none/fake": "FINISHED",
        "fake-model/fake-broken/fake": "FAILED",
        "fake-model/fake-q2/fake": "FAILED",
        "fake-model/fake-q4/fake": "FINISHED",
    }
    assert jobs["fake-model/fake-broken/fake"].data.tags["qsweep.error"] == "fake quantizer failed on purpose"
    q2 = jobs["fake-model/fake-q2/fake"].data
    assert q2.tags["qsweep.error"] == "fake benchmark failed on purpose"
    assert "ppl" in q2.metrics and "time_benchmark_ppl_s" in q2.metrics  # measured before the failure
    assert "fake_delta" in jobs["fake-model/fake-q4/fake"].data.metrics


@scenario
def single_job_engine_crash(case: Case):
    return case.sweep("method=none", "engine=fake", "engine.crash_on_start=true", "benchmark=[fakebench]")


def test_a_single_job_whose_engine_cannot_start_fails_cleanly(outcomes):
    case, done = outcome(outcomes, "single_job_engine_crash")
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last == "qsweep: 1 job(s) failed: fake-model/none/fake"
    _, parents, jobs = case.runs()
    assert parents == []  # a single job: no sweep run
    error = jobs["fake-model/none/fake"].data.tags["qsweep.error"]
    assert "fake server exited with code 1 while starting" in error


@scenario
def port_taken_after_pre_flight(case: Case):
    """The first job's benchmark takes the port the second job is set to serve on: free at the
    pre-flight, taken when the second job plans in its own turn."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return port, case.sweep("-m", "method=none", "engine=fake", f"engine.port=0,{port}",
                            "benchmark=[fakebench]", f"benchmark.fakebench.squat_port={port}")  # fmt: skip


def test_a_job_whose_plan_fails_in_its_own_turn_is_a_failed_run_and_the_sweep_goes_on(outcomes):
    """A QsweepError when a job plans (a port taken since the pre-flight) used to escape into Hydra
    with a traceback and leave the parent run RUNNING: now it is the job's FAILED run with the
    reason, the other job runs, the parent is closed FAILED and the exit code is 1."""
    case, (port, done) = outcome(outcomes, "port_taken_after_pre_flight")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr and "Error executing job" not in done.stderr
    _, parents, jobs = case.runs()
    assert parents[0].info.status == "FAILED"
    statuses = {name: (r.info.status, r.data.tags.get("qsweep.error", "")) for name, r in jobs.items()}
    (failed,) = [name for name, (status, _) in statuses.items() if status == "FAILED"]
    assert failed == f"fake-model/none/fake[engine.port={port}]", statuses
    assert statuses[failed][1].startswith(f"at plan time: engine.port={port} on 127.0.0.1 is in use")
    assert statuses["fake-model/none/fake[engine.port=0]"] == ("FINISHED", "")
    assert done.stderr.strip().splitlines()[-1] == f"qsweep: 1 job(s) failed: {failed}"


# --- signals ----------------------------------------------------------------------------------


@scenario
def ctrl_c(case: Case):
    return interrupted_mid_benchmark(case)


@scenario
def ctrl_c_turned_into_an_error(case: Case):
    return interrupted_mid_benchmark(case, "benchmark.fakebench.interrupt_as_error=true")


def interrupted_mid_benchmark(case: Case, *extra: str):
    proc = case.start("-m", "method=none,fake-q4", "engine=fake", "benchmark=[fakebench]",
                      "benchmark.fakebench.sleep_s=60", *extra)  # fmt: skip
    try:
        wait_for(proc, "stage benchmark_fakebench ...")
        time.sleep(0.3)  # inside the benchmark's 60 s
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, rest


@pytest.mark.parametrize("name", ["ctrl_c", "ctrl_c_turned_into_an_error"])
def test_ctrl_c_mid_benchmark_is_handled_by_the_job(outcomes, name):
    """SIGINT (SIGTERM takes the same path; tests/test_e2e.py sends it to a real sweep); also where
    a library turns the interrupt into an error of its own (found by the chaos test: OmegaConf
    raised a ConfigKeyError), which is still an interrupt, not a failure."""
    case, (returncode, rest) = outcome(outcomes, name)
    assert returncode == 130, rest
    assert "interrupted" in rest and "stage benchmark_fakebench:" in rest  # the stage ended in `finally`
    _, parents, jobs = case.runs()
    assert [r.info.status for r in jobs.values()] == ["KILLED"] and parents[0].info.status == "KILLED"


KILLED = ("-m", "method=none", "engine=fake", "benchmark=[ppl,fakebench]")


@scenario
def killed_and_rerun(case: Case):
    proc = case.start(*KILLED, "benchmark.fakebench.sleep_s=60")
    try:
        wait_for(proc, "stage benchmark_fakebench ...")
        time.sleep(0.3)
        proc.kill()  # SIGKILL: no `finally` runs
        proc.wait(timeout=30)
    finally:
        proc.kill()
    _, parents, jobs = case.runs()
    return parents[0], jobs["fake-model/none/fake"], case.sweep(*KILLED)


def test_a_killed_sweep_is_marked_failed_and_its_rerun_measures_only_what_is_missing(outcomes):
    """SIGKILL the controller in a job's second benchmark: the runs stay RUNNING. The next sweep on
    the same store marks them FAILED with the reason, reuses the first benchmark's result (stored as
    soon as measured) and measures only the second."""
    case, (parent, killed, done) = outcome(outcomes, "killed_and_rerun")
    assert killed.info.status == parent.info.status == "RUNNING" and "ppl" in killed.data.metrics
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "marked 2 abandoned run(s) FAILED" in done.stdout
    assert "stage benchmark_fakebench ..." in done.stdout and "stage benchmark_ppl" not in done.stdout
    client, parents, jobs = case.runs()
    old = client.get_run(killed.info.run_id)
    assert old.info.status == "FAILED" and old.data.tags["qsweep.error"].startswith(
        "abandoned: the qsweep process"
    )
    assert client.get_run(parent.info.run_id).info.status == "FAILED" and parents[1].info.status == "FINISHED"
    job = jobs["fake-model/none/fake"]
    assert job.info.status == "FINISHED" and job.data.tags["mlflow.parentRunId"] == parents[1].info.run_id
    assert (
        job.data.tags["qsweep.reused.ppl"] == killed.info.run_id
        and "qsweep.reused.fakebench" not in job.data.tags
    )
    assert job.data.metrics["ppl"] == killed.data.metrics["ppl"] and "fake_score" in job.data.metrics
