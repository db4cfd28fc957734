"""`python -m qsweep.cache`: what the artifact and model caches hold, whether it is intact, and
making room.

    python -m qsweep.cache list                          # kind, what, size, age, last use
    python -m qsweep.cache verify                        # entries whose files changed (exit 1 if any)
    python -m qsweep.cache trim --unused-days 30         # remove what no sweep used for 30 days
    python -m qsweep.cache trim --max-gb 50 --dry-run    # least recently used first, down to 50 GB
    python -m qsweep.cache list paths.artifact_cache=/shared/qsweep-cache   # any config value
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from qsweep import config
from qsweep.cache import admin
from qsweep.errors import QsweepError


def caches(overrides: list[str]) -> list[Path]:
    """The artifact and model cache folders of qsweep's config with these overrides."""
    cfg = config.compose(overrides, job_name="cache")
    return [Path(cfg.paths.artifact_cache).expanduser(), Path(cfg.paths.model_cache).expanduser()]


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def _age(seconds: float) -> str:
    days, hours = divmod(seconds / 3600, 24)
    return f"{days:.0f} d" if days >= 1 else f"{hours:.1f} h"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qsweep.cache", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["list", "verify", "trim"])
    parser.add_argument("--unused-days", type=float, help="trim: entries no sweep used for this long")
    parser.add_argument("--max-gb", type=float, help="trim: least recently used first, until this is left")
    parser.add_argument("--dry-run", action="store_true", help="trim: say what would go, remove nothing")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. paths.artifact_cache=/dir")
    args = parser.parse_args(argv)
    if args.action == "trim" and args.unused_days is None and args.max_gb is None:
        parser.error("trim needs --unused-days and/or --max-gb")
    roots = caches(args.overrides)
    infos = [info for root in roots for info in admin.entries(root)]
    now = time.time()
    if args.action == "list":
        print(f"{'kind':<18} {'size':>10} {'built':>7} {'used':>7}  what (folder)")
        for info in sorted(infos, key=lambda i: (i.kind, -i.last_used)):
            print(f"{info.kind:<18} {_size(info.size):>10} {_age(now - info.built_at):>7} "
                  f"{_age(now - info.last_used):>7}  {info.what} ({info.path})")  # fmt: skip
        print(f"{len(infos)} entries, {_size(sum(i.size for i in infos))} in {', '.join(map(str, roots))}")
        return 0
    if args.action == "verify":
        bad = [found for root in roots for found in admin.verify(root)]
        for info, damage in bad:
            print(f"damaged: {info.kind} {info.what} ({info.path}): {damage}")
        verdict = f"{len(bad)} damaged (a sweep rebuilds a damaged entry)" if bad else "all intact"
        print(f"{len(infos)} entries checked, {verdict}")
        return 1 if bad else 0
    older = args.unused_days * 86400 if args.unused_days is not None else None
    max_bytes = int(args.max_gb * 2**30) if args.max_gb is not None else None
    freed, busy = 0, []
    for info in admin.to_trim(infos, older, max_bytes, now):
        line = f"{info.kind} {info.what}, {_size(info.size)}, unused {_age(now - info.last_used)}"
        if args.dry_run or admin.remove(info):
            print(f"{'would remove' if args.dry_run else 'removed'} {line}")
            freed += info.size
        else:
            busy.append(info)
            print(f"kept {line}: a sweep is using it now")
    kept = f", {len(busy)} in use kept" if busy else ""
    print(f"{'would free' if args.dry_run else 'freed'} {_size(freed)}{kept}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except QsweepError as err:
        print(f"qsweep: {err}", file=sys.stderr)
        sys.exit(2)
