"""Engine `llamacpp`: llama-server as a child process on 127.0.0.1, serving a GGUF file.

llama-server returns log-probs for generated tokens only, so the perplexity protocol's prompt
scoring runs in-process with llama-cpp-python on the same file (stage_scripts/llamacpp_score.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from qsweep import envs, procs
from qsweep.context import Artifact, JobContext
from qsweep.engines import http
from qsweep.engines.base import ENGINES, Engine, EngineConfig, chosen_device, cuda_missing
from qsweep.engines.served import Load, ServedModel, Tokenized
from qsweep.errors import QsweepError
from qsweep.settings import at_least, quantizes, speed_only

log = logging.getLogger(__name__)


class SplitMode(Enum):
    """How one model spans several GPUs (--split-mode): whole layers per GPU, or rows of each tensor."""

    none = "none"
    layer = "layer"
    row = "row"


class KvCacheType(Enum):
    """Types llama.cpp keeps its KV cache in (-ctk / -ctv)."""

    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"
    q5_1 = "q5_1"
    q5_0 = "q5_0"
    q4_1 = "q4_1"
    q4_0 = "q4_0"
    iq4_nl = "iq4_nl"


class FlashAttn(Enum):
    """Flash attention: `auto` is llama.cpp's own choice (its server's and llama-perplexity's
    default), turned on where the V cache is quantized, which needs it."""

    auto = "auto"
    on = "on"
    off = "off"


@dataclass
class Config(EngineConfig):
    ctx_size: int = speed_only(2048, minimum=1)  # total KV context, shared by the slots
    parallel: int = speed_only(1, minimum=1)  # slots (-np): requests served at once
    threads: int | None = at_least(1, None)  # default: llama.cpp's choice (all cores)
    # auto: a CUDA GPU where one is present (set-up builds llama.cpp with CUDA there), else the CPU
    device: str = "auto"
    n_gpu_layers: int | None = None  # -ngl on a GPU; default: llama.cpp's choice (all that fit)
    gpus: int = at_least(1, 1)  # GPUs one server spans on a GPU; the job holds that many of its own
    split_mode: SplitMode = SplitMode.layer  # how a model spans `gpus` > 1
    # The KV cache's types, for serving and for the perplexity/KL scoring alike; the baseline is
    # always measured with f16, so a quantized cache's cost shows in every comparison.
    cache_type_k: KvCacheType = quantizes(KvCacheType.f16)
    cache_type_v: KvCacheType = quantizes(KvCacheType.f16)
    flash_attn: FlashAttn = FlashAttn.auto


class LlamaCppServed(ServedModel):
    """A running llama-server plus in-process scoring on the same GGUF."""

    def _score_script(self, *args: object, timeout_s: float) -> dict:
        out = self.ctx.log_dir / f"score-{time.monotonic_ns()}.json"
        env = self.ctx.stage_env(envs.LLAMACPP)
        try:
            procs.run(
                [
                    *env.script("llamacpp_score.py"),
                    *args,
                    "--model",
                    self.artifact.path,
                    "--out",
                    out,
                    *(["--threads", self.cfg.threads] if self.cfg.threads else []),
                    *(["--gpu-layers", gpu_layers(self.cfg)] if on_gpu(self.cfg) else []),
                    "--cache-type-k",
                    self.cfg.cache_type_k.value,
                    "--cache-type-v",
                    self.cfg.cache_type_v.value,
                    "--flash-attn",
                    flash_attn(self.cfg),
                ],
                log_path=self.ctx.log("scoring.log"),
                timeout_s=timeout_s,
                what="llama.cpp scoring",
                env=env.environ(),
            )
            return json.loads(out.read_text())
        finally:
            out.unlink(missing_ok=True)

    def tokenize(
        self, text: Path, timeout_s: float, compare_tokens: int = 0, max_tokens: int = 0
    ) -> Tokenized:
        """Token ids of a text as llama.cpp makes them, and the BOS id if the model adds one; with
        `compare_tokens`, also how the source model's transformers tokenizer splits that many tokens."""
        compare = []
        if compare_tokens and self.artifact.hf_tokenizer is not None:
            compare = ["--hf-tokenizer", self.artifact.hf_tokenizer, "--compare-tokens", str(compare_tokens)]
        limit = ["--max-tokens", str(max_tokens)] if max_tokens else []
        result = self._score_script("tokenize", "--text", text, *compare, *limit, timeout_s=timeout_s)
        return Tokenized(result["tokens"], result["bos"], result.get("hf_compare"))

    def full_logprobs(self, chunks: list[list[int]], first: int, npy: Path, timeout_s: float) -> None:
        """The whole next-token distribution at each position from `first`, as float16 in `npy`."""
        self._score_chunks("logprobs", chunks, first, "--npy", npy, timeout_s=timeout_s)

    def score(self, chunks: list[list[int]], first: int, timeout_s: float) -> list[list[float]]:
        """Log-prob of each chunk[j+1] given chunk[:j+1], for j from `first` to the end."""
        return self._score_chunks("score", chunks, first, timeout_s=timeout_s)["logprobs"]

    def _score_chunks(
        self, command: str, chunks: list[list[int]], first: int, *args, timeout_s: float
    ) -> dict:
        path = self.ctx.log_dir / "chunks.json"
        path.write_text(json.dumps({"chunks": chunks}))
        try:
            return self._score_script(
                command, "--chunks", path, "--first", str(first), *args, timeout_s=timeout_s
            )
        finally:
            path.unlink(missing_ok=True)


