"""GGUF quantization with llama.cpp: convert_hf_to_gguf.py to f16, optional llama-imatrix on
calibration text, then llama-quantize. Each step is a cached entry, so methods and engines that
share the f16 file or the imatrix build it once."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from omegaconf import MISSING

from qsweep import envs, procs, textdata
from qsweep.cache import CacheEntry, content_key
from qsweep.context import Artifact, JobContext
from qsweep.errors import QsweepError
from qsweep.methods.base import METHODS, Method, PlannedArtifact, planned_step
from qsweep.models import PreparedModel
from qsweep.textdata import TextConfig, check_holds, materialize

log = logging.getLogger(__name__)

BUILD_LOG = "build.log"  # each cache entry keeps the log of the steps that built it


class GgufOuttype(Enum):
    """convert_hf_to_gguf.py --outtype: the unquantized GGUF."""

    f16 = "f16"
    bf16 = "bf16"
    f32 = "f32"


class GgufQuantType(Enum):
    """llama-quantize types qsweep offers (the `gguf-*` options in conf/method/ name the common ones)."""

    Q8_0 = "Q8_0"
    Q6_K = "Q6_K"
    Q5_K_M = "Q5_K_M"
    Q5_K_S = "Q5_K_S"
    Q5_0 = "Q5_0"
    Q4_K_M = "Q4_K_M"
    Q4_K_S = "Q4_K_S"
    Q4_0 = "Q4_0"
    Q4_1 = "Q4_1"
    Q3_K_L = "Q3_K_L"
    Q3_K_M = "Q3_K_M"
    Q3_K_S = "Q3_K_S"
    Q2_K = "Q2_K"
    Q2_K_S = "Q2_K_S"
    IQ4_XS = "IQ4_XS"
    IQ4_NL = "IQ4_NL"
    IQ3_M = "IQ3_M"
    IQ3_S = "IQ3_S"
    IQ3_XXS = "IQ3_XXS"
    IQ2_M = "IQ2_M"
    IQ2_S = "IQ2_S"
    IQ2_XS = "IQ2_XS"
    IQ2_XXS = "IQ2_XXS"
    IQ1_M = "IQ1_M"
    IQ1_S = "IQ1_S"


# Types llama-quantize refuses to make without an importance matrix: their tensors' types need one
# (llama.cpp's src/llama-quant.cpp, tensor_requires_imatrix: IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_M,
# IQ1_S, and the Q2_K tensors of a Q2_K_S file; IQ2_M and IQ1_M files are mostly such tensors).
NEEDS_IMATRIX = frozenset(
    {
        GgufQuantType.IQ3_XXS,
        GgufQuantType.IQ2_M,
        GgufQuantType.IQ2_S,
        GgufQuantType.IQ2_XS,
        GgufQuantType.IQ2_XXS,
        GgufQuantType.IQ1_M,
        GgufQuantType.IQ1_S,
        GgufQuantType.Q2_K_S,
    }
)


@dataclass
class Config:
    quant_type: GgufQuantType = MISSING
    imatrix: bool = False
    # Calibration text for the importance matrix: by default a slice of the Wikipedia text that the
    # perplexity benchmark (which reads from the start of the file) never sees.
    imatrix_text: TextConfig = field(
        default_factory=lambda: TextConfig(name="wiki-calibration", offset_chars=1_000_000, max_chars=300_000)
    )
    imatrix_chunks: int = 32  # chunks of imatrix_ctx tokens
    imatrix_ctx: int = 512
    leave_output_tensor: bool = False  # keep output.weight unquantized (a no-op for tied embeddings)
    f16_outtype: GgufOuttype = GgufOuttype.f16
    threads: int | None = None
    timeout_s: int = 7200


def llama_build(ctx: JobContext) -> str:
    return ctx.stage_env(envs.LLAMACPP).info().get("llama_cpp_build", "unknown")


def inspect_gguf(path: Path, out: Path, log: Path, ctx: JobContext) -> dict:
    """Tensor-type mix, parameter count and bits per weight of a GGUF file."""
    env = ctx.stage_env(envs.LLAMACPP)
    procs.run(
        [*env.script("gguf_info.py"), path, out],
        log_path=log,
        timeout_s=600,
        what=f"inspect {path.name}",
        env=env.environ(),
    )
    return json.loads(out.read_text())


def f16_key(model_fingerprint: str, outtype: GgufOuttype, ctx: JobContext) -> dict:
    return {"model": model_fingerprint, "outtype": outtype.value, "llama_cpp": llama_build(ctx)}


def imatrix_key(cfg: Config, base_key: str, text_sha: str, ctx: JobContext) -> dict:
    return {
        "base": base_key,
        "text": text_sha,
        "chunks": cfg.imatrix_chunks,
        "ctx": cfg.imatrix_ctx,
        "llama_cpp": llama_build(ctx),
    }


def quant_key(cfg: Config, base_key: str, imatrix_key: str | None, ctx: JobContext) -> dict:
    return {
        "base": base_key,
        "type": cfg.quant_type.value,
        "imatrix": imatrix_key,
        "leave_output_tensor": cfg.leave_output_tensor,
        "llama_cpp": llama_build(ctx),
    }


def f16_gguf(model: PreparedModel, outtype: GgufOuttype, ctx: JobContext) -> CacheEntry:
    """The model converted to an unquantized GGUF by llama.cpp's own converter."""
    env = ctx.stage_env(envs.LLAMACPP)
    env.require()
    key = f16_key(model.fingerprint, outtype, ctx)
    quantize_log = ctx.log("quantize.log")

    def build(tmp: Path) -> dict:
        out = tmp / f"model-{outtype.value}.gguf"
        log.info("  converting %s to GGUF %s", model.name, outtype.value)
        procs.run(
            [
                env.python,
                env.share / "llama.cpp" / "convert_hf_to_gguf.py",
                model.path,
                "--outtype",
                outtype.value,
                "--outfile",
                out,
            ],
            log_path=quantize_log,
            timeout_s=7200,
            what=f"convert {model.name} to GGUF",
            env=env.environ(),
        )
        info = inspect_gguf(out, tmp / "gguf_info.json", quantize_log, ctx)
        shutil.copy2(quantize_log, tmp / BUILD_LOG)
        return {"file": out.name, "gguf": info}

    return ctx.artifact_cache.entry("gguf-base", key, build, what=f"{outtype.value} GGUF of {model.name}")


