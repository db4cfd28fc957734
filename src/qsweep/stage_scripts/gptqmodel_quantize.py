"""Quantize a transformers checkpoint with GPTQModel (classic GPTQ format, not compressed-tensors).

Runs inside the quantize stage environment; imports nothing from qsweep. Takes the same JSON spec
as llmcompressor_quantize.py (algorithm must be gptq; scheme W4A16 -> 4 bits).
"""

from __future__ import annotations

import json
import resource
import sys
import time


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    started = time.monotonic()
    from gptqmodel import GPTQModel, QuantizeConfig

    bits = {"W4A16": 4, "W8A16": 8}.get(spec["scheme"])
    if bits is None or spec["algorithm"] != "gptq":
        print(f"GPTQModel backend supports gptq with W4A16/W8A16, not {spec['algorithm']} {spec['scheme']}")
        return 2
    with open(spec["calibration"]) as f:
        texts = [json.loads(line)["text"] for line in f][: spec["num_samples"]]
    config = QuantizeConfig(bits=bits, group_size=spec["group_size"] or 128, desc_act=False)
    model = GPTQModel.load(spec["model"], config)
    n_params = sum(p.numel() for p in model.model.parameters())
    tokenized = [model.tokenizer(t, truncation=True, max_length=spec["seq_len"])["input_ids"] for t in texts]
    model.quantize(tokenized, batch_size=1)
    model.save(spec["out"])
    summary = {
        "quantize_s": round(time.monotonic() - started, 2),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gptqmodel": __import__("gptqmodel").__version__,
        "effective_group_size": config.group_size,
        "n_params": n_params,
    }
    print(json.dumps(summary), flush=True)
    with open(spec["summary_out"], "w") as f:
        json.dump(summary, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
