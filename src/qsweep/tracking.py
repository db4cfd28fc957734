"""MLflow layout: a parent run per multirun sweep, a child run per job, in a SQLite store under
mlruns/ (absolute URI, since Hydra jobs may run from other directories) or a tracking server.

A job records everything through one `JobRecorder`; the sweep's parent run is recorded by the
sweep callback (`sweep.py`). Nothing else in qsweep calls MLflow.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import qsweep
from qsweep import envs, procs, redact
from qsweep.context import Artifact, BenchmarkResult
from qsweep.errors import QsweepError
from qsweep.measure import Served
from qsweep.models import PreparedModel
from qsweep.plan import JobPlan
from qsweep.results import StoredResult

log = logging.getLogger(__name__)
# The MLflow UI opens an experiment by its kind: a model-training experiment shows the runs table
# with metric columns and charts; without the tag MLflow 3 lands on a GenAI traces overview.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# Groups whose settings become run params; paths and tracking are machine-specific, not the experiment.
PARAM_GROUPS = ("model", "method", "engine", "benchmark")


def tracking_uri(cfg: DictConfig) -> str:
    if cfg.tracking.uri:
        return str(cfg.tracking.uri)
    return f"sqlite:///{Path(cfg.paths.mlruns).resolve() / 'mlflow.db'}"


# Store URI schemes MLflow can track to (a typo in one fails here, not in a job).
STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "file", "http", "https", "databricks")


def creatable(path: Path) -> str | None:
    """Why folder `path` cannot be made (a file in the way, no permission), or None."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_store(cfg) -> None:
    """Pre-flight: the folders qsweep writes can be made, and a store other than a SQLite file can
    be opened and written (the experiment is made if new); QsweepError with one line naming the
    setting."""
    for name in ("mlruns", "outputs", "artifact_cache", "model_cache"):
        why = creatable(Path(getattr(cfg.paths, name)).expanduser())
        if why:
            raise QsweepError(
                f"paths.{name}={getattr(cfg.paths, name)} cannot be created: {why}; fix paths.{name}"
            )
    uri = tracking_uri(cfg)
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()  # postgresql+psycopg2 -> postgresql
    if not uri.startswith("/") and ("://" not in uri or scheme not in STORE_SCHEMES):
        raise QsweepError(
            f"tracking.uri={uri} is not a store MLflow can track to: use http(s)://host:port, "
            "sqlite:///file.db or a database URI, or leave it unset for mlruns/"
        )
    if scheme in ("http", "https"):  # MLflow's client would retry for minutes: ask once, briefly
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5).close()
        except (OSError, urllib.error.URLError) as err:
            reason = getattr(err, "reason", None) or err
            raise QsweepError(
                f"tracking.uri={uri} does not answer ({reason}): start the server or fix the URI"
            ) from None
    if scheme != "sqlite":  # a SQLite file in a folder that can be made opens; others must be tried
        client_for(cfg)


# SQLite's words for a write lock held by another connection, as MLflow passes them on (also from
# a tracking server on SQLite, in its error reply); nothing else is waited out.
LOCKED_STORE = ("database is locked", "database table is locked")


