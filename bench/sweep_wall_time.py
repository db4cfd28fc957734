"""Benchmark (prints figures, asserts nothing): wall time of the default three-job sweep on SmolLM2
with default budgets, stage by stage, from a cold artifact cache (the prepared model is reused) and
then again, unchanged, when every result is reused. Targets: the cold sweep under 5 minutes on a
2-core machine; the second run at most 5% of the first.

    .venv/bin/python bench/sweep_wall_time.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("model", "quantize", "serve", "benchmark_ppl")


def sweep(tmp: Path) -> float:
    started = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "qsweep",
            "-m",
            f"paths.mlruns={tmp / 'mlruns'}",
            f"paths.artifact_cache={tmp / 'cache'}",
            f"paths.outputs={tmp / 'outputs'}",
        ],
        cwd=REPO,
        check=True,
        timeout=3600,
    )
    return time.monotonic() - started


def main() -> None:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cold, warm = sweep(tmp), sweep(tmp)
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("qsweep")
        jobs = [
            r
            for r in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
            if r.data.tags.get("qsweep.kind") == "job"
        ]
        print(f"\n{'run':<36}{'':6}" + "".join(f"{s:>15}" for s in STAGES) + f"{'ppl':>10}")
        for i, run in enumerate(jobs):
            label = "cold" if i < len(jobs) // 2 else "warm"
            times = "".join(f"{run.data.metrics.get(f'time_{s}_s', float('nan')):>14.1f}s" for s in STAGES)
            print(
                f"{run.info.run_name:<36}{label:6}{times}{run.data.metrics.get('ppl', float('nan')):>10.3f}"
            )
        print(
            f"\nsweep wall time: cold {cold:.0f} s (target < 300 s), again {warm:.1f} s; ratio again/cold "
            f"{warm / cold:.3f} (target <= 0.05)"
        )


if __name__ == "__main__":
    main()
