"""Bad input fails at once with one line naming the fix, a non-zero exit, and no MLflow run."""

from __future__ import annotations

import io
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REAL_ENVS, REPO, run_cli
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


def run_main(args: list[str], tmp: Path) -> SimpleNamespace:
    """`python -m qsweep ARGS` as the CLI's own main() in this process (a process each would cost
    ~0.45 s of CPU per case; `test_bad_input_through_real_processes` keeps the real entry point
    covered): exit code, stdout, stderr. A case that passes the pre-flight never starts a job."""
    from qsweep import cli

    paths = {"mlruns": tmp / "mlruns", "artifact_cache": tmp / "cache", "outputs": tmp / "outputs"}
    given = {a.split("=", 1)[0] for a in args}
    argv = ["qsweep", *args, *(f"paths.{k}={v}" for k, v in paths.items() if f"paths.{k}" not in given)]
    out, err = io.StringIO(), io.StringIO()

    def no_jobs():
        raise AssertionError("passed the pre-flight: a job would have started")

    code: int | str = 0
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(out), redirect_stderr(err):
        patch.setattr(sys, "argv", argv)
        patch.setattr(cli, "hydra_main", no_jobs)
        patch.setattr(cli.faulthandler, "register", lambda *a, **k: None)  # needs a real stderr
        try:
            cli.main()
        except SystemExit as exit_:
            code = exit_.code
        except BaseException:  # noqa: BLE001 - shown as the traceback a user would see
            code = "traceback"
            traceback.print_exc(file=err)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case through the CLI's main(), each with a home, caches and MLflow store of its own:
    case id -> (outcome, its folder)."""
    folders = {case: tmp_path_factory.mktemp("bad-input") for case in IDS}
    with pytest.MonkeyPatch.context() as patch:
        home = tmp_path_factory.mktemp("home")
        (home / "envs").symlink_to(REAL_ENVS, target_is_directory=True)  # only the input is wrong
        patch.setenv(HOME_ENV_VAR, str(home))
        patch.chdir(REPO)  # cases name files relative to the repository
        pairs = zip(IDS, CASES, strict=True)
        return {case: (run_main(args, folders[case]), folders[case]) for case, (args, _, _) in pairs}


@pytest.mark.parametrize("args", [["method=gptqq"], ["engine.port=70000"], ["tracking.uri=foo://bar"]])
def test_bad_input_through_real_processes(args, tmp_path):
    """The real entry point (`python -m qsweep`) gives the same one line and exit code 2."""
    done = run_cli(*args, tmp=tmp_path, timeout_s=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("qsweep: ") and "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("args,first,second", CASES, ids=IDS)
def test_bad_input_is_one_clear_line(args, first, second, outcomes, request):
    done, tmp_path = outcomes[request.node.callspec.id]
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("qsweep: ") and first in lines[0] and second in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "mlruns").exists(), "no MLflow store may be created for bad input"


def test_a_stage_environment_not_set_up_is_refused_at_pre_flight(tmp_path, monkeypatch):
    """A home whose stage environments were never built: refused before any run is made, naming
    each environment the jobs need (llama.cpp's for the server, evalscope's for the load test)."""
    home = tmp_path / "home"
    monkeypatch.setenv(HOME_ENV_VAR, str(home))
    monkeypatch.chdir(REPO)
    done = run_main(["-m", "method=none,gguf-q4_k_m", "benchmark=[ppl,perf]"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"qsweep: stage environment(s) evalscope, llamacpp not set up in {home / 'envs'}: run ./setup.sh"
    )
    assert not (tmp_path / "mlruns").exists()
