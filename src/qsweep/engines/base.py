"""The engine contract: how a plug-in serves an artifact for benchmarks to measure.

To add an engine: a module in this package with a `Config` (subclass `EngineConfig`) and an
`Engine[Config]` subclass registered with `@ENGINES.register("<name>")`, a YAML option in conf/engine/
(`defaults: [<name>_schema, _self_]`), its stage environment's requirements in envs/, a test, and
a row in docs/guide.md. Nothing else needs to know about it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from qsweep import envs
from qsweep.context import Artifact, JobContext
from qsweep.engines import http
from qsweep.engines.served import CAPABILITIES, Load, ServedModel
from qsweep.envs import StageEnvSpec
from qsweep.errors import QsweepError
from qsweep.plugins import Plugin, Registry
from qsweep.settings import below_minimum, neutral


@dataclass
class EngineConfig:
    """Settings every engine has. A subclass that changes a default must keep its mark
    (`neutral`, from qsweep.settings); mark its own settings `neutral` or `speed_only` where they
    leave results unchanged."""

    host: str = neutral("127.0.0.1")
    port: int = neutral(0)  # 0: a free port
    startup_timeout_s: int = neutral(300, minimum=1)
    request_timeout_s: int = neutral(300, minimum=1)
    smoke_prompt: str = neutral("The capital of France is")
    smoke_max_tokens: int = neutral(16, minimum=1)
    fit_to_load: bool = neutral(True)  # size the server for the benchmarks' declared load
    extra_args: list[str] = field(default_factory=list)  # passed to the server as they are


def check_common(cfg: EngineConfig) -> None:
    """The settings every engine has, checked at pre-flight: a port that is valid and free, and
    every field marked with a `minimum` (qsweep.settings) at least that."""
    if not 0 <= cfg.port <= 65535:
        raise QsweepError(f"engine.port={cfg.port} is not a port: use 1-65535, or 0 for a free one")
    if cfg.port:
        http.server_port(cfg.host, cfg.port)  # refused at once if another process listens there
    low = below_minimum(cfg)
    if low:
        name, value, minimum = low
        raise QsweepError(f"engine.{name}={value} must be at least {minimum:g}")


DEVICES = ("auto", "cpu", "cuda")


def chosen_device(setting: str) -> str:
    """An engine's `device` setting made concrete: auto is a CUDA GPU where one is, else the CPU;
    an unknown one is refused at pre-flight."""
    if setting not in DEVICES:
        raise QsweepError(f"engine.device={setting} must be auto, cpu or cuda")
    return ("cuda" if envs.has_cuda_gpu() else "cpu") if setting == "auto" else setting


def cuda_missing(setting: str) -> str | None:
    """Why a `device` setting cannot be served here (cuda asked for, no CUDA GPU), or None."""
    if setting == "cuda" and not envs.has_cuda_gpu():
        return "engine.device=cuda, and this machine has no CUDA GPU"
    return None


E = TypeVar("E", bound=EngineConfig)  # the plug-in's settings (its Config)


class Engine(Plugin[E], ABC):
    """Serves an artifact behind an OpenAI-compatible server for the job's benchmarks.

    Class attributes are the declaration the pre-flight reads before anything runs; `name` is set
    by the registration.
    """

    formats: ClassVar[tuple[str, ...]]  # artifact formats it serves ("gguf", "hf")
    # Formats tried and found not to load, with why (shown when a sweep skips such a pair).
    not_served: ClassVar[dict[str, str]] = {}
    env: ClassVar[StageEnvSpec | None]  # the stage environment its server runs in
    # What `serve` yields; the capability protocols it implements are what this engine can do.
    served_type: ClassVar[type[ServedModel]]

    @classmethod
    def capabilities(cls) -> frozenset[type]:
        """The capability protocols (engines/served.py) its served model implements."""
        return frozenset(cap for cap in CAPABILITIES if issubclass(cls.served_type, cap))

    def check(self, cfg: E) -> None:  # noqa: B027 - optional: most plug-ins have nothing to check
        """Side-effect-free validation at pre-flight; raise QsweepError with one line naming the fix."""

    def unavailable(self, cfg: E) -> str | None:
        """Why this machine cannot serve with these settings (no GPU for device=cuda), or None;
        a real run refuses at pre-flight, a dry run says so."""
        return None

    def device(self, cfg: E) -> str:
        """The device it serves on ("cpu", "cuda"): picks measured caveats and unservable pairs."""
        return "cpu"

    def gpus(self, cfg: E) -> int:
        """How many GPUs a job serving with these settings holds (tensor parallelism; 0 on a CPU):
        the job gets that many of its own (qsweep.devices), and only those are visible to it."""
        return 0

    def kernel_missing(self, cfg: E, needed: frozenset[str], ctx: JobContext) -> str | None:
        """Why this engine cannot run the layers of an artifact that needs the kernels `needed`
        (`Method.layer_kernels`) on this machine, as measured here (a probe of its own build,
        kept in the artifact cache), or None: the pair is then skipped at pre-flight, before
        anything is quantized, with this reason."""
        return None

    def kernels(self, cfg: E, ctx: JobContext) -> str:
        """What decides its figures on this machine besides its settings and package versions (for
        llama.cpp, its own system info: backends and the CPU features compiled in), or ''. Part of
        every result's cache key and tagged on every run (`engine.kernels`); the report flags
        comparisons across different ones."""
        return ""

    def fit(self, cfg: E, load: Load) -> E:
        """The config sized for `load` (never lowered; unchanged when `cfg.fit_to_load` is off)."""
        return cfg

    @abstractmethod
    def serve(self, cfg: E, artifact: Artifact, ctx: JobContext) -> AbstractContextManager[ServedModel]:
        """Start the server, wait until it is healthy, yield a `served_type`, and stop it (with its
        whole process group) on leaving the block, whatever happens."""


ENGINES: Registry[Engine[Any]] = Registry("engine", Engine, group="engine")
