"""Benchmark (prints figures, asserts nothing): what `cpu_wait` buys two jobs that share the CPU.

llama-perplexity (the same ggml kernels and OpenMP threads as qsweep's scoring, importance matrix
and quantization) on SmolLM2 Q4_K_M, with as many threads as cores, run alone and as two at once,
with the tools' default wait (`spin`) and with qsweep's `sleep` (StageEnv with CpuWait.sleep:
OMP_WAIT_POLICY=PASSIVE). Prints each wall time and the slowdowns against the spinning run alone,
all measured in this one process, one after another. Targets: a pair sleeping well under a pair
spinning, and sleeping alone no slower than spinning alone (it is the default for untimed work).

    .venv/bin/python bench/cpu_wait.py [chunks]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from smollm2 import bench_context, smollm2_gguf

from qsweep.envs import LLAMACPP, CpuWait
from qsweep.textdata import TextConfig, materialize

REPEATS = 2


def main() -> None:
    chunks = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    with bench_context() as ctx:
        artifact = smollm2_gguf(ctx)
        text, _ = materialize(TextConfig(), ctx.artifact_cache)

        def run(wait: CpuWait, at_once: int) -> float:
            """Seconds until all `at_once` copies finished (each its own process, started together)."""
            env = ctx.stage_env(LLAMACPP)
            env.cpu_wait = wait
            cmd = [str(env.tool("llama-perplexity")), "-m", str(artifact.path), "-f", str(text), "-c", "512",
                   "--chunks", str(chunks)]  # fmt: skip
            started = time.monotonic()
            procs = [
                subprocess.Popen(cmd, env=env.environ(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for _ in range(at_once)
            ]
            for proc in procs:
                if proc.wait(timeout=1800) != 0:
                    raise SystemExit(f"llama-perplexity failed ({proc.returncode}): {' '.join(cmd)}")
            return time.monotonic() - started

        cases = [("alone, spin", CpuWait.spin, 1), ("alone, sleep", CpuWait.sleep, 1),
                 ("pair, spin", CpuWait.spin, 2), ("pair, sleep", CpuWait.sleep, 2)]  # fmt: skip
        seconds = {name: statistics.median(run(wait, n) for _ in range(REPEATS)) for name, wait, n in cases}
        base = seconds["alone, spin"]
        print(f"llama-perplexity, {chunks} x 512 tokens, SmolLM2 Q4_K_M; median of {REPEATS}:")
        for name, value in seconds.items():
            print(f"  {name:<13} {value:6.1f} s  ({value / base:.2f}x the spinning run alone)")
        pair = seconds["pair, sleep"] / seconds["pair, spin"]
        print(f"  pair sleeping / pair spinning: {pair:.2f} (target < 1)")
        print(f"  alone sleeping / alone spinning: {seconds['alone, sleep'] / base:.2f} (target <= ~1)")


if __name__ == "__main__":
    main()
