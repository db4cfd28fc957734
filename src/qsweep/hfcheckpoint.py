"""Facts about a transformers checkpoint directory, read from safetensors headers (no torch needed)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path


def checkpoint_stats(path: Path) -> dict:
    """Bytes of weights and the element count of the stored tensors (packed tensors count packed)."""
    weight_bytes = n_params = 0
    files = sorted(Path(path).glob("*.safetensors"))
    for file in files:
        weight_bytes += file.stat().st_size
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        n_params += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return {"weight_bytes": weight_bytes, "n_params": n_params, "files": len(files)}
