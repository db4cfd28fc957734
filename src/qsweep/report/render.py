"""The report as Markdown, CSV and one self-contained HTML page (figures inlined as PNG data, no
script, no network): the same rows, recommendations and noise statements in each."""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure

from qsweep.report.decide import Pick, within_noise
from qsweep.report.rows import JobRow, Value


@dataclass
class Section:
    """One model's part of a report."""

    model: str
    rows: list[JobRow]
    picks: list[Pick]
    left_out: dict[str, str]  # job -> why it cannot be recommended
    noise: list[str]
    unlike: list[str] = field(default_factory=list)  # comparisons not like for like (decide.like_for_like)
    figures: dict[str, Any] = field(default_factory=dict)  # drawn, then as written (PNG)


def _num(value: float, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _ci(value: float, ci: tuple[float, float], digits: int = 4) -> str:
    if math.isnan(value):
        return "-"
    low, high = ci
    return (
        f"{value:.{digits}f}"
        if math.isnan(low)
        else f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    )


def _curve(row: JobRow, key: str, level: int | None) -> float:
    return (row.curves.get(key) or {}).get(level, math.nan) if level is not None else math.nan


def datasets(rows: list[JobRow]) -> list[str]:
    return sorted({name for row in rows for name in row.accuracy})


def table(rows: list[JobRow]) -> tuple[list[str], list[list[str]]]:
    """The evidence table: one row per job, the columns a decision needs."""
    names = datasets(rows)
    header = ["job", "status", "bpw", "size MB", "memory MB", "ppl ratio [95% CI]", "KLD mean / p99"]
    for name in names:
        header += [f"{name} [95% CI]", f"{name} Δ / recovery", f"{name} flips ↓/↑"]
    header += ["tok/s 1 user", "tok/s highest", "TTFT p50/p99 ms", "TPOT p50/p99 ms", "capacity (users)"]
    body = []
    for row in rows:
        low, high = min(row.levels, default=None), max(row.levels, default=None)
        kld = "-" if row.kld_mean is None else f"{row.kld_mean.mean:.4f} / {_num(row.kld_p99, 4)}"
        ratio = _ci(row.ppl_ratio, row.ppl_ratio_ci) + (" ~" if row.ppl_within_noise else "")
        memory = _num(row.memory_mb, 0) + (f" {row.memory_kind}" if row.memory_kind else "")
        status = row.status + (" (reused)" if row.reused_from else "")
        line = [row.name, status, _num(row.bits_per_weight, 2), _num(row.size_mb, 0), memory,
                ratio if not row.is_baseline else "1 (baseline)", kld]  # fmt: skip
        for name in names:
            acc = row.accuracy.get(name)
            if acc is None:
                line += ["-", "-", "-"]
                continue
            line.append(_ci(acc.score.mean, acc.score.ci95, 3) + (f" (n={acc.n})" if acc.n else ""))
            if acc.delta is not None:
                noise = " ~noise" if acc.within_noise else ""
                line.append(f"{acc.delta.mean:+.3f}{noise} / {_num(acc.recovery, 3)}")
            else:
                line.append("baseline" if row.is_baseline else "-")
            flips = f"{acc.flips_to_wrong}/{acc.flips_to_right}" if acc.flips_to_wrong is not None else "-"
            line.append(flips)
        at_low = f"{_num(_curve(row, 'perf_output_tok_s', low))}" + (
            f" (c{low})" if low not in (None, 1) else ""
        )
        at_high = f"{_num(_curve(row, 'perf_output_tok_s', high))}" + (f" (c{high})" if high else "")
        ttft = "/".join(_num(_curve(row, f"perf_ttft_ms_{p}", high), 0) for p in ("p50", "p99"))
        tpot = "/".join(_num(_curve(row, f"perf_tpot_ms_{p}", high), 1) for p in ("p50", "p99"))
        capacity = "-" if math.isnan(row.capacity) else f"{row.capacity:.0f}"
        if row.busy:
            at_low += " (busy CPU)"
        line += [at_low if row.levels else "-", at_high if row.levels else "-",
                 ttft if row.levels else "-", tpot if row.levels else "-", capacity]  # fmt: skip
        body.append(line)
    return header, body


def csv_text(sections: list[Section]) -> str:
    """Plain numbers, one row per job, for spreadsheets and scripts."""
    fields = [
        "model", "job", "method", "engine", "status", "run_id", "reused_from", "bits_per_weight", "size_mb",
        "memory_mb", "ppl", "ppl_ratio", "ppl_ratio_ci_low", "ppl_ratio_ci_high", "kld_mean", "kld_p99",
        "capacity", "capacity_output_tok_s", "objective",
    ]  # fmt: skip
    rows = [row for section in sections for row in section.rows]
    names = datasets(rows)
    for name in names:
        suffixes = ("", "_ci_low", "_ci_high", "_delta", "_delta_ci_low", "_delta_ci_high", "_recovery",
                    "_flips_to_wrong", "_flips_to_right")  # fmt: skip
        fields += [f"{name}{suffix}" for suffix in suffixes]
    levels = sorted({level for row in rows for level in row.levels})
    for level in levels:
        fields += [f"output_tok_s_c{level}", f"ttft_ms_p50_c{level}", f"ttft_ms_p99_c{level}",
                   f"tpot_ms_p50_c{level}", f"tpot_ms_p99_c{level}"]  # fmt: skip
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        record: dict[str, object] = {
            "model": row.model, "job": row.name, "method": row.method, "engine": row.engine,
            "status": row.status, "run_id": row.run_id, "reused_from": row.reused_from,
            "bits_per_weight": row.bits_per_weight, "size_mb": row.size_mb, "memory_mb": row.memory_mb,
            "ppl": row.ppl.mean if row.ppl else math.nan, "ppl_ratio": row.ppl_ratio,
            "ppl_ratio_ci_low": row.ppl_ratio_ci[0], "ppl_ratio_ci_high": row.ppl_ratio_ci[1],
            "kld_mean": row.kld_mean.mean if row.kld_mean else math.nan, "kld_p99": row.kld_p99,
            "capacity": row.capacity, "capacity_output_tok_s": row.capacity_tok_s, "objective": row.objective,
        }  # fmt: skip
        for name, acc in row.accuracy.items():
            low, high = acc.score.ci95
            record |= {name: acc.score.mean, f"{name}_ci_low": low, f"{name}_ci_high": high,
                       f"{name}_recovery": acc.recovery}  # fmt: skip
            if acc.delta is not None:
                d_low, d_high = acc.delta.ci95
                record |= {f"{name}_delta": acc.delta.mean, f"{name}_delta_ci_low": d_low,
                           f"{name}_delta_ci_high": d_high, f"{name}_flips_to_wrong": acc.flips_to_wrong,
                           f"{name}_flips_to_right": acc.flips_to_right}  # fmt: skip
        for level in row.levels:
            for key in ("output_tok_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99"):
                record[f"{key}_c{level}"] = _curve(row, f"perf_{key}", level)
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()})
    return out.getvalue()


