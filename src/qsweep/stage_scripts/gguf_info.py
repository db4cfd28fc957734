"""Describe a GGUF file: tensor-type mix, parameter count, bits per weight, architecture.

K-quants and IQ4_XS fall back to other types on tensors whose rows are not a multiple of 256
(SmolLM2's hidden size is 576), so users need to see the real mix. Runs in the llamacpp stage
environment with llama.cpp's own gguf-py; imports nothing from qsweep.
Usage: python gguf_info.py FILE.gguf OUT.json
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict


def main() -> int:
    from gguf import GGUFReader

    path, out = sys.argv[1], sys.argv[2]
    reader = GGUFReader(path)
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
    n_params = n_bytes = 0
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        by_type[kind]["tensors"] += 1
        by_type[kind]["params"] += int(tensor.n_elements)
        by_type[kind]["bytes"] += int(tensor.n_bytes)
        n_params += int(tensor.n_elements)
        n_bytes += int(tensor.n_bytes)
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else "unknown"
    info = {
        "architecture": arch,
        "n_params": n_params,
        "tensor_bytes": n_bytes,
        "file_bytes": os.path.getsize(path),
        "bits_per_weight": 8 * n_bytes / n_params if n_params else 0.0,
        "tensor_types": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["params"])),
    }
    with open(out, "w") as f:
        json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
