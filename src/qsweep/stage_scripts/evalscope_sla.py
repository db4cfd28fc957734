"""Capacity under a latency objective, found by evalscope perf's own SLA auto-tune.

Runs in the evalscope stage environment:
    python evalscope_sla.py RESULT.json <evalscope perf arguments, with --sla-auto-tune ...>

`evalscope perf --sla-auto-tune` keeps its decision (the selected concurrency per objective) only on
the Python object it returns and in its log; this script runs the same entry point and writes that
decision and every probe it measured to RESULT.json for qsweep to read.
"""

import json
import sys

from evalscope.perf.arguments import Arguments, parse_args
from evalscope.perf.main import run_perf_benchmark


def main() -> None:
    result_path = sys.argv[1]
    sys.argv = ["evalscope-perf", *sys.argv[2:]]  # parse_args reads sys.argv
    result = run_perf_benchmark(Arguments.from_args(parse_args()))
    with open(result_path, "w", encoding="utf-8") as out:
        json.dump(
            {
                "selections": [s.model_dump() for s in result.selections],
                "probes": [p.model_dump() for p in result.probes],
            },
            out,
            indent=1,
            default=str,
        )


if __name__ == "__main__":
    main()
