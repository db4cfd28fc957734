"""The artifact cache (qsweep.cache): built once under a lock, whole or not at all, rebuilt when
damaged or stale, listed, verified and trimmed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from qsweep.cache import ArtifactCache, content_key
from qsweep.errors import QsweepError


def _entry(cache, kind: str, name: str, size: int):
    return cache.entry(kind, {"name": name}, lambda tmp: (tmp / "data.bin").write_bytes(b"x" * size) and None,
                       what=f"{kind} {name}")  # fmt: skip


def test_cache_builds_once_and_reuses(tmp_path):
    cache, calls = ArtifactCache(tmp_path), []

    def build(tmp: Path) -> dict:
        calls.append(1)
        (tmp / "out.bin").write_bytes(b"x")
        return {"size": 1}

    first = cache.entry("kind", {"a": 1}, build, what="thing")
    second = cache.entry("kind", {"a": 1}, build, what="thing")
    other = cache.entry("kind", {"a": 2}, build, what="thing")
    assert calls == [1, 1] and not first.hit and second.hit and not other.hit
    assert second.path == first.path and (second.path / "out.bin").read_bytes() == b"x"
    assert second.manifest["size"] == 1 and second.manifest["key"] == content_key({"a": 1})


def test_cache_keeps_nothing_from_a_failed_build(tmp_path):
    cache = ArtifactCache(tmp_path)

    def broken(tmp: Path) -> dict:
        (tmp / "half.bin").write_bytes(b"partial")
        raise RuntimeError("tool crashed")

    with pytest.raises(RuntimeError):
        cache.entry("kind", {"a": 1}, broken, what="thing")
    assert [p.name for p in (tmp_path / "kind").iterdir() if not p.name.endswith(".lock")] == []
    rebuilt = cache.entry("kind", {"a": 1}, lambda tmp: (tmp / "ok").write_text("1") and None, what="thing")
    assert not rebuilt.hit and (rebuilt.path / "ok").exists()


def test_cache_rebuilds_an_entry_without_manifest(tmp_path):
    (tmp_path / "kind" / content_key({"a": 1})).mkdir(parents=True)  # a crash left a folder behind
    entry = ArtifactCache(tmp_path).entry("kind", {"a": 1}, lambda tmp: None, what="thing")
    assert not entry.hit


def test_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path):
    import errno

    def full(tmp: Path) -> dict:
        (tmp / "part").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(QsweepError, match="disk full while building the thing.*larger disk"):
        ArtifactCache(tmp_path).entry("kind", {"a": 1}, full, what="the thing")
    assert [p.name for p in (tmp_path / "kind").iterdir() if not p.name.endswith(".lock")] == []


def test_cache_rebuilds_entries_older_than_a_sweep_once(tmp_path):
    """rerun=[quantize]: entries built before the sweep began count as missing, are rebuilt in
    place, and the rebuilt entry is a hit for every later job of the same sweep."""
    calls = []

    def build(tmp: Path) -> dict:
        calls.append(1)
        (tmp / "out").write_text(str(len(calls)))
        return {}

    old = ArtifactCache(tmp_path).entry("kind", {"a": 1}, build, what="thing")
    began = time.time()
    forced = ArtifactCache(tmp_path, rebuild_before=began)
    rebuilt = forced.entry("kind", {"a": 1}, build, what="thing")
    again = forced.entry("kind", {"a": 1}, build, what="thing")
    assert not rebuilt.hit and again.hit and calls == [1, 1]
    assert rebuilt.path == old.path and (rebuilt.path / "out").read_text() == "2"
    assert ArtifactCache(tmp_path).lookup("kind", {"a": 1}).hit
    assert ArtifactCache(tmp_path, rebuild_before=time.time() + 1).lookup("kind", {"a": 1}) is None


def test_a_damaged_cache_entry_is_reported_and_rebuilt_never_used(tmp_path, caplog):
    from qsweep.cache import ArtifactCache

    cache, builds = ArtifactCache(tmp_path), []

    def build(tmp):
        builds.append(1)
        (tmp / "model.gguf").write_bytes(b"x" * 1000)
        (tmp / "info.json").write_text("{}")

    entry = cache.entry("gguf", {"k": 1}, build, what="a file")
    assert cache.lookup("gguf", {"k": 1}).path == entry.path and len(builds) == 1
    # a killed build of the same key left its folder: the next build removes it
    leftover = tmp_path / "gguf" / f".tmp-{entry.manifest['key']}-99999"
    leftover.mkdir()
    (leftover / "model.gguf").write_bytes(b"half")
    with open(entry.path / "model.gguf", "r+b") as f:  # truncated to half, as a full disk would
        f.truncate(500)
    assert cache.lookup("gguf", {"k": 1}) is None
    assert "is damaged (model.gguf has 500 bytes, 1000 were written)" in caplog.text
    again = cache.entry("gguf", {"k": 1}, build, what="a file")  # looks again, twice: said once
    assert caplog.text.count("is damaged") == 1
    assert not again.hit and len(builds) == 2 and (again.path / "model.gguf").stat().st_size == 1000
    assert not leftover.exists()
    # edited in place with the same size: found by its hash once its time changed
    (again.path / "model.gguf").write_bytes(b"y" * 1000)
    assert cache.lookup("gguf", {"k": 1}) is None and "was changed after it was written" in caplog.text
    # an entry made before files were recorded is taken as it is
    manifest = json.loads((again.path / "qsweep-manifest.json").read_text())
    del manifest["files"]
    (again.path / "qsweep-manifest.json").write_text(json.dumps(manifest))
    assert cache.lookup("gguf", {"k": 1}) is not None


def test_cache_listing_says_what_each_entry_is_its_size_and_last_use(tmp_path):
    from qsweep.cache import ArtifactCache, admin, used_marker

    cache = ArtifactCache(tmp_path)
    old = _entry(cache, "gguf", "old", 3000)
    _entry(cache, "models", "recent", 5000)
    week_ago = time.time() - 7 * 86400
    os.utime(used_marker(old.path), (week_ago, week_ago))
    infos = {i.what: i for i in admin.entries(tmp_path)}
    assert set(infos) == {"gguf old", "models recent"}
    assert infos["gguf old"].size == 3000 and infos["models recent"].size == 5000
    assert infos["gguf old"].last_used == pytest.approx(week_ago, abs=1)
    assert cache.lookup("gguf", {"name": "old"}) is not None  # a use moves its last use to now
    assert next(i for i in admin.entries(tmp_path) if i.what == "gguf old").last_used > week_ago + 1000


def test_cache_verify_finds_a_changed_file_and_trim_removes_by_age_then_size(tmp_path):
    from qsweep.cache import ArtifactCache, admin, used_marker

    cache = ArtifactCache(tmp_path)
    made = {name: _entry(cache, "gguf", name, size) for name, size in (("a", 4000), ("b", 3000), ("c", 2000))}
    for days, name in ((40, "a"), (10, "b"), (1, "c")):
        then = time.time() - days * 86400
        os.utime(used_marker(made[name].path), (then, then))
    with open(made["c"].path / "data.bin", "r+b") as f:
        f.truncate(10)
    assert [(i.what, why) for i, why in admin.verify(tmp_path)] == [
        ("gguf c", "data.bin has 10 bytes, 2000 were written")
    ]
    infos = list(admin.entries(tmp_path))
    assert [i.what for i in admin.to_trim(infos, older_than_s=30 * 86400, max_bytes=None)] == ["gguf a"]
    # by size: least recently used first until the rest fit
    assert [i.what for i in admin.to_trim(infos, older_than_s=None, max_bytes=2500)] == ["gguf a", "gguf b"]


def test_cache_trim_leaves_an_entry_a_sweep_holds_and_removes_the_rest_whole(tmp_path):
    import fcntl

    from qsweep.cache import ArtifactCache, admin

    cache = ArtifactCache(tmp_path)
    busy, idle = _entry(cache, "gguf", "busy", 100), _entry(cache, "gguf", "idle", 100)
    infos = {i.what: i for i in admin.entries(tmp_path)}
    with open(busy.path.with_name(f"{busy.path.name}.lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a sweep building or reading it
        assert admin.remove(infos["gguf busy"]) is False
    assert admin.remove(infos["gguf idle"]) is True
    assert busy.path.is_dir() and not idle.path.exists()
    assert not list(tmp_path.glob("gguf/.old-*")), "nothing half-deleted is left"
    assert cache.lookup("gguf", {"name": "idle"}) is None


def test_cache_command_lists_and_verifies(tmp_path, capsys):
    from qsweep.cache import ArtifactCache
    from qsweep.cache.__main__ import main

    _entry(ArtifactCache(tmp_path / "artifacts"), "gguf", "q4", 1234)
    paths = [f"paths.artifact_cache={tmp_path / 'artifacts'}", f"paths.model_cache={tmp_path / 'models'}"]
    assert main(["list", *paths]) == 0
    listed = capsys.readouterr().out
    assert "gguf q4 (" in listed and "1 entries, 0.0 MB" in listed
    assert main(["verify", *paths]) == 0 and "1 entries checked, all intact" in capsys.readouterr().out
