"""Quantization methods, one module per kind. A method config's `kind` names its module, which
exposes `Config` (the schema) and `build(cfg, model, fmt, ctx) -> Artifact`."""

from qsweep.registry import Registry

METHODS = Registry(
    "method kind",
    {
        "baseline": "qsweep.methods.baseline",
        "gguf": "qsweep.methods.gguf",
        "llmcompressor": "qsweep.methods.llmcompressor",
    },
)
