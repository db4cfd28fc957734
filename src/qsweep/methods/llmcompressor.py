"""HF-format quantization with llm-compressor (`method=gptq`, `awq`, `fp8`, `w8a8`,
`w8a8-smoothquant`, or a recipe file), or GPTQ through GPTQModel (`method.backend=gptqmodel`), run
in the quantize stage environment. Output: a compressed-tensors checkpoint with recipe.yaml
(GPTQModel: the classic GPTQ format)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from qsweep import calibration, envs, procs
from qsweep.cache import content_key, file_sha256
from qsweep.context import Artifact, JobContext
from qsweep.errors import QsweepError
from qsweep.hfcheckpoint import checkpoint_stats
from qsweep.methods.base import METHODS, Method, PlannedArtifact, planned_step
from qsweep.models import ModelShape, PreparedModel
from qsweep.stage_scripts.quantize_common import groups_weights

log = logging.getLogger(__name__)


class Algorithm(Enum):
    gptq = "gptq"
    awq = "awq"
    rtn = "rtn"  # round-to-nearest: no calibration (FP8 dynamic)


class Backend(Enum):
    llmcompressor = "llmcompressor"
    gptqmodel = "gptqmodel"  # GPTQ only


@dataclass
class Config:
    algorithm: Algorithm = MISSING
    scheme: str = "W4A16"  # a compressed-tensors preset: W4A16, W4A16_ASYM, W8A8, FP8_DYNAMIC, ...
    # Grouped presets only (the integer WxAy ones: W4A16, W8A16, ...; null: the preset's 128). Must
    # divide the input widths of the model's linear layers: a value set on the command line that
    # does not is refused; an option's own (gptq's 128) is lowered to the largest power of two
    # that does, with a note (SmolLM2's 576 -> 64).
    group_size: int | None = 128
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    recipe: str | None = None  # a llm-compressor recipe YAML; replaces algorithm/scheme/group_size/ignore
    # SmoothQuant before quantizing (W8A8): how much of the activations' outliers moves into the
    # weights (0-1; llm-compressor's smoothing_strength); None: no smoothing.
    smoothing_strength: float | None = None
    backend: Backend = Backend.llmcompressor
    # The sweep's shared calibration settings (top-level `calibration`) unless overridden here.
    calibration: Any = "${calibration}"
    timeout_s: int = 7200


# compressed-tensors 0.19's PRESET_SCHEMES (envs/quantize-*.txt pins it; a test compares this list
# with the installed package's), so a scheme typo is refused before the stage environment runs.
SCHEMES = (
    "UNQUANTIZED", "W4A16_ASYM", "W8A8", "INT8", "W4AFP8", "FP8", "FP8_DYNAMIC", "FP8_BLOCK", "NVFP4A16",
    "NVFP4", "MXFP4A16", "MXFP4", "MXFP8A16", "MXFP8", "W2A4", "W2A8", "W2A16", "W3A4", "W3A8", "W3A16",
    "W4A4", "W4A8", "W4A16", "W5A8", "W5A16", "W6A8", "W6A16", "W7A8", "W7A16", "W8A16",
)  # fmt: skip


def check(cfg: Config) -> None:
    """Side-effect-free validation at pre-flight."""
    if not cfg.recipe and cfg.scheme not in SCHEMES:
        near = difflib.get_close_matches(cfg.scheme.upper(), SCHEMES, n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise QsweepError(f"method.scheme={cfg.scheme} is not a compressed-tensors preset: {hint}"
                          f"choose from {', '.join(SCHEMES)}")  # fmt: skip
    if cfg.group_size is not None and (cfg.group_size < 1 or cfg.group_size & (cfg.group_size - 1)):
        # the layer widths it must divide are multiples of powers of two (qsweep lowers it to the
        # largest power of two dividing them, logged as method.effective_group_size)
        nearest = 1 << max(0, round(math.log2(cfg.group_size))) if cfg.group_size > 0 else 128
        raise QsweepError(
            f"method.group_size={cfg.group_size} must be a positive power of two: use {nearest}"
        )
    if cfg.backend is Backend.gptqmodel and (cfg.algorithm is not Algorithm.gptq or cfg.recipe):
        raise QsweepError(
            f"method.backend=gptqmodel runs GPTQ only, not {cfg.algorithm.value}: use method=gptq"
        )
    if cfg.smoothing_strength is not None and not 0 < cfg.smoothing_strength < 1:
        raise QsweepError(
            f"method.smoothing_strength={cfg.smoothing_strength} must be between 0 and 1 (SmoothQuant's "
            "usual 0.8), or null for no smoothing"
        )
    if cfg.smoothing_strength is not None and (cfg.recipe or cfg.algorithm is Algorithm.rtn):
        raise QsweepError("method.smoothing_strength needs calibration (gptq or awq) and no recipe file")
    if cfg.recipe and not Path(cfg.recipe).expanduser().is_file():
        raise QsweepError(f"recipe '{cfg.recipe}' does not exist: fix method.recipe")
    if needs_calibration(cfg):
        calibration.check(cfg.calibration)


def check_group_size(cfg: Config, shape: ModelShape, given: bool) -> list[str]:
    """A group size divides every quantized layer's input width, or is refused naming the nearest
    one that does (`given`: set on the command line) or lowered as the stage script lowers it."""
    if cfg.recipe or not groups_weights(cfg.scheme) or not shape.widths:
        return []
    # a grouped preset without a group size set groups by its own 128
    group_size = cfg.group_size or 128
    cfg = dataclasses.replace(cfg, group_size=group_size)
    common = math.gcd(*shape.widths)
    if common % group_size == 0:
        return []
    fitting = [1 << k for k in range(16) if common % (1 << k) == 0]
    widths = f"({', '.join(map(str, shape.widths))}, from {shape.source})"
    if given:
        nearest = min(fitting, key=lambda size: (abs(size - group_size), size))
        raise QsweepError(
            f"method.group_size={cfg.group_size} does not divide the model's layer widths {widths}: "
            f"use {nearest}"
        )
    lowered = max(size for size in fitting if size <= group_size)
    return [
        f"group size {cfg.group_size} does not divide the model's layer widths {widths}: {lowered} "
        f"is used (set method.group_size to choose)"
    ]


def calibration_file(cfg: Config, ctx: JobContext) -> tuple[Path | None, str | None]:
    """The calibration JSONL and its hash; None for methods that need no data."""
    if not needs_calibration(cfg):
        return None, None
    return calibration.calibration_file(cfg.calibration, ctx.artifact_cache)


def layer_progress(log: Path) -> str:
    """How far llm-compressor's sequential pipeline is, from its progress bars in the log."""
    found = procs.last_match(log, r"\((\d+)/(\d+)\): (Calibrating|Propagating)")
    return f"(layer group {found[0]}/{found[1]}, {found[2].lower()})" if found else ""


