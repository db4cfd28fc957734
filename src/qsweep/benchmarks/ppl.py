"""Benchmark `ppl`: perplexity with llama-perplexity's protocol, for every engine.

The text is tokenized whole by the engine's tokenizer (BOS added if the model asks for it), cut
into chunks of n_ctx tokens, the first token of each chunk replaced by BOS, and only the second half
of each chunk scored, so every scored token has at least n_ctx/2 tokens of context. The engine
supplies tokenization and per-token log-probs; this module does the rest.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import cast

from qsweep import stats
from qsweep.benchmarks.base import BENCHMARKS, Benchmark
from qsweep.context import BenchmarkResult, JobContext
from qsweep.engines.served import Load, ScoresPrompt, ServedModel, Tokenizes
from qsweep.errors import QsweepError
from qsweep.settings import neutral
from qsweep.textdata import TextConfig, check_holds, content_sha, materialize

log = logging.getLogger(__name__)


@dataclass
class Config:
    text: TextConfig = field(default_factory=TextConfig)
    n_ctx: int = 512
    max_tokens: int = 8192  # token budget: max_tokens // n_ctx chunks
    timeout_s: int = neutral(3600)


def make_chunks(tokens: list[int], n_ctx: int, max_tokens: int, bos: int | None) -> list[list[int]]:
    """Consecutive n_ctx-token chunks within the budget, each starting with BOS where the model uses one."""
    n_chunks = min(max_tokens // n_ctx, len(tokens) // n_ctx)
    chunks = [list(tokens[i * n_ctx : (i + 1) * n_ctx]) for i in range(n_chunks)]
    if bos is not None:
        for chunk in chunks:
            chunk[0] = bos
    return chunks


def perplexity(logprobs: list[float]) -> tuple[float, float]:
    """exp(mean NLL) and its standard error, computed as llama-perplexity does."""
    count = len(logprobs)
    if count < 2:
        raise QsweepError("perplexity needs at least two scored tokens: raise max_tokens")
    nll = -sum(logprobs) / count
    nll2 = sum(lp * lp for lp in logprobs) / count
    ppl = math.exp(nll)
    variance = nll2 - nll * nll
    return ppl, (math.sqrt(variance / (count - 1)) * ppl if variance > 0 else 0.0)


@BENCHMARKS.register("ppl")
class Perplexity(Benchmark[Config]):
    """Perplexity of the served model on a text, llama-perplexity's protocol; paired ratio to the baseline."""

    requires = (Tokenizes, ScoresPrompt)

    def check(self, cfg: Config) -> None:
        if cfg.n_ctx < 4 or cfg.n_ctx % 2:
            raise QsweepError(f"benchmark.ppl.n_ctx={cfg.n_ctx} must be an even number >= 4")
        if cfg.max_tokens < cfg.n_ctx:
            raise QsweepError(
                f"benchmark.ppl.max_tokens={cfg.max_tokens} scores no chunk of n_ctx={cfg.n_ctx}: "
                f"set it to at least {cfg.n_ctx}"
            )
        check_holds(cfg.text, cfg.n_ctx, "benchmark.ppl.n_ctx")  # one chunk at least

    def load(self, cfg: Config) -> Load:
        return Load(scored_tokens=cfg.n_ctx)

    def data_key(self, cfg: Config, ctx: JobContext) -> dict:
        return {"text": content_sha(cfg.text, ctx.artifact_cache)}

    def run(self, cfg: Config, served: ServedModel, ctx: JobContext) -> BenchmarkResult:
        self.check(cfg)
        text, _ = materialize(cfg.text, ctx.artifact_cache)
        budget = cfg.max_tokens - cfg.max_tokens % cfg.n_ctx
        tokenized = cast(Tokenizes, served).tokenize(
            text, timeout_s=cfg.timeout_s, compare_tokens=budget, max_tokens=budget
        )
        tokens = tokenized.tokens
        chunks = make_chunks(tokens, cfg.n_ctx, cfg.max_tokens, tokenized.bos)
        if not chunks:
            raise QsweepError(
                f"text '{cfg.text.name}' has {len(tokens)} tokens, fewer than n_ctx={cfg.n_ctx}: "
                "use a longer text or a smaller n_ctx"
            )
        first = cfg.n_ctx // 2
        log.info("  perplexity over %d chunks of %d tokens", len(chunks), cfg.n_ctx)
        scored = cast(ScoresPrompt, served).score(chunks, first, timeout_s=cfg.timeout_s)
        flat = [lp for chunk in scored for lp in chunk]
        ppl, err = perplexity(flat)
        metrics = {"ppl": ppl, "ppl_err": err, "ppl_scored_tokens": len(flat), "ppl_chunks": len(chunks)}
        if tokenized.hf_compare is not None:
            metrics["ppl_tokenizer_differing_spans"] = report_split(tokenized.hf_compare, ctx)
        scored_tokens = [t for chunk in chunks for t in chunk[first + 1 :]]
        return BenchmarkResult(metrics, samples={"logprobs": flat, "tokens": scored_tokens, "ppl": ppl})

    def compare(self, samples: dict, baseline: dict) -> dict[str, float]:
        """This model's perplexity against the baseline's on the same text. Where both scored the
        same tokens (same tokenizer) the comparison is paired per token: the mean of the per-token
        NLL differences is ln(PPL / PPL_base), with a standard error far smaller than either PPL's own."""
        ratio = samples["ppl"] / baseline["ppl"]
        metrics = {"ppl_base": baseline["ppl"], "ppl_ratio": ratio}
        if samples["tokens"] == baseline["tokens"]:
            diffs = [b - q for q, b in zip(samples["logprobs"], baseline["logprobs"], strict=True)]
            diff = stats.estimate(diffs)
            low, high = diff.ci95
            metrics.update(
                ppl_ln_ratio=diff.mean,
                ppl_ln_ratio_err=diff.stderr,
                ppl_ratio_ci_low=math.exp(low),
                ppl_ratio_ci_high=math.exp(high),
                ppl_within_noise=float(low <= 0.0 <= high),
            )
        return metrics


def report_split(compare: dict, ctx: JobContext) -> int:
    """Say so when the engine's tokenizer (llama.cpp's GGUF vocabulary) splits the text differently
    from the model's transformers tokenizer: then its perplexity and vLLM's score different tokens."""
    spans = compare["differing_spans"]
    if spans:
        first = compare["examples"][0]
        ctx.note(
            f"llama.cpp's GGUF tokenizer splits the perplexity text differently from the transformers "
            f"tokenizer in {spans} place(s) ({compare['gguf_tokens']} vs {compare['hf_tokens']} tokens; "
            f"first: {first['gguf']} vs {first['hf']}), so its ppl is not exactly comparable with vLLM's"
        )
    return spans
