"""Helpers shared by the quantize stage scripts (imported as a sibling file; nothing from qsweep)."""

from __future__ import annotations

import json
import re
import resource
import time


def groups_weights(scheme: str) -> bool:
    """Whether a compressed-tensors preset quantizes weights in groups (of 128 by default), which
    must divide every quantized layer's input width: its integer WxAy presets (W4A16, W4A16_ASYM,
    W8A16, W4A8, W4AFP8, ...), but not W8A8 / INT8, which are per channel."""
    return scheme not in ("W8A8", "INT8") and re.fullmatch(r"W\dA(\d+|FP8)(_ASYM)?", scheme) is not None


def calibration_texts(path: str, num_samples: int, tokenizer) -> list[str]:
    """The calibration rows as model input text: `{"text": ...}` as is, `{"messages": [...]}`
    rendered with the model's chat template (so chat-style data looks like what it will serve)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "messages" in row:
                texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
            else:
                texts.append(row["text"])
            if len(texts) == num_samples:
                break
    return texts


def write_summary(spec: dict, started: float, **fields) -> None:
    """Print and save the stage's summary: wall time, peak RSS and what the caller adds."""
    summary = {
        "quantize_s": round(time.monotonic() - started, 2),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **fields,
    }
    print(json.dumps(summary), flush=True)
    with open(spec["summary_out"], "w") as f:
        json.dump(summary, f)
