"""Shared fixtures. Every test runs with QSWEEP_HOME pointing at a temporary folder of its own
(autouse `isolated_home`), so caches, outputs and Hydra logs never touch the user's; the stage
environments ./setup.sh built (the README's test command runs it first) are linked in, and the
prepared default model is shared by the session's tests (preparing it takes ~30 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qsweep import environ
from qsweep.envs import HOME_ENV_VAR, default_home

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
REAL_ENVS = default_home() / "envs"  # read before any test changes QSWEEP_HOME
REPO_MLRUNS = REPO / "mlruns"


def run_cli(
    *args: str,
    tmp: Path,
    timeout_s: float = 1800,
    fakes: bool = False,
    mlruns: Path | None = None,
    forked: bool = True,
    seed: Path | None = None,
) -> subprocess.CompletedProcess:
    """`python -m qsweep ARGS` with MLflow (unless `mlruns` says where), caches and outputs under
    `tmp`; with `fakes`, the fake plug-ins of tests/fakeplugins.py are loaded the way a third
    party's would be, in a fork of a process that has them imported (unless not `forked`); with
    `seed` (the gguf_seed fixture), the artifact cache starts as a copy of it."""
    if seed is not None:
        seed_cache(seed, tmp / "cache")
    argv = [
        *args,
        f"paths.mlruns={mlruns or tmp / 'mlruns'}",
        f"paths.artifact_cache={tmp / 'cache'}",
        f"paths.outputs={tmp / 'outputs'}",
    ]
    if fakes and forked:  # a fork of a process that has imported qsweep and the fakes (tests/forkedcli.py)
        import forkedcli

        return forkedcli.run(argv, cli_env(fakes), REPO, tmp / "controllers", timeout_s)
    return subprocess.run(
        [sys.executable, "-m", "qsweep", *argv],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        env=cli_env(fakes),
    )


def cli_env(fakes: bool = False) -> dict[str, str]:
    env = {**environ.snapshot(), "PYTHONUNBUFFERED": "1"}
    if fakes:
        env["QSWEEP_PLUGINS"] = "fakeplugins"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="session", autouse=True)
def datasets_cache_of_the_session(tmp_path_factory):
    """The `datasets` library's cache, where lm-eval and evalscope prepare their task data, in the
    session's temporary folder: its entries are keyed by the data file's path, which is under each
    test's own QSWEEP_HOME, so in ~/.cache/huggingface every run of the tests left ~30 MB behind."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
        yield


@pytest.fixture(scope="session")
def shared_model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def _mlruns_state() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in REPO_MLRUNS.iterdir()} if REPO_MLRUNS.is_dir() else {}


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch, shared_model_cache) -> Path:
    """QSWEEP_HOME in this test's temporary folder, with the real stage environments and the
    session's model cache linked in; fails the test if it wrote into the repository's mlruns/."""
    home = tmp_path / "qsweep-home"
    (home / "cache").mkdir(parents=True)
    (home / "envs").symlink_to(REAL_ENVS, target_is_directory=True)
    (home / "cache" / "models").symlink_to(shared_model_cache, target_is_directory=True)
    monkeypatch.setenv(HOME_ENV_VAR, str(home))
    before = _mlruns_state()
    yield home
    assert _mlruns_state() == before, "a test wrote into the repository's mlruns/: pass paths.mlruns"


@pytest.fixture(scope="session")
def llamacpp_env():
    from qsweep.envs import LLAMACPP, StageEnv

    env = StageEnv(LLAMACPP.name, REAL_ENVS)
    env.require()  # a missing environment is a failure, not a skip: the test command sets it up
    return env


def job_context(root: Path, model_cache: Path):
    """A JobContext for tests that drive plug-ins by hand: artifacts and logs under `root`."""
    from qsweep.cache import ArtifactCache
    from qsweep.context import JobContext

    return JobContext(ArtifactCache(root / "artifacts"), ArtifactCache(model_cache), root / "logs", REAL_ENVS)


