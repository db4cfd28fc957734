"""What a served model can do, and what a benchmark asks of the engine serving it.

An engine's `serve` yields a `ServedModel`. What else it can do is said by the capability protocols
below, which its served-model class implements: a benchmark declares the capabilities it needs
(`Benchmark.requires`), the pre-flight matches the two, and a benchmark uses them with
`isinstance(served, Capability)`, never by probing for attributes.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from qsweep.context import Artifact, JobContext
from qsweep.engines import http


@dataclass
class Tokenized:
    tokens: list[int]
    bos: int | None  # the BOS id where the model adds one
    # For engines whose tokenizer is not the model's transformers one (llama.cpp's GGUF vocabulary):
    # how the transformers tokenizer splits the same text ({"differing_spans": n, "examples": [...]}).
    hf_compare: dict | None = None


@runtime_checkable
class ChatEndpoint(Protocol):
    """an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions) that clients such as
    evalscope talk to"""

    def api_base(self) -> str:
        """The API's base URL, ending in /v1."""
        ...

    def complete(self, prompt: str, max_tokens: int) -> tuple[str, float]:
        """A greedy completion; returns (text, seconds)."""
        ...


@runtime_checkable
class Tokenizes(Protocol):
    """tokenization with the engine's own tokenizer"""

    def tokenize(
        self, text: Path, timeout_s: float, compare_tokens: int = 0, max_tokens: int = 0
    ) -> Tokenized:
        """Token ids of a text file as the engine makes them, and the BOS id if the model adds one.
        With `compare_tokens`, engines whose vocabulary is not the transformers one also say how
        the transformers tokenizer splits that many tokens (`Tokenized.hf_compare`). With
        `max_tokens`, at least the first that many (all where the text has fewer): an engine may
        stop tokenizing there."""
        ...


@runtime_checkable
class ScoresPrompt(Protocol):
    """log-probabilities of given prompt tokens"""

    def score(self, chunks: list[list[int]], first: int, timeout_s: float) -> list[list[float]]:
        """For each chunk, the log-prob of chunk[j+1] given chunk[:j+1], for j from `first` to the end."""
        ...


@runtime_checkable
class FullDistribution(Protocol):
    """the whole next-token distribution at every position"""

    def full_logprobs(self, chunks: list[list[int]], first: int, npy: Path, timeout_s: float) -> None:
        """Log-probs over the whole vocabulary at each position from `first`, as float16 rows in `npy`."""
        ...


@runtime_checkable
class TopKDistribution(Protocol):
    """the k likeliest next tokens with their log-probabilities at every position"""

    def top_logprobs(
        self, chunks: list[list[int]], first: int, k: int, timeout_s: float
    ) -> list[list[dict[int, float]]]:
        """Per chunk, per position from `first`: {token: log-prob} of the k likeliest next tokens."""
        ...


@runtime_checkable
class EchoesPromptLogprobs(Protocol):
    """an HTTP /v1/completions that returns the prompt tokens' log-probs (`echo` with `logprobs`),
    which lm-evaluation-harness's log-likelihood tasks read"""

    def echo_logprobs(self, tokens: list[int], timeout_s: float) -> list[float | None]:
        """The log-prob of each prompt token given those before it, as /v1/completions with
        `echo: true, logprobs: 1` returns them over HTTP (None for the first)."""
        ...


CAPABILITIES: tuple[type, ...] = (
    ChatEndpoint, Tokenizes, ScoresPrompt, FullDistribution, TopKDistribution, EchoesPromptLogprobs
)  # fmt: skip


def describe(capability: type) -> str:
    """'ScoresPrompt (log-probabilities of given prompt tokens)': for messages."""
    return f"{capability.__name__} ({' '.join((capability.__doc__ or '').split())})"


@dataclass(frozen=True)
class Load:
    """What a benchmark asks of the engine serving it. The engine is sized for the largest value of
    each field over a job's benchmarks (`Engine.fit`), never below its own settings."""

    concurrency: int = 1  # requests in flight at once
    tokens_per_request: int = 0  # context one generation request needs: prompt + generated tokens
    scored_tokens: int = 0  # longest token sequence scored in one request (prompt log-probs)
    top_logprobs: int = 0  # next-token log-probs asked for at each position

    def combine(self, other: Load) -> Load:
        return Load(**{f.name: max(getattr(self, f.name), getattr(other, f.name)) for f in fields(Load)})


@dataclass
class ServedModel:
    """A running OpenAI-compatible server; engines subclass it and add the capabilities they have.

    The server must answer GET `health_path` with a 2xx status once it can serve, and for as long
    as it can: the start-up waits for it (`http.wait_healthy`) and, during the benchmarks, a server
    silent there for `request_timeout_s` is taken for hung (`measure.ServerWatch`)."""

    health_path: ClassVar[str] = "/health"  # llama-server's and vLLM's

    cfg: Any  # the engine's config: request_timeout_s, smoke settings
    artifact: Artifact
    url: str
    start_s: float  # seconds from launch to a healthy server
    log: Path
    ctx: JobContext
    model_name: str | None = None  # the "model" field of requests, where the server wants one
    process: subprocess.Popen | None = None  # the server (its group leader): watched, its memory measured

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def api_base(self) -> str:
        return f"{self.url}/v1"

    def health_url(self) -> str:
        return f"{self.url}{self.health_path}"

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
