"""The decision: which job to deploy for which workload, under the user's constraints, and when the
leaders are too close to call.

A figure's noise is its standard error: accuracy and perplexity carry theirs from the per-sample
scores; a load test's from its repeats (`benchmark.perf.repeats`); a load test run once is given
`speed_noise` (relative) as its run-to-run error, since one run cannot tell its own. Two jobs are
within noise when their difference is inside the 95% interval of that difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qsweep import stats
from qsweep.report.rows import JobRow, Value


@dataclass
class ReportConfig:
    """The `report` section: the constraints a recommendation must meet, and how speed is read."""

    # Quality floors against the baseline: accuracy recovery (llm-compressor's CI gate), and the
    # perplexity ratio for jobs measured by perplexity (llama.cpp's Q4_K_M is +2.8% on an 8B
    # model; small models lose more). null: no floor.
    min_recovery: float | None = 0.95
    max_ppl_ratio: float | None = 1.10
    max_memory_mb: float | None = None  # the server's peak memory, where measured
    # The Pareto chart's speed: output tok/s at this concurrency; null: the highest measured
    # (or the capacity under the latency objective, where the load test searched for one).
    concurrency: int | None = None
    speed_noise: float = 0.05  # relative error of a load test measured once (no repeats)
    at_end: bool = True  # write the report at the end of every multirun


@dataclass
class Pick:
    """The answer for one workload: a winner, or the leaders that are within noise of each other."""

    workload: str  # "single user", "throughput at saturation", "smallest footprint", "best quality"
    measure: str  # what was ranked, e.g. "output tok/s at 1 user"
    leaders: list[JobRow] = field(default_factory=list)  # best first; more than one: no single winner
    values: dict[str, str] = field(default_factory=dict)  # job name -> the ranked figure, as shown
    why_none: str = ""  # when no job qualifies

    @property
    def winner(self) -> JobRow | None:
        return self.leaders[0] if len(self.leaders) == 1 else None

    def sentence(self) -> str:
        if not self.leaders:
            return f"**{self.workload}**: no recommendation ({self.why_none})."
        shown = ", ".join(f"`{r.name}` ({self.values[r.name]})" for r in self.leaders)
        if self.winner:
            name = self.winner.name
            return f"**{self.workload}**: `{name}`, {self.values[name]} ({self.measure})."
        return (
            f"**{self.workload}**: no single winner: {shown} are within noise of each other "
            f"on {self.measure}."
        )


def error(value: Value, relative_noise: float) -> float:
    """A figure's standard error, or `relative_noise` of it where it has none."""
    return value.stderr if not math.isnan(value.stderr) else abs(value.mean) * relative_noise


def within_noise(a: Value, b: Value, relative_noise: float = 0.0) -> bool:
    """Whether two figures' difference is inside the 95% interval of that difference."""
    return abs(a.mean - b.mean) <= stats.Z95 * math.hypot(error(a, relative_noise), error(b, relative_noise))


def leaders(
    candidates: list[tuple[JobRow, Value]], higher_is_better: bool, relative_noise: float = 0.0
) -> list[JobRow]:
    """The best candidate and every other whose difference from it is within noise (inside the 95%
    interval of the difference), best first."""
    if not candidates:
        return []
    sign = 1 if higher_is_better else -1
    ranked = sorted(candidates, key=lambda item: -sign * item[1].mean)
    best = ranked[0][1]
    return [row for row, value in ranked if within_noise(best, value, relative_noise)]


def excluded(row: JobRow, cfg: ReportConfig) -> str | None:
    """Why a job cannot be recommended under the constraints, or None."""
    if row.status != "FINISHED":
        return row.status.lower()
    if row.suspect:
        return f"suspect: {row.suspect}"
    quality = row.quality()
    recovery = quality is not None and quality[0] == "recovery"
    if recovery and quality and cfg.min_recovery is not None and quality[1].mean < cfg.min_recovery:
        return f"recovery {quality[1].mean:.3f} < {cfg.min_recovery}"
    if cfg.max_ppl_ratio is not None and row.ppl_ratio > cfg.max_ppl_ratio:
        return f"ppl ratio {row.ppl_ratio:.3f} > {cfg.max_ppl_ratio}"
    if cfg.max_memory_mb is not None and row.memory_mb > cfg.max_memory_mb:
        return f"memory {row.memory_mb:.0f} MB > {cfg.max_memory_mb:.0f} MB"
    return None


def _speed_pick(workload: str, rows: list[JobRow], level_of, cfg: ReportConfig) -> Pick:
    candidates = []
    for row in rows:
        level = level_of(row)
        value = row.speed(level) if level is not None else None
        if value is not None and not row.busy:
            candidates.append((row, value, level))
    levels = sorted({level for _, _, level in candidates})
    at = f"concurrency {levels[0]}" if len(levels) == 1 else "each job's level"
    pick = Pick(workload, f"output tok/s at {at}")
    pick.values = {r.name: f"{v.mean:.1f} tok/s" for r, v, _ in candidates}
    pick.leaders = leaders([(r, v) for r, v, _ in candidates], True, cfg.speed_noise)
    if not candidates:
        pick.why_none = "no load test measured on an idle machine among the qualifying jobs"
    return pick


