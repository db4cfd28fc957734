"""Quantize a transformers checkpoint with GPTQModel (classic GPTQ format, not compressed-tensors).

Runs inside the quantize stage environment; imports nothing from qsweep. Takes the same JSON spec
as llmcompressor_quantize.py (algorithm must be gptq; scheme W4A16 -> 4 bits).
"""

from __future__ import annotations

import json
import sys
import time

from quantize_common import calibration_texts, write_summary


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    started = time.monotonic()
    from gptqmodel import GPTQModel, QuantizeConfig

    bits = {"W4A16": 4, "W8A16": 8}.get(spec["scheme"])
    if bits is None or spec["algorithm"] != "gptq":
        print(f"GPTQModel backend supports gptq with W4A16/W8A16, not {spec['algorithm']} {spec['scheme']}")
        return 2
    config = QuantizeConfig(bits=bits, group_size=spec["group_size"] or 128, desc_act=False)
    model = GPTQModel.load(spec["model"], config)
    n_params = sum(p.numel() for p in model.model.parameters())
    texts = calibration_texts(spec["calibration"], spec["num_samples"], model.tokenizer)
    tokenized = [model.tokenizer(t, truncation=True, max_length=spec["seq_len"])["input_ids"] for t in texts]
    model.quantize(tokenized, batch_size=1)
    model.save(spec["out"])
    write_summary(
        spec,
        started,
        gptqmodel=__import__("gptqmodel").__version__,
        effective_group_size=config.group_size,
        n_params=n_params,
        calibration_preview=texts[0][:80],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
