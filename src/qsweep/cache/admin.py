"""What a cache folder holds, whether it is intact, and making room: the functions behind
`python -m qsweep.cache`. Removal takes each entry's own lock without waiting, so an entry that a
sweep is building or using at that moment is left alone (and said so)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qsweep.cache import MANIFEST, damaged, lock_file, read_manifest, used_marker


@dataclass
class EntryInfo:
    """One cache entry, as `list` shows it."""

    path: Path
    kind: str
    what: str  # "model smollm2-135m", "gguf-q4_k_m GGUF", ...; from the manifest
    size: int  # bytes of its files
    built_at: float  # epoch seconds
    last_used: float  # epoch seconds: its `.used` marker (touched on every build and use), else built_at
    files: dict = field(default_factory=dict)  # the manifest's record of its files (size, time, SHA-256)

    @property
    def key(self) -> str:
        return self.path.name


def entries(root: Path) -> Iterator[EntryInfo]:
    """Every complete entry under `root` (`<kind>/<key>/` with a manifest), in folder order."""
    for manifest_file in sorted(Path(root).glob(f"*/*/{MANIFEST}")):
        folder = manifest_file.parent
        if folder.name.startswith("."):
            continue  # a build or removal in progress
        manifest = read_manifest(folder) or {}
        files = manifest.get("files") or {}
        size = sum(f["size"] for f in files.values()) if files else _du(folder)
        built = float(manifest.get("built_at_epoch") or manifest_file.stat().st_mtime)
        try:
            used = used_marker(folder).stat().st_mtime
        except OSError:
            used = built
        what = manifest.get("what") or _describe(manifest)
        yield EntryInfo(folder, folder.parent.name, what, size, built, used, files)


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _describe(manifest: dict) -> str:
    """What an entry made before manifests said so is, from its key parts."""
    parts = manifest.get("key_parts") or {}
    shown = [f"{k}={v}" for k, v in parts.items() if isinstance(v, str | int | float) and len(str(v)) < 40]
    return ", ".join(shown[:3]) or manifest.get("kind", "?")


def verify(root: Path) -> list[tuple[EntryInfo, str]]:
    """The entries whose files differ from their manifest (hashing any whose times changed)."""
    found = [(info, damaged(info.path, info.files)) for info in entries(root)]
    return [(info, damage) for info, damage in found if damage]


def to_trim(
    infos: list[EntryInfo], older_than_s: float | None, max_bytes: int | None, now: float | None = None
) -> list[EntryInfo]:
    """What `trim` removes: entries unused for longer than `older_than_s`, then the least recently
    used until the rest fit in `max_bytes`."""
    now = time.time() if now is None else now
    by_use = sorted(infos, key=lambda i: i.last_used)
    gone = [i for i in by_use if older_than_s is not None and now - i.last_used > older_than_s]
    if max_bytes is not None:
        kept = [i for i in by_use if i not in gone]
        total = sum(i.size for i in kept)
        for info in kept:
            if total <= max_bytes:
                break
            gone.append(info)
            total -= info.size
    return gone


def remove(info: EntryInfo) -> bool:
    """Remove an entry unless a sweep holds its lock now (then False). The folder is first renamed
    out of sight, so no reader ever sees it half-deleted."""
    with open(lock_file(info.path), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            doomed = info.path.with_name(f".old-{info.key}-{os.getpid()}")
            os.replace(info.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            with contextlib.suppress(OSError):
                used_marker(info.path).unlink()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    return True
