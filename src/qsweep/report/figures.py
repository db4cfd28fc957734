"""The report's pictures, drawn with matplotlib (Agg, no display): the quality x speed x size Pareto
chart with 95% interval bars, the load-test curves by concurrency, and quality against bits per
weight. Each returns a Figure, or None when the sweep holds nothing to draw it from."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from matplotlib.figure import Figure  # noqa: E402

from qsweep import stats  # noqa: E402
from qsweep.report.decide import ReportConfig, error  # noqa: E402
from qsweep.report.rows import JobRow, Value  # noqa: E402


def label(row: JobRow) -> str:
    return f"{row.method} / {row.engine}"


def speed_axis(rows: list[JobRow], cfg: ReportConfig) -> tuple[str, dict[str, Value]]:
    """The Pareto chart's x: capacity under the objective where every job has one, else output
    tok/s at `cfg.concurrency` (default: the highest level measured by every job)."""
    if rows and all(not math.isnan(r.capacity_tok_s) for r in rows):
        # capacities are often equal (the search's bound): the throughput there tells them apart
        values = {r.name: Value(r.capacity_tok_s) for r in rows}
        return f"output tok/s at each job's capacity within {rows[0].objective}", values
    if rows and all(not math.isnan(r.capacity) for r in rows):
        return f"users served within {rows[0].objective}", {r.name: Value(r.capacity) for r in rows}
    common = set.intersection(*(set(r.levels) for r in rows)) if rows else set()
    level = cfg.concurrency if cfg.concurrency is not None else max(common, default=None)
    if level is None:
        return "", {}
    values = {r.name: v for r in rows if (v := r.speed(level)) is not None}
    return f"output tok/s at concurrency {level}", values


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated points (higher x and higher y are better), by x."""
    best: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not best or y > best[-1][1]:
            best.append((x, y))
    return sorted(best)


def pareto(rows: list[JobRow], cfg: ReportConfig) -> Figure | None:
    """Quality (recovery or 1/perplexity ratio) against speed, marker area = memory (or size),
    95% interval bars on both axes where known, the frontier drawn."""
    xlabel, speeds = speed_axis([r for r in rows if r.status == "FINISHED"], cfg)
    points = [(r, speeds[r.name], q) for r in rows if r.name in speeds and (q := r.quality())]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5), layout="constrained")
    footprint = [r.memory_mb if not math.isnan(r.memory_mb) else r.size_mb for r, _, _ in points]
    largest = max((f for f in footprint if not math.isnan(f)), default=1.0) or 1.0
    for (row, x, (_, y)), mb in zip(points, footprint, strict=True):
        area = 60 + 600 * (mb / largest if not math.isnan(mb) else 0.2)
        xerr = stats.Z95 * error(x, cfg.speed_noise) if "tok/s" in xlabel else None
        yerr = stats.Z95 * y.stderr if not math.isnan(y.stderr) else None
        ax.errorbar(x.mean, y.mean, xerr=xerr, yerr=yerr, fmt="none", ecolor="0.45", capsize=3, zorder=1)
        ax.scatter([x.mean], [y.mean], s=area, alpha=0.7, zorder=2, label=f"{label(row)} ({mb:.0f} MB)")
        text = label(row) + (f", {row.capacity:.0f} users" if "capacity" in xlabel else "")
        ax.annotate(text, (x.mean, y.mean), textcoords="offset points", xytext=(8, 6), fontsize=8)
    edge = frontier([(x.mean, y.mean) for _, x, (_, y) in points])
    ax.plot([p[0] for p in edge], [p[1] for p in edge], "--", color="tab:red", lw=1.2, label="frontier")
    kind = points[0][2][0]
    floor = cfg.min_recovery if kind == "recovery" else 1 / cfg.max_ppl_ratio if cfg.max_ppl_ratio else None
    if floor is not None:
        ax.axhline(floor, color="0.6", lw=0.8, ls=":", label=f"quality floor {floor:.3f}")
    if "tok/s" in xlabel and any(math.isnan(x.stderr) for _, x, _ in points):
        xlabel += f"\n(bars: {cfg.speed_noise:.0%} assumed run-to-run noise where a load test ran once)"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"quality vs baseline ({points[0][2][0]}), 95% interval")
    measured = all(not math.isnan(r.memory_mb) for r, _, _ in points)
    ax.set_title(f"Quality x speed x size (marker area = {'peak memory' if measured else 'artifact size'})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", markerscale=0.4)
    return fig


def perf_curves(rows: list[JobRow]) -> Figure | None:
    """Output tok/s, TTFT and TPOT (p50 solid, p99 dashed) against concurrency, one line per job."""
    measured = [r for r in rows if r.levels]
    if not measured:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5), layout="constrained")
    panels = (
        ("output tok/s", ("perf_output_tok_s",)),
        ("TTFT ms (p50 solid, p99 dashed)", ("perf_ttft_ms_p50", "perf_ttft_ms_p99")),
        ("TPOT ms (p50 solid, p99 dashed)", ("perf_tpot_ms_p50", "perf_tpot_ms_p99")),
    )
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for index, row in enumerate(measured):
            color = f"C{index % 10}"
            for key, style in zip(keys, ("-o", "--"), strict=False):
                curve = row.curves.get(key) or {}
                if curve:
                    levels = sorted(curve)
                    ax.plot(levels, [curve[c] for c in levels], style, color=color, ms=4,
                            label=label(row) if style == "-o" else None)  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("concurrency (users)")
        ax.set_xticks(sorted({c for row in measured for c in row.levels}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def quality_vs_bits(rows: list[JobRow]) -> Figure | None:
    """Quality against bits per weight, with 95% interval bars."""
    points = [(r, q) for r in rows if not math.isnan(r.bits_per_weight) and (q := r.quality())]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for index, (row, (_, y)) in enumerate(points):
        yerr = stats.Z95 * y.stderr if not math.isnan(y.stderr) else None
        ax.errorbar(row.bits_per_weight, y.mean, yerr=yerr, fmt="o", color=f"C{index % 10}", capsize=3)
        ax.annotate(
            label(row), (row.bits_per_weight, y.mean), textcoords="offset points", xytext=(6, 4), fontsize=8
        )
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(f"quality vs baseline ({points[0][1][0]})")
    ax.set_title("Quality against bits per weight")
    ax.grid(alpha=0.3)
    return fig


def draw(rows: list[JobRow], cfg: ReportConfig) -> dict[str, Figure]:
    """Every figure there is data for, by file name."""
    figures = {
        "pareto.png": pareto(rows, cfg),
        "perf_curves.png": perf_curves(rows),
        "quality_vs_bits.png": quality_vs_bits(rows),
    }
    return {name: fig for name, fig in figures.items() if fig is not None}
