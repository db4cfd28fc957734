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


def neutral(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field that changes no result: `port: int = neutral(0)`."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={NEUTRAL: True})


def speed_only(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field that changes speed, not outputs: `parallel: int = speed_only(1)`."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={SPEED_ONLY: True})


def is_neutral(f: dataclasses.Field, timing: bool = False) -> bool:
    """Whether field `f` leaves a result (a timing result, with `timing`) unchanged."""
    return bool(f.metadata.get(NEUTRAL) or (f.metadata.get(SPEED_ONLY) and not timing))


def result_settings(cfg: Any, timing: bool = False) -> dict[str, Any]:
    """A config's settings that can change a result, or with `timing` a speed measurement."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if not is_neutral(f, timing)}