def store_locked(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is SQLite refusing a write because another writer holds it."""
    seen: BaseException | None = err
    while seen is not None:
        if any(words in str(seen).lower() for words in LOCKED_STORE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def patiently(call, what: str, patience_s: float = 600.0):
    """`call()`, retried while the MLflow store is locked by another writer (SQLite takes one
    writer at a time: a sweep beside another, `mlflow ui` migrating it), for up to `patience_s`."""
    deadline, delay = time.monotonic() + patience_s, 1.0
    while True:
        try:
            return call()
        except Exception as err:
            if not store_locked(err) or time.monotonic() + delay > deadline:
                raise
            log.warning("  the MLflow store is locked by another writer: %s again in %.0f s", what, delay)
            time.sleep(delay)
            delay = min(2 * delay, 30.0)


class PatientClient:
    """An MlflowClient whose every call waits out a locked store (`patiently`), so a measurement is
    recorded late rather than lost."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: patiently(lambda: attr(*args, **kwargs), name)


def client_for(cfg: DictConfig):
    """An MlflowClient on the configured store, with the experiment created once under a file lock
    (parallel jobs otherwise race on SQLite's schema migration)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    lock_dir = Path(cfg.paths.mlruns).resolve()
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise QsweepError(f"paths.mlruns={cfg.paths.mlruns} cannot be created: {err.strerror}") from None
    with open(lock_dir / ".qsweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            create_sqlite_store(uri)
            client = PatientClient(patiently(lambda: MlflowClient(tracking_uri=uri), "open"))
            experiment = client.get_experiment_by_name(cfg.tracking.experiment)
            if experiment is None:
                artifacts = None if cfg.tracking.uri else (lock_dir / "artifacts").as_uri()
                experiment_id = client.create_experiment(
                    cfg.tracking.experiment, artifact_location=artifacts, tags=EXPERIMENT_TAGS
                )
            else:
                experiment_id = experiment.experiment_id
                for key, value in EXPERIMENT_TAGS.items():
                    if experiment.tags.get(key) != value:  # made by an older qsweep
                        client.set_experiment_tag(experiment_id, key, value)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise QsweepError(f"cannot open the MLflow store {uri} (tracking.uri): {first[:300]}") from None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client, experiment_id


def create_sqlite_store(uri: str) -> None:
    """A new SQLite store is made whole or not at all: MLflow's schema migrations run on a file
    beside it, which is then renamed into place. Made in place, a process killed during them left a
    store that no later MLflow could open ("table _alembic_tmp_... already exists"). Call under the
    store's lock."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:////") else None
    if path is None or path.exists():
        return
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):  # of a creation killed under this lock
        leftover.unlink(missing_ok=True)
    # a name of its own each time: MLflow keeps a store per URI for the life of the process
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        made = MlflowClient(tracking_uri=f"sqlite:///{partial}")
        made.search_experiments(max_results=1)  # migrations, and MLflow's Default experiment
        engine = getattr(made._tracking_client.store, "engine", None)
        if engine is not None:
            engine.dispose()  # its connections to the file, which is renamed next
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Leaf values as 'a.b.c' -> str, with secrets masked (`redact`)."""
    out: dict[str, str] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        key = prefix.rstrip(".")
        masked = redact.tree({key: node})[key]
        out[key] = redact.text("" if masked is None else str(masked))[:6000]
    return out


def run_params(cfg: DictConfig, choices: dict[str, Any], names: dict[str, str]) -> dict[str, str]:
    """The experiment's settings as params: every model/method/engine/benchmark value, the group
    choices, and the names the run is known by (`method.name`: the method option)."""
    params = {}
    for group in PARAM_GROUPS:
        params.update(
            flatten(OmegaConf.to_container(cfg[group], resolve=True, enum_to_str=True), f"{group}.")
        )
    params.update({f"choice.{k}": str(v) for k, v in choices.items() if not k.startswith("hydra")})
    params.update({f"{group}.name": name for group, name in names.items()})
    return params


def environment_tags() -> dict[str, str]:
    cpu = envs.cpu_model() or platform.processor() or "unknown"
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


def stage_env_tags(env: envs.StageEnv, spec: envs.StageEnvSpec) -> dict[str, str]:
    """`env.<stage>.<package>` -> version for the packages that decide results (`spec.key_packages`)."""
    versions = env.package_versions()
    return {f"env.{spec.name}.{pkg}": versions[pkg] for pkg in spec.key_packages if pkg in versions}


# A run that the process on this host which made it no longer runs, or one on another host silent
# for this long (its heartbeat tag comes every HEARTBEAT_S), was abandoned: a killed controller, a
# lost node. The next sweep on the same store marks it FAILED.
HEARTBEAT_S = 60.0
ABANDONED_AFTER_S = 900.0


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot), or None if there is none: with the pid,
    it tells a live process from a later one that got the same pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_tags() -> dict[str, str]:
    """Which process makes and keeps a run, to tell later whether it is still alive."""
    return {
        "qsweep.pid": str(os.getpid()),
        "qsweep.process_start": _process_start(os.getpid()) or "",
        "qsweep.heartbeat": str(int(time.time())),
    }


class Heartbeat:
    """Updates a run's `qsweep.heartbeat` tag every HEARTBEAT_S from a daemon thread while it runs."""

    def __init__(self, client, run_id: str):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(client, run_id), daemon=True)
        self._thread.start()

    def _beat(self, client, run_id: str) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                client.set_tag(run_id, "qsweep.heartbeat", str(int(time.time())))
            except Exception:  # noqa: BLE001 - a missed beat is no failure; the next one may land
                log.debug("heartbeat of run %s not recorded", run_id, exc_info=True)

    def stop(self) -> None:
        self._stop.set()


