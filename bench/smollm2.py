"""What the benchmarks share: a job context on the set-up's caches and environments, SmolLM2
prepared from its wheel, and its GGUF files (built once, then taken from the cache)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qsweep.cache import ArtifactCache
from qsweep.context import Artifact, JobContext
from qsweep.envs import default_home
from qsweep.methods import baseline, gguf
from qsweep.models import PreparedModel, from_conf, prepare


@contextlib.contextmanager
def bench_context() -> Iterator[JobContext]:
    """A JobContext on $QSWEEP_HOME's caches and stage environments, logging to a temporary folder."""
    home = default_home()
    with tempfile.TemporaryDirectory() as tmp:
        yield JobContext(
            ArtifactCache(home / "cache" / "artifacts"), ArtifactCache(home / "cache" / "models"), Path(tmp),
            home / "envs",
        )  # fmt: skip


def smollm2(ctx: JobContext) -> PreparedModel:
    return prepare(from_conf("smollm2-135m"), "smollm2-135m", ctx)


def smollm2_gguf(ctx: JobContext, quant_type: str | None = "Q4_K_M") -> Artifact:
    """SmolLM2 as a GGUF of `quant_type` (None: the f16 file, the baseline's)."""
    model = smollm2(ctx)
    if quant_type is None:
        return baseline.BaselineMethod().build(baseline.Config(), model, "gguf", ctx)
    return gguf.GgufMethod().build(gguf.Config(quant_type=gguf.GgufQuantType(quant_type)), model, "gguf", ctx)
