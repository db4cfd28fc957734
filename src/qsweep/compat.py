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


def serving_format(cfg: DictConfig) -> str | None:
    """The artifact format this job's method makes for its engine, or None if they share none."""
    method, engine = METHODS.get(cfg.method.kind), ENGINES.get(cfg.engine.kind)
    return next((fmt for fmt in engine.FORMATS if fmt in method.FORMATS), None)


def skip_reason(cfg: DictConfig) -> str | None:
    """Why this method x engine pair cannot run here, or None."""
    method, engine = METHODS.get(cfg.method.kind), ENGINES.get(cfg.engine.kind)
    if serving_format(cfg) is None:
        notes = [getattr(engine, "NOT_SERVED", {}).get(fmt) for fmt in method.FORMATS]
        return (
            f"{cfg.engine.name} serves {'/'.join(engine.FORMATS)} artifacts; "
            f"method {cfg.method.name} makes {'/'.join(method.FORMATS)}"
        ) + "".join(f": {note}" for note in notes if note)
    device = engine.device(cfg.engine) if hasattr(engine, "device") else "cpu"
    return UNSERVABLE.get((cfg.method.name, cfg.engine.kind, device))