def _md_table(header: list[str], body: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, line)) + " |" for line in body]
    return "\n".join(lines)


@dataclass
class Comparison:
    """Two sweeps side by side: per job, each headline figure before and after, with a noise flag."""

    before: str
    after: str
    header: list[str]
    body: list[list[str]]


def markdown(title: str, sections: list[Section], constraints: str, comparison: Comparison | None) -> str:
    parts = [f"# {title}", "", f"Constraints: {constraints}.", ""]
    for section in sections:
        parts += [f"## {section.model}", "", "### Recommendation", ""]
        parts += [f"- {pick.sentence()}" for pick in section.picks]
        if section.left_out:
            parts += [
                "",
                "Not recommended: " + "; ".join(f"`{k}` ({v})" for k, v in section.left_out.items()) + ".",
            ]
        if section.noise:
            parts += ["", "### Within noise", ""] + [f"- {line}" for line in section.noise]
        if section.unlike:
            parts += ["", "### Not like for like", ""] + [f"- {line}" for line in section.unlike]
        header, body = table(section.rows)
        parts += ["", "### Evidence", "", _md_table(header, body), ""]
        parts += [f"![{name}](figures/{name})" for name in section.figures]
        parts.append("")
    if comparison:
        parts += [f"## {comparison.after} against {comparison.before}", "",
                  _md_table(comparison.header, comparison.body), ""]  # fmt: skip
    parts += [LEGEND, ""]
    return "\n".join(parts)


