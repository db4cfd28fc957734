"""Typed config schemas, registered in Hydra's ConfigStore so a wrong key or type fails at compose time.

Users write YAML under conf/; each YAML option names its plug-in's schema in its defaults list
(`- gguf_schema`), Hydra's "schema in the same config group" pattern. The schemas come from the
plug-in registrations (`plugins.py`): `<group>/<name>_schema` for every method, engine and
benchmark, and one optional field per benchmark in the `benchmark` container.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from qsweep import plugins
from qsweep.benchmarks.base import BENCHMARKS
from qsweep.calibration import CalibrationConfig
from qsweep.devices import GpuSlotsConfig
from qsweep.envs import DEFAULT_HOME, HOME_ENV_VAR, REPO_ROOT, CpuWait
from qsweep.gates import GatesConfig
from qsweep.models import ModelConfig
from qsweep.report.decide import ReportConfig

CONF_DIR = REPO_ROOT / "conf"
SWEEPS_DIR = REPO_ROOT / "sweeps"  # the config group `sweeps` (+sweeps=NAME), added by hydra_plugins/


@dataclass
class PathsConfig:
    # $QSWEEP_HOME when set, read at compose time; caches and outputs follow `paths.home`.
    home: str = f"${{oc.env:{HOME_ENV_VAR},'{DEFAULT_HOME}'}}"
    # The stage environments stay where ./setup.sh built them ($QSWEEP_HOME/envs, else .qsweep/envs)
    # whatever `paths.home` says: moving the caches elsewhere needs no second set-up.
    envs: str = f"${{oc.env:{HOME_ENV_VAR},'{DEFAULT_HOME}'}}/envs"
    model_cache: str = "${paths.home}/cache/models"
    artifact_cache: str = "${paths.home}/cache/artifacts"
    outputs: str = "${paths.home}/outputs"
    mlruns: str = str(REPO_ROOT / "mlruns")


@dataclass
class TrackingConfig:
    uri: str | None = None  # default: SQLite under paths.mlruns; or a shared tracking server's URI
    experiment: str = "qsweep"


@dataclass
class QsweepConfig:
    model: ModelConfig = MISSING
    method: Any = MISSING  # a method schema, chosen by the method's YAML
    engine: Any = MISSING  # an engine schema, chosen by the engine's YAML
    benchmark: Any = MISSING  # the container made by `root_schema`: one optional field per benchmark
    # Calibration data shared by every calibrated method of a sweep (methods point at it with
    # ${calibration}), so `calibration.num_samples=8` applies across a sweep of mixed methods.
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    # The decision report's constraints (quality floor, memory cap) and how it reads speed.
    report: ReportConfig = field(default_factory=ReportConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Work to redo although its results exist: `rerun=[all]`, `rerun=[quantize]` (the artifacts, and
    # so every benchmark on them), or benchmark names (`rerun=[perf]`).
    rerun: list[str] = field(default_factory=list)
    # Stop a sweep at its first failed job: the jobs after it are recorded as not run (skipped).
    fail_fast: bool = False
    # Print what each job would do (skip, reuse, build, run, and for how long), run nothing.
    dry_run: bool = False
    # Let a parallel launcher (joblib, submitit_local) run jobs that time things side by side on a
    # CPU-only machine, where they measure each other; off, such a sweep is refused at pre-flight.
    parallel_timing: bool = False
    # Where engines run unless an engine says otherwise (engine.device follows it): auto picks a
    # CUDA GPU where one is present.
    device: str = "auto"
    # How jobs share out the machine's GPUs: each job holds its own (qsweep.devices).
    gpus: GpuSlotsConfig = field(default_factory=GpuSlotsConfig)
    # How the threads of untimed work (quantization, importance matrix, scoring) wait between
    # tasks: `sleep`, so that jobs side by side share the cores; `spin`, the tools' own default. An
    # engine's server always spins while a benchmark that times things runs on it.
    cpu_wait: CpuWait = CpuWait.sleep


def root_schema() -> type:
    """QsweepConfig with its `benchmark` container: one optional field per registered benchmark,
    so `benchmark=[ppl]` selects which run and `benchmark.pplx.n_ctx=1` fails at compose time."""
    container = dataclasses.make_dataclass(
        "BenchmarksConfig",
        [(name, Optional[bench.Config], None) for name, bench in BENCHMARKS.items()],  # noqa: UP045
    )
    return dataclasses.make_dataclass(
        "QsweepConfig", [("benchmark", container, field(default_factory=container))], bases=(QsweepConfig,)
    )


def register() -> None:
    """Store the root schema and every plug-in's schema in Hydra's ConfigStore."""
    store = ConfigStore.instance()
    store.store(name="qsweep_schema", node=root_schema())
    for registry in plugins.registries():
        for name, plugin in registry.items():
            package = f"{registry.group}.{name}" if registry is BENCHMARKS else None
            store.store(group=registry.group, name=schema_option(name), node=plugin.Config, package=package)


def schema_option(name: str) -> str:
    return f"{name}_schema"


def is_schema(option: str) -> bool:
    return option.endswith("_schema")


def compose(overrides: list[str], job_name: str = "qsweep"):
    """qsweep's config with these overrides, outside a sweep: for the commands that read a sweep's
    settings (paths, tracking, the report's constraints) without running one."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name=job_name):
        return hydra_compose("config", overrides=overrides)
