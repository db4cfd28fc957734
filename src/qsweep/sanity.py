"""Results that cannot be right are not reported as results: checks on what a job measured that
flag it as suspect (tag `qsweep.suspect`, a note, left out of the report's recommendations), with
the reason. They catch a broken checkpoint or conversion, a failing server and a shared machine,
not small differences: each threshold is far from what a working model gives."""

from __future__ import annotations

import re

# A real model's perplexity on natural text is in the tens at most (SmolLM2-135M: 13 on
# Wikipedia); a broken conversion gave 7443.
PPL_PLAUSIBLE_MAX = 1000.0
# Share of the CPUs busy with other work during a load test above which its figures measure that work.
BUSY_DURING_MAX = 0.25
# Two engines serving the same unquantized model score the same text within this (relative).
BASELINE_AGREEMENT = 0.01


def degenerate(reply: str | None) -> bool:
    """A reply of many words drawn from at most two (`'1 1 1 1 1 1 1 1'`), or empty."""
    if reply is None:
        return False
    words = re.findall(r"\w+|[^\w\s]", reply)
    return not words or (len(words) >= 6 and len({w.lower() for w in words}) <= 2)


def job_reasons(measured: dict[str, float], reply: str | None, is_baseline: bool) -> list[str]:
    """Why a job's figures are suspect, from its own metrics and smoke reply."""
    reasons = []
    if degenerate(reply):
        shown = (reply or "").strip()[:40]
        reasons.append(f"the smoke reply is degenerate ({shown!r}): a broken checkpoint?")
    ppl = measured.get("ppl")
    if ppl is not None and ppl > PPL_PLAUSIBLE_MAX:
        which = "baseline" if is_baseline else "model"
        reasons.append(
            f"{which} perplexity {ppl:.0f} is beyond any real model's here (> {PPL_PLAUSIBLE_MAX:.0f})"
        )
    if measured.get("perf_success_rate_min", 1.0) < 1.0:
        reasons.append(f"{1 - measured['perf_success_rate_min']:.0%} of a load level's requests failed")
    if measured.get("perf_cpu_busy_during", 0.0) > BUSY_DURING_MAX:
        busy = measured["perf_cpu_busy_during"]
        reasons.append(f"{busy:.0%} of the CPUs were busy with other work during the load test")
    return reasons


def baselines_disagree(ppl_by_engine: dict[str, float]) -> str | None:
    """Why the same baseline's perplexity on two engines (same text and settings) is suspect."""
    if len(ppl_by_engine) < 2:
        return None
    low, high = min(ppl_by_engine.values()), max(ppl_by_engine.values())
    if high > low * (1 + BASELINE_AGREEMENT):
        shown = ", ".join(f"{engine} {ppl:.4f}" for engine, ppl in sorted(ppl_by_engine.items()))
        return f"the baseline's perplexity differs by over {BASELINE_AGREEMENT:.0%} between engines ({shown})"
    return None
