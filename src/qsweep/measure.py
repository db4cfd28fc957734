"""Serve an artifact and run benchmarks on it: the one loop a job and the baseline evaluation share."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from qsweep import procs
from qsweep.benchmarks.base import Benchmark
from qsweep.context import Artifact, BenchmarkResult, JobContext
from qsweep.engines.base import Engine
from qsweep.engines.served import ChatEndpoint, ServedModel

log = logging.getLogger(__name__)


@dataclass
class StageClock:
    """Wall time of each named stage (`time_<stage>_s`), announced as it starts and ends."""

    prefix: str = ""  # "baseline_": stages run on the job's behalf, told apart in the log
    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        name = self.prefix + name
        log.info("stage %s ...", name)
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[f"time_{name}_s"] = elapsed = time.monotonic() - started
            log.info("stage %s: %.1f s", name, elapsed)


@dataclass
class Served:
    """How the server came up: seconds to healthy, and the smoke completion (where it has an API)."""

    start_s: float
    prompt: str
    reply: str | None = None
    latency_s: float | None = None


def headline(metrics: Mapping[str, float]) -> str:
    """The metrics worth a terminal line (standard errors and intervals stay in MLflow)."""
    detail = ("_stderr", "_err", "_n", "_ci_low", "_ci_high")
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith(detail) or k == "ppl_err")


def serve_and_measure(
    engine: Engine,
    engine_cfg: Any,
    artifact: Artifact,
    benchmarks: Mapping[str, tuple[Benchmark, Any]],
    ctx: JobContext,
    clock: StageClock,
    on_served: Callable[[Served], None] = lambda served: None,
    on_result: Callable[[str, BenchmarkResult], None] = lambda name, result: None,
    on_memory: Callable[[dict[str, float]], None] = lambda memory: None,
) -> dict[str, BenchmarkResult]:
    """Start the engine once, check it answers, run every benchmark on it in order, stop it.
    `on_served`, `on_result` and `on_memory` (the server's peak memory, read before it stops) hear
    of each step as it happens (a job records them at once, so a later failure keeps what was
    measured)."""
    results: dict[str, BenchmarkResult] = {}
    # A server measured for speed runs alone (the pre-flight sees to it), as its tool's default.
    timed = any(benchmark.measures_time for benchmark, _ in benchmarks.values())
    with clock.stage("serve"), ctx.timed(timed), engine.serve(engine_cfg, artifact, ctx) as served:
        up = Served(served.start_s, engine_cfg.smoke_prompt)
        if isinstance(served, ChatEndpoint):
            up.reply, up.latency_s = served.complete(engine_cfg.smoke_prompt, engine_cfg.smoke_max_tokens)
            log.info("  serving: %r -> %r", engine_cfg.smoke_prompt, up.reply.strip()[:80])
        on_served(up)
        with ServerWatch(served, engine_cfg.request_timeout_s) as watch, procs.watching(watch):
            for name, (benchmark, bench_cfg) in benchmarks.items():
                with clock.stage(f"benchmark_{name}"):
                    result = benchmark.run(bench_cfg, served, ctx)
                log.info("  %s: %s", name, headline(result.metrics))
                on_result(name, result)
                results[name] = result
        if served.pid is not None:
            on_memory(server_memory(served.pid))
    return results


class ServerWatch:
    """Whether the server still runs and answers, asked by every tool's wait loop during the
    benchmarks: a server that exited, or that has not answered /health for the engine's
    `request_timeout_s` (stopped, hung), ends the benchmark at once with that reason, rather than
    after the tool's own timeout (evalscope retries a dead server for as long as it is allowed).
    /health is asked from a thread of its own, so a server that hangs never holds up the wait
    loops (Ctrl-C, a tool's own timeout) that ask this."""

    def __init__(self, served: ServedModel, timeout_s: float, every_s: float = 5.0):
        # asked often enough that a short timeout is never mistaken for silence
        self.served, self.timeout_s, self.every_s = served, timeout_s, min(every_s, timeout_s / 4)
        self.last_answer = time.monotonic()
        self._stop = threading.Event()
        self._prober = threading.Thread(target=self._probe, name="server-watch", daemon=True)

    def __enter__(self) -> ServerWatch:
        self._prober.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # the thread ends after the probe in flight (not waited for: it may hang)

    def _probe(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                with urllib.request.urlopen(self.served.health_url(), timeout=min(5.0, self.timeout_s)):
                    self.last_answer = time.monotonic()
            except (OSError, urllib.error.URLError):
                pass

    def __call__(self) -> str | None:
        process = self.served.process
        if process is not None and process.poll() is not None:
            return (
                f"the server exited (code {process.returncode}) during the benchmarks: "
                f"{procs.tail(self.served.log, 2)} (log: {self.served.log})"
            )
        silent = time.monotonic() - self.last_answer
        if silent >= self.timeout_s:
            return (
                f"the server stopped answering (no {self.served.health_path} reply for {silent:.0f} s, "
                f"engine request_timeout_s={self.timeout_s}): stopped or hung; log: {self.served.log}"
            )
        return None


def server_memory(pid: int) -> dict[str, float]:
    """`server_peak_rss_mb`: the server's processes' peak resident memory so far; on a GPU also
    `server_gpu_memory_mb`, what they hold there (vLLM reserves its share up front)."""
    tree = procs.process_tree(pid)
    memory = {
        "server_peak_rss_mb": procs.peak_rss_mb(tree),
        "server_gpu_memory_mb": procs.gpu_memory_mb(tree),
    }
    return {k: v for k, v in memory.items() if v is not None}
