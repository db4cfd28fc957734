"""Benchmark (prints figures, asserts nothing): llama.cpp served through qsweep versus llama.cpp's
own numbers, side by side in one run, on SmolLM2 Q4_K_M with the same threads.

1. Decode speed at concurrency 1: qsweep's load test (1000 / mean TPOT) over `llama-bench` tg.
   Target: 0.9 or above.
2. Fair serving presets: output tok/s at concurrency 4 over concurrency 1, with the preset (4 slots)
   and without it (1 slot, what the seed ran). Target with the preset: 1.5 or above.

    .venv/bin/python bench/serving_throughput.py [threads]
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

from qsweep import procs
from qsweep.benchmarks import perf
from qsweep.cache import ArtifactCache
from qsweep.config import PathsConfig
from qsweep.context import JobContext
from qsweep.engines import llamacpp
from qsweep.envs import StageEnv
from qsweep.methods import gguf
from qsweep.models import from_conf, prepare

OUTPUT_TOKENS = 128


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else (os.cpu_count() or 1)
    home = Path(PathsConfig().home)
    env = StageEnv("llamacpp")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ctx = JobContext(
            ArtifactCache(home / "cache" / "artifacts"), ArtifactCache(home / "cache" / "models"), tmp
        )
        model = prepare(
            from_conf("smollm2-135m"),
            ctx.model_cache,
            tmp,
        )
        artifact = gguf.build(
            gguf.Config(name="gguf-q4_k_m", quant_type=gguf.GgufQuantType.Q4_K_M), model, "gguf", ctx
        )
        bench_log = tmp / "llama-bench.log"
        procs.run(
            [env.tool("llama-bench"), "-m", artifact.path, "-p", "0", "-n", OUTPUT_TOKENS, "-t", threads,
             "-r", "3", "-o", "md"],
            log_path=bench_log, timeout_s=900, what="llama-bench", env=env.environ(),
        )  # fmt: skip
        tg = float(re.search(rf"tg{OUTPUT_TOKENS}\s*\|\s*([\d.]+)", bench_log.read_text()).group(1))

        def load_test(engine_cfg: llamacpp.Config, concurrency: list[int]) -> dict[int, dict]:
            cfg = perf.Config(concurrency=concurrency, requests_per_level=3, input_tokens=32,
                              output_tokens=OUTPUT_TOKENS, warmup_requests=1, repeats=3)  # fmt: skip
            with llamacpp.serve(engine_cfg, artifact, ctx) as served:
                rows = perf.run(cfg, served, ctx).tables["perf_table.json"]
            return {row["concurrency"]: row for row in rows}

        base = llamacpp.Config(threads=threads)
        fair = load_test(llamacpp.fit_to_load(base, 4, 32 + OUTPUT_TOKENS + 16), [1, 4])
        single = load_test(base, [1, 4])

    decode = 1000 / fair[1]["tpot_ms_mean"]
    print(f"SmolLM2-135M Q4_K_M, {threads} threads, {OUTPUT_TOKENS} output tokens")
    print(f"  llama-bench tg{OUTPUT_TOKENS}            : {tg:8.1f} tok/s")
    print(f"  qsweep decode at c=1 (1000/TPOT): {decode:8.1f} tok/s")
    print(f"  ratio                           : {decode / tg:8.2f}  (target >= 0.9)")
    for label, rows in (("fair preset (4 slots)", fair), ("one slot (no preset)", single)):
        c1, c4 = rows[1]["output_tok_s"], rows[4]["output_tok_s"]
        print(f"  {label:<22}: c1 {c1:7.1f}  c4 {c4:7.1f} tok/s  c4/c1 {c4 / c1:5.2f}")
    print("  target: c4/c1 >= 1.5 with the fair preset")


if __name__ == "__main__":
    main()
