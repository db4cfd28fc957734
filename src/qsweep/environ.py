"""The process environment, read so that another thread cannot make the read fail.

MLflow's telemetry thread sets and unsets `_MLFLOW_TELEMETRY_SESSION_ID` while qsweep runs; a plain
`dict(os.environ)` or `os.environ.items()` then meets a key that vanished between being listed and
being read (KeyError), or a dict that changed size while listed (RuntimeError). Every scan of the
whole environment in qsweep goes through `snapshot()`."""

from __future__ import annotations

import os


def snapshot() -> dict[str, str]:
    """A copy of os.environ as it is now; a variable another thread removes meanwhile is left out."""
    while True:
        try:
            keys = list(os.environ)
            break
        except RuntimeError:  # the underlying dict changed size while it was listed: list it again
            continue
    values = ((key, os.environ.get(key)) for key in keys)  # Mapping.get: None for a vanished key
    return {key: value for key, value in values if value is not None}
