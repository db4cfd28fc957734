"""GPU slots with device lists the tests give (these machines have no GPU): each job holds its own
devices, several when its engine spans them, never one another job holds; a killed holder frees its
devices; the pre-flight refuses a job wider than the GPUs visible; tensor parallelism reaches the
engines' command lines. The joblib scenario in tests/test_launchers.py checks the same across
worker processes of a real sweep; a real GPU check is reported in docs/guide.md."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from hydra import initialize_config_dir

from qsweep import cli, config, devices
from qsweep.devices import GpuSlotsConfig
from qsweep.engines import llamacpp, vllm
from qsweep.errors import QsweepError

config.register()


def test_jobs_side_by_side_get_disjoint_devices_and_wait_when_none_is_free(tmp_path):
    gpus = ["0", "1", "2", "3"]
    with (
        devices.claim(2, gpus, tmp_path, wait_s=0) as first,
        devices.claim(2, gpus, tmp_path, wait_s=0) as second,
    ):
        assert (first, second) == (["0", "1"], ["2", "3"])
        said = []
        started = time.monotonic()
        with (
            pytest.raises(QsweepError, match=r"no 1 free GPU\(s\) among 0, 1, 2, 3 for 0 s"),
            devices.claim(1, gpus, tmp_path, wait_s=0.3, poll_s=0.05, on_wait=said.append),
        ):
            pass
        assert time.monotonic() - started >= 0.3 and said and "other jobs hold them" in said[0]
    with devices.claim(4, gpus, tmp_path, wait_s=0) as everything:  # all released on leaving the blocks
        assert everything == gpus
    with (
        pytest.raises(QsweepError, match=r"needs 5 GPU\(s\) and 4 are visible"),
        devices.claim(5, gpus, tmp_path, 0),
    ):
        pass


def test_a_killed_job_frees_its_devices(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from qsweep import devices
            with devices.claim(1, ["a"], __import__("pathlib").Path({str(tmp_path)!r}), wait_s=0) as held:
                print(held, flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "['a']"
        with pytest.raises(QsweepError, match="no 1 free"), devices.claim(1, ["a"], tmp_path, wait_s=0):
            pass
        holder.kill()
        holder.wait(timeout=10)
        with devices.claim(1, ["a"], tmp_path, wait_s=0) as held:  # the kernel dropped its lock
            assert held == ["a"]
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_devices_are_locked_by_uuid_so_isolated_jobs_seeing_index_0_do_not_wait(tmp_path):
    """Two jobs a scheduler isolated each see their own GPU as index 0: different GPUs, no wait."""
    mine, theirs = [("0", "GPU-1111")], [("0", "GPU-2222")]
    assert devices.lock_names(["0", "GPU-3333"], mine) == {"0": "GPU-1111", "GPU-3333": "GPU-3333"}
    with (
        devices.claim(1, ["0"], tmp_path, wait_s=0, listed=mine),
        devices.claim(1, ["0"], tmp_path, wait_s=0, listed=theirs),
    ):
        pass
    with (
        devices.claim(1, ["0"], tmp_path, wait_s=0, listed=mine),
        pytest.raises(QsweepError, match="no 1 free"),
        devices.claim(1, ["0"], tmp_path, wait_s=0, listed=mine),
    ):
        pass


def test_visible_devices_come_from_the_config_then_cuda_visible_devices():
    assert devices.visible(["5", "7"], {"CUDA_VISIBLE_DEVICES": "0"}) == ["5", "7"]
    assert devices.visible(None, {"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert devices.visible(None, {"CUDA_VISIBLE_DEVICES": ""}) == []  # a job given no GPU


def test_a_job_sees_only_its_own_devices_while_it_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "outer")
    slots = GpuSlotsConfig(ids=["g0", "g1", "g2"], lock_dir=str(tmp_path))
    with devices.job_gpus(2, slots) as held:
        assert held == ["g0", "g1"] and os.environ["CUDA_VISIBLE_DEVICES"] == "g0,g1"
        with devices.job_gpus(0, slots) as none:  # a CPU job on a GPU machine sees no GPU
            assert none == [] and os.environ["CUDA_VISIBLE_DEVICES"] == ""
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "g0,g1"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "outer"
    with devices.job_gpus(0, GpuSlotsConfig(ids=[], lock_dir=str(tmp_path))) as none:  # no GPU at all
        assert none == [] and os.environ["CUDA_VISIBLE_DEVICES"] == "outer"


def test_preflight_refuses_a_job_wider_than_the_visible_gpus_and_notes_waiting_jobs(monkeypatch):
    sweep = ["method=none,gguf-q4_k_m", "benchmark=[ppl]", "gpus.ids=[a,b]"]
    with pytest.raises(QsweepError, match=r"needs 4 GPU\(s\) and 2 are visible here \(a, b\)"):
        cli.preflight([*sweep, "gpus.per_job=4"], multirun=True)
    plans = cli.preflight(
        [*sweep, "gpus.per_job=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], True
    )
    assert any("the others wait for free GPUs" in note for plan in plans for note in plan.notes)
    # submitit_local shows each job its first gpus_per_node devices (none by default)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    local = ["method=none,gguf-q4_k_m", "benchmark=[ppl]", "gpus.per_job=1", "hydra/launcher=submitit_local"]
    with pytest.raises(QsweepError, match="set hydra.launcher.gpus_per_node to this machine's 4"):
        cli.preflight(local, multirun=True)
    assert len(cli.preflight([*local, "hydra.launcher.gpus_per_node=4"], multirun=True)) == 2
    # SLURM's nodes have GPUs the login node does not see: not judged here
    plans = cli.preflight([*sweep, "gpus.per_job=4", "hydra/launcher=slurm"], multirun=True)
    assert all(plan.remote and plan.gpus == 4 for plan in plans) and cli.cannot_run_here(plans) is None


def test_engines_ask_for_their_tensor_parallel_devices(monkeypatch):
    """vLLM holds tensor_parallel_size GPUs on CUDA, llama.cpp `gpus` with layers on the GPU; on a
    CPU neither holds any. The pre-flight plans that many per job."""
    monkeypatch.setattr("qsweep.envs.has_cuda_gpu", lambda: True)
    assert vllm.VllmEngine().gpus(vllm.Config(tensor_parallel_size=4)) == 4
    assert vllm.VllmEngine().gpus(vllm.Config(device="cpu", tensor_parallel_size=4)) == 0
    assert llamacpp.LlamaCppEngine().gpus(llamacpp.Config(gpus=2)) == 2
    assert llamacpp.LlamaCppEngine().gpus(llamacpp.Config(gpus=2, n_gpu_layers=0)) == 0
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        plan = cli.plan_overrides(
            ["engine=vllm", "method=none", "benchmark=[ppl]", "engine.tensor_parallel_size=2"]
        )
    assert plan.gpus == 2 and plan.device == "cuda"
