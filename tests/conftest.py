"""Shared fixtures. Tests that need the stage environments use the ones ./setup.sh built (the
README's test command runs it first); caches of quantized files go to a temporary folder, while
the prepared default model is shared with normal runs (preparing it takes ~30 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, tmp: Path, timeout_s: float = 1800) -> subprocess.CompletedProcess:
    """`python -m qsweep ARGS` with MLflow, caches and outputs under `tmp`."""
    cmd = [
        sys.executable,
        "-m",
        "qsweep",
        *args,
        f"paths.mlruns={tmp / 'mlruns'}",
        f"paths.artifact_cache={tmp / 'cache'}",
        f"paths.outputs={tmp / 'outputs'}",
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture(scope="session")
def llamacpp_env():
    from qsweep.envs import StageEnv

    env = StageEnv("llamacpp")
    env.require()  # a missing environment is a failure, not a skip: the test command sets it up
    return env


@pytest.fixture(scope="session")
def smollm2(llamacpp_env, tmp_path_factory):
    """The default model, prepared into the shared model cache (a cache hit after the first time)."""
    from qsweep import models
    from qsweep.cache import ArtifactCache
    from qsweep.config import PathsConfig

    cfg = models.from_conf("smollm2-135m")
    cache = ArtifactCache(Path(PathsConfig().home) / "cache" / "models")
    return models.prepare(cfg, cache, tmp_path_factory.mktemp("prepare-logs"))
