"""Typed config schemas, registered in Hydra's ConfigStore so a wrong key or type fails at compose time.

Users write YAML under conf/; each YAML file names its schema in its defaults list
(`- gguf_schema`), Hydra's "schema in the same config group" pattern.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from qsweep.benchmarks import accuracy, kld, perf, ppl
from qsweep.calibration import CalibrationConfig
from qsweep.engines import llamacpp, vllm
from qsweep.envs import REPO_ROOT, default_home
from qsweep.gates import GatesConfig
from qsweep.methods import baseline, gguf, llmcompressor
from qsweep.models import ModelConfig

CONF_DIR = REPO_ROOT / "conf"


@dataclass
class PathsConfig:
    home: str = str(default_home())
    model_cache: str = "${paths.home}/cache/models"
    artifact_cache: str = "${paths.home}/cache/artifacts"
    outputs: str = "${paths.home}/outputs"
    mlruns: str = str(REPO_ROOT / "mlruns")


@dataclass
class TrackingConfig:
    uri: str | None = None  # default: SQLite under paths.mlruns; or a shared tracking server's URI
    experiment: str = "qsweep"


@dataclass
class BenchmarksConfig:
    """One optional entry per benchmark; `benchmark=[ppl]` selects which run."""

    ppl: ppl.Config | None = None
    perf: perf.Config | None = None
    accuracy: accuracy.Config | None = None
    kld: kld.Config | None = None


@dataclass
class QsweepConfig:
    model: ModelConfig = MISSING
    method: Any = MISSING  # a method schema, chosen by the method's YAML
    engine: Any = MISSING  # an engine schema, chosen by the engine's YAML
    benchmark: BenchmarksConfig = field(default_factory=BenchmarksConfig)
    # Calibration data shared by every calibrated method of a sweep (methods point at it with
    # ${calibration}), so `calibration.num_samples=8` applies across a sweep of mixed methods.
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


SCHEMAS = {
    # (group, name): (schema, package)
    ("method", "baseline_schema"): (baseline.Config, None),
    ("method", "gguf_schema"): (gguf.Config, None),
    ("method", "llmcompressor_schema"): (llmcompressor.Config, None),
    ("engine", "llamacpp_schema"): (llamacpp.Config, None),
    ("engine", "vllm_schema"): (vllm.Config, None),
    ("benchmark", "ppl_schema"): (ppl.Config, "benchmark.ppl"),
    ("benchmark", "perf_schema"): (perf.Config, "benchmark.perf"),
    ("benchmark", "accuracy_schema"): (accuracy.Config, "benchmark.accuracy"),
    ("benchmark", "kld_schema"): (kld.Config, "benchmark.kld"),
}


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="qsweep_schema", node=QsweepConfig)
    for (group, name), (node, package) in SCHEMAS.items():
        store.store(group=group, name=name, node=node, package=package)


def is_schema(option: str) -> bool:
    return option.endswith("_schema")
