"""Quantize a transformers checkpoint with llm-compressor (GPTQ, AWQ, FP8, any recipe).

Runs inside the quantize stage environment; imports nothing from qsweep. Reads a JSON spec:
  {"model": dir, "out": dir, "algorithm": "gptq"|"awq"|"rtn", "scheme": "W4A16", "group_size": 128|null,
   "ignore": [...], "smoothing_strength": 0.8|null, "recipe": path|null,
   "calibration": jsonl of {"text": ...}|null,
   "num_samples": int, "seq_len": int,
   "summary_out": path}
Writes the compressed-tensors checkpoint (with recipe.yaml) to `out` and a summary JSON to `summary_out`.
"""

from __future__ import annotations

import json
import sys
import time

from quantize_common import calibration_texts, groups_weights, write_summary


def allow_awq_on_cpu() -> None:
    """llm-compressor's IntermediatesCache pins offloaded tensors unconditionally, which raises
    'Cannot access accelerator device when none is available' on a CPU-only machine. Pinning
    only matters for host-to-GPU copies, so without an accelerator it becomes a no-op."""
    import torch

    if torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available():
        return
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


def effective_group_size(model, requested: int | None, ignore: list[str]) -> int | None:
    """The requested group size, or the largest power of two below it that divides the input
    width of every quantized Linear layer (SmolLM2's 576 is not a multiple of 128: 64 is used)."""
    import math

    import torch

    if requested is None:
        return None
    widths = [
        m.in_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(name.endswith(i) for i in ignore)
    ]
    common = math.gcd(*widths) if widths else requested
    size = requested
    while size > 1 and common % size:
        size //= 2
    if size != requested:
        print(
            f"WARNING: group_size {requested} does not divide the layer widths (gcd {common}); using {size}",
            flush=True,
        )
    return size


def build_recipe(spec: dict):
    """The recipe file, or the quantization modifier, preceded by SmoothQuant where asked."""
    if spec["recipe"]:
        return spec["recipe"]
    quantization = quantization_modifier(spec)
    if spec.get("smoothing_strength") is None:
        return quantization
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    return [SmoothQuantModifier(smoothing_strength=spec["smoothing_strength"]), quantization]


def quantization_modifier(spec: dict):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

    scheme = spec["scheme"]
    ignore = list(spec["ignore"])
    targets = ["Linear"]
    if spec["group_size"] not in (None, 128) and groups_weights(scheme):
        # A preset with a different group size: same scheme, group_size replaced.
        base: QuantizationScheme = preset_name_to_scheme(scheme, targets)
        weights: QuantizationArgs = base.weights.model_copy(update={"group_size": spec["group_size"]})
        scheme = {"group_0": base.model_copy(update={"weights": weights})}
    if spec["algorithm"] == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        if isinstance(scheme, dict):
            return GPTQModifier(config_groups=scheme, ignore=ignore)
        return GPTQModifier(targets=targets, scheme=scheme, ignore=ignore)
    if spec["algorithm"] == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        if isinstance(scheme, dict):
            return AWQModifier(config_groups=scheme, ignore=ignore)
        return AWQModifier(targets=targets, scheme=scheme, ignore=ignore)
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if isinstance(scheme, dict):
        return QuantizationModifier(config_groups=scheme, ignore=ignore)
    return QuantizationModifier(targets=targets, scheme=scheme, ignore=ignore)


def calibration_dataset(spec: dict, tokenizer):
    from datasets import Dataset

    texts = calibration_texts(spec["calibration"], spec["num_samples"], tokenizer)
    # The chat template already adds any special tokens the model expects.
    encoded = tokenizer(texts, truncation=True, max_length=spec["seq_len"], add_special_tokens=False)
    dataset = Dataset.from_dict(
        {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    )
    return dataset, texts[0][:80]


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    started = time.monotonic()
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    if spec["algorithm"] == "awq":
        allow_awq_on_cpu()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto")
    n_params = sum(p.numel() for p in model.parameters())
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if groups_weights(spec["scheme"]) and not spec["recipe"]:
        spec["group_size"] = effective_group_size(model, spec["group_size"] or 128, spec["ignore"])
    recipe = build_recipe(spec)
    kwargs, preview = {}, None
    if spec["calibration"]:
        dataset, preview = calibration_dataset(spec, tokenizer)
        kwargs.update(
            dataset=dataset,
            max_seq_length=spec["seq_len"],
            num_calibration_samples=spec["num_samples"],
        )
    print(
        f"oneshot: algorithm={spec['algorithm']} scheme={spec['scheme']} samples={spec['num_samples']}",
        flush=True,
    )
    oneshot(model=model, recipe=recipe, **kwargs)
    model.save_pretrained(spec["out"], save_compressed=True)
    tokenizer.save_pretrained(spec["out"])
    write_summary(
        spec,
        started,
        llmcompressor=__import__("llmcompressor").__version__,
        effective_group_size=spec["group_size"],
        n_params=n_params,
        calibration_preview=preview,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
