"""A content-addressed cache of built artifacts (prepared models, f16 GGUFs, imatrices, quantized files).

An entry's key is the hash of everything its content depends on (model identity, method settings,
calibration data, tool versions). Entries are built in a temporary folder and renamed into place
only when complete, under a file lock, so an interrupted build leaves nothing half-written and two
sweeps sharing the cache build each entry once. The manifest records every file's size, time and
SHA-256; an entry whose files no longer match (truncated, edited, half-copied) is reported and
rebuilt, never used. Build folders a killed process left behind are removed by the next build of
the same entry.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from qsweep.errors import QsweepError

MANIFEST = "qsweep-manifest.json"
log = logging.getLogger(__name__)


def content_key(parts: dict) -> str:
    """A short stable hash of JSON-serialisable key parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, remembered per process by path, size and modification time:
    every cache key of a sweep hashes the same packaged GGUF and texts (SmolLM2's is 93 MB,
    Gemma's chunks 240 MB)."""
    stat = os.stat(path)
    return _sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class CacheEntry:
    path: Path
    manifest: dict
    hit: bool

    @property
    def build_s(self) -> float:
        return float(self.manifest.get("build_s", 0.0))


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


FULL_BELOW_BYTES = 16 << 20  # free space under which a failed build is put down to a full disk


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < FULL_BELOW_BYTES
    except OSError:
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


_damage_said: set[tuple] = set()  # damaged entries this process has warned about


class ArtifactCache:
    """Entries live at <root>/<kind>/<key>/ with a manifest written last.

    With `rebuild_before` (a time.time() value), entries built before then count as missing and are
    rebuilt, replacing the old ones: how a sweep forces work (`rerun=[quantize]`) without
    rebuilding, job after job, an entry it has already rebuilt."""

    def __init__(self, root: Path, rebuild_before: float | None = None):
        self.root = Path(root)
        self.rebuild_before = rebuild_before

    def lookup(self, kind: str, key_parts: dict) -> CacheEntry | None:
        """The entry for `key_parts` if it is cached, without building anything (marked used)."""
        entry = self.lookup_key(kind, content_key(key_parts))
        return self._used(entry) if entry else None

    def lookup_key(self, kind: str, key: str) -> CacheEntry | None:
        """The entry of content key `key` (`content_key` of its parts) if it is cached (a look, not
        a use: the dry run's)."""
        final = self.root / kind / key
        cached = read_manifest(final)
        if not self._current(cached):
            return None
        return CacheEntry(final, cached, hit=True) if self._intact(final, cached) else None

    def _current(self, manifest: dict | None) -> TypeGuard[dict]:
        if manifest is None:
            return False
        return self.rebuild_before is None or manifest.get("built_at_epoch", 0.0) >= self.rebuild_before

    def _intact(self, final: Path, manifest: dict | None) -> dict | None:
        """The manifest if the entry's files are as recorded (entries made before files were
        recorded are taken as they are), else None, with one line saying what changed."""
        if manifest is None:
            return None
        damage = damaged(final, manifest.get("files"))
        if damage:
            said = (str(final), manifest.get("built_at_epoch"), damage)
            if said not in _damage_said:  # an entry is looked at more than once (plan, build, lock)
                _damage_said.add(said)
                log.warning("cache entry %s is damaged (%s): it will be rebuilt, not used", final, damage)
            return None
        return manifest

    def entry(
        self,
        kind: str,
        key_parts: dict,
        build: Callable[[Path], dict | None],
        what: str,
        replace: bool = False,
    ) -> CacheEntry:
        """Return the entry for `key_parts`, running `build(tmp_dir)` first if it is not cached
        (or, with `replace`, always, replacing what was there).

        `build` writes its files into tmp_dir and may return extra manifest fields.
        """
        key = content_key(key_parts)
        final = self.root / kind / key
        cached = read_manifest(final)
        if self._current(cached) and not replace and self._intact(final, cached):
            return self._used(CacheEntry(final, cached, hit=True))
        with _locked(lock_file(final)):
            cached = read_manifest(final)  # another process may have built it while we waited
            if self._current(cached) and not replace and self._intact(final, cached):
                return self._used(CacheEntry(final, cached, hit=True))
            # Whoever built this key holds this lock: folders of earlier builds are a killed
            # process's leftovers (a half-written file among them).
            for stale in [*final.parent.glob(f".tmp-{key}-*"), *final.parent.glob(f".old-{key}-*")]:
                shutil.rmtree(stale, ignore_errors=True)
            tmp = self.root / kind / f".tmp-{key}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            started = time.monotonic()
            try:
                extra = build(tmp) or {}
                manifest = {
                    "kind": kind,
                    "what": what,
                    "key": key,
                    "key_parts": key_parts,
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "built_at_epoch": time.time(),
                    "build_s": round(time.monotonic() - started, 2),
                    **extra,
                    "files": record_files(tmp),
                }
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
                # An old entry, or a folder without a manifest left by a crash, makes way.
                old = self.root / kind / f".old-{key}-{os.getpid()}"
                if final.exists():
                    os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            except (OSError, QsweepError) as err:
                # A tool that ran out of space says so in its own words, if at all (numpy: "884736
                # requested and 807680 written"): the free space on the disk is what tells.
                if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or _nearly_full(tmp):
                    raise QsweepError(
                        f"disk full while building {what} in {self.root}: free space, or point "
                        f"paths.artifact_cache / paths.model_cache at a larger disk ({_first_line(err)})"
                    ) from err
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return self._used(CacheEntry(final, manifest, hit=False))

    @staticmethod
    def _used(entry: CacheEntry) -> CacheEntry:
        """Mark the entry used now (`<key>.used`'s time: what `trim` reads as its last use)."""
        with contextlib.suppress(OSError):
            used_marker(entry.path).touch()
        return entry


def used_marker(entry: Path) -> Path:
    """`<key>.used` beside an entry: its time is the entry's last use."""
    return entry.with_name(f"{entry.name}.used")


def lock_file(entry: Path) -> Path:
    """`<key>.lock` beside an entry: held while it is built, and while it is removed."""
    return entry.with_name(f"{entry.name}.lock")


def read_manifest(entry: Path) -> dict | None:
    """An entry's manifest, or None where there is none (or it is unreadable: the entry is rebuilt)."""
    try:
        return json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def record_files(folder: Path) -> dict[str, dict]:
    """Size, modification time and SHA-256 of every file under `folder`, by relative path."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        stat = path.stat()
        files[str(path.relative_to(folder))] = {
            "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path),
        }  # fmt: skip
    return files


def damaged(folder: Path, files: dict[str, dict] | None) -> str | None:
    """What differs from the recorded files (missing, another size, other content), or None.
    A file with its recorded size and time is taken as unchanged; another time means hashing it."""
    for name, recorded in (files or {}).items():
        path = folder / name
        try:
            stat = path.stat()
        except OSError:
            return f"{name} is missing"
        if stat.st_size != recorded["size"]:
            return f"{name} has {stat.st_size} bytes, {recorded['size']} were written"
        if stat.st_mtime_ns != recorded["mtime_ns"] and file_sha256(path) != recorded["sha256"]:
            return f"{name} was changed after it was written"
    return None
