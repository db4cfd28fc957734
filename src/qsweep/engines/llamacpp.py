"""Engine `llamacpp`: llama-server as a child process on 127.0.0.1, serving a GGUF file.

llama-server returns log-probs for generated tokens only, so the perplexity protocol's prompt
scoring runs in-process with llama-cpp-python on the same file (stage_scripts/llamacpp_score.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qsweep import procs
from qsweep.context import Artifact, JobContext
from qsweep.engines import http
from qsweep.engines.served import ServedModel, Tokenized
from qsweep.envs import StageEnv
from qsweep.errors import QsweepError

ENV = "llamacpp"
FORMATS = ("gguf",)


@dataclass
class Config:
    name: str = "llamacpp"
    kind: str = "llamacpp"
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    ctx_size: int = 2048  # total KV context, shared by the slots
    parallel: int = 1  # slots (-np): requests served at once
    threads: int | None = None  # default: llama.cpp's choice (all cores)
    n_gpu_layers: int | None = None  # -ngl; default: llama.cpp's choice
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: int = 300
    request_timeout_s: int = 300
    smoke_prompt: str = "The capital of France is"
    smoke_max_tokens: int = 16
    fit_to_load: bool = True  # raise parallel / ctx_size to what a load test needs


def fit_to_load(cfg: Config, concurrency: int, tokens_per_request: int) -> Config:
    """Fair serving preset: one slot per concurrent request, each with room for a whole request.
    llama-server splits ctx_size across its slots; with the default single slot it serves requests
    one at a time (the seed's flat ~205 tok/s from 1 to 100 users)."""
    if not cfg.fit_to_load:
        return cfg
    parallel = max(cfg.parallel, concurrency)
    return dataclasses.replace(
        cfg, parallel=parallel, ctx_size=max(cfg.ctx_size, parallel * tokens_per_request)
    )


class LlamaCppServed(ServedModel):
    """A running llama-server plus in-process scoring on the same GGUF."""

    def _score_script(self, *args: str | Path, timeout_s: float) -> dict:
        out = self.ctx.log_dir / f"score-{time.monotonic_ns()}.json"
        try:
            procs.run(
                [
                    *StageEnv(ENV).script("llamacpp_score.py"),
                    *args,
                    "--model",
                    self.artifact.path,
                    "--out",
                    out,
                    *(["--threads", self.cfg.threads] if self.cfg.threads else []),
                ],
                log_path=self.ctx.log("scoring.log"),
                timeout_s=timeout_s,
                what="llama.cpp scoring",
                env=StageEnv(ENV).environ(),
            )
            return json.loads(out.read_text())
        finally:
            out.unlink(missing_ok=True)

    def tokenize(self, text: Path, timeout_s: float, compare_tokens: int = 0) -> Tokenized:
        """Token ids of a text as llama.cpp makes them, and the BOS id if the model adds one; with
        `compare_tokens`, also how the source model's transformers tokenizer splits that many tokens."""
        compare = []
        if compare_tokens and self.artifact.hf_tokenizer is not None:
            compare = ["--hf-tokenizer", self.artifact.hf_tokenizer, "--compare-tokens", str(compare_tokens)]
        result = self._score_script("tokenize", "--text", text, *compare, timeout_s=timeout_s)
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


@contextlib.contextmanager
def serve(cfg: Config, artifact: Artifact, ctx: JobContext) -> Iterator[LlamaCppServed]:
    """Start llama-server, wait until /health answers, yield, and stop its process group."""
    if artifact.format not in FORMATS:
        raise QsweepError(f"llama.cpp serves GGUF files, not {artifact.format}")
    env = StageEnv(ENV)
    port = cfg.port or http.free_port(cfg.host)
    url = f"http://{cfg.host}:{port}"
    log = ctx.log("server.log")
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
        *cfg.extra_args,
    ]
    started = time.monotonic()
    print(f"[qsweep]   starting llama-server on {url} (-c {cfg.ctx_size} -np {cfg.parallel})", flush=True)
    with procs.background(cmd, log_path=log, env=env.environ()) as proc:
        http.wait_healthy(
            f"{url}/health", proc, timeout_s=cfg.startup_timeout_s, log=log, what="llama-server"
        )
        yield LlamaCppServed(cfg, artifact, url, time.monotonic() - started, log, ctx)