@pytest.fixture(scope="session")
def smollm2(llamacpp_env, shared_model_cache, tmp_path_factory):
    """The default model, prepared once per session into the session's model cache."""
    from qsweep import models

    ctx = job_context(tmp_path_factory.mktemp("prepare"), shared_model_cache)
    return models.prepare(models.from_conf("smollm2-135m"), "smollm2-135m", ctx)


@pytest.fixture(scope="session")
def gguf_seed(smollm2, shared_model_cache, tmp_path_factory) -> Path:
    """An artifact cache holding the default model's f16 GGUF, converted once per session: the
    end-to-end and fault tests start from a copy of it (`run_cli(seed=...)`) instead of converting
    the model again each (9 s here, twice that on an AVX2-only CPU). The conversion stays tested
    where it is the subject: tests/test_llamacpp.py, and the fault tests of full disks and
    concurrent builds, which start from an empty cache."""
    from qsweep.methods import baseline

    ctx = job_context(tmp_path_factory.mktemp("gguf-seed"), shared_model_cache)
    baseline.BaselineMethod().build(baseline.Config(), smollm2, "gguf", ctx)
    return ctx.artifact_cache.root


def seed_cache(seed: Path, cache: Path) -> None:
    """A copy, not links: a test that damages a cached file (tests/test_faults.py) damages its own."""
    import shutil

    shutil.copytree(seed, cache, dirs_exist_ok=True)


# The one real sweep of HF-format methods on vLLM (and GGUF on llama.cpp beside it), shared by the
# tests that read it (tests/test_e2e.py's mixed-sweep test, tests/test_vllm.py's baseline): a vLLM
# server start and its evaluation cost minutes on an AVX2-only CPU, so nothing serves the baseline twice.
MIXED_SWEEP = (
    "-m",
    "method=none,w8a8-smoothquant,gguf-q4_k_m",
    "engine=vllm,llamacpp",
    "benchmark=[ppl,kld,lmeval]",
    "benchmark.ppl.max_tokens=1024",
    "benchmark.kld.max_tokens=1024",
    "benchmark.lmeval.tasks=[hellaswag,arc_challenge,gsm8k]",
    "benchmark.lmeval.limit=4",
    "benchmark.lmeval.max_tokens=32",
    "calibration.num_samples=4",
    "calibration.seq_len=128",
)


@pytest.fixture(scope="session")
def mixed_sweep(gguf_seed, shared_model_cache, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """MIXED_SWEEP through the real CLI, once per session: (its folder, with mlruns/ and cache/; what
    it printed). Set up before any test's own QSWEEP_HOME, so the model cache is named here."""
    tmp = tmp_path_factory.mktemp("mixed-sweep")
    return tmp, run_cli(*MIXED_SWEEP, f"paths.model_cache={shared_model_cache}", tmp=tmp, seed=gguf_seed)


def sweep_runs(tmp: Path):
    """(client, every run of the `qsweep` experiment oldest first) of the store run_cli made under `tmp`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("qsweep")
    every = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return client, every


def alive(pid: int) -> bool:
    """Whether process `pid` is alive (a zombie, which still answers kill(0), counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def live_processes(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes, zombies and this one left out, whose command line
    mentions `marker` (a test's folder: its servers, tools and scorers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append((int(entry.name), cmdline))
    return found


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` are skipped, with the reason, where no CUDA GPU is present (asked only
    when one is collected: nvidia-smi is not free)."""
    needing = [item for item in items if item.get_closest_marker("gpu")]
    if needing:
        from qsweep.envs import has_cuda_gpu

        if not has_cuda_gpu():
            for item in needing:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU: `nvidia-smi -L` lists none here"))


def pytest_terminal_summary(terminalreporter) -> None:
    """The fault suite's count of what it injected and how each ended (tests/test_faults.py)."""
    faults = sys.modules.get("test_faults")
    if faults is not None and faults.INJECTED:
        terminalreporter.write_line(
            f"fault suite: {len(faults.INJECTED)} faults injected, each ended clean with 0 orphan processes"
        )
        for entry in faults.INJECTED:
            terminalreporter.write_line(f"  - {entry}")
