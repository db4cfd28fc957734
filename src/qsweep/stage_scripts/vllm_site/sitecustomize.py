"""Imported at start-up by every Python process of a vLLM server that qsweep starts with this folder
on PYTHONPATH (API server, engine core, workers alike), before any vLLM code runs."""

import os

if os.environ.get("QSWEEP_TORCH_MKLDNN") == "0":
    # On CPUs with AMX-INT8, torch sends FP8 matmuls with per-tensor scales to oneDNN, which has
    # only its reference implementation for them: 64 x 576 x 1536 took 0.94 s there against 0.007 s
    # in torch's own FP8 path, taken with oneDNN off (measured 2026-11-26, torch 2.13 CPU).
    import torch

    torch.backends.mkldnn.enabled = False