@ENGINES.register("llamacpp")
class LlamaCppEngine(Engine[Config]):
    """llama-server for GGUF files; prompt scoring in-process on the same file."""

    formats = ("gguf",)
    not_served = {
        "hf-bitsandbytes": "llama.cpp loads GGUF files only, and bitsandbytes' NF4/FP4 have no GGUF type",
    }
    env = envs.LLAMACPP
    served_type = LlamaCppServed

    def check(self, cfg: Config) -> None:
        self.device(cfg)
        if cfg.cache_type_v is not KvCacheType.f16 and cfg.flash_attn is FlashAttn.off:
            raise QsweepError(
                f"engine.cache_type_v={cfg.cache_type_v.value} needs flash attention (llama.cpp keeps a "
                "quantized V cache only with it): set engine.flash_attn=auto or on"
            )

    def unavailable(self, cfg: Config) -> str | None:
        return cuda_missing(cfg.device)

    def device(self, cfg: Config) -> str:
        return "cuda" if on_gpu(cfg) else "cpu"

    def gpus(self, cfg: Config) -> int:
        return cfg.gpus if on_gpu(cfg) else 0

    def kernels(self, cfg: Config, ctx: JobContext) -> str:
        return envs.llamacpp_system_info(ctx.stage_env(envs.LLAMACPP).root)

    def fit(self, cfg: Config, load: Load) -> Config:
        """Fair serving preset: one slot per concurrent request, each with room for a whole request.
        llama-server splits ctx_size across its slots; with the default single slot it serves
        requests one at a time (the seed's flat ~205 tok/s from 1 to 100 users). Prompt scoring
        runs in-process with its own context, so `load.scored_tokens` needs nothing here."""
        if not cfg.fit_to_load:
            return cfg
        parallel = max(cfg.parallel, load.concurrency)
        return dataclasses.replace(
            cfg, parallel=parallel, ctx_size=max(cfg.ctx_size, parallel * load.tokens_per_request)
        )

    def serve(self, cfg: Config, artifact: Artifact, ctx: JobContext) -> contextlib.AbstractContextManager:
        return serve(cfg, artifact, ctx)


def on_gpu(cfg: Config) -> bool:
    """Whether the server runs on a GPU: asked for, or `auto` where one is (and layers go there)."""
    return chosen_device(cfg.device) == "cuda" and cfg.n_gpu_layers != 0


def flash_attn(cfg: Config) -> str:
    """Flash attention for server and scorer alike: on where the V cache is quantized (which
    needs it) and the setting is auto, else the setting (auto: llama.cpp's own choice)."""
    if cfg.flash_attn is FlashAttn.auto and cfg.cache_type_v is not KvCacheType.f16:
        return FlashAttn.on.value
    return cfg.flash_attn.value


def gpu_layers(cfg: Config) -> int:
    return -1 if cfg.n_gpu_layers is None else cfg.n_gpu_layers


@contextlib.contextmanager
def serve(cfg: Config, artifact: Artifact, ctx: JobContext) -> Iterator[LlamaCppServed]:
    """Start llama-server, wait until /health answers, yield, and stop its process group."""
    if artifact.format not in LlamaCppEngine.formats:
        raise QsweepError(f"llama.cpp serves GGUF files, not {artifact.format}")
    env = ctx.stage_env(envs.LLAMACPP)
    port = http.server_port(cfg.host, cfg.port)
    url = f"http://{cfg.host}:{port}"
    server_log = ctx.log("server.log")
    cmd = [
        env.tool("llama-server"),
        "-m",
        artifact.path,
        "--host",
        cfg.host,
        "--port",
        port,
        "-c",
        cfg.ctx_size,
        "-np",
        cfg.parallel,
        "--no-webui",
        *(["-t", cfg.threads] if cfg.threads else []),
        *(["-ngl", cfg.n_gpu_layers] if cfg.n_gpu_layers is not None else []),
        *(["--split-mode", cfg.split_mode.value] if on_gpu(cfg) and cfg.gpus > 1 else []),
        *(["-ctk", cfg.cache_type_k.value] if cfg.cache_type_k is not KvCacheType.f16 else []),
        *(["-ctv", cfg.cache_type_v.value] if cfg.cache_type_v is not KvCacheType.f16 else []),
        *(["-fa", flash_attn(cfg)] if flash_attn(cfg) != FlashAttn.auto.value else []),
        *cfg.extra_args,
    ]
    started = time.monotonic()
    log.info("  starting llama-server on %s (-c %s -np %s)", url, cfg.ctx_size, cfg.parallel)
    with procs.background(cmd, log_path=server_log, env=env.environ()) as proc:
        http.wait_healthy(
            f"{url}{LlamaCppServed.health_path}",
            proc,
            timeout_s=cfg.startup_timeout_s,
            log=server_log,
            what="llama-server",
        )
        yield LlamaCppServed(cfg, artifact, url, time.monotonic() - started, server_log, ctx, process=proc)
