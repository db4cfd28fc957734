"""Marks on config fields that say what a setting changes, so result keys are derived, not kept
in a table: a field marked `neutral` changes no measurement (where a server listens, how long to
wait); one marked `speed_only` changes how fast a result comes, never what it is (slots, context
size, batch size). A quality result (perplexity, accuracy) is keyed by every other field; a timing
result (a load test) also by the `speed_only` ones."""

from __future__ import annotations

import dataclasses
from typing import Any

NEUTRAL = "qsweep.neutral"
SPEED_ONLY = "qsweep.speed_only"
QUANTIZES = "qsweep.quantizes"
MINIMUM = "qsweep.minimum"  # the least value the pre-flight accepts (None always passes)


def _field(mark: dict, default: Any, default_factory: Any, minimum: float | None) -> Any:
    metadata = {**mark, **({MINIMUM: minimum} if minimum is not None else {})}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


MISSING: Any = dataclasses.MISSING


def neutral(default: Any = MISSING, *, default_factory: Any = MISSING, minimum: float | None = None) -> Any:
    """A config field that changes no result: `port: int = neutral(0)`; `minimum`, the least
    value the pre-flight accepts (`timeout_s: int = neutral(300, minimum=1)`)."""
    return _field({NEUTRAL: True}, default, default_factory, minimum)


def quantizes(default: Any = MISSING, *, default_factory: Any = MISSING) -> Any:
    """An engine setting that quantizes at serving time (a KV cache type), whose default quantizes
    nothing: the baseline is always measured at the default, and a job that sets it is compared with
    that baseline, `method=none` included, so its cost shows: `cache_type_k: T = quantizes(T.f16)`."""
    return _field({QUANTIZES: True}, default, default_factory, None)


def unquantized(cfg: Any) -> Any:
    """`cfg` with every `quantizes` field at its default: the settings the baseline is served with."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.metadata.get(QUANTIZES)}
    return dataclasses.replace(cfg, **defaults) if defaults else cfg


def quantizes_at_serving(cfg: Any) -> bool:
    """Whether a `quantizes` field of `cfg` is set off its default."""
    return unquantized(cfg) != cfg


def speed_only(
    default: Any = MISSING, *, default_factory: Any = MISSING, minimum: float | None = None
) -> Any:
    """A config field that changes speed, not outputs: `parallel: int = speed_only(1, minimum=1)`."""
    return _field({SPEED_ONLY: True}, default, default_factory, minimum)


def at_least(minimum: float, default: Any = MISSING) -> Any:
    """A config field that changes results and must be at least `minimum` where set."""
    return _field({}, default, MISSING, minimum)


def below_minimum(cfg: Any) -> tuple[str, Any, float] | None:
    """The first field of `cfg` set below its `minimum` mark: (name, value, minimum), or None."""
    for f in dataclasses.fields(cfg):
        value, minimum = getattr(cfg, f.name), f.metadata.get(MINIMUM)
        if minimum is not None and value is not None and not isinstance(value, bool) and value < minimum:
            return f.name, value, minimum
    return None


def is_neutral(f: dataclasses.Field, timing: bool = False) -> bool:
    """Whether field `f` leaves a result (a timing result, with `timing`) unchanged."""
    return bool(f.metadata.get(NEUTRAL) or (f.metadata.get(SPEED_ONLY) and not timing))


def result_settings(cfg: Any, timing: bool = False) -> dict[str, Any]:
    """A config's settings that can change a result, or with `timing` a speed measurement."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if not is_neutral(f, timing)}