@METHODS.register("llmcompressor")
class LlmCompressorMethod(Method[Config]):
    """llm-compressor's GPTQ, AWQ and FP8 (`method=gptq`, `awq`, `fp8`), or a recipe file; GPTQ
    also through GPTQModel (`method.backend=gptqmodel`)."""

    formats = ("hf",)
    env = envs.QUANTIZE

    def check(self, cfg: Config) -> None:
        check(cfg)

    def check_model(self, cfg: Config, shape: ModelShape, given: frozenset[str]) -> list[str]:
        return check_group_size(cfg, shape, given="group_size" in given)

    def gpus(self, cfg: Config) -> int:
        """One where a GPU is: llm-compressor and GPTQModel calibrate on it (set-up installs the
        CUDA variant of the quantize environment there)."""
        return 1 if envs.has_cuda_gpu() else 0

    def layer_kernels(self, cfg: Config) -> frozenset[str]:
        """Weight-only integer presets (W4A16, W4A16_ASYM, ...; GPTQModel's too) need a WNA16
        matmul: `w4a16` for 4-bit weights. A recipe file's schemes are not read here."""
        weight_only = re.fullmatch(r"W(\d+)A16(_ASYM)?", cfg.scheme)
        return frozenset() if cfg.recipe or not weight_only else frozenset({f"w{weight_only[1]}a16"})

    def plan(self, cfg: Config, model_fingerprint: str, fmt: str, ctx: JobContext) -> PlannedArtifact:
        sha = calibration.content_sha(cfg.calibration, ctx.artifact_cache) if needs_calibration(cfg) else None
        key = content_key(artifact_key(cfg, model_fingerprint, sha, ctx))
        what = f"{cfg.algorithm.value} {cfg.scheme} checkpoint"
        return PlannedArtifact(key, [planned_step(what, "hf-quantized", key, ctx)])

    def build(self, cfg: Config, model: PreparedModel, fmt: str, ctx: JobContext) -> Artifact:
        return quantize(cfg, model, ctx)


def needs_calibration(cfg: Config) -> bool:
    return not (cfg.algorithm is Algorithm.rtn and not cfg.recipe)


