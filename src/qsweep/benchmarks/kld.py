"""Benchmark `kld`: KL divergence of a quantized model's next-token distributions from the
baseline's, on the same text and positions as `ppl` (llama-perplexity's chunking), through any
engine: each side returns its next-token log-probs at every scored position.

On llama.cpp the whole distribution is kept (float16, as llama-perplexity's --kl-divergence-base
does) and KL(base || quant) is exact; a test checks it against llama-perplexity within 10%. Other
engines (vLLM) return top-k log-probs only: KL is then computed over the baseline's top-k tokens
plus one bucket for the rest of the vocabulary, and a base token missing from the quantized
model's top-k gets its k-th log-prob. That estimate errs low: on SmolLM2 Q4_K_M vs f16, top-64
gave 0.044 and top-512 0.051 where the exact value is 0.056 (top-token agreement matched).
Reported: mean (with standard error), median, 99th percentile, and how often the two models' most
likely token agrees.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import cast

from qsweep import stats
from qsweep.benchmarks.base import BENCHMARKS, Benchmark
from qsweep.benchmarks.ppl import make_chunks
from qsweep.context import BenchmarkResult, JobContext
from qsweep.engines.served import FullDistribution, Load, ServedModel, Tokenizes, TopKDistribution
from qsweep.errors import QsweepError
from qsweep.settings import neutral
from qsweep.textdata import TextConfig, check_holds, content_sha, materialize

log = logging.getLogger(__name__)


@dataclass
class Config:
    text: TextConfig = field(default_factory=TextConfig)
    n_ctx: int = 512
    max_tokens: int = 2048  # token budget: max_tokens // n_ctx chunks; the second half of each scored
    top_k: int = 64
    timeout_s: int = neutral(3600)


@BENCHMARKS.register("kld")
class KlDivergence(Benchmark[Config]):
    """KL divergence of next-token distributions from the baseline's, on the ppl text and positions."""

    requires = (Tokenizes,)
    requires_any = (FullDistribution, TopKDistribution)

    def check(self, cfg: Config) -> None:
        if cfg.n_ctx < 4 or cfg.n_ctx % 2 or cfg.top_k < 1 or cfg.max_tokens < cfg.n_ctx:
            raise QsweepError("benchmark.kld needs an even n_ctx >= 4, max_tokens >= n_ctx and top_k >= 1")
        check_holds(cfg.text, cfg.n_ctx, "benchmark.kld.n_ctx")  # one chunk at least

    def load(self, cfg: Config) -> Load:
        return Load(scored_tokens=cfg.n_ctx, top_logprobs=cfg.top_k)

    def data_key(self, cfg: Config, ctx: JobContext) -> dict:
        return {"text": content_sha(cfg.text, ctx.artifact_cache)}

    def run(self, cfg: Config, served: ServedModel, ctx: JobContext) -> BenchmarkResult:
        self.check(cfg)
        text, _ = materialize(cfg.text, ctx.artifact_cache)
        tokenized = cast(Tokenizes, served).tokenize(
            text, timeout_s=cfg.timeout_s, max_tokens=cfg.max_tokens - cfg.max_tokens % cfg.n_ctx
        )
        chunks = make_chunks(tokenized.tokens, cfg.n_ctx, cfg.max_tokens, tokenized.bos)
        if not chunks:
            raise QsweepError(f"text '{cfg.text.name}' is shorter than n_ctx={cfg.n_ctx}: use a longer text")
        first = cfg.n_ctx // 2
        context = [t for chunk in chunks for t in chunk]  # both sides must have scored the same tokens
        exact = isinstance(served, FullDistribution)  # the whole distribution: exact KL
        what = "full" if exact else f"top-{cfg.top_k}"
        log.info("  %s log-probs over %d chunks of %d tokens", what, len(chunks), cfg.n_ctx)
        if exact:
            npy = ctx.log_dir / "kld" / "logprobs.npy"
            npy.parent.mkdir(parents=True, exist_ok=True)
            cast(FullDistribution, served).full_logprobs(chunks, first, npy, timeout_s=cfg.timeout_s)
            samples = {"tokens": context, "logprobs_npy": str(npy)}
        else:
            top = cast(TopKDistribution, served).top_logprobs(
                chunks, first, cfg.top_k, timeout_s=cfg.timeout_s
            )
            positions = [
                [[int(t) for t in d], [float(v) for v in d.values()]] for chunk in top for d in chunk
            ]
            samples = {"tokens": context, "top": positions}
        # Only the comparison with the baseline gives numbers (the baseline's own kld is 0 by definition).
        return BenchmarkResult({"kld_chunks": len(chunks)}, samples=samples)

    def compare(self, samples: dict, baseline: dict) -> dict[str, float]:
        if samples["tokens"] != baseline["tokens"]:
            log.warning(
                "  kld: this model's tokenizer split the text differently from the baseline's; "
                "no KL divergence (compare runs of one engine family)"
            )
            return {}
        if "logprobs_npy" in samples and "logprobs_npy" in baseline:
            klds, agree = exact_kld(baseline["logprobs_npy"], samples["logprobs_npy"])
        elif "top" in samples and "top" in baseline:
            klds, agree = [], []
            for (b_ids, b_lps), (q_ids, q_lps) in zip(baseline["top"], samples["top"], strict=True):
                quant = dict(zip(q_ids, q_lps, strict=True))
                klds.append(position_kld((b_ids, b_lps), quant))
                agree.append(
                    float(b_ids[b_lps.index(max(b_lps))] == max(quant, key=lambda token: quant[token]))
                )
        else:
            return {}
        kld, top1 = stats.estimate(klds), stats.estimate(agree)
        return {
            "kld_mean": kld.mean,
            "kld_mean_stderr": kld.stderr,
            "kld_median": stats.percentile(klds, 50),
            "kld_p99": stats.percentile(klds, 99),
            "top1_agreement": top1.mean,
            "top1_agreement_stderr": top1.stderr,
        }


def position_kld(base: tuple[list[int], list[float]], quant: dict[int, float]) -> float:
    """KL(base || quant) at one position over the base's top-k tokens plus a rest-of-vocabulary bucket."""
    floor = min(quant.values())
    kl, p_mass, q_mass = 0.0, 0.0, 0.0
    for token, lp in zip(*base, strict=True):
        lq = quant.get(token, floor)
        p = math.exp(lp)
        kl += p * (lp - lq)
        p_mass += p
        q_mass += math.exp(lq)
    p_rest, q_rest = max(1.0 - p_mass, 0.0), max(1.0 - q_mass, 1e-10)
    if p_rest > 0:
        kl += p_rest * math.log(p_rest / q_rest)
    return max(kl, 0.0)


def exact_kld(base_npy: str, quant_npy: str) -> tuple[list[float], list[float]]:
    """Per-position KL(base || quant) over the whole vocabulary, and top-token agreement."""
    import numpy as np

    base = np.load(base_npy).astype(np.float32)
    quant = np.load(quant_npy).astype(np.float32)
    kl = (np.exp(base) * (base - quant)).sum(axis=1)
    agree = base.argmax(axis=1) == quant.argmax(axis=1)
    return np.maximum(kl, 0.0).tolist(), agree.astype(float).tolist()
