"""Bad input fails at once with one line naming the fix, a non-zero exit, and no MLflow run."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import run_cli
from qsweep.envs import HOME_ENV_VAR

CASES = [
    (["method=gptqq"], "unknown method 'gptqq'", "gguf-q4_k_m"),
    (["method=gguf-q4_km"], "did you mean 'gguf-q4_k_m'", "none"),
    (["-m", "method=none,gguf-q4_k_m,bogus"], "unknown method 'bogus'", "gguf-iq4_xs"),
    (["engine=vlm"], "unknown engine 'vlm'", "llamacpp"),
    (["benchmark=[pplx]"], "unknown benchmark 'pplx'", "ppl"),
    (["method=gguf-q4_k_m", "method.quant_type=Q9"], "Invalid value 'Q9'", "Q4_K_M"),
    (["method.foo=1"], "Key 'foo' not in", "method.foo"),
    (["model.path=/no/such/model"], "model.path '/no/such/model'", "fix the path"),
    (["benchmark.ppl.text.path=/no/such.txt"], "text file '/no/such.txt' does not exist", "fix the path"),
    (["benchmark.ppl.text.path=tests/data/latin1.txt"], "is not UTF-8 text", "give a text file"),
    (
        ["-m", "method=none,gguf-q4_k_m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        "hydra/launcher=joblib runs 2 jobs at once on this CPU-only machine, and benchmark perf times",
        "parallel_timing=true",
    ),
    (
        ["method=gguf-iq4_xs", "method.imatrix_text.path=tests/data/short.txt"],
        "too few for 512 tokens",
        "lower method.imatrix_ctx",
    ),
    (
        ["benchmark.ppl.text.path=tests/data/short.txt"],
        "has 68 bytes from offset 0, too few for 512 tokens",
        "lower benchmark.ppl.n_ctx",
    ),
    (["model=local"], "model.path", "set model.path"),
    (["method=awq", "method.backend=gptqmodel"], "runs GPTQ only", "method=gptq"),
    (
        ["method=gptq", "method.recipe=/no/recipe.yaml"],
        "recipe '/no/recipe.yaml' does not exist",
        "method.recipe",
    ),
    (
        ["method=gptq", "calibration.source=jsonl", "calibration.path=/no/cal.jsonl"],
        "/no/cal.jsonl",
        "calibration",
    ),
    (["engine=vllm", "engine.max_num_seqs=lots"], "max_num_seqs", "lots"),
    (["benchmark.perf.concurrency=[0,4]"], "positive levels", "benchmark.perf.concurrency"),
    (["method=gptq", "calibration.source=sharegpt"], "Invalid value 'sharegpt'", "chat"),
    (["gates.ppl_ratio_mx=1.05"], "Key 'ppl_ratio_mx' not in", "gates"),
    (
        ["benchmark=[accuracy]", "benchmark.accuracy.datasets=[ceval]"],
        "no offline data for ['ceval']",
        "source=hub",
    ),
    (["benchmark=[kld]", "benchmark.kld.n_ctx=511"], "even n_ctx", "benchmark.kld"),
    (["+gates.extra.ppl_ratio=1.05"], "must end in _min or _max", "gates.extra.ppl_ratio"),
    (["rerun=[quantise]"], "rerun=['quantise']: nothing by that name", "quantize"),
    (["benchmark.perf.slo.ttft_p99_ms=-5"], "benchmark.perf.slo needs positive limits", "slo.ttft_p99_ms="),
    (
        ["benchmark=[accuracy]", "benchmark.accuracy.at_capacity=true"],
        "at_capacity=true needs the load test's capacity",
        "benchmark.perf.slo.ttft_p99_ms",
    ),
    (["report.min_recovery=high"], "min_recovery", "high"),
    (["method=gptq", "method.group_size=-1"], "group_size=-1 must be a positive power of two", "use 128"),
    (["method=gptq", "method.group_size=0"], "group_size=0 must be a positive power of two", "use 128"),
    (["method=gptq", "method.group_size=7"], "group_size=7 must be a positive power of two", "use 8"),
    (["method=gptq", "method.scheme=W17A16"], "scheme=W17A16 is not a compressed-tensors preset", "W4A16"),
    (["method=gptq", "method.scheme=w4a16"], "did you mean W4A16?", "choose from"),
    (["benchmark.ppl.n_ctx=100000"], "benchmark ppl needs 100000-token sequences", "context of 8192 tokens"),
    (
        ["method=gptq", "method.group_size=256"],
        "method.group_size=256 does not divide the model's layer widths (576, 576, 1536",
        "use 64",
    ),
    (
        ["model=qwen3-4b-instruct-2507", "method=gptq", "method.group_size=1024"],
        "does not divide the model's layer widths (2560, 4096, 9728, from model.layer_widths",
        "use 512",
    ),
    (
        ["model=qwen3-4b-instruct-2507", "benchmark.ppl.n_ctx=300000"],
        "benchmark ppl needs 300000-token sequences",
        "context of 262144 tokens",
    ),
    (["benchmark.ppl.max_tokens=-5"], "benchmark.ppl.max_tokens=-5 scores no chunk", "at least 512"),
    (["engine.port=70000"], "engine.port=70000 is not a port", "0 for a free one"),
    (["engine.startup_timeout_s=0"], "engine.startup_timeout_s=0 must be at least 1", "engine."),
    (["engine=vllm", "engine.max_logprobs=0"], "engine.max_logprobs=0 must be at least 1", "engine."),
    (["benchmark.perf.input_tokens=9000"], "benchmark perf needs", "lower benchmark.perf's"),
    (
        ["method=gptq", "calibration.source=jsonl", "calibration.path=tests/data/empty-calibration.jsonl"],
        "holds no rows",
        "text",
    ),
    (["method=gptq", "calibration.source=jsonl", "calibration.path=/etc/hostname"], "is not JSON", "line 1"),
    (["tracking.uri=foo://bar"], "tracking.uri=foo://bar is not a store MLflow can track to", "http(s)://"),
    (
        ["tracking.uri=http://127.0.0.1:9"],
        "tracking.uri=http://127.0.0.1:9 does not answer",
        "start the server",
    ),
    (
        ["paths.mlruns=/etc/hostname/runs"],
        "paths.mlruns=/etc/hostname/runs cannot be created",
        "not a folder",
    ),
    (
        ["paths.model_cache=/etc/hostname/m"],
        "paths.model_cache=/etc/hostname/m cannot be",
        "fix paths.model_cache",
    ),
    (
        ["method=gguf-q4_k_m", "method.quant_type=???"],
        "method.quant_type has no value",
        "set method.quant_type=",
    ),
    (
        ["benchmark=[perf]", "benchmark.ppl.n_ctx=128"],
        "benchmark.ppl.n_ctx is set",
        "add it to benchmark=[...]",
    ),
    (
        ["benchmark=[ppl]", "benchmark.ppl.n_ctx=101"],
        "n_ctx=101 must be an even number >= 4",
        "benchmark.ppl",
    ),
]


IDS = [" ".join(c[0]) for c in CASES]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case through the real CLI, two processes at a time (they time nothing), each with a
    home, caches and MLflow store of its own: case id -> (process, its folder)."""
    folders = {case: tmp_path_factory.mktemp("bad-input") for case in IDS}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(HOME_ENV_VAR, str(tmp_path_factory.mktemp("home")))

        def run(case: str, args: list[str]):
            # run_cli sets paths.mlruns itself: a case about it passes its own that way
            mlruns = next((Path(a.split("=", 1)[1]) for a in args if a.startswith("paths.mlruns=")), None)
            rest = [a for a in args if not a.startswith("paths.mlruns=")]
            return case, run_cli(*rest, tmp=folders[case], timeout_s=120, mlruns=mlruns)

        with ThreadPoolExecutor(max_workers=2) as pool:
            done = dict(pool.map(lambda item: run(*item), zip(IDS, (c[0] for c in CASES), strict=True)))
    return {case: (done[case], folders[case]) for case in IDS}


@pytest.mark.parametrize("args,first,second", CASES, ids=IDS)
def test_bad_input_is_one_clear_line(args, first, second, outcomes, request):
    done, tmp_path = outcomes[request.node.callspec.id]
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("qsweep: ") and first in lines[0] and second in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "mlruns").exists(), "no MLflow store may be created for bad input"
