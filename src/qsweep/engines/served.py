"""What every engine yields while it serves: an OpenAI-compatible server that benchmarks talk to."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qsweep.context import Artifact, JobContext
from qsweep.engines import http


@dataclass
class Tokenized:
    tokens: list[int]
    bos: int | None  # the BOS id where the model adds one
    # For engines whose tokenizer is not the model's transformers one (llama.cpp's GGUF vocabulary):
    # how the transformers tokenizer splits the same text ({"differing_spans": n, "examples": [...]}).
    hf_compare: dict | None = None


@dataclass
class ServedModel:
    """A running server. Engines add `tokenize(text, timeout_s, compare_tokens) -> Tokenized` and
    `score(chunks, first, timeout_s)` for the perplexity protocol."""

    cfg: Any  # the engine's config: request_timeout_s, smoke settings
    artifact: Artifact
    url: str
    start_s: float  # seconds from launch to a healthy server
    log: Path
    ctx: JobContext
    model_name: str | None = None  # the "model" field of requests, where the server wants one

    def request(self, path: str, body: dict, timeout_s: float | None = None) -> dict:
        if self.model_name is not None:
            body = {"model": self.model_name, **body}
        return http.post_json(f"{self.url}{path}", body, timeout_s=timeout_s or self.cfg.request_timeout_s)

    def complete(self, prompt: str, max_tokens: int) -> tuple[str, float]:
        """A greedy completion through /v1/completions; returns (text, seconds)."""
        started = time.monotonic()
        reply = self.request(
            "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        )
        return reply["choices"][0]["text"], time.monotonic() - started
