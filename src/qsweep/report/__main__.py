"""`python -m qsweep.report`: the decision report of finished sweeps, from MLflow alone (no model runs).

    python -m qsweep.report                              # the latest sweep
    python -m qsweep.report --sweep DIR_OR_RUN_ID        # a sweep (its folder or parent run id); repeatable
    python -m qsweep.report --model smollm2-135m         # the latest finished run of every job of a model
    python -m qsweep.report --sweep NEW --against OLD    # and each job's change since another sweep
    python -m qsweep.report report.min_recovery=0.98 tracking.uri=http://host:5000   # any config value

A single sweep's report goes to `<sweep dir>/report/` and onto its parent run; others to `--out`
(default `<paths.outputs>/reports/<name>/`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import cast

from omegaconf import OmegaConf

from qsweep import config, logs, tracking
from qsweep.errors import QsweepError
from qsweep.report import build
from qsweep.report.decide import ReportConfig
from qsweep.sweep import PARENT_ID_FILE

log = logging.getLogger("qsweep.report")


def parent_id(sweep: str) -> str:
    """A sweep given as its folder (holding its parent run id) or as the run id itself."""
    folder = Path(sweep)
    if (folder / PARENT_ID_FILE).is_file():
        return (folder / PARENT_ID_FILE).read_text().strip()
    if folder.exists():
        raise QsweepError(f"{sweep} is not a sweep folder (no {PARENT_ID_FILE} in it)")
    return sweep


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m qsweep.report", description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="append", default=[], help="sweep folder or parent run id")
    parser.add_argument("--model", help="every finished job of this model option, latest run of each")
    parser.add_argument("--against", help="a sweep to compare with (before), folder or parent run id")
    parser.add_argument("--out", type=Path, help="where to write (default: see above)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. report.min_recovery=0.98")
    args = parser.parse_args(argv)
    cfg = config.compose(args.overrides, job_name="report")
    report_cfg = cast(ReportConfig, OmegaConf.to_object(cfg.report))  # the schema types the section
    client, experiment_id = tracking.client_for(cfg)
    started = time.monotonic()
    against = parent_id(args.against) if args.against else None
    if args.model:
        rows = build.load_rows(client, build.model_runs(client, experiment_id, args.model))
        folder = args.out or Path(cfg.paths.outputs) / "reports" / args.model
        comparison = None
        if against:
            names = (build._sweep_name(client, against), f"latest {args.model}")
            comparison = build.compare_sweeps(build.rows_for(client, [against]), rows, report_cfg, names)
        written = build.write(f"qsweep report: {args.model}", build.sections_of(rows, report_cfg), report_cfg,
                              folder, comparison)  # fmt: skip
    else:
        sweeps = [parent_id(s) for s in args.sweep] or [build.latest_sweep(client, experiment_id)]
        if len(sweeps) == 1:
            run = client.get_run(sweeps[0])
            sweep_dir = run.data.tags.get("qsweep.sweep_dir")
            elsewhere = Path(cfg.paths.outputs) / "reports" / run.info.run_name.replace(" ", "-")
            folder = args.out or (Path(sweep_dir) / "report" if sweep_dir else elsewhere)
            written = build.sweep_report(client, sweeps[0], report_cfg, folder, against)
        else:
            rows = build.rows_for(client, sweeps)
            folder = args.out or Path(cfg.paths.outputs) / "reports" / time.strftime("%Y-%m-%d_%H-%M-%S")
            title = "qsweep report: " + ", ".join(build._sweep_name(client, s) for s in sweeps)
            written = build.write(title, build.sections_of(rows, report_cfg), report_cfg, folder)
    log.info(
        "report written in %.1f s: %s (and report.md, report.csv)", time.monotonic() - started, written.html
    )
    return written.html


if __name__ == "__main__":
    logs.console()
    try:
        main()
    except QsweepError as err:
        print(f"qsweep: {err}", file=sys.stderr)
        sys.exit(2)
