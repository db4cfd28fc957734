"""bitsandbytes (`method=bnb-nf4`): quantized by the serving engine while it loads the checkpoint,
nothing built beforehand. Its artifact is the model's checkpoint in format `hf-bitsandbytes` with
the BitsAndBytesConfig to load it with; an engine serves it only where it lists that format.

None of qsweep's engines do, found by trying (the reasons are their `not_served` entries, so such
pairs are skipped with them): vLLM 0.32, CPU and CUDA builds alike, has no bitsandbytes
quantization (the deprecation RFC vllm-project/vllm#39583), and llama.cpp loads GGUF files only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

from qsweep.context import Artifact, JobContext
from qsweep.hfcheckpoint import checkpoint_stats
from qsweep.methods.base import METHODS, Method, PlannedArtifact
from qsweep.models import PreparedModel

FORMAT = "hf-bitsandbytes"


class QuantType(Enum):
    nf4 = "nf4"  # 4-bit NormalFloat (QLoRA's)
    fp4 = "fp4"


@dataclass
class Config:
    """transformers' BitsAndBytesConfig for a 4-bit load."""

    bnb_4bit_quant_type: QuantType = QuantType.nf4
    bnb_4bit_use_double_quant: bool = False  # quantize the quantization constants too
    bnb_4bit_compute_dtype: str = "bfloat16"


def quantization_config(cfg: Config) -> dict:
    """The `quantization_config` an engine that loads with bitsandbytes takes."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True} | {
        k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(cfg).items()
    }


@METHODS.register("bitsandbytes")
class BitsAndBytesMethod(Method[Config]):
    """The checkpoint as it is, with the bitsandbytes settings the engine quantizes it with."""

    formats = (FORMAT,)

    def plan(self, cfg: Config, model_fingerprint: str, fmt: str, ctx: JobContext) -> PlannedArtifact:
        return PlannedArtifact(f"checkpoint-{model_fingerprint}-bnb-{cfg.bnb_4bit_quant_type.value}", [])

    def build(self, cfg: Config, model: PreparedModel, fmt: str, ctx: JobContext) -> Artifact:
        stats = checkpoint_stats(model.path)
        return Artifact(
            format=FORMAT,
            path=model.path,
            cache_hit=model.cache_hit,
            key=f"checkpoint-{model.fingerprint}-bnb-{cfg.bnb_4bit_quant_type.value}",
            metrics={"n_params": stats["n_params"], "quantize_s": 0.0},
            params={"artifact.type": "checkpoint, quantized at load"},
            info={"quantization_config": quantization_config(cfg)},
        )