def imatrix(cfg: Config, base: CacheEntry, ctx: JobContext) -> CacheEntry:
    """An importance matrix computed by llama-imatrix on the calibration text."""
    env = ctx.stage_env(envs.LLAMACPP)
    text, text_sha = materialize(cfg.imatrix_text, ctx.artifact_cache)
    key = imatrix_key(cfg, base.manifest["key"], text_sha, ctx)
    quantize_log = ctx.log("quantize.log")

    def build(tmp: Path) -> dict:
        log.info("  computing importance matrix (%d x %d tokens)", cfg.imatrix_chunks, cfg.imatrix_ctx)
        procs.run(
            [
                env.tool("llama-imatrix"),
                "-m",
                base.path / base.manifest["file"],
                "-f",
                text,
                "-o",
                tmp / "imatrix.gguf",
                "--chunks",
                cfg.imatrix_chunks,
                "-c",
                cfg.imatrix_ctx,
                *(["-t", cfg.threads] if cfg.threads else []),
            ],
            log_path=quantize_log,
            timeout_s=cfg.timeout_s,
            what="llama-imatrix",
            env=env.environ(),
        )
        shutil.copy2(quantize_log, tmp / BUILD_LOG)
        return {"file": "imatrix.gguf"}

    return ctx.artifact_cache.entry("imatrix", key, build, what="importance matrix")


def summarize_types(info: dict) -> str:
    """'Q5_0:62%,Q8_0:21%,...' by share of parameters: the mix users need to see."""
    total = info["n_params"] or 1
    return ",".join(f"{t}:{100 * v['params'] / total:.0f}%" for t, v in info["tensor_types"].items())


