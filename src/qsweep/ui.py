"""`python -m qsweep.ui [--port 5000] [overrides]`: the MLflow UI on qsweep's store, on 127.0.0.1,
with the address that opens the experiment's runs as a model-training experiment.

qsweep tags its experiment `mlflow.experimentKind=custom_model_development`, but MLflow 3.17's UI
follows its own "GenAI / Model training" switch (kept in the browser, default GenAI) rather than
that tag; the address printed here sets the switch (`workflowType=machine_learning`) and opens the
chart view, where every metric of the selected runs is drawn and the perf_* curves have
concurrency on the x axis.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qsweep import config, tracking
from qsweep.errors import QsweepError


def address(base: str, experiment_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&compareRunsMode=CHART"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qsweep.ui", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. tracking.uri=...")
    args = parser.parse_args(argv)
    cfg = config.compose(args.overrides, job_name="ui")
    _, experiment_id = tracking.client_for(cfg)
    uri = tracking.tracking_uri(cfg)
    if uri.startswith("http"):  # a tracking server serves its own UI
        print(f"open {address(uri.rstrip('/'), experiment_id)}")
        return
    base = f"http://127.0.0.1:{args.port}"
    print(f"open {address(base, experiment_id)}  (Ctrl-C stops the UI)", flush=True)
    mlflow = Path(sys.executable).parent / "mlflow"
    # The UI replaces this process: Ctrl-C stops it, and nothing is left behind.
    command = [str(mlflow), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)]
    os.execv(mlflow, command)


if __name__ == "__main__":
    try:
        main()
    except QsweepError as err:
        print(f"qsweep: {err}", file=sys.stderr)
        sys.exit(2)
