"""Benchmark (prints figures, asserts nothing): qsweep's perplexity on llama.cpp against llama.cpp's
own `llama-perplexity`, same GGUF, text, context and chunk count, one after another in this process.

Prints, per file, both perplexities and their relative difference (target: within 0.05%), and the
wall time of qsweep's ppl benchmark (what the job's `benchmark_ppl` stage times: tokenizing the text,
the tokenizer comparison, scoring) over llama-perplexity's whole run (target: 1.2 or below).

    .venv/bin/python bench/scoring_vs_llama_perplexity.py [chunks]
"""

from __future__ import annotations

import re
import sys
import time

from smollm2 import bench_context, smollm2_gguf

from qsweep import procs
from qsweep.benchmarks import ppl
from qsweep.engines import llamacpp
from qsweep.envs import LLAMACPP
from qsweep.textdata import TextConfig, source_file

N_CTX = 512


def main() -> None:
    chunks = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    with bench_context() as ctx:
        env = ctx.stage_env(LLAMACPP)
        tmp = ctx.log_dir
        files = {"f16": smollm2_gguf(ctx, None), "Q4_K_M": smollm2_gguf(ctx, "Q4_K_M")}
        cfg = ppl.Config(text=TextConfig(), n_ctx=N_CTX, max_tokens=chunks * N_CTX)
        print(f"perplexity, {chunks} x {N_CTX} tokens of Wikipedia text, SmolLM2:")
        for name, artifact in files.items():
            with llamacpp.serve(llamacpp.Config(), artifact, ctx) as served:
                started = time.monotonic()
                ours = ppl.Perplexity().run(cfg, served, ctx).metrics["ppl"]
                ours_s = time.monotonic() - started
            log = tmp / f"llama-perplexity-{name}.log"
            started = time.monotonic()
            procs.run(
                [env.tool("llama-perplexity"), "-m", artifact.path, "-f", source_file(cfg.text), "-c", N_CTX,
                 "--chunks", chunks],
                log_path=log, timeout_s=3600, what="llama-perplexity", env=env.environ(),
            )  # fmt: skip
            theirs_s = time.monotonic() - started
            theirs = float(re.search(r"Final estimate: PPL = ([\d.]+)", log.read_text()).group(1))
            print(
                f"  {name:<7} qsweep {ours:.4f} in {ours_s:5.1f} s, llama-perplexity {theirs:.4f} in "
                f"{theirs_s:5.1f} s: {abs(ours - theirs) / theirs:.4%} apart (target <= 0.05%), "
                f"time ratio {ours_s / theirs_s:.2f} (target <= 1.2)"
            )


if __name__ == "__main__":
    main()