def artifact_from(entry: CacheEntry, chain: list[CacheEntry], label: str, model: PreparedModel) -> Artifact:
    info = entry.manifest["gguf"]
    return Artifact(
        format="gguf",
        path=entry.path / entry.manifest["file"],
        cache_hit=entry.hit,
        key=entry.manifest["key"],
        metrics={
            "artifact_size_mb": info["file_bytes"] / 1e6,
            "bits_per_weight": info["bits_per_weight"],
            "n_params": info["n_params"],
            # Time the chain took when it was built (maybe by an earlier sweep): cache hits cost ~0.
            "quantize_s": sum(e.build_s for e in chain),
        },
        params={
            "artifact.type": label,
            "gguf.tensor_types": summarize_types(info),
            "artifact.cache_key": entry.manifest["key"],
        },
        info=info,
        logs={
            f"{e.manifest['kind']}.log": e.path / BUILD_LOG for e in chain if (e.path / BUILD_LOG).exists()
        },
        hf_tokenizer=model.path,
    )


@METHODS.register("gguf")
class GgufMethod(Method[Config]):
    """llama.cpp quantization types (`method=gguf-q4_k_m`, `gguf-iq4_xs`), optionally with an
    importance matrix."""

    formats = ("gguf",)
    env = envs.LLAMACPP

    def check(self, cfg: Config) -> None:
        if cfg.quant_type in NEEDS_IMATRIX and not cfg.imatrix:
            raise QsweepError(
                f"method.quant_type={cfg.quant_type.value} needs an importance matrix (llama-quantize "
                "refuses it without one): set method.imatrix=true"
            )
        if cfg.imatrix:
            check_holds(cfg.imatrix_text, cfg.imatrix_ctx, "method.imatrix_ctx")  # one chunk at least

    def plan(self, cfg: Config, model_fingerprint: str, fmt: str, ctx: JobContext) -> PlannedArtifact:
        base = content_key(f16_key(model_fingerprint, cfg.f16_outtype, ctx))
        steps = [planned_step(f"{cfg.f16_outtype.value} GGUF", "gguf-base", base, ctx)]
        imat = None
        if cfg.imatrix:
            text_sha = textdata.content_sha(cfg.imatrix_text, ctx.artifact_cache)
            imat = content_key(imatrix_key(cfg, base, text_sha, ctx))
            steps.append(planned_step("importance matrix", "imatrix", imat, ctx))
        key = content_key(quant_key(cfg, base, imat, ctx))
        steps.append(planned_step(f"{cfg.quant_type.value} GGUF", "gguf", key, ctx))
        return PlannedArtifact(key, steps)

    def build(self, cfg: Config, model: PreparedModel, fmt: str, ctx: JobContext) -> Artifact:
        return quantize(cfg, model, ctx)


def quantize(cfg: Config, model: PreparedModel, ctx: JobContext) -> Artifact:
    """The f16 GGUF (cached), its importance matrix if asked (cached), then llama-quantize (cached)."""
    env = ctx.stage_env(envs.LLAMACPP)
    base = f16_gguf(model, cfg.f16_outtype, ctx)
    chain = [base]
    imat = None
    if cfg.imatrix:
        imat = imatrix(cfg, base, ctx)
        chain.append(imat)
    key = quant_key(cfg, base.manifest["key"], imat.manifest["key"] if imat else None, ctx)
    quantize_log = ctx.log("quantize.log")

    def build(tmp: Path) -> dict:
        out = tmp / f"model-{cfg.quant_type.value}.gguf"
        log.info("  llama-quantize %s", cfg.quant_type.value)
        procs.run(
            [
                env.tool("llama-quantize"),
                *(["--imatrix", imat.path / imat.manifest["file"]] if imat else []),
                *(["--leave-output-tensor"] if cfg.leave_output_tensor else []),
                base.path / base.manifest["file"],
                out,
                cfg.quant_type.value,
                *([cfg.threads] if cfg.threads else []),
            ],
            log_path=quantize_log,
            timeout_s=cfg.timeout_s,
            what=f"llama-quantize {cfg.quant_type.value}",
            env=env.environ(),
        )
        info = inspect_gguf(out, tmp / "gguf_info.json", quantize_log, ctx)
        shutil.copy2(quantize_log, tmp / BUILD_LOG)
        return {"file": out.name, "gguf": info}

    entry = ctx.artifact_cache.entry("gguf", key, build, what=f"{cfg.quant_type.value} GGUF")
    chain.append(entry)
    return artifact_from(entry, chain, cfg.quant_type.value, model)