def artifact_key(cfg: Config, model_fingerprint: str, calibration_sha: str | None, ctx: JobContext) -> dict:
    """Everything the checkpoint depends on: model, settings, recipe, calibration data, versions."""
    versions = ctx.stage_env(envs.QUANTIZE).package_versions()
    recipe = Path(cfg.recipe).expanduser().resolve() if cfg.recipe else None
    calibrated = calibration_sha is not None
    return {
        "model": model_fingerprint,
        "algorithm": cfg.algorithm.value,
        "scheme": cfg.scheme,
        "group_size": cfg.group_size,
        "ignore": list(cfg.ignore),
        "recipe": file_sha256(recipe) if recipe else None,
        "backend": cfg.backend.value,
        "gptqmodel": versions.get("gptqmodel") if cfg.backend is Backend.gptqmodel else None,
        "calibration": calibration_sha,
        "num_samples": cfg.calibration.num_samples if calibrated else None,
        "seq_len": cfg.calibration.seq_len if calibrated else None,
        "llmcompressor": versions.get("llmcompressor"),
        "compressed-tensors": versions.get("compressed-tensors"),
        # only where set, so that the keys of checkpoints made before the setting existed stay valid
        **({"smoothing_strength": cfg.smoothing_strength} if cfg.smoothing_strength is not None else {}),
    }


def quantize(cfg: Config, model: PreparedModel, ctx: JobContext) -> Artifact:
    """The quantized checkpoint, built in the quantize stage environment or taken from the cache."""
    env = ctx.stage_env(envs.QUANTIZE)
    env.require()
    recipe = Path(cfg.recipe).expanduser().resolve() if cfg.recipe else None
    if recipe is not None and not recipe.is_file():
        raise QsweepError(f"recipe '{cfg.recipe}' does not exist: fix method.recipe")
    calibration_path, calibration_sha = calibration_file(cfg, ctx)
    key = artifact_key(cfg, model.fingerprint, calibration_sha, ctx)
    quantize_log = ctx.log("quantize.log")

    def build(tmp: Path) -> dict:
        spec = {
            "model": str(model.path),
            "out": str(tmp / "checkpoint"),
            "algorithm": cfg.algorithm.value,
            "scheme": cfg.scheme,
            "group_size": cfg.group_size,
            "ignore": list(cfg.ignore),
            "smoothing_strength": cfg.smoothing_strength,
            "recipe": str(recipe) if recipe else None,
            "calibration": str(calibration_path) if calibration_path else None,
            "num_samples": cfg.calibration.num_samples if calibration_path else 0,
            "seq_len": cfg.calibration.seq_len if calibration_path else 0,
            "summary_out": str(tmp / "summary.json"),
        }
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1))
        log.info("  %s %s %s", cfg.backend.value, cfg.algorithm.value, cfg.scheme)
        script = "gptqmodel_quantize.py" if cfg.backend is Backend.gptqmodel else "llmcompressor_quantize.py"
        # GPTQModel refuses 2 workers on a 2-core box unless told how many it may use, and
        # JIT-compiles kernels into a cache that should not land in $HOME.
        extra = {
            "GPTQMODEL_CPU_WORKERS": str(os.cpu_count() or 1),
            "GPTQMODEL_TORCH_EXTENSIONS_DIR": str(ctx.artifact_cache.root / "torch-extensions"),
        }
        # llm-compressor's per-layer progress bars, every 15 s: read for progress below
        environ = env.environ(progress_bars=True, **extra, TQDM_MININTERVAL="15")
        procs.run(
            [*env.script(script), tmp / "spec.json"],
            log_path=quantize_log,
            timeout_s=cfg.timeout_s,
            what=f"{cfg.backend.value} {cfg.algorithm.value}",
            env=environ,
            cwd=tmp,  # GPTQModel writes a logs/ folder into its working directory
            progress=lambda: layer_progress(quantize_log),
        )
        summary = json.loads((tmp / "summary.json").read_text())
        (tmp / "build.log").write_text(quantize_log.read_text())
        return {"summary": summary}

    what = f"{cfg.algorithm.value} {cfg.scheme} checkpoint"
    entry = ctx.artifact_cache.entry("hf-quantized", key, build, what=what)
    checkpoint = entry.path / "checkpoint"
    summary = entry.manifest["summary"]
    stats = checkpoint_stats(checkpoint)
    n_params = checkpoint_stats(model.path)[
        "n_params"
    ]  # of the unquantized model (packed int4 would undercount)
    logs = {"hf-quantized.log": entry.path / "build.log"}
    if (checkpoint / "recipe.yaml").is_file():
        logs["recipe.yaml"] = checkpoint / "recipe.yaml"
    return Artifact(
        format="hf",
        path=checkpoint,
        cache_hit=entry.hit,
        key=entry.manifest["key"],
        metrics={
            "artifact_size_mb": stats["weight_bytes"] / 1e6,
            "bits_per_weight": 8 * stats["weight_bytes"] / n_params,
            "n_params": n_params,
            "quantize_s": entry.build_s,
            "quantize_peak_rss_mb": summary["peak_rss_mb"],
        },
        params={
            "artifact.type": f"{cfg.algorithm.value}-{cfg.scheme}",
            "artifact.cache_key": entry.manifest["key"],
            "method.effective_group_size": str(summary.get("effective_group_size")),
        },
        info={"checkpoint": stats, "summary": summary},
        logs=logs,
    )