def recommend(rows: list[JobRow], cfg: ReportConfig) -> tuple[list[Pick], dict[str, str]]:
    """The picks for one model's jobs, and the jobs left out with why."""
    out = {row.name: why for row in rows if (why := excluded(row, cfg))}
    ok = [row for row in rows if row.name not in out]

    def lowest(row: JobRow) -> int | None:
        return min(row.levels) if row.levels else None

    picks = [_speed_pick("single user", ok, lowest, cfg)]

    with_capacity = [r for r in ok if not math.isnan(r.capacity) and not r.busy]
    if with_capacity:
        objective = with_capacity[0].objective or "the latency objective"
        pick = Pick("throughput at saturation", f"users served within {objective}")
        pick.values = {r.name: f"{r.capacity:.0f} users" for r in with_capacity}
        best = max(r.capacity for r in with_capacity)
        # A search's answer is a concurrency, not an average: equal capacities are then told
        # apart by the throughput measured there, within noise.
        top = [r for r in with_capacity if r.capacity == best]
        speeds = [(r, Value(r.capacity_tok_s)) for r in top if not math.isnan(r.capacity_tok_s)]
        pick.leaders = leaders(speeds, True, cfg.speed_noise) if len(speeds) == len(top) else top
        for r in top:
            if not math.isnan(r.capacity_tok_s):
                pick.values[r.name] += f", {r.capacity_tok_s:.1f} tok/s there"
        picks.append(pick)
    else:

        def highest(row: JobRow) -> int | None:
            return max(row.levels) if row.levels else None

        picks.append(_speed_pick("throughput at saturation", ok, highest, cfg))

    by_memory = bool(ok) and all(not math.isnan(r.memory_mb) for r in ok)
    footprint = Pick("smallest footprint", "peak server memory" if by_memory else "artifact size")
    sizes = [(r, r.memory_mb if by_memory else r.size_mb) for r in ok]
    sizes = sorted(((r, mb) for r, mb in sizes if not math.isnan(mb)), key=lambda item: item[1])
    footprint.values = {r.name: f"{mb:.0f} MB" for r, mb in sizes}
    # sizes are exact and memory nearly so: within 1% of the smallest counts as a tie
    footprint.leaders = [r for r, mb in sizes if mb <= 1.01 * sizes[0][1]] if sizes else []
    footprint.why_none = "no size or memory recorded"
    picks.append(footprint)

    rated = [(r, q[1]) for r in ok if (q := r.quality())]
    kind = (rated[0][0].quality() or ("quality",))[0] if rated else ""
    quality = Pick("best quality", kind + " against the baseline" if rated else "quality")
    quality.values = {r.name: _interval(v) for r, v in rated}
    quality.leaders = leaders(rated, True)
    quality.why_none = "no perplexity or accuracy measured"
    picks.append(quality)
    return picks, out


def _interval(value: Value) -> str:
    low, high = value.ci95
    return f"{value.mean:.3f}" if low == high else f"{value.mean:.3f} [{low:.3f}, {high:.3f}]"


def noise_statements(rows: list[JobRow]) -> list[str]:
    """What a reader might misread: accuracy and perplexity differences from the baseline that are
    inside their 95% interval."""
    lines = []
    for row in rows:
        for name, acc in row.accuracy.items():
            if acc.delta is not None and acc.within_noise:
                low, high = acc.delta.ci95
                lines.append(
                    f"`{row.name}` on {name}: {acc.delta.mean:+.3f} against the baseline, 95% interval "
                    f"[{low:+.3f}, {high:+.3f}]: noise, not a difference"
                )
        if row.ppl_within_noise:
            lines.append(f"`{row.name}`: perplexity ratio {row.ppl_ratio:.4f} is within noise of 1")
    return lines


def features(kernels: str) -> set[str]:
    """The features a kernel-path line turns on ("AVX2 = 1 | ..." -> {"AVX2"}), and its backends
    ("CUDA : ARCHS = ..." -> {"CUDA"})."""
    found = set()
    for part in kernels.split("|"):
        if ":" in part:
            backend, _, part = part.partition(":")
            found.add(backend.strip())
        name, _, value = part.partition("=")
        if name.strip() and value.strip() not in ("", "0"):
            found.add(name.strip())
    return found


def like_for_like(rows: list[JobRow]) -> list[str]:
    """Comparisons a reader should not take at face value: runs made on different GPU counts
    (speed and memory), and runs of one engine on different kernel paths (figures differ for that
    alone: 0.1-0.16% in perplexity between AVX2 and AVX-512 builds on the same GGUFs)."""
    lines = []
    done = [row for row in rows if row.status == "FINISHED" and not row.skipped]
    counts: dict[int, list[str]] = {}
    for row in done:
        if row.gpu_count is not None:
            counts.setdefault(row.gpu_count, []).append(row.name)
    if len(counts) > 1:
        groups = "; ".join(f"{n} GPU(s): " + ", ".join(f"`{name}`" for name in names)
                           for n, names in sorted(counts.items()))  # fmt: skip
        lines.append(
            f"runs held different numbers of GPUs ({groups}): their speed and memory differ for that"
        )
    for engine in dict.fromkeys(row.engine for row in done):
        paths: dict[str, list[str]] = {}
        for row in done:
            if row.engine == engine and row.kernels:
                paths.setdefault(row.kernels, []).append(row.name)
        if len(paths) < 2:
            continue
        common = set.intersection(*(features(k) for k in paths))
        groups = "; ".join(
            (" ".join(sorted(features(k) - common)) or "baseline features") + ": "
            + ", ".join(f"`{name}`" for name in names)
            for k, names in paths.items()
        )  # fmt: skip
        lines.append(
            f"{engine} ran on different kernel paths ({groups}): their figures may differ by a few "
            "tenths of a percent for that alone"
        )
    return lines
