"""Faults injected with real processes (llama-server, evalscope, llama-quantize, a second SQLite
writer) on the default model with the smallest budgets. Each ends with the right status and a
one-line reason, the sweep goes on, nothing wrong is reported as a result, and no process is left
behind (counted after each). The suite prints what it injected at the end."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, cli_env, live_processes, run_cli, seed_cache
from fakeplugins import write_fake_checkpoint
from test_e2e import _children_running, runs

pytestmark = pytest.mark.slow

INJECTED: list[str] = []  # "fault: outcome", one per fault this module injected (conftest prints them)
SHORT_PERF = ["method=none", "benchmark=[perf]", "benchmark.perf.concurrency=[1]",
              "benchmark.perf.output_tokens=32", "benchmark.perf.input_tokens=32",
              "benchmark.perf.warmup_requests=0"]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory, gguf_seed) -> Path:
    """One artifact cache for the module, starting with the session's f16 GGUF (conftest.gguf_seed)."""
    path = tmp_path_factory.mktemp("fault-cache")
    seed_cache(gguf_seed, path)
    return path


def read_until(proc: subprocess.Popen, text: str, seen: list[str], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
        assert time.monotonic() < deadline, f"never saw {text!r}:\n" + "".join(seen[-30:])
    raise AssertionError(f"the sweep ended before {text!r}:\n" + "".join(seen[-30:]))


def pids_of(name: str, marker: str) -> list[int]:
    """Live processes named `name` whose command line mentions `marker`."""
    return [pid for pid, cmdline in live_processes(marker) if name in cmdline.split(" ", 1)[0]]


def finish(proc: subprocess.Popen, seen: list[str], timeout_s: float = 600) -> str:
    try:
        rest, _ = proc.communicate(timeout=timeout_s)
    finally:
        proc.kill()
    return "".join(seen) + rest


def no_orphans(marker: str) -> None:
    time.sleep(1)
    left = _children_running(marker)
    assert not left, f"processes left behind: {left}"


@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_a_server_that_dies_or_stops_answering_mid_load_test_fails_the_job_and_the_sweep_goes_on(
    fault, tmp_path, cache, llamacpp_env
):
    """The first job's llama-server is SIGKILLed (or SIGSTOPped) during its load test; the job fails
    with that reason within the engine's request timeout (10 s here), not evalscope's hour; the
    second job runs."""
    proc = start_own_group(tmp_path, "-m", *SHORT_PERF, "benchmark.perf.requests_per_level=60,1",
                           "engine.request_timeout_s=10", cache=cache)  # fmt: skip
    seen: list[str] = []
    read_until(proc, "stage benchmark_perf ...", seen)
    time.sleep(3)  # evalscope is sending requests
    servers = pids_of("llama-server", str(cache))
    assert len(servers) == 1, servers
    os.kill(servers[0], signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    out = finish(proc, seen)
    assert proc.returncode == 1, out[-3000:]
    _, every = runs(tmp_path)
    jobs = [r for r in every if r.data.tags.get("qsweep.kind") == "job"]
    errors = [r.data.tags.get("qsweep.error") for r in jobs]
    assert [r.info.status for r in jobs] == ["FAILED", "FINISHED"], errors
    error = jobs[0].data.tags["qsweep.error"]
    expected = "the server exited (code -9)" if fault == "killed" else "the server stopped answering"
    assert error.startswith(expected) and "\n" not in error, error
    assert "perf_output_tok_s_c1" not in jobs[0].data.metrics  # nothing measured is reported
    assert jobs[1].data.metrics["perf_success_rate_min"] == 1
    no_orphans(str(tmp_path))
    no_orphans(str(cache))
    INJECTED.append(f"llama-server {'SIGKILL' if fault == 'killed' else 'SIGSTOP'} mid load test: FAILED, "
                    f"'{error[:60]}...', next job FINISHED")  # fmt: skip


def test_a_server_that_will_not_start_fails_fast_with_its_own_error(tmp_path, gguf_seed):
    """Each job of the sweep fails at its server's start, says why in its run, and the sweep goes
    on to the next job (a quantized one: built, then failing the same way)."""
    bad_flag = "engine.extra_args=[--no-such-flag]"
    two_jobs = [a for a in SHORT_PERF if not a.startswith("method=")] + ["method=none,gguf-q4_k_m"]
    done = run_cli("-m", *two_jobs, bad_flag, tmp=tmp_path, timeout_s=600, seed=gguf_seed)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "2 job(s) failed" in done.stderr and "Traceback" not in done.stderr
    _, every = runs(tmp_path)
    jobs = [r for r in every if r.data.tags.get("qsweep.kind") == "job"]
    assert [r.data.params["method.name"] for r in jobs] == ["none", "gguf-q4_k_m"]
    for job in jobs:
        error = job.data.tags["qsweep.error"]
        assert job.info.status == "FAILED" and "llama-server exited with code" in error
        assert "no-such-flag" in error  # the server's own line
        assert "time_serve_s" in job.data.metrics and job.data.metrics["time_serve_s"] < 120  # not a timeout
    assert [r.info.status for r in every if r.data.tags.get("qsweep.kind") == "sweep"] == ["FAILED"]
    no_orphans(str(tmp_path))
    INJECTED.append("llama-server with a bad flag: FAILED in seconds with the server's own line")


def test_a_port_in_use_is_refused_before_anything_runs(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli(f"engine.port={port}", tmp=tmp_path, timeout_s=120)
    assert done.returncode == 2 and f"engine.port={port} on 127.0.0.1 is in use" in done.stderr
    assert not (tmp_path / "mlruns").exists()
    INJECTED.append("engine.port taken by another process: refused at pre-flight, exit 2, no run")


def test_a_corrupted_cached_artifact_is_rebuilt_not_served(tmp_path, gguf_seed):
    ppl = ["benchmark=[ppl]", "benchmark.ppl.max_tokens=1024"]
    first = run_cli(*ppl, tmp=tmp_path, timeout_s=900, seed=gguf_seed)
    assert first.returncode == 0, first.stdout[-3000:]
    gguf = next((tmp_path / "cache").glob("gguf-base/*/model-f16.gguf"))  # run_cli's cache
    size = gguf.stat().st_size
    with open(gguf, "r+b") as f:
        f.truncate(size // 2)  # as an interrupted copy or a full disk would leave it
    again = run_cli(*ppl, tmp=tmp_path, timeout_s=900)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "is damaged (model-f16.gguf has" in again.stdout and "it will be rebuilt, not used" in again.stdout
    assert gguf.stat().st_size == size
    _, every = runs(tmp_path)
    measured = [r.data.metrics["ppl"] for r in every if r.data.tags.get("qsweep.kind") == "job"]
    assert len(measured) == 2 and measured[0] == pytest.approx(measured[1], rel=1e-9)
    INJECTED.append("cached GGUF truncated to half: reported in one line, rebuilt, same perplexity")


def test_the_quantizer_killed_fails_the_job_and_leaves_no_half_written_entry(tmp_path, cache, llamacpp_env):
    proc = start_own_group(tmp_path, "method=gguf-iq4_xs", "benchmark=[ppl]", "benchmark.ppl.max_tokens=1024",
                           cache=cache)  # fmt: skip
    seen: list[str] = []
    deadline = time.monotonic() + 600
    while not (quantizers := pids_of("llama-imatrix", str(cache)) + pids_of("llama-quantize", str(cache))):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(seen[-30:])
        time.sleep(0.2)
    os.kill(quantizers[0], signal.SIGKILL)
    out = finish(proc, seen)
    assert proc.returncode == 1, out[-3000:]
    _, every = runs(tmp_path)
    job = next(r for r in every if r.data.tags.get("qsweep.kind") == "job")
    assert job.info.status == "FAILED" and "failed (exit -9)" in job.data.tags["qsweep.error"]
    assert not list(cache.glob("*/.tmp-*")), "a killed build leaves no build folder behind"
    entries = [p for p in cache.glob("*/*") if p.is_dir()]
    assert all((p / "qsweep-manifest.json").exists() for p in entries), "every entry is whole"
    no_orphans(str(cache))
    INJECTED.append("quantizer SIGKILLed: FAILED with its exit code, no half-written cache entry")


def test_a_store_locked_by_another_writer_is_waited_out_and_nothing_is_lost(tmp_path):
    """Another process holds the SQLite store's write lock for 30 s (past MLflow's 20 s SQLite busy
    timeout) while a (fake) sweep records its jobs: the calls wait, every job is recorded FINISHED
    with its results."""
    model = write_fake_checkpoint(tmp_path / "fake-model")
    args = ["-m", "method=none,fake-q4", "engine=fake", "benchmark=[fakebench]", "model=local",
            f"model.path={model}"]  # fmt: skip
    first = run_cli(*args, tmp=tmp_path, timeout_s=300, fakes=True)  # makes the store
    assert first.returncode == 0, first.stdout[-2000:]
    locked, release = threading.Event(), threading.Event()

    def hold_lock():
        db = sqlite3.connect(tmp_path / "mlruns" / "mlflow.db", timeout=60)
        db.execute("BEGIN EXCLUSIVE")
        locked.set()
        release.wait(30)
        db.rollback()
        db.close()

    holder = threading.Thread(target=hold_lock, daemon=True)
    holder.start()
    assert locked.wait(30)
    try:
        again = run_cli(*args, "rerun=[all]", tmp=tmp_path, timeout_s=600, fakes=True)
    finally:
        release.set()
        holder.join()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "the MLflow store is locked by another writer" in again.stdout
    _, every = runs(tmp_path)
    second = [r for r in every if r.data.tags.get("qsweep.kind") == "job"][2:]
    assert [r.info.status for r in second] == ["FINISHED", "FINISHED"]
    assert all("fake_score" in r.data.metrics for r in second)
    INJECTED.append("MLflow store locked by another writer for 30 s: waited out, every job FINISHED")


def interrupt(proc: subprocess.Popen) -> None:
    """What Ctrl-C in a terminal does: SIGINT to the foreground process group (the controller's;
    the tools it starts run in sessions of their own)."""
    os.killpg(proc.pid, signal.SIGINT)


def start_own_group(tmp: Path, *args: str, cache: Path | None = None) -> subprocess.Popen:
    """A sweep in the background in a process group of its own (as a shell's foreground job), its
    output merged; caches under `tmp` unless `cache` names a shared one."""
    cmd = [sys.executable, "-m", "qsweep", *args, f"paths.mlruns={tmp / 'mlruns'}",
           f"paths.artifact_cache={cache or tmp / 'cache'}", f"paths.outputs={tmp / 'outputs'}"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def wait_for_tool(proc: subprocess.Popen, names: tuple[str, ...], marker: str, seen: list[str]) -> int:
    """The pid of the first live process named one of `names` under `marker`, while `proc` runs."""
    deadline = time.monotonic() + 600
    while not (found := [pid for name in names for pid in pids_of(name, marker)]):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(seen[-30:]) + (
            proc.stdout.read() if proc.poll() is not None else ""
        )
        time.sleep(0.2)
    return found[0]


# Ctrl-C while each stage's tool runs: the model's conversion from its GGUF (a model cache of the
# test's own), the importance matrix and quantization, and the load test against llama-server.
CTRL_C_STAGES = {
    "model": (("python",), ["method=none", "benchmark=[ppl]"], "preparing model"),
    "quantize": (("llama-imatrix", "llama-quantize"), ["method=gguf-iq4_xs", "benchmark=[ppl]"], None),
    "benchmark": (("llama-server",), SHORT_PERF, "stage benchmark_perf ..."),
}


@pytest.mark.parametrize("stage", list(CTRL_C_STAGES))
def test_ctrl_c_in_each_stage_stops_everything_and_marks_the_runs_killed(
    stage, tmp_path, cache, llamacpp_env
):
    names, args, after = CTRL_C_STAGES[stage]
    model_cache = ["paths.model_cache=" + str(tmp_path / "models")] if stage == "model" else []
    marker = str(tmp_path / "models") if stage == "model" else str(cache)
    proc = start_own_group(tmp_path, "-m", *args, *model_cache, cache=cache)
    seen: list[str] = []
    try:
        if after:
            read_until(proc, after, seen)
        wait_for_tool(proc, names, marker, seen)
        time.sleep(0.5)  # well inside the tool's work
        interrupt(proc)
        out = finish(proc, seen, timeout_s=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out and "Traceback" not in out
    _, every = runs(tmp_path)
    assert sorted(r.info.status for r in every) == ["KILLED", "KILLED"], out[-3000:]  # the job, the sweep
    for folder in (cache, tmp_path / "models"):
        assert not list(folder.glob("*/.tmp-*")), "an interrupted build leaves no build folder behind"
    no_orphans(str(tmp_path))
    no_orphans(str(cache))
    INJECTED.append(f"Ctrl-C during the {stage} stage ({names[-1]} running): exit 130, runs KILLED, "
                    "no build folder left")  # fmt: skip


def test_a_full_disk_fails_the_build_in_one_line_and_leaves_nothing_half_written(tmp_path, llamacpp_env):
    """The artifact cache on a 64 MB filesystem: the f16 GGUF (271 MB) cannot be written. Both jobs
    fail saying the disk is full (llama.cpp's converter only says '884736 requested and 807680
    written'), the sweep goes on to the second, and the cache holds no partial file."""
    small = tmp_path / "small-disk"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    assert mounted.returncode == 0, f"this test mounts a small tmpfs (as root): {mounted.stderr}"
    try:
        proc = start_own_group(tmp_path, "-m", "method=none,gguf-q4_k_m", "benchmark=[ppl]",
                               "benchmark.ppl.max_tokens=1024", cache=small)  # fmt: skip
        out = finish(proc, [], timeout_s=900)
        left = [p for p in small.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    finally:
        subprocess.run(["umount", "-l", str(small)], timeout=30)
    assert proc.returncode == 1, out[-3000:]
    _, every = runs(tmp_path)
    jobs = [r for r in every if r.data.tags.get("qsweep.kind") == "job"]
    assert [r.info.status for r in jobs] == ["FAILED", "FAILED"]  # the second job ran too
    for job in jobs:
        error = job.data.tags["qsweep.error"]
        assert error.startswith("disk full while building") and "\n" not in error, error
    assert left == [], left
    no_orphans(str(tmp_path))
    INJECTED.append("artifact cache on a full disk: both jobs FAILED with 'disk full while building', "
                    "no partial file")  # fmt: skip


def test_two_sweeps_at_once_on_one_cache_build_each_entry_once(tmp_path, llamacpp_env):
    shared = tmp_path / "shared-cache"
    args = ("method=none", "benchmark=[ppl]", "benchmark.ppl.max_tokens=1024")  # the f16 GGUF: one entry
    first, second = (start_own_group(tmp_path / name, *args, cache=shared) for name in ("a", "b"))
    outs = [finish(proc, [], timeout_s=900) for proc in (first, second)]
    assert first.returncode == second.returncode == 0, outs[0][-2000:] + outs[1][-2000:]
    built = {kind.name: len([p for p in kind.iterdir() if p.is_dir() and not p.name.startswith(".")])
             for kind in shared.iterdir() if kind.is_dir()}  # fmt: skip
    assert built["gguf-base"] == 1, built
    jobs = [next(r for r in runs(tmp_path / name)[1] if r.data.tags.get("qsweep.kind") == "job")
            for name in ("a", "b")]  # fmt: skip
    assert jobs[0].data.metrics["ppl"] == pytest.approx(jobs[1].data.metrics["ppl"], rel=1e-9)  # one file
    hits = sorted(job.data.tags["artifact.cache_hit"] for job in jobs)
    assert hits == ["false", "true"]  # one built it, the other waited for it
    no_orphans(str(shared))
    INJECTED.append(f"two sweeps at once on one cache: each entry built once (cache hits {hits}), same ppl")


def test_a_killed_controller_takes_its_tools_along_and_the_next_sweep_closes_its_runs(
    tmp_path, cache, gguf_seed
):
    """SIGKILL (no `finally` runs) during the load test: llama-server and evalscope go with it (they
    get SIGKILL when their parent dies); the next sweep on the store marks the runs FAILED."""
    proc = start_own_group(tmp_path, "-m", *SHORT_PERF, "benchmark.perf.requests_per_level=60", cache=cache)
    seen: list[str] = []
    try:
        read_until(proc, "stage benchmark_perf ...", seen)
        wait_for_tool(proc, ("llama-server",), str(cache), seen)
        time.sleep(3)  # evalscope is sending requests
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    no_orphans(str(tmp_path))
    no_orphans(str(cache))
    _, before = runs(tmp_path)
    assert sorted(r.info.status for r in before) == ["RUNNING", "RUNNING"]
    again = run_cli("-m", *SHORT_PERF, tmp=tmp_path, timeout_s=900, seed=gguf_seed)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "marked 2 abandoned run(s) FAILED" in again.stdout
    client, after = runs(tmp_path)
    old = [client.get_run(r.info.run_id) for r in before]
    assert all(r.info.status == "FAILED" and r.data.tags["qsweep.error"].startswith("abandoned") for r in old)
    no_orphans(str(cache))
    INJECTED.append("controller SIGKILLed mid load test: server and load generator gone, runs closed "
                    "FAILED by the next sweep")  # fmt: skip
