"""A sweep as a whole: its MLflow parent run, its summary, and its exit code.

Hydra calls `SweepCallback` (conf/config.yaml) in the controller process, whatever the launcher:
it opens the parent run before the first job and, after the last, reads the jobs' recorded
outcomes back from MLflow, prints the summary, closes the parent run and, if any job failed,
raises `SweepFailed`, which the CLI turns into exit code 1. Jobs record their own outcome (Hydra's
BasicSweeper skips `on_multirun_end` when a job raises; qsweep's jobs never do).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qsweep import procs, redact, sanity, tracking

log = logging.getLogger(__name__)

PARENT_ID_FILE = "mlflow_parent_run_id"


@dataclass(frozen=True)
class JobOutcome:
    """What a job returns to Hydra once its run is recorded."""

    name: str
    status: str  # FINISHED, FAILED, KILLED or SKIPPED
    run_id: str | None = None


class SweepFailed(SystemExit):
    """Some jobs failed: the process exits with code 1 after the sweep's summary."""

    def __init__(self, failed: list[str]):
        super().__init__(1)
        self.failed = failed

    def __str__(self) -> str:
        return f"{len(self.failed)} job(s) failed: {', '.join(self.failed)}"


def sweep_began(sweep_dir: Path) -> float:
    """When the sweep began (its parent run was made), for every job of it under any launcher."""
    try:
        return (sweep_dir / PARENT_ID_FILE).stat().st_mtime
    except OSError:
        return time.time()


def parent_run_id(sweep_dir: Path) -> str | None:
    try:
        return (sweep_dir / PARENT_ID_FILE).read_text().strip() or None
    except OSError:
        return None


@functools.cache
def sweep_swept_keys(sweep_dir: Path) -> frozenset[str]:
    """The keys the sweep varies besides model, method and engine (`plan.swept_keys`), from the
    command line and sweeper params Hydra saved in the sweep's multirun.yaml (a job sees only its
    own values)."""
    from omegaconf import OmegaConf

    from qsweep.plan import swept_keys

    try:
        saved = OmegaConf.load(sweep_dir / "multirun.yaml").hydra
    except OSError:
        return frozenset()
    return swept_keys(list(saved.overrides.task), saved.sweeper.params)


def closes_runs_on_error(hook):
    """A callback hook that, when it fails, closes this process's open runs (the parent's, mostly)
    FAILED with the error before Hydra reports it."""

    @functools.wraps(hook)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return hook(*args, **kwargs)
        except SweepFailed:
            raise
        except Exception as err:
            why = f"the sweep stopped ({hook.__name__}): {type(err).__name__}: {err}"
            tracking.close_open_runs("FAILED", why)
            raise

    return wrapper


class SweepCallback(Callback):
    """Opens the sweep's parent run before the first job, closes it after the last, and decides the
    exit code from the jobs' runs."""

    def __getstate__(self) -> dict:
        # Launchers (joblib, submitit) send the callbacks to their workers: the parent run's
        # heartbeat thread stays in the controller.
        return {k: v for k, v in self.__dict__.items() if k != "heartbeat"}

    @closes_runs_on_error
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        client, experiment_id = tracking.client_for(config)
        close_abandoned(client, experiment_id)

    @closes_runs_on_error
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        client, experiment_id = tracking.client_for(config)
        close_abandoned(client, experiment_id)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        tags = {
            **tracking.environment_tags(),
            **tracking.owner_tags(),
            "qsweep.kind": "sweep",
            "qsweep.sweep_dir": str(sweep_dir),
            "qsweep.command": redact.text(" ".join(config.hydra.overrides.task), also=secrets_of(config)),
        }
        with procs.interrupts_deferred():
            run = client.create_run(experiment_id, run_name=f"sweep {sweep_dir.name}", tags=tags)
            tracking.opened(client, run.info.run_id)
        (sweep_dir / PARENT_ID_FILE).write_text(run.info.run_id)
        self.heartbeat = tracking.Heartbeat(client, run.info.run_id)
        log.info("sweep %s: MLflow parent run %s", sweep_dir.name, run.info.run_id)

    @closes_runs_on_error
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        run_id = parent_run_id(Path(config.hydra.sweep.dir))
        if run_id is None:
            return
        if getattr(self, "heartbeat", None):
            self.heartbeat.stop()
        client, experiment_id = tracking.client_for(config)
        children = tracking.sweep_jobs(client, experiment_id, run_id)
        flag_disagreeing_baselines(client, children)
        log.info("sweep summary:\n%s", summary_table(children))
        write_report(client, run_id, config)
        if client.get_run(run_id).info.status == "RUNNING":
            unfinished = any(c.info.status != "FINISHED" for c in children)
            tracking.terminate(client, run_id, "FAILED" if unfinished else "FINISHED")
        failed = [c.info.run_name for c in children if c.info.status == "FAILED"]
        if failed:
            raise SweepFailed(failed)

    def on_run_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        """A single job (no -m): its own recorded outcome decides the exit code."""
        if job_return is None or job_return.status != JobStatus.COMPLETED:
            return  # a job that raised: Hydra reports it
        outcome = job_return.return_value
        if isinstance(outcome, JobOutcome) and outcome.status == "FAILED":
            raise SweepFailed([outcome.name])


