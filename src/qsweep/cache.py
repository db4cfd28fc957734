"""A content-addressed cache of built artifacts (prepared models, f16 GGUFs, imatrices, quantized files).

An entry's key is the hash of everything its content depends on (model identity, method settings,
calibration data, tool versions). Entries are built in a temporary folder and renamed into place
only when complete, under a file lock, so an interrupted build leaves nothing half-written and two
sweeps sharing the cache build each entry once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qsweep.errors import QsweepError

MANIFEST = "qsweep-manifest.json"


def content_key(parts: dict) -> str:
    """A short stable hash of JSON-serialisable key parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_sha256(path: Path) -> str:
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


class ArtifactCache:
    """Entries live at <root>/<kind>/<key>/ with a manifest written last.

    With `rebuild_before` (a time.time() value), entries built before then count as missing and are
    rebuilt, replacing the old ones: how a sweep forces work (`rerun=[quantize]`) without
    rebuilding, job after job, an entry it has already rebuilt."""

    def __init__(self, root: Path, rebuild_before: float | None = None):
        self.root = Path(root)
        self.rebuild_before = rebuild_before

    def lookup(self, kind: str, key_parts: dict) -> CacheEntry | None:
        """The entry for `key_parts` if it is cached, without building anything."""
        return self.lookup_key(kind, content_key(key_parts))

    def lookup_key(self, kind: str, key: str) -> CacheEntry | None:
        """The entry of content key `key` (`content_key` of its parts) if it is cached."""
        final = self.root / kind / key
        cached = self._read(final)
        return CacheEntry(final, cached, hit=True) if self._current(cached) else None

    def _current(self, manifest: dict | None) -> bool:
        if manifest is None:
            return False
        return self.rebuild_before is None or manifest.get("built_at_epoch", 0.0) >= self.rebuild_before

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
        cached = self._read(final)
        if self._current(cached) and not replace:
            return CacheEntry(final, cached, hit=True)
        with _locked(self.root / kind / f"{key}.lock"):
            cached = self._read(final)  # another process may have built it while we waited
            if self._current(cached) and not replace:
                return CacheEntry(final, cached, hit=True)
            tmp = self.root / kind / f".tmp-{key}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            started = time.monotonic()
            try:
                extra = build(tmp) or {}
                manifest = {
                    "kind": kind,
                    "key": key,
                    "key_parts": key_parts,
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "built_at_epoch": time.time(),
                    "build_s": round(time.monotonic() - started, 2),
                    **extra,
                }
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
                # An old entry, or a folder without a manifest left by a crash, makes way.
                old = self.root / kind / f".old-{key}-{os.getpid()}"
                if final.exists():
                    os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise QsweepError(
                        f"disk full while building {what} in {self.root}: free space, or point "
                        f"paths.artifact_cache / paths.model_cache at a larger disk"
                    ) from err
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return CacheEntry(final, manifest, hit=False)

    @staticmethod
    def _read(final: Path) -> dict | None:
        try:
            return json.loads((final / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
