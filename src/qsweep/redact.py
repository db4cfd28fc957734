"""Secrets never reach MLflow or a kept log: values under secret-looking keys (`hf_token`, `api_key`,
`password`...), the argument after a secret-looking flag (`--api-key X`), `key=value` words with such
a key, and the values of secret-looking environment variables wherever they appear in text."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from qsweep import environ

# The last part of a key that names a secret: hf_token, api_key, password... (not max_tokens).
SECRET_KEY = re.compile(r"(^|[_.-])(token|secret|password|passwd|api[_-]?key|credentials?)$", re.IGNORECASE)
MASK = "***"


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key.rsplit(".", 1)[-1].lstrip("-+~")))


def argv(args: list[Any]) -> list[str]:
    """A command line with the value after a secret flag, and `secret_key=value` words, masked."""
    return [str(arg) for arg in _masked_list(list(args))]


def _masked_list(items: list[Any]) -> list[Any]:
    out, hide_next = [], False
    for item in items:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        if isinstance(item, str | os.PathLike):
            word = str(item)
            key, eq, _ = word.partition("=")
            if eq and is_secret_key(key):
                out.append(f"{key}={MASK}")
                continue
            hide_next = word.startswith("-") and is_secret_key(word)
        out.append(item)
    return out


def tree(node: Any, key: str = "") -> Any:
    """A config (dicts, lists, scalars) with secret values masked; lists read as command lines."""
    if isinstance(node, dict):
        return {k: tree(v, str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return _masked_list([tree(v) for v in node])
    if key and is_secret_key(key) and node not in (None, ""):
        return MASK
    return node


def secret_values(node: Any) -> list[str]:
    """The values `tree` masks in this config, to mask them in logs too."""
    found: list[str] = []

    def walk(original: Any, masked: Any) -> None:
        if isinstance(original, dict):
            for k, v in original.items():
                walk(v, masked[k])
        elif isinstance(original, list):
            for o, m in zip(original, masked, strict=True):
                if m == MASK and o != MASK:
                    found.append(str(o))
                elif isinstance(o, str) and isinstance(m, str) and m.endswith(f"={MASK}"):
                    found.append(o.partition("=")[2])
                else:
                    walk(o, m)
        elif masked == MASK and original != MASK:
            found.append(str(original))

    walk(node, tree(node))
    return [value for value in found if len(value) >= 4]


def environment_secrets() -> list[str]:
    """Values of this process's secret-looking environment variables (HF_TOKEN, OPENAI_API_KEY...)."""
    return [v for k, v in environ.snapshot().items() if is_secret_key(k.lower()) and len(v) >= 6]


def text(value: str, also: Sequence[str] = ()) -> str:
    """Text with the environment's secret values (and `also`) masked."""
    for secret in [*environment_secrets(), *also]:
        value = value.replace(secret, MASK)
    return value


def file(path, also: Sequence[str] = ()) -> None:
    """Mask the environment's secret values (and `also`: the config's) in a log file, in place,
    before it is kept."""
    secrets = [*environment_secrets(), *also]
    if not secrets:
        return
    try:
        content = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return
    if any(secret in content for secret in secrets):
        path.write_text(text(content, also), encoding="utf-8", errors="surrogateescape")
