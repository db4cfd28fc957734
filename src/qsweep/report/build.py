"""Assemble a report from MLflow: pick the runs (a sweep, several sweeps, or every finished job of a
model), read their rows, decide, draw, write report.md / report.csv / report.html with figures/,
and log it all to the sweep's parent run."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from qsweep import tracking
from qsweep.errors import QsweepError
from qsweep.report import decide, figures, render
from qsweep.report.decide import ReportConfig
from qsweep.report.rows import JobRow, Value, load_rows

log = logging.getLogger(__name__)


@dataclass
class Written:
    """Where a report went."""

    folder: Path
    markdown: Path
    csv: Path
    html: Path
    figures: list[Path]


def sweep_runs(client, parent_id: str) -> list:
    """A sweep's job runs, in the order they started."""
    return tracking.sweep_jobs(client, client.get_run(parent_id).info.experiment_id, parent_id)


def latest_sweep(client, experiment_id: str) -> str:
    runs = client.search_runs(
        [experiment_id], filter_string="tags.`qsweep.kind` = 'sweep'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )  # fmt: skip
    if not runs:
        raise QsweepError("no sweep in this MLflow experiment yet: run one with `python -m qsweep -m`")
    return runs[0].info.run_id


def model_runs(client, experiment_id: str, model: str) -> list:
    """The latest finished run of every job of `model` in the experiment (all sweeps, and single jobs)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`qsweep.kind` = 'job' and tags.`choice.model` = '{model}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    latest: dict[str, object] = {}
    for run in runs:
        latest.setdefault(run.info.run_name, run)
    if not latest:
        raise QsweepError(f"no finished job of model '{model}' in this MLflow experiment")
    return sorted(latest.values(), key=lambda r: r.info.start_time)


def sections_of(rows: list[JobRow], cfg: ReportConfig, draw: bool = True) -> list[render.Section]:
    """One section per model: its rows, picks, exclusions, noise statements and figures."""
    sections = []
    for model in dict.fromkeys(row.model for row in rows):
        mine = [row for row in rows if row.model == model and row.status != "SKIPPED"]
        picks, left_out = decide.recommend(mine, cfg)
        section = render.Section(
            model, mine, picks, left_out, decide.noise_statements(mine), decide.like_for_like(mine)
        )
        if draw:
            section.figures = figures.draw(mine, cfg)
        sections.append(section)
    return sections


def compare_sweeps(before: list[JobRow], after: list[JobRow], cfg: ReportConfig, names: tuple[str, str]):
    """Per job present in both: each headline figure before -> after, with a noise flag."""
    old = {row.name: row for row in before if row.status == "FINISHED"}
    header = ["job", "quality", "ppl", "KLD mean", "tok/s lowest", "tok/s highest", "capacity", "memory MB"]
    body = []
    for row in after:
        was = old.get(row.name)
        if was is None or row.status != "FINISHED":
            continue
        q_old, q_new = was.quality(), row.quality()
        low, high = min(row.levels, default=None), max(row.levels, default=None)
        body.append([
            row.name,
            render.change(q_old[1] if q_old else None, q_new[1] if q_new else None, 0.0),
            render.change(was.ppl, row.ppl, 0.0, 4),
            render.change(was.kld_mean, row.kld_mean, 0.0, 4),
            render.change(was.speed(low), row.speed(low), cfg.speed_noise, 1) if low else "-",
            render.change(was.speed(high), row.speed(high), cfg.speed_noise, 1) if high else "-",
            render.change(_v(was.capacity), _v(row.capacity), 0.0, 0),
            render.change(_v(was.memory_mb), _v(row.memory_mb), 0.01, 0),
        ])  # fmt: skip
        for name, acc in row.accuracy.items():
            if name in was.accuracy:
                body[-1][1] += f"; {name}: " + render.change(was.accuracy[name].score, acc.score, 0.0)
    return render.Comparison(names[0], names[1], header, body)


def _v(number: float) -> Value | None:
    return None if math.isnan(number) else Value(number, 0.0)


def constraints_text(cfg: ReportConfig) -> str:
    parts = []
    if cfg.min_recovery is not None:
        parts.append(f"accuracy recovery >= {cfg.min_recovery}")
    if cfg.max_ppl_ratio is not None:
        parts.append(f"perplexity ratio <= {cfg.max_ppl_ratio}")
    if cfg.max_memory_mb is not None:
        parts.append(f"peak memory <= {cfg.max_memory_mb:.0f} MB")
    parts.append(f"speed noise {cfg.speed_noise:.0%} where a load test ran once")
    return ", ".join(parts)


def write(
    title: str, sections: list[render.Section], cfg: ReportConfig, folder: Path, comparison=None
) -> Written:
    """report.md, report.csv, report.html and figures/*.png in `folder` (replaced whole)."""
    folder.mkdir(parents=True, exist_ok=True)
    figure_dir = folder / "figures"
    figure_dir.mkdir(exist_ok=True)
    for old in figure_dir.glob("*.png"):
        old.unlink()
    saved = []
    many = len(sections) > 1
    for section in sections:
        drawn, section.figures = section.figures, {}
        for name, fig in drawn.items():
            file = f"{section.model}-{name}" if many else name  # the Markdown links by file name
            fig.savefig(figure_dir / file, dpi=110)
            plt.close(fig)
            saved.append(figure_dir / file)
            section.figures[file] = (figure_dir / file).read_bytes()  # the HTML page inlines these
    constraints = constraints_text(cfg)
    written = Written(folder, folder / "report.md", folder / "report.csv", folder / "report.html", saved)
    written.markdown.write_text(render.markdown(title, sections, constraints, comparison), encoding="utf-8")
    written.csv.write_text(render.csv_text(sections), encoding="utf-8")
    written.html.write_text(render.html_page(title, sections, constraints, comparison), encoding="utf-8")
    return written


def log_to_run(client, run_id: str, written: Written, sections: list[render.Section]) -> None:
    """The report on an MLflow run: its files under report/ (the figures as images the UI shows),
    the evidence as MLflow tables, and the recommendation as the run's description. Logging it
    again replaces it."""
    import json

    import pandas as pd
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    for path in (written.markdown, written.csv, written.html):
        client.log_artifact(run_id, str(path), "report")
    for path in written.figures:
        client.log_artifact(run_id, str(path), "report/figures")
    tables = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    for section in sections:
        header, body = render.table(section.rows)
        # MlflowClient.log_table's format (pandas "split"), written whole: log_table would append.
        path = written.folder / f"{section.model}-table.json"
        pd.DataFrame(body, columns=header).to_json(path, orient="split", index=False)
        client.log_artifact(run_id, str(path), "report")
        entry = {"path": f"report/{path.name}", "type": "table"}
        if entry not in tables:
            tables.append(entry)
    client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(tables))
    note = "\n".join(f"- {pick.sentence()}" for section in sections for pick in section.picks)
    client.set_tag(run_id, "mlflow.note.content", f"qsweep report (report/report.html):\n\n{note}")
    client.set_tag(run_id, "qsweep.report", str(written.html))


def rows_for(client, run_ids: list[str]) -> list[JobRow]:
    return load_rows(client, [run for parent in run_ids for run in sweep_runs(client, parent)])


def sweep_report(
    client, parent_id: str, cfg: ReportConfig, folder: Path, against: str | None = None
) -> Written:
    """The report of one sweep, written to `folder` and logged to its parent run."""
    rows = rows_for(client, [parent_id])
    if not rows:
        raise QsweepError(f"sweep run {parent_id} has no jobs")
    comparison = None
    if against:
        names = (_sweep_name(client, against), _sweep_name(client, parent_id))
        comparison = compare_sweeps(rows_for(client, [against]), rows, cfg, names)
    sections = sections_of(rows, cfg)
    written = write(f"qsweep report: {_sweep_name(client, parent_id)}", sections, cfg, folder, comparison)
    log_to_run(client, parent_id, written, sections)
    return written


def _sweep_name(client, run_id: str) -> str:
    try:
        return client.get_run(run_id).info.run_name or run_id
    except Exception:  # noqa: BLE001 - a name is only for the title
        return run_id
