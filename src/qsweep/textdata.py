"""Texts for perplexity and calibration: a file shipped inside an installed package (found, never
downloaded), or any local file. A slice of it is materialised in the cache by content hash."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from qsweep.cache import ArtifactCache, file_sha256
from qsweep.errors import QsweepError


@dataclass
class TextConfig:
    """A text source. `path` (a local file) wins over `package` + `resource` (a file inside an
    installed distribution). `offset_chars` / `max_chars` take a slice, so calibration and
    evaluation can use different parts of one file."""

    name: str = "wiki"
    package: str | None = "exllamav2"
    resource: str | None = "exllamav2/conversion/standard_cal_data/wiki.utf8"
    path: str | None = None
    offset_chars: int = 0
    max_chars: int | None = None


def package_file(package: str, resource: str) -> Path:
    """A file inside an installed distribution, located without importing the package."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise QsweepError(f"package '{package}' is not installed: run ./setup.sh") from None
    found = Path(str(dist.locate_file(resource)))
    if not found.is_file():
        raise QsweepError(f"'{resource}' is not in package '{package}' {dist.version}: check the config")
    return found


def source_file(text: TextConfig) -> Path:
    """The file a text comes from; raises a one-line error if it is missing."""
    if text.path:
        path = Path(text.path).expanduser()
        if not path.is_file():
            raise QsweepError(f"text file '{text.path}' does not exist: fix the path ({text.name})")
        return path.resolve()
    if text.package and text.resource:
        return package_file(text.package, text.resource)
    raise QsweepError(f"text '{text.name}' has neither a path nor a package resource: set one")


def check_holds(text: TextConfig, tokens: int, setting: str) -> None:
    """Pre-flight: the text exists, is UTF-8, and its slice can hold `tokens` tokens (a token is
    at least one byte, so fewer bytes cannot); one line naming `setting` otherwise."""
    source = source_file(text)
    stat = source.stat()
    size = _slice_bytes(str(source), stat.st_size, stat.st_mtime_ns, text.offset_chars, text.max_chars)
    if size is None:
        raise QsweepError(f"text '{text.name}' ({source}) is not UTF-8 text: give a text file")
    if size < tokens:
        raise QsweepError(
            f"text '{text.name}' has {size} bytes from offset {text.offset_chars}, too few for {tokens} "
            f"tokens: give a longer text or lower {setting}"
        )


@functools.lru_cache(maxsize=16)
def _slice_bytes(path: str, size: int, mtime_ns: int, offset: int, max_chars: int | None) -> int | None:
    try:
        content = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None
    end = None if max_chars is None else offset + max_chars
    return len(content[offset:end].encode("utf-8"))


def _slice_key(text: TextConfig, source: Path) -> dict:
    return {"source_sha256": file_sha256(source), "offset": text.offset_chars, "max": text.max_chars}


def read_slice(text: TextConfig) -> str:
    """The text's slice, read from its source (nothing written)."""
    content = source_file(text).read_text(encoding="utf-8", errors="replace")
    end = None if text.max_chars is None else text.offset_chars + text.max_chars
    piece = content[text.offset_chars : end]
    if not piece.strip():
        raise QsweepError(f"text '{text.name}' is empty after offset {text.offset_chars}: lower offset_chars")
    return piece


def materialize(text: TextConfig, cache: ArtifactCache) -> tuple[Path, str]:
    """The text's slice as a UTF-8 file, and its content hash (part of every cache key that uses it)."""
    source = source_file(text)
    if text.offset_chars == 0 and text.max_chars is None:
        return source, file_sha256(source)

    def build(tmp: Path) -> dict:
        piece = read_slice(text)
        (tmp / "text.txt").write_text(piece, encoding="utf-8")
        return {"chars": len(piece)}

    entry = cache.entry("texts", _slice_key(text, source), build, what=f"text slice '{text.name}'")
    path = entry.path / "text.txt"
    return path, file_sha256(path)


def content_sha(text: TextConfig, cache: ArtifactCache) -> str:
    """The hash `materialize` gives, without writing anything (for a dry run and result keys)."""
    source = source_file(text)
    if text.offset_chars == 0 and text.max_chars is None:
        return file_sha256(source)
    entry = cache.lookup("texts", _slice_key(text, source))
    if entry is not None:
        return file_sha256(entry.path / "text.txt")
    return hashlib.sha256(read_slice(text).encode("utf-8")).hexdigest()
