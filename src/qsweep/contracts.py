"""Checks of a registered plug-in against its kind's contract, beyond what Python's ABCs check.
The test suite runs them on every registered plug-in; a plug-in author can run them too:
`assert not contracts.problems(ENGINES.get("mine"))`."""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import OmegaConf

from qsweep.benchmarks.base import Benchmark
from qsweep.engines.base import Engine, EngineConfig
from qsweep.engines.served import CAPABILITIES, Load, ServedModel
from qsweep.envs import StageEnvSpec
from qsweep.methods.base import Method
from qsweep.settings import MINIMUM, NEUTRAL

FORMATS = ("gguf", "hf")  # artifact formats the built-in methods make and engines serve


def problems(plugin: Any) -> list[str]:
    """What `plugin` gets wrong about its contract; [] when nothing."""
    found = _common(plugin)
    if isinstance(plugin, Method):
        found += _formats(plugin.formats, "formats")
    elif isinstance(plugin, Engine):
        found += _engine(plugin)
    elif isinstance(plugin, Benchmark):
        found += _benchmark(plugin)
    else:
        found.append(f"{type(plugin).__name__} is no Method, Engine or Benchmark")
    return found


def _common(plugin: Any) -> list[str]:
    found = []
    if not getattr(type(plugin), "name", None):
        found.append("has no name: register it with @<REGISTRY>.register('<name>')")
    if not (type(plugin).__doc__ or "").strip():
        found.append("has no docstring: say in a line what it does")
    config = getattr(plugin, "Config", None)
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        found.append("Config must be a dataclass (its typed settings)")
        return found
    try:
        OmegaConf.structured(config)
    except Exception as err:  # noqa: BLE001 - any failure means Hydra cannot use it as a schema
        found.append(f"Config is not a valid OmegaConf schema: {str(err).splitlines()[0]}")
    env = getattr(plugin, "env", None)
    if env is not None and not isinstance(env, StageEnvSpec):
        found.append("env must be a StageEnvSpec or None")
    elif env is not None and not env.requirements.is_file():
        found.append(f"its stage environment's requirements file {env.requirements} is missing")
    return found


def _formats(formats: Any, what: str) -> list[str]:
    if not formats or not all(isinstance(f, str) for f in formats):
        return [f"{what} must list the artifact formats (e.g. {FORMATS})"]
    return []


def _engine(engine: Engine) -> list[str]:
    found = _formats(engine.formats, "formats")
    found += [
        f"not_served names {fmt}, which it serves" for fmt in engine.not_served if fmt in engine.formats
    ]
    if not (isinstance(engine.served_type, type) and issubclass(engine.served_type, ServedModel)):
        found.append("served_type must subclass ServedModel")
    elif not str(engine.served_type.health_path).startswith("/"):
        found.append("served_type.health_path must be the server's health path, e.g. /health")
    if not issubclass(engine.Config, EngineConfig):
        return [*found, "Config must subclass EngineConfig (host, port, timeouts, smoke test, fit_to_load)"]
    base = {f.name: f for f in dataclasses.fields(EngineConfig)}
    for f in dataclasses.fields(engine.Config):
        if f.name not in base:
            continue
        if base[f.name].metadata.get(NEUTRAL) and not f.metadata.get(NEUTRAL):
            found.append(f"Config.{f.name} redefines a result-neutral setting without `neutral(...)`")
        if base[f.name].metadata.get(MINIMUM) is not None and f.metadata.get(MINIMUM) is None:
            found.append(f"Config.{f.name} redefines a setting without its `minimum=`")
    return found


def _benchmark(benchmark: Benchmark) -> list[str]:
    found = [
        f"requires {cap!r}, which is no capability protocol"
        for cap in (*benchmark.requires, *benchmark.requires_any)
        if cap not in CAPABILITIES
    ]
    try:
        cfg = benchmark.Config()
    except TypeError as err:
        return [*found, f"Config() needs every setting to have a default ({err})"]
    load = benchmark.load(cfg)
    if not isinstance(load, Load):
        found.append("load() must return a Load")
    return found
