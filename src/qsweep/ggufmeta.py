"""A GGUF file's metadata (key/value header), read in pure Python: what the pre-flight needs to know
about a model shipped as GGUF (its context length and layer widths) before any stage environment runs.

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian; version 2 and 3).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

# value type -> struct format of a scalar
SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
STRING, ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    length = _read(f, "<Q")
    return f.read(length).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int, keep: bool) -> Any:
    if kind in SCALARS:
        return _read(f, SCALARS[kind])
    if kind == STRING:
        return _string(f)
    if kind == ARRAY:
        item_kind, count = _read(f, "<I"), _read(f, "<Q")
        if not keep and item_kind in SCALARS:  # skip a large array (a tokenizer's vocabulary) unread
            f.seek(count * struct.calcsize(SCALARS[item_kind]), 1)
            return None
        items = [_value(f, item_kind, keep) for _ in range(count)]
        return items if keep else None
    raise ValueError(f"unknown GGUF value type {kind}")


def entries(path: Path, wanted: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """The header's (key, value) pairs in file order; arrays are skipped (value None) unless their
    key is in `wanted`. A reader that has what it needs can stop early: the tokenizer's vocabulary
    (hundreds of thousands of strings) comes after the model's hyper-parameters."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = _read(f, "<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        _read(f, "<Q")  # tensor count
        for _ in range(_read(f, "<Q")):
            key = _string(f)
            kind = _read(f, "<I")
            yield key, _value(f, kind, keep=key in wanted)


def metadata(path: Path, wanted: tuple[str, ...] = ()) -> dict[str, Any]:
    """The header's scalar and string values (arrays only for keys in `wanted`)."""
    return {key: value for key, value in entries(path, wanted) if value is not None}


def hyperparameters(path: Path) -> dict[str, Any]:
    """The header's values up to the tokenizer's (llama.cpp writes `general.*` and the architecture's
    hyper-parameters first): what the pre-flight needs, in microseconds instead of a vocabulary's
    worth of reads."""
    found = {}
    for key, value in entries(path):
        if key.startswith("tokenizer."):
            break
        if value is not None:
            found[key] = value
    return found
