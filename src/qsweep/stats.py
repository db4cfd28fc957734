"""Uncertainty for every number a sweep compares: standard errors, 95% intervals, deltas against the
baseline, recovery ratios. Normal approximations throughout (what lm-eval-harness and evalscope
users know); `Z95` is the two-sided 95% quantile."""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    mean: float
    stderr: float
    n: int

    @property
    def ci95(self) -> tuple[float, float]:
        return self.mean - Z95 * self.stderr, self.mean + Z95 * self.stderr


def estimate(scores: list[float]) -> Estimate:
    """Mean of per-sample scores (0/1 for accuracy) and its standard error, std(ddof=1)/sqrt(n)."""
    n = len(scores)
    if n == 0:
        raise ValueError("no scores")
    mean = sum(scores) / n
    if n == 1:
        return Estimate(mean, math.nan, 1)
    variance = sum((s - mean) ** 2 for s in scores) / (n - 1)
    return Estimate(mean, math.sqrt(variance / n), n)


def proportion_interval(scores: list[float]) -> tuple[float, float]:
    """95% interval of a mean score. For 0/1 scores the Wilson score interval, which stays inside
    [0, 1] and is not [0, 0] when no sample passed; otherwise the normal interval."""
    n = len(scores)
    if n and all(s in (0.0, 1.0) for s in scores):
        p, z2 = sum(scores) / n, Z95 * Z95
        center = (p + z2 / (2 * n)) / (1 + z2 / n)
        half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        return max(0.0, center - half), min(1.0, center + half)
    return estimate(scores).ci95


@dataclass(frozen=True)
class Comparison:
    delta: float  # candidate - baseline
    stderr: float
    paired: bool  # same samples on both sides: the standard error of the per-sample differences
    recovery: float  # candidate / baseline

    @property
    def ci95(self) -> tuple[float, float]:
        return self.delta - Z95 * self.stderr, self.delta + Z95 * self.stderr

    @property
    def within_noise(self) -> bool:
        """The 95% interval of the delta contains zero: no evidence of a difference."""
        low, high = self.ci95
        return low <= 0.0 <= high


def compare(candidate: dict[str, float], baseline: dict[str, float]) -> Comparison:
    """Compare per-sample scores keyed by sample id. Where both sides scored the same samples the
    delta is paired (much tighter: both models find the same questions hard); otherwise the two
    standard errors add in quadrature."""
    cand, base = estimate(list(candidate.values())), estimate(list(baseline.values()))
    recovery = cand.mean / base.mean if base.mean else math.nan
    common = sorted(set(candidate) & set(baseline))
    if len(common) >= 2 and len(common) == len(candidate) == len(baseline):
        diff = estimate([candidate[k] - baseline[k] for k in common])
        return Comparison(diff.mean, diff.stderr, True, recovery)
    return Comparison(cand.mean - base.mean, math.hypot(cand.stderr, base.stderr), False, recovery)


def flips(candidate: dict[str, float], baseline: dict[str, float]) -> tuple[int, int]:
    """Answer flips over the samples both sides scored: (right -> wrong, wrong -> right), a sample
    being right when its score is at least 0.5. Two models with equal accuracy can still disagree
    on many answers; the flips say how many."""
    common = set(candidate) & set(baseline)
    to_wrong = sum(1 for k in common if baseline[k] >= 0.5 > candidate[k])
    to_right = sum(1 for k in common if candidate[k] >= 0.5 > baseline[k])
    return to_wrong, to_right


def compare_estimates(candidate: Estimate, baseline: Estimate) -> Comparison:
    """Unpaired comparison of two summary estimates (perplexity, where only mean and error are kept)."""
    recovery = candidate.mean / baseline.mean if baseline.mean else math.nan
    return Comparison(
        candidate.mean - baseline.mean, math.hypot(candidate.stderr, baseline.stderr), False, recovery
    )


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of repeated measurements (0 for a single one)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
