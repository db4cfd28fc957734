"""The unquantized baseline (`method=none`): the checkpoint itself, or for llama.cpp its f16 GGUF."""

from __future__ import annotations

from dataclasses import dataclass

from qsweep.context import Artifact, JobContext
from qsweep.errors import QsweepError
from qsweep.methods.gguf import ENV, GgufOuttype, artifact_from, f16_gguf
from qsweep.models import PreparedModel

__all__ = ["ENV", "FORMATS", "Config", "build"]
FORMATS = ("gguf",)  # the HF checkpoint itself joins when an engine serves it


@dataclass
class Config:
    name: str = "none"
    kind: str = "baseline"
    gguf_outtype: GgufOuttype = GgufOuttype.f16  # what "unquantized" means for GGUF engines


def build(cfg: Config, model: PreparedModel, fmt: str, ctx: JobContext) -> Artifact:
    if fmt == "gguf":
        entry = f16_gguf(model, cfg.gguf_outtype, ctx)
        return artifact_from(entry, [entry], cfg.gguf_outtype.value)
    raise QsweepError(f"the baseline has no {fmt} form yet")
