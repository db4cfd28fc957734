"""The unquantized baseline (`method=none`): the checkpoint itself for engines that load
transformers checkpoints, its f16 GGUF for llama.cpp. Every quantized job is compared with it."""

from __future__ import annotations

from dataclasses import dataclass

from qsweep.cache import content_key
from qsweep.context import Artifact, JobContext
from qsweep.errors import QsweepError
from qsweep.hfcheckpoint import checkpoint_stats
from qsweep.methods.base import METHODS, Method, PlannedArtifact, planned_step
from qsweep.methods.gguf import GgufOuttype, artifact_from, f16_gguf, f16_key
from qsweep.models import PreparedModel


@dataclass
class Config:
    gguf_outtype: GgufOuttype = GgufOuttype.f16  # what "unquantized" means for GGUF engines


@METHODS.register("baseline")
class BaselineMethod(Method[Config]):
    """The model as it is; its GGUF form runs llama.cpp's converter (llamacpp environment)."""

    formats = ("gguf", "hf")
    env = None  # the GGUF form uses the llamacpp environment through methods.gguf
    is_baseline = True

    def plan(self, cfg: Config, model_fingerprint: str, fmt: str, ctx: JobContext) -> PlannedArtifact:
        if fmt == "gguf":
            key = content_key(f16_key(model_fingerprint, cfg.gguf_outtype, ctx))
            return PlannedArtifact(
                key, [planned_step(f"{cfg.gguf_outtype.value} GGUF", "gguf-base", key, ctx)]
            )
        return PlannedArtifact(f"checkpoint-{model_fingerprint}", [])  # the model itself

    def build(self, cfg: Config, model: PreparedModel, fmt: str, ctx: JobContext) -> Artifact:
        if fmt == "gguf":
            entry = f16_gguf(model, cfg.gguf_outtype, ctx)
            return artifact_from(entry, [entry], cfg.gguf_outtype.value, model)
        if fmt == "hf":
            stats = checkpoint_stats(model.path)
            return Artifact(
                format="hf",
                path=model.path,
                cache_hit=model.cache_hit,
                key=f"checkpoint-{model.fingerprint}",
                metrics={
                    "artifact_size_mb": stats["weight_bytes"] / 1e6,
                    "n_params": stats["n_params"],
                    "bits_per_weight": 8 * stats["weight_bytes"] / max(stats["n_params"], 1),
                    "quantize_s": 0.0,
                },
                params={"artifact.type": "checkpoint"},
                info={"checkpoint": stats},
            )
        raise QsweepError(f"the baseline has no {fmt} form")