# The runs this process made and has not closed: whatever ends the process (an exception, a signal,
# a QsweepError at plan time) closes them with the reason (`close_open_runs`, from the CLI), so only
# a process that was killed outright leaves a run RUNNING for the next sweep to close.
_open_runs: dict[str, Any] = {}  # run id -> its client
_closed_statuses: list[str] = []  # the status of each run this process closed, in order
_open_runs_lock = threading.Lock()


def opened(client, run_id: str) -> None:
    with _open_runs_lock:
        _open_runs[run_id] = client


def terminate(client, run_id: str, status: str) -> None:
    """Close a run this process made (set_terminated), and forget it."""
    client.set_terminated(run_id, status)
    with _open_runs_lock:
        if _open_runs.pop(run_id, None) is not None:
            _closed_statuses.append(status)


def open_runs() -> list[str]:
    with _open_runs_lock:
        return list(_open_runs)


def closed_statuses() -> list[str]:
    """The statuses this process closed its runs with (FINISHED, FAILED, KILLED), in order."""
    with _open_runs_lock:
        return list(_closed_statuses)


def close_open_runs(status: str, reason: str) -> list[str]:
    """Close every run this process made and left open, with `status` and tag `qsweep.error` (kept if
    the run has one); returns their ids. Best effort: a store that fails now is said, not raised."""
    with _open_runs_lock:
        left = dict(_open_runs)
    closed = []
    for run_id, client in left.items():
        try:
            run = client.get_run(run_id)
            if run.info.status != "RUNNING":  # closed, and interrupted before it was forgotten
                with _open_runs_lock:
                    _open_runs.pop(run_id, None)
                    _closed_statuses.append(run.info.status)
                continue
            if "qsweep.error" not in run.data.tags:
                client.set_tag(run_id, "qsweep.error", reason[:5000])
            terminate(client, run_id, status)
            closed.append(run_id)
        except Exception as err:  # noqa: BLE001 - the next sweep's abandoned-run check is the fallback
            log.error("could not close MLflow run %s (%s): %s", run_id, reason, err)
    return closed


def close_abandoned_runs(client, experiment_id: str) -> list[str]:
    """Mark FAILED, with the reason, the RUNNING qsweep runs of this experiment that nobody runs any
    more; returns their names."""
    host, now, closed = socket.gethostname(), time.time(), []
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000
    )
    for run in running:
        tags = run.data.tags
        if "qsweep.pid" not in tags:
            continue  # not made by a qsweep that says who keeps it
        if tags.get("host") == host:
            pid = int(tags["qsweep.pid"])
            if _process_start(pid) == tags.get("qsweep.process_start"):
                continue
            why = (
                f"abandoned: the qsweep process that ran it ({pid} on {host}) was killed outright "
                "(SIGKILL, out of memory, power loss): one that exits any other way closes its runs"
            )
        else:
            beat = float(tags.get("qsweep.heartbeat") or 0)
            if now - beat < ABANDONED_AFTER_S:
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(beat))
            why = f"abandoned: no heartbeat from {tags.get('host')} since {since} (process or node lost)"
        client.set_tag(run.info.run_id, "qsweep.error", why)
        client.set_terminated(run.info.run_id, "FAILED")
        closed.append(run.info.run_name)
    return closed


def sweep_jobs(client, experiment_id: str, parent_id: str) -> list:
    """A sweep's job runs (children of its parent run), in the order they started."""
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=5000,
    )


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k[:250], v) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(client, run_id: str, metrics: Mapping[str, float | None], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    for start in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[start : start + 500])


def log_result(client, run_id: str, result: BenchmarkResult) -> None:
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


