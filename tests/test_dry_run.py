"""The dry run of the default sweep and of the seed experiment's sweep, through the real CLI: every
job listed with what it would do, nothing built, measured or recorded. Slow only in that it reads
the real stage environments (the keys of llama.cpp's and llm-compressor's artifacts name them)."""

from __future__ import annotations

import pytest

from conftest import run_cli
from qsweep import envs, models

pytestmark = pytest.mark.slow


def job_lines(stdout: str) -> dict[str, str]:
    """job name -> its status line's status, from the dry run's output."""
    found = {}
    for line in stdout.splitlines():
        text = line.removeprefix("[qsweep] ")
        if text.startswith("    ") or ": " not in text or "/" not in text.split(": ", 1)[0]:
            continue
        name, status = text.split(": ", 1)
        found[name] = status
    return found


def test_dry_run_of_the_default_sweep_says_what_each_job_would_do_and_writes_nothing(tmp_path, llamacpp_env):
    done = run_cli("-m", "dry_run=true", tmp=tmp_path, timeout_s=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    jobs = job_lines(done.stdout)
    assert set(jobs) == {f"smollm2-135m/{m}/llamacpp" for m in ("none", "gguf-q4_k_m", "gguf-iq4_xs")}
    assert all(status.startswith("run, ") for status in jobs.values()), jobs
    for step in ("f16 GGUF: to build", "importance matrix: to build", "IQ4_XS GGUF: to build",
                 "ppl: to measure; perf: to measure", "no estimate"):  # fmt: skip
        assert step in done.stdout, step
    assert "3 job(s): 3 run" in done.stdout
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "cache").exists()
    assert not (tmp_path / "outputs").exists()


def test_seed_experiment_sweep_composes_lists_its_jobs_and_says_in_one_line_why_it_cannot_run_here(
    tmp_path, llamacpp_env
):
    done = run_cli("-m", "+sweeps=seed-blog", "dry_run=true", tmp=tmp_path, timeout_s=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    jobs = job_lines(done.stdout)
    methods, engines = ("none", "gptq", "gguf-iq4_xs", "gguf-q4_k_m"), ("vllm", "llamacpp")
    assert set(jobs) == {f"qwen3-4b-instruct-2507/{m}/{e}" for m in methods for e in engines}
    skipped = {name for name, status in jobs.items() if status == "skip"}
    assert skipped == {"qwen3-4b-instruct-2507/gptq/llamacpp", "qwen3-4b-instruct-2507/gguf-iq4_xs/vllm",
                       "qwen3-4b-instruct-2507/gguf-q4_k_m/vllm"}  # fmt: skip
    assert "ppl: to measure; accuracy: to measure; perf: to measure" in done.stdout
    assert "gptq W4A16 checkpoint: to build" in done.stdout and "IQ4_XS GGUF: to build" in done.stdout
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "cache").exists()

    if models.hub_reachable() and envs.has_cuda_gpu():
        return  # a machine that can run it: nothing to refuse
    refused = run_cli("-m", "+sweeps=seed-blog", tmp=tmp_path, timeout_s=120)
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot run on this machine" in lines[0] and "Traceback" not in refused.stderr
    assert not (tmp_path / "mlruns").exists()
