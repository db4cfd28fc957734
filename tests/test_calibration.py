"""Calibration data (qsweep.calibration): JSON records read one by one, chat conversations, the
cached calibration set."""

from __future__ import annotations

import json

import pytest

from qsweep import calibration
from qsweep.cache import ArtifactCache
from qsweep.errors import QsweepError


def test_truncated_json_array_is_read_record_by_record(tmp_path):
    records = [{"id": i, "conversations": [{"from": "human", "value": "x" * i}]} for i in range(5)]
    text = json.dumps(records, indent=2)
    cut = tmp_path / "cut.json"
    cut.write_text(text[: text.index('"id": 4')])  # cut inside the last record, as in the wheel
    assert [r["id"] for r in calibration.json_array_records(cut, chunk_chars=16)] == [0, 1, 2, 3]
    whole = tmp_path / "whole.json"
    whole.write_text(text)
    assert [r["id"] for r in calibration.json_array_records(whole, chunk_chars=7)] == [0, 1, 2, 3, 4]


def test_sharegpt_conversations_map_roles_and_drop_unusable_ones(tmp_path):
    def turn(who, what):
        return {"from": who, "value": what}

    records = [
        {"conversations": [turn("human", "hi"), turn("gpt", "hello there")]},
        {"conversations": [turn("human", "only a question, no answer")]},
        {"conversations": [turn("human", "q"), turn("unknown-speaker", "a")]},
        {"conversations": [turn("system", "be brief"), turn("human", "2+2?"), turn("chatgpt", "4")]},
        {"conversations": [turn("human", "  "), turn("gpt", "empty question")]},
        {"conversations": [turn("human", "a"), turn("gpt", "b")]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))
    found = calibration.conversations(path, skip=0, count=10, min_chars=3)
    assert found == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
    ]  # the last one is shorter than min_chars
    assert calibration.conversations(path, skip=1, count=1, min_chars=3) == found[1:]


def test_chat_calibration_from_the_wheel_is_cached_by_settings(tmp_path):
    cache = ArtifactCache(tmp_path)
    cal = calibration.CalibrationConfig(source=calibration.CalibrationSource.chat, num_samples=3, seq_len=64)
    path, sha = calibration.calibration_file(cal, cache)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3 and all({"user", "assistant"} <= {m["role"] for m in r["messages"]} for r in rows)
    assert calibration.calibration_file(cal, cache) == (path, sha)
    cal.skip_conversations = 3
    other, other_sha = calibration.calibration_file(cal, cache)
    assert other != path and other_sha != sha
    cal.num_samples = 10**6
    with pytest.raises(QsweepError, match="lower calibration.num_samples"):
        calibration.calibration_file(cal, cache)
