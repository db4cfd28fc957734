"""Where a CI run's time went: `.ci/run` passes the set-up's and the tests' logs and their wall
times; this prints one table (stdlib only: it runs whether or not the set-up worked)."""

import re
import sys
from pathlib import Path


def main(setup_log: str, tests_log: str, setup_s: str, tests_s: str) -> None:
    setup = Path(setup_log).read_text(errors="replace") if Path(setup_log).exists() else ""
    tests = Path(tests_log).read_text(errors="replace") if Path(tests_log).exists() else ""
    print("\n=== CI time ===")
    print(f"set-up   {int(setup_s):>6} s")
    for name, took in re.findall(r"stage environment '([\w-]+)' ready in (\d+) s", setup):
        print(f"  {name:<14} {int(took):>5} s")
    for name in re.findall(r"stage environment '([\w-]+)' is up to date", setup):
        print(f"  {name:<14} up to date")
    print(f"tests    {int(tests_s):>6} s")
    slowest = tests.split("slowest 15 durations", 1)[1] if "slowest 15 durations" in tests else ""
    for took, what in re.findall(r"^([\d.]+)s (\w+ +\S+)", slowest, re.M):
        print(f"  {float(took):>7.1f} s  {what}")
    outcome = re.findall(r"^=+ (.*(?:passed|failed|error).*) =+$", tests, re.M)
    if outcome:
        print(f"  {outcome[-1]}")
    total = int(setup_s) + int(tests_s)
    print(f"total    {total:>6} s ({total / 60:.1f} min; budget 40 min)")


if __name__ == "__main__":
    main(*sys.argv[1:5])
