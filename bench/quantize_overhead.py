"""Benchmark (prints figures, asserts nothing): GPTQ wall time through qsweep (stage environment,
cache, calibration file, logging) versus calling llm-compressor's `oneshot` directly in the same
environment with the same recipe and data, side by side. Target ratio: 1.10 or below.

    .venv/bin/python bench/quantize_overhead.py [num_samples] [seq_len]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qsweep.cache import ArtifactCache
from qsweep.calibration import CalibrationConfig
from qsweep.context import JobContext
from qsweep.envs import QUANTIZE, default_home
from qsweep.methods import llmcompressor
from qsweep.models import from_conf, prepare

DIRECT = """
import json, sys
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, calibration, out, n, seq_len, group = sys.argv[1:7]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
tok = AutoTokenizer.from_pretrained(model_dir)
texts = [json.loads(line)["text"] for line in open(calibration)][: int(n)]
enc = tok(texts, truncation=True, max_length=int(seq_len), add_special_tokens=False)
ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme
base = preset_name_to_scheme("W4A16", ["Linear"])
weights = base.weights.model_copy(update={"group_size": int(group)})
scheme = QuantizationScheme(targets=["Linear"], weights=weights)
oneshot(model=model, recipe=GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]), dataset=ds,
        max_seq_length=int(seq_len), num_calibration_samples=int(n))
model.save_pretrained(out, save_compressed=True)
"""


def main() -> None:
    num_samples, seq_len = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (16, 256)
    home = default_home()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ctx = JobContext(
            ArtifactCache(tmp / "cache"),
            ArtifactCache(home / "cache" / "models"),
            tmp / "logs",
            home / "envs",
        )
        model = prepare(from_conf("smollm2-135m"), "smollm2-135m", ctx)
        cfg = llmcompressor.Config(
            algorithm=llmcompressor.Algorithm.gptq,
            scheme="W4A16",
            calibration=CalibrationConfig(num_samples=num_samples, seq_len=seq_len),
        )
        calibration, _ = llmcompressor.calibration_file(cfg, ctx)  # same data for both
        started = time.monotonic()
        artifact = llmcompressor.LlmCompressorMethod().build(cfg, model, "hf", ctx)
        through_qsweep = time.monotonic() - started
        group = artifact.params["method.effective_group_size"]
        env = ctx.stage_env(QUANTIZE)
        started = time.monotonic()
        subprocess.run(
            [
                str(env.python),
                "-c",
                DIRECT,
                *map(str, (model.path, calibration, tmp / "direct", num_samples, seq_len, group)),
            ],
            check=True,
            env=env.environ(),
            timeout=7200,
            capture_output=True,
        )
        direct = time.monotonic() - started
    print(f"GPTQ W4A16 g{group}, {num_samples} x {seq_len} calibration tokens, SmolLM2-135M")
    print(f"  through qsweep : {through_qsweep:7.1f} s")
    print(f"  direct oneshot : {direct:7.1f} s")
    print(f"  ratio          : {through_qsweep / direct:7.2f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
