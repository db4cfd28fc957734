"""Benchmark (prints figures, asserts nothing): llama.cpp served through qsweep versus llama.cpp's
own numbers, side by side in one run, on SmolLM2 Q4_K_M with the same threads.

1. Decode speed at concurrency 1: qsweep's load test (1000 / mean TPOT) over `llama-bench` tg.
   Target: 0.9 or above.
2. Fair serving presets: output tok/s at concurrency 4 over concurrency 1, with the preset (4 slots)
   and without it (1 slot, what the seed ran). Target with the preset: 1.5 or above.

    .venv/bin/python bench/serving_throughput.py [threads]
"""

from __future__ import annotations

import math
import os
import re
import sys

from smollm2 import bench_context, smollm2_gguf

from qsweep import procs
from qsweep.benchmarks import perf
from qsweep.engines import llamacpp
from qsweep.engines.served import Load
from qsweep.envs import LLAMACPP

OUTPUT_TOKENS = 128
REPEATS = 5  # run to run, c4/c1 moved between 1.45 and 1.65: report the spread


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else (os.cpu_count() or 1)
    with bench_context() as ctx:
        tmp = ctx.log_dir
        env = ctx.stage_env(LLAMACPP)
        artifact = smollm2_gguf(ctx)
        bench_log = tmp / "llama-bench.log"
        procs.run(
            [env.tool("llama-bench"), "-m", artifact.path, "-p", "0", "-n", OUTPUT_TOKENS, "-t", threads,
             "-r", "3", "-o", "md"],
            log_path=bench_log, timeout_s=900, what="llama-bench", env=env.environ(),
        )  # fmt: skip
        tg = float(re.search(rf"tg{OUTPUT_TOKENS}\s*\|\s*([\d.]+)", bench_log.read_text()).group(1))

        def load_test(
            engine_cfg: llamacpp.Config, concurrency: list[int]
        ) -> tuple[dict[int, dict], list[float]]:
            """Rows per concurrency, and llama-server's own decode tok/s of every full-length request."""
            cfg = perf.Config(concurrency=concurrency, requests_per_level=3, input_tokens=32,
                              output_tokens=OUTPUT_TOKENS, warmup_requests=1, repeats=REPEATS)  # fmt: skip
            with llamacpp.serve(engine_cfg, artifact, ctx) as served:
                rows = perf.LoadTest().run(cfg, served, ctx).tables["perf_table.json"]
                log = served.log.read_text(errors="replace")
            server_decode = [
                float(m.group(1))
                for m in re.finditer(
                    rf"\|\s+eval time = .*/\s+{OUTPUT_TOKENS} tokens .*?([\d.]+) tokens per second", log
                )
            ]
            served.log.unlink()
            return {row["concurrency"]: row for row in rows}, server_decode

        base = llamacpp.Config(threads=threads)
        fair, _ = load_test(llamacpp.LlamaCppEngine().fit(base, Load(4, 32 + OUTPUT_TOKENS + 16)), [1, 4])
        # One slot serves every request alone: the server's own timing of each is a decode at c=1.
        single, single_decode = load_test(base, [1, 4])

    decode = 1000 / fair[1]["tpot_ms_mean"]
    print(f"SmolLM2-135M Q4_K_M, {threads} threads, {OUTPUT_TOKENS} output tokens")
    print(f"  llama-bench tg{OUTPUT_TOKENS}            : {tg:8.1f} tok/s")
    print(f"  qsweep decode at c=1 (1000/TPOT): {decode:8.1f} tok/s")
    print(f"  ratio                           : {decode / tg:8.2f}  (target >= 0.9)")
    server = sum(single_decode) / len(single_decode)
    print(
        f"  llama-server's own decode timing: {server:8.1f} tok/s  ({len(single_decode)} requests, one slot)"
    )
    print(
        f"  ratio                           : {server / tg:8.2f}  (the rest of the gap: HTTP and the client)"
    )
    for label, rows in (("fair preset (4 slots)", fair), ("one slot (no preset)", single)):
        c1, c4 = rows[1]["output_tok_s"], rows[4]["output_tok_s"]
        sd1, sd4 = rows[1]["output_tok_s_std"], rows[4]["output_tok_s_std"]
        spread = (c4 / c1) * math.hypot(sd1 / c1, sd4 / c4)  # first-order error of a ratio
        print(f"  {label:<22}: c1 {c1:6.1f} ± {sd1:4.1f}  c4 {c4:6.1f} ± {sd4:4.1f} tok/s  "
              f"c4/c1 {c4 / c1:4.2f} ± {spread:4.2f}")  # fmt: skip
    print(f"  target: c4/c1 >= 1.5 with the fair preset (mean ± sd over {REPEATS} repeats)")


if __name__ == "__main__":
    main()