class JobRecorder:
    """Every MLflow call of one job: the job says what happened (a stage's outcome, a metric, a
    file) and this turns it into params, metrics, tags and artifacts on the job's run."""

    def __init__(self, client, run_id: str, parent_id: str | None, secrets: Sequence[str] = ()):
        self.client, self.run_id, self.parent_id = client, run_id, parent_id
        self.secrets = list(secrets)  # the config's secret values, masked in the logs it keeps
        self.heartbeat = Heartbeat(client, run_id)

    @classmethod
    def start(cls, cfg: DictConfig, plan: JobPlan, job_dir: Path, parent_id: str | None) -> JobRecorder:
        """Create the job's run (a child of the sweep's parent run, if any) with its settings."""
        client, experiment_id = client_for(cfg)
        tags = {
            **environment_tags(),
            **owner_tags(),
            "qsweep.kind": "job",
            "qsweep.baseline": str(not plan.quantizes).lower(),
            "qsweep.job_dir": str(job_dir),
            **{f"choice.{k}": str(v) for k, v in plan.choices.items()},
        }
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        with procs.interrupts_deferred():
            run_id = client.create_run(experiment_id, run_name=plan.name, tags=tags).info.run_id
            opened(client, run_id)
        recorder = cls(client, run_id, parent_id)
        try:
            names = {"model": plan.model_name, "method": plan.method_option, "engine": plan.engine_option}
            log_params(client, run_id, run_params(cfg, plan.choices, names))
            recorder.config(cfg)
            if plan.skipped_benchmarks and not plan.skip_reason:
                client.set_tag(run_id, "qsweep.skipped_benchmarks", "; ".join(
                    f"{name}: {why}" for name, why in plan.skipped_benchmarks.items()))  # fmt: skip
        except Exception as err:
            error = f"could not record the job's settings: {type(err).__name__}: {err}"
            recorder.finish("FAILED", error, traceback.format_exc(), {}, [], [])
            raise QsweepError(error) from err
        log.info("job %s: MLflow run %s", plan.name, run_id)
        return recorder

    @classmethod
    def unplanned(
        cls, cfg: DictConfig, name: str, choices: dict, job_dir: Path, parent_id: str | None, error: str
    ) -> str:
        """A job whose plan failed in its own process (a port taken since the pre-flight): a FAILED
        run of its sweep with the reason and its config, so the sweep goes on and counts it."""
        client, experiment_id = client_for(cfg)
        tags = {**environment_tags(), **owner_tags(), "qsweep.kind": "job", "qsweep.job_dir": str(job_dir)}
        tags |= {f"choice.{k}": str(v) for k, v in choices.items()}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        with procs.interrupts_deferred():
            run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
            opened(client, run_id)
        recorder = cls(client, run_id, parent_id)
        with contextlib.suppress(Exception):  # the error matters more than the config's copy
            recorder.config(cfg)
        recorder.finish("FAILED", error, None, {}, [], [])
        return run_id

    def config(self, cfg: DictConfig) -> None:
        """The job's whole config as `config.yaml`, secrets masked (and remembered, to mask logs)."""
        config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        self.secrets = redact.secret_values(config)
        self.client.log_dict(self.run_id, redact.tree(config), "config.yaml")

    def failed_siblings(self) -> list[str]:
        """The names of this sweep's jobs recorded FAILED so far (under a parallel launcher, those
        still running are not known yet)."""
        run = self.client.get_run(self.run_id)
        failed = self.client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}' and attributes.status = 'FAILED'",
        )
        return [r.info.run_name for r in failed]

    def skipped(self, reason: str) -> None:
        """An unsupported method x engine pair: recorded as a finished run with its reason."""
        self.heartbeat.stop()
        self.client.set_tag(self.run_id, "qsweep.skipped", reason)
        terminate(self.client, self.run_id, "FINISHED")

    def model(self, model: PreparedModel) -> None:
        self.client.set_tag(self.run_id, "model.cache_hit", str(model.cache_hit).lower())
        # how closely the checkpoint reproduces the GGUF it was made from
        numbers = {k: v for k, v in model.checked.items() if isinstance(v, float)}
        log_params(self.client, self.run_id, {f"model.check.{k}": f"{v:.4f}" for k, v in numbers.items()})

    def artifact(self, artifact: Artifact) -> None:
        log_metrics(self.client, self.run_id, artifact.metrics)
        log_params(self.client, self.run_id, artifact.params)
        self.client.set_tag(self.run_id, "artifact.cache_hit", str(artifact.cache_hit).lower())
        self.client.log_dict(self.run_id, artifact.info, "artifact_info.json")
        for name, path in artifact.logs.items():
            redact.file(Path(path), self.secrets)
            self.client.log_artifact(self.run_id, str(path), f"quantize_logs/{Path(name).stem}")

    def stage_envs(self, used: list[tuple[envs.StageEnvSpec, envs.StageEnv]]) -> None:
        """Versions of the packages that decide results, per stage environment, and each full list."""
        for spec, env in used:
            info = env.info()
            for key, value in stage_env_tags(env, spec).items():
                self.client.set_tag(self.run_id, key, value)
            if "llama_cpp_build" in info:
                self.client.set_tag(self.run_id, "llama_cpp.build", info["llama_cpp_build"])
                self.client.set_tag(self.run_id, "llama_cpp.cpu_target", info.get("cpu_target", "native"))
            packages = "\n".join(info.get("packages", []))
            self.client.log_text(self.run_id, packages, f"envs/{spec.name}-packages.txt")

    def kernels(self, kernels: str) -> None:
        """The engine's kernel path on this machine (`Engine.kernels`), tag `engine.kernels`."""
        if kernels:
            self.client.set_tag(self.run_id, "engine.kernels", kernels[:5000])

    def devices(self, gpus: list[str]) -> None:
        """The GPUs the job held (as CUDA_VISIBLE_DEVICES named them for it): params `job.gpus`
        and `job.gpu_count`, which the report compares across runs."""
        params = {"job.gpus": ",".join(gpus) or "none", "job.gpu_count": str(len(gpus))}
        log_params(self.client, self.run_id, params)

    def preset(self, changed: dict[str, Any]) -> None:
        log_params(self.client, self.run_id, {f"served.{k}": str(v) for k, v in changed.items()})

    def served(self, served: Served) -> None:
        log_metrics(
            self.client, self.run_id, {"server_start_s": served.start_s, "smoke_latency_s": served.latency_s}
        )
        if served.reply is not None:
            text = f"prompt: {served.prompt}\nreply: {served.reply}\n"
            self.client.log_text(self.run_id, text, "smoke_completion.txt")

    def result(self, result: BenchmarkResult) -> None:
        log_result(self.client, self.run_id, result)

    def reused(self, name: str, stored: StoredResult, deltas: dict[str, float]) -> None:
        """A benchmark's stored result standing in for a measurement: its metrics, curves and tables
        logged again, its files left with the run that measured it (tag `qsweep.reused.<name>`)."""
        log_result(self.client, self.run_id, stored.as_result())
        log_metrics(self.client, self.run_id, deltas)
        self.client.set_tag(self.run_id, f"qsweep.reused.{name}", stored.run_id)

    def reuse_summary(self, reused: dict, benchmarks: int) -> None:
        """Tags `qsweep.reused` (all / partly) and `qsweep.reused_from` (the measuring runs)."""
        self.client.set_tag(self.run_id, "qsweep.reused", "all" if len(reused) == benchmarks else "partly")
        sources = sorted({found.result.run_id for found in reused.values()})
        self.client.set_tag(self.run_id, "qsweep.reused_from", ",".join(sources))

    def metrics(self, metrics: dict[str, float]) -> None:
        log_metrics(self.client, self.run_id, metrics)

    def suspect(self, reasons: list[str]) -> None:
        """Figures that cannot be right (`sanity`): tag `qsweep.suspect`, kept out of recommendations."""
        self.client.set_tag(self.run_id, "qsweep.suspect", "; ".join(reasons)[:5000])

    def gates_missed(self, missed: list[str]) -> None:
        self.client.set_tag(self.run_id, "qsweep.gates_missed", "; ".join(missed))

    def finish(
        self,
        status: str,
        error: str,
        traceback_text: str | None,
        timings: dict[str, float],
        notes: list[str],
        files: list[Path],
    ) -> None:
        """Attach timings, notes, the error and the job's log files, and close the run (and the
        sweep's parent when the job was killed); never let MLflow hide the job's own error."""
        self.heartbeat.stop()
        try:
            log_metrics(self.client, self.run_id, timings)
            if error:
                self.client.set_tag(self.run_id, "qsweep.error", error[:5000])
            if traceback_text:
                self.client.log_text(self.run_id, traceback_text, "error_traceback.txt")
            if notes:
                self.client.set_tag(self.run_id, "qsweep.notes", "\n".join(notes)[:5000])
            for path in files:
                if path.is_file():
                    redact.file(path, self.secrets)  # a tool may have printed a secret it was given
                    self.client.log_artifact(self.run_id, str(path), "logs")
            terminate(self.client, self.run_id, status)
            if status == "KILLED" and self.parent_id:
                self.client.set_tag(self.parent_id, "qsweep.error", f"job {self.run_id} was interrupted")
                terminate(self.client, self.parent_id, "KILLED")
        except Exception as err:  # MLflow itself failing must not mask what happened to the job
            log.error(
                "could not finish MLflow run %s: %s; job details: %s", self.run_id, err, json.dumps(timings)
            )
