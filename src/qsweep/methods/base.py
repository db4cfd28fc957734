"""The method contract: how a plug-in turns a prepared model into an artifact an engine serves.

To add a method: a module in this package with a `Config` dataclass and a `Method[Config]` subclass
registered with `@METHODS.register("<kind>")`, YAML options in conf/method/ (`defaults:
[<kind>_schema, _self_]`; one kind may have many options, as llmcompressor has gptq, awq and fp8),
a test and a row in docs/guide.md. Artifacts are cached by content: build them with
`ctx.artifact_cache.entry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from qsweep.context import Artifact, JobContext
from qsweep.envs import StageEnvSpec
from qsweep.models import ModelShape, PreparedModel
from qsweep.plugins import C, Plugin, Registry


@dataclass
class PlannedArtifact:
    """What `build` would do, found without building or writing anything (for a dry run)."""

    key: str | None  # the artifact's content key, as `Artifact.key` will be; None if unknown
    steps: list[tuple[str, bool]]  # (what is built, whether the cache has it already), in order


def planned_step(what: str, kind: str, key: str, ctx: JobContext) -> tuple[str, bool]:
    """A `PlannedArtifact` step: (what, whether the artifact cache has entry `key` of `kind`)."""
    return what, ctx.artifact_cache.lookup_key(kind, key) is not None


class Method(Plugin[C], ABC):
    """Quantizes (or not: the baseline) a model into an artifact of one of `formats`."""

    formats: ClassVar[tuple[str, ...]]  # artifact formats it can make ("gguf", "hf")
    env: ClassVar[StageEnvSpec | None] = None  # the stage environment it runs in
    # The unquantized reference every other method is compared with (there is one: `none`).
    is_baseline: ClassVar[bool] = False

    def check(self, cfg: C) -> None:  # noqa: B027 - optional: most plug-ins have nothing to check
        """Side-effect-free validation at pre-flight; raise QsweepError with one line naming the fix."""

    def check_model(self, cfg: C, shape: ModelShape, given: frozenset[str]) -> list[str]:
        """Validation against the model's shape (its context and layer widths, where known: at
        pre-flight, and again once a downloaded checkpoint's config.json is there). `given` names
        this method's settings set on the command line. Raise QsweepError with one line naming the
        fix, or return notes on what is adapted to the model."""
        return []

    def gpus(self, cfg: C) -> int:
        """How many GPUs its quantization uses on this machine (0: none; the job holds at least
        that many of its own, and sees no others)."""
        return 0

    def layer_kernels(self, cfg: C) -> frozenset[str]:
        """The quantized matmuls its artifact's layers need from an engine, in qsweep's names
        (`w4a16`: 4-bit integer weights with 16-bit activations); an engine that lacks one on this
        machine (`Engine.kernel_missing`) skips the pair before anything is quantized. Empty where
        none is special or it cannot be told before building (a recipe file)."""
        return frozenset()

    def plan(self, cfg: C, model_fingerprint: str, fmt: str, ctx: JobContext) -> PlannedArtifact:
        """The cache entries `build` would use and whether they exist, computed with the same keys
        and without side effects: the dry run reports them and looks up results under `key`. The
        default knows nothing (the dry run then says the artifact will be built)."""
        return PlannedArtifact(None, [(f"{self.name} artifact", False)])

    @abstractmethod
    def build(self, cfg: C, model: PreparedModel, fmt: str, ctx: JobContext) -> Artifact:
        """The artifact in format `fmt` (always one of `formats`: the one the engine serves), built or
        taken from the cache; its metrics, params and logs are recorded on the job's run."""


METHODS: Registry[Method[Any]] = Registry("method", Method, group="method")
