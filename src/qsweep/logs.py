"""Logging: every qsweep module logs through `logging.getLogger(__name__)`. Inside a sweep, Hydra's
job logging (conf/config.yaml) sends records to the terminal with this formatter and to the job's
log file, which is attached to the job's MLflow run; outside one (pre-flight, set-up) `console()`
sets up the same terminal format."""

from __future__ import annotations

import logging
import sys

PREFIX = "[qsweep] "


class ConsoleFormatter(logging.Formatter):
    """`[qsweep] message` for qsweep's own records, as the terminal always showed them; records of
    other libraries (MLflow, Hydra) in the format `other`."""

    def __init__(self, other: str = "[%(name)s][%(levelname)s] %(message)s"):
        super().__init__(other)

    def format(self, record: logging.LogRecord) -> str:
        if not (record.name == "qsweep" or record.name.startswith("qsweep.")):
            return super().format(record)
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        return PREFIX + (f"{message}\n{record.exc_text}" if record.exc_text else message)


def console() -> None:
    """Terminal logging for code that runs outside a Hydra job; a no-op where logging is set up."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(ConsoleFormatter())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