LEGEND = (
    "Quality is against the baseline (`method=none`) on the same engine and settings: accuracy deltas "
    "are paired over the same samples, with 95% intervals; `~noise`: the interval includes 0. `ppl "
    "ratio ~`: its interval includes 1. Flips ↓/↑: answers right in the baseline and wrong here / wrong "
    "there and right here. tok/s is output tokens per second at the load test's lowest and highest "
    "concurrency; TTFT and TPOT at the highest. Capacity: the highest concurrency meeting the latency "
    "objective (evalscope's SLA search). Memory: the server's peak resident (RSS) or GPU memory."
)


def _png(fig: Figure | bytes) -> str:
    if isinstance(fig, bytes):  # already written as PNG
        return base64.b64encode(fig).decode()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return base64.b64encode(buffer.getvalue()).decode()


def html_page(title: str, sections: list[Section], constraints: str, comparison: Comparison | None) -> str:
    """One page that works offline: inline CSS, figures as data: URIs, no script."""
    esc = html.escape

    def table_html(header: list[str], body: list[list[str]], cls: str) -> str:
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in line) + "</tr>" for line in body)
        return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'

    def md_inline(text: str) -> str:  # the few marks the sentences use: **bold** and `code`
        out, bold, code = [], False, False
        for index, part in enumerate(text.replace("**", "\0").split("\0")):
            if index:
                bold = not bold
                out.append("<strong>" if bold else "</strong>")
            pieces = part.split("`")
            for j, piece in enumerate(pieces):
                if j:
                    code = not code
                    out.append("<code>" if code else "</code>")
                out.append(esc(piece))
        return "".join(out)

    body = [f"<h1>{esc(title)}</h1>", f"<p>Constraints: {esc(constraints)}.</p>"]
    for section in sections:
        body += [f"<h2>{esc(section.model)}</h2>", "<h3>Recommendation</h3>", '<ul class="picks">']
        body += [f"<li>{md_inline(pick.sentence())}</li>" for pick in section.picks]
        body.append("</ul>")
        if section.left_out:
            left_out = "; ".join(f"<code>{esc(k)}</code> ({esc(v)})" for k, v in section.left_out.items())
            body.append(f"<p>Not recommended: {left_out}.</p>")
        if section.noise:
            body += (
                ["<h3>Within noise</h3>", "<ul>"]
                + [f"<li>{md_inline(n)}</li>" for n in section.noise]
                + ["</ul>"]
            )
        if section.unlike:
            body += (
                ["<h3>Not like for like</h3>", "<ul>"]
                + [f"<li>{md_inline(n)}</li>" for n in section.unlike]
                + ["</ul>"]
            )
        body += ["<h3>Evidence</h3>", table_html(*table(section.rows), "evidence")]
        for name, fig in section.figures.items():
            image = f'<img class="plot" alt="{esc(name)}" src="data:image/png;base64,{_png(fig)}">'
            body.append(f"<figure>{image}<figcaption>{esc(name)}</figcaption></figure>")
    if comparison:
        body += [f"<h2>{esc(comparison.after)} against {esc(comparison.before)}</h2>",
                 table_html(comparison.header, comparison.body, "comparison")]  # fmt: skip
    body.append(f'<p class="legend">{esc(LEGEND)}</p>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }}
th:first-child, td:first-child {{ text-align: left; }}
thead th {{ background: #f0f2f5; }}
figure {{ margin: 1em 0; }} img.plot {{ max-width: 100%; border: 1px solid #ddd; }}
code {{ background: #f4f4f4; padding: 0 0.2em; }}
.legend {{ color: #555; font-size: 0.85em; max-width: 60em; }}
</style></head>
<body>
{chr(10).join(body)}
</body></html>
"""


def change(before: Value | None, after: Value | None, relative_noise: float, digits: int = 3) -> str:
    """`old -> new (+d%)`, with `~noise` when the change is inside the 95% interval of the difference."""
    if before is None or after is None or math.isnan(before.mean) or math.isnan(after.mean):
        return "-"
    gap = after.mean - before.mean
    noise = within_noise(before, after, relative_noise)
    relative = f" ({gap / before.mean:+.1%})" if before.mean else ""
    flag = " ~noise" if noise and gap else ""
    return f"{before.mean:.{digits}f} → {after.mean:.{digits}f}{relative}{flag}"
