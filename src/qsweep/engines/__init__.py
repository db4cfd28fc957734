"""Serving engines, one module per kind. An engine config's `kind` names its module, which exposes
`Config`, `FORMATS` (artifact formats it serves) and `serve(cfg, artifact, model, ctx)`, a context
manager yielding a served model."""

from qsweep.registry import Registry

ENGINES = Registry("engine kind", {"llamacpp": "qsweep.engines.llamacpp", "vllm": "qsweep.engines.vllm"})
