"""Quality gates: limits a quantized run must meet (llm-compressor's CI fails a model whose accuracy
recovery is below 0.95). A run that misses one keeps all its data; it gets the tag
`qsweep.gates_missed` and a line in the sweep summary.

Each gate is named after a metric with `_min` or `_max`: `gates.ppl_ratio_max=1.05` checks the
metric `ppl_ratio`. The common ones are fields (so a typo fails at compose time); any other metric
goes in `gates.extra` (`+gates.extra.perf_output_tok_s_c4_min=50`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qsweep.errors import QsweepError


@dataclass
class GatesConfig:
    ppl_ratio_max: float | None = None  # perplexity / the baseline's
    kld_mean_max: float | None = None
    top1_agreement_min: float | None = None
    ifeval_recovery_min: float | None = None  # accuracy / the baseline's
    gsm8k_recovery_min: float | None = None
    math_500_recovery_min: float | None = None
    mmlu_recovery_min: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def limits(cfg: GatesConfig) -> dict[str, float]:
    found = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra" and v is not None}
    found.update(cfg.extra)
    for name in found:
        if not name.endswith(("_min", "_max")):
            raise QsweepError(f"gate '{name}' must end in _min or _max: rename gates.extra.{name}")
    return found


def evaluate(cfg: GatesConfig, metrics: dict[str, float]) -> list[str]:
    """The gates this run misses, as readable lines; gates on metrics it lacks are not judged."""
    missed = []
    for name, limit in sorted(limits(cfg).items()):
        metric, bound = name.rsplit("_", 1)
        value = metrics.get(metric)
        if value is None:
            continue
        if (bound == "min" and value < limit) or (bound == "max" and value > limit):
            sign = "<" if bound == "min" else ">"
            missed.append(f"{metric} {value:.4g} {sign} {limit:g}")
    return missed