def flag_disagreeing_baselines(client, runs: list) -> None:
    """The same unquantized model scored on the same text by two engines must agree (`sanity`);
    when it does not, both runs are flagged suspect (a tokenizer or conversion problem)."""
    groups: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        tags, params = run.data.tags, run.data.params
        if (
            run.info.status == "FINISHED"
            and tags.get("qsweep.baseline") == "true"
            and "ppl" in run.data.metrics
        ):
            text = tuple(
                sorted((k, v) for k, v in params.items() if k.startswith(("benchmark.ppl.", "model.")))
            )
            groups.setdefault(text, {})[tags.get("choice.engine", "?")] = run
    for by_engine in groups.values():
        why = sanity.baselines_disagree({e: r.data.metrics["ppl"] for e, r in by_engine.items()})
        if why:
            log.warning("  suspect: %s", why)
            for run in by_engine.values():
                earlier = run.data.tags.get("qsweep.suspect")
                client.set_tag(run.info.run_id, "qsweep.suspect", f"{earlier}; {why}" if earlier else why)
                run.data.tags["qsweep.suspect"] = why


def write_report(client, parent_id: str, config: DictConfig) -> None:
    """The sweep's decision report, in its folder and on its parent run; a report that cannot be
    written is said, never a reason to fail the sweep (its jobs' results are all recorded)."""
    from omegaconf import OmegaConf

    from qsweep.report.decide import ReportConfig

    try:
        cfg = cast(ReportConfig, OmegaConf.to_object(config.report))  # the schema types the section
        if not cfg.at_end:
            return
        from qsweep.report import build  # here: it imports matplotlib, a second that at_end=false saves

        written = build.sweep_report(client, parent_id, cfg, Path(config.hydra.sweep.dir) / "report")
        log.info("report: %s", written.html)
    except Exception as err:  # noqa: BLE001 - see the docstring
        log.error("could not write the sweep's report: %s: %s", type(err).__name__, err)
        log.debug("report failure", exc_info=True)


def secrets_of(config: DictConfig) -> list[str]:
    """The secret values in a sweep's config (`redact`), to keep them out of its command tag."""
    from omegaconf import OmegaConf

    settings = cast(dict, OmegaConf.to_container(config, resolve=False, enum_to_str=True))
    settings.pop("hydra", None)
    return redact.secret_values(settings)


def close_abandoned(client, experiment_id: str) -> None:
    closed = tracking.close_abandoned_runs(client, experiment_id)
    if closed:
        log.warning(
            "  marked %d abandoned run(s) FAILED (their qsweep was killed): %s",
            len(closed),
            ", ".join(closed),
        )


def shorten(text: str, width: int) -> str:
    """The start of a long reason for a table cell (the run's tag keeps all of it)."""
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def summary_table(runs: list) -> str:
    """The sweep's jobs, one line each, for the terminal. `reused`: the run whose results a job took
    instead of measuring (`partly` when it measured some). `ppl/base` is the perplexity ratio to the
    baseline, `~` when its 95% interval includes 1 (no evidence of a difference)."""
    row = "{:<40} {:<9} {:<9} {:>9} {:>9} {:>8} {:>6}  {}"
    header = row.format("job", "status", "reused", "ppl", "ppl/base", "size MB", "bpw", "out tok/s")
    lines = [header]
    for run in runs:
        m, tags = run.data.metrics, run.data.tags
        ppl = f"{m['ppl']:.4f}" if "ppl" in m else "-"
        ratio = (
            f"{m['ppl_ratio']:.4f}" + ("~" if m.get("ppl_within_noise") else " ") if "ppl_ratio" in m else "-"
        )
        size = f"{m['artifact_size_mb']:.0f}" if "artifact_size_mb" in m else "-"
        bpw = f"{m['bits_per_weight']:.2f}" if "bits_per_weight" in m else "-"
        levels = sorted(
            (int(match.group(1)), value)
            for key, value in m.items()
            if (match := re.fullmatch(r"perf_output_tok_s_c(\d+)", key))
        )
        speed = " ".join(f"c{c}:{value:.0f}" for c, value in levels) or "-"
        status = "SKIPPED" if "qsweep.skipped" in tags else run.info.status
        reused = {"all": tags.get("qsweep.reused_from", "")[:8], "partly": "partly"}.get(
            tags.get("qsweep.reused"), "-"
        )
        note = f"  ({shorten(tags['qsweep.skipped'], 70)})" if status == "SKIPPED" else ""
        if "qsweep.gates_missed" in tags:
            note += f"  MISSED GATES: {tags['qsweep.gates_missed']}"
        if "qsweep.suspect" in tags:
            note += f"  SUSPECT: {shorten(tags['qsweep.suspect'], 70)}"
        lines.append(row.format(run.info.run_name, status, reused, ppl, ratio, size, bpw, speed + note))
    return "\n".join(lines)
