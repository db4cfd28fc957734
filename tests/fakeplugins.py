"""Fake plug-ins for fast orchestration tests: a method, two engines and a benchmark, registered
through the same path a third party uses (QSWEEP_PLUGINS=fakeplugins, with tests/ on PYTHONPATH),
never by the real code. They need no stage environment: the fake engine serves from a thread of
the controller, over real HTTP, and scores tokens deterministically, so a quantized fake is worse
than its baseline by an amount its `noise` sets.

Options (as YAML files would give): method=fake-q4 / fake-q2 / fake-broken, engine=fake (serves
prompt scores and an OpenAI API) / fakeapi (an OpenAI API only), benchmark=[fakebench].
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from hydra.core.config_store import ConfigStore

from qsweep import stats
from qsweep.benchmarks.base import BENCHMARKS, Benchmark
from qsweep.cache import content_key
from qsweep.context import Artifact, BenchmarkResult, JobContext
from qsweep.engines.base import ENGINES, Engine, EngineConfig
from qsweep.engines.served import ChatEndpoint, Load, ServedModel, Tokenized
from qsweep.errors import QsweepError
from qsweep.methods.base import METHODS, Method, PlannedArtifact, planned_step
from qsweep.models import PreparedModel
from qsweep.settings import neutral, speed_only

VOCAB = 1000


def write_fake_checkpoint(path: Path) -> Path:
    """A checkpoint folder qsweep accepts as `model.path`: config.json and one safetensors file."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "fake", "vocab_size": VOCAB}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]}}).encode()
    (path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(128))
    return path


# --- method ----------------------------------------------------------------------------------


@dataclass
class FakeQuantConfig:
    noise: float = 0.05  # how much worse than the baseline each token's log-prob gets
    bits: float = 4.0
    fail: bool = False  # the quantizer fails, as a crashed tool would


@METHODS.register("fakequant")
class FakeQuant(Method[FakeQuantConfig]):
    """Writes a 'quantized model' file holding its noise level; cached like a real artifact."""

    formats = ("fake",)

    def check(self, cfg: FakeQuantConfig) -> None:
        if cfg.noise < 0:
            raise QsweepError(f"method.noise={cfg.noise} must be >= 0: fix method.noise")

    def plan(
        self, cfg: FakeQuantConfig, model_fingerprint: str, fmt: str, ctx: JobContext
    ) -> PlannedArtifact:
        key = content_key({"model": model_fingerprint, "noise": cfg.noise, "bits": cfg.bits})
        return PlannedArtifact(key, [planned_step("fake quantized model", "fake-quantized", key, ctx)])

    def build(self, cfg: FakeQuantConfig, model: PreparedModel, fmt: str, ctx: JobContext) -> Artifact:
        if cfg.fail:
            raise QsweepError("fake quantizer failed on purpose")
        key = {"model": model.fingerprint, "noise": cfg.noise, "bits": cfg.bits}

        def build(tmp: Path) -> dict:
            (tmp / "model.json").write_text(json.dumps({"noise": cfg.noise}))
            if SABOTAGE == "tmp":  # broken on purpose: a half-written build folder nobody removes
                (tmp.parent / f".tmp-stray-{os.getpid()}").mkdir(exist_ok=True)
            return {}

        entry = ctx.artifact_cache.entry("fake-quantized", key, build, what="fake quantized model")
        return Artifact(
            format="fake",
            path=entry.path / "model.json",
            cache_hit=entry.hit,
            key=entry.manifest["key"],
            metrics={"artifact_size_mb": cfg.bits, "bits_per_weight": cfg.bits, "quantize_s": entry.build_s},
            params={"artifact.type": f"fake-{cfg.bits:g}bit"},
        )


# --- engines ---------------------------------------------------------------------------------


@dataclass
class FakeServeConfig(EngineConfig):
    slots: int = speed_only(1)  # sized from the benchmarks' load, like llama-server's -np
    crash_on_start: bool = False
    die_after_requests: int = 0  # the server goes away after answering this many (0: never)
    hang_after_requests: int = -1  # then answers nothing more, as a hung server (-1: never)
    degenerate_below_bits: float = 0.0  # replies '1 1 1 ...' for artifacts of fewer bits per weight
    gpus: int = 0  # GPUs a job holds (as a tensor-parallel server would), from a device list a test gives


@dataclass
class FakeApiConfig(FakeServeConfig):
    pass


REPLY = "Paris, the capital and largest city of France, lies on the Seine in the north of the country."
BROKEN_REPLY = " ".join(["1"] * 20)  # what a broken checkpoint says


class _Handler(BaseHTTPRequestHandler):
    reply = REPLY  # set per server
    # fault injection, set per server (FakeServeConfig): a count of answered POSTs and what to do then
    served: list[int] = [0]
    die_after, hang_after = 0, -1
    gone = threading.Event()  # set when the server stops: a hung handler then returns

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._reply({"status": "ok"})

    def do_POST(self) -> None:  # noqa: N802
        self.served[0] += 1
        if self.die_after and self.served[0] > self.die_after:
            threading.Thread(target=self.server.shutdown, daemon=True).start()  # as a crashed server
            self.close_connection = True
            self.connection.close()
            return
        if 0 <= self.hang_after < self.served[0]:
            self.gone.wait()
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        words = " ".join(self.reply.split()[: body.get("max_tokens", 1)])
        self._reply({"choices": [{"text": " " + words, "message": {"content": words}}]})

    def _reply(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def _http_server(cfg: FakeServeConfig, artifact: Artifact, ctx: JobContext) -> Iterator[str]:
    # As careless a tool as there is: it prints its arguments and a token from its environment.
    ctx.log("server.log").write_text(
        f"fake-server {' '.join(cfg.extra_args)} HF_TOKEN={os.environ.get('HF_TOKEN')}\n"
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}\n"
    )
    if cfg.crash_on_start:
        raise QsweepError("fake server exited with code 1 while starting: bad flag (log: fake.log)")
    broken = artifact.metrics.get("bits_per_weight", 16.0) < cfg.degenerate_below_bits
    gone = threading.Event()
    per_server = {"reply": BROKEN_REPLY if broken else REPLY, "gone": gone, "served": [0]}
    per_server |= {"die_after": cfg.die_after_requests, "hang_after": cfg.hang_after_requests}
    handler = type("Handler", (_Handler,), per_server)
    server = ThreadingHTTPServer((cfg.host, cfg.port), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    with open(ctx.log("server.log"), "a") as log:
        log.write(f"fake server on port {server.server_port}, {cfg.slots} slot(s)\n")
        log.write(f"serving since {time.time() * 1000:.0f}\n")  # epoch ms: tests/test_launchers.py
    if SABOTAGE == "orphan":  # broken on purpose: a helper process nobody stops
        helper = [sys.executable, "-c", "import time; time.sleep(300)", str(ctx.log_dir)]
        subprocess.Popen(helper, start_new_session=True)
    try:
        yield f"http://{cfg.host}:{server.server_port}"
    finally:
        gone.set()
        server.shutdown()
        server.server_close()
        with open(ctx.log("server.log"), "a") as log:
            log.write(f"stopped at {time.time() * 1000:.0f}\n")


@dataclass
class FakeApiServed(ServedModel):
    """An OpenAI API only (ServedModel's own methods)."""


@dataclass
class FakeScoringServed(FakeApiServed):
    """The API, plus tokenization and prompt scoring with a noise read from the artifact."""

    def noise(self) -> float:
        return json.loads(self.artifact.path.read_text())["noise"] if self.artifact.format == "fake" else 0.0

    def tokenize(
        self, text: Path, timeout_s: float, compare_tokens: int = 0, max_tokens: int = 0
    ) -> Tokenized:
        words = text.read_text(encoding="utf-8", errors="replace").split()[:20000]
        return Tokenized([2 + zlib.crc32(w.encode()) % (VOCAB - 2) for w in words], bos=1)

    def score(self, chunks: list[list[int]], first: int, timeout_s: float) -> list[list[float]]:
        noise = self.noise()
        return [[-(1.0 + (t % 7) / 3) - noise * (1 + t % 3) for t in chunk[first + 1 :]] for chunk in chunks]


class _FakeEngine(Engine):
    Config = FakeServeConfig
    env = None

    def gpus(self, cfg: FakeServeConfig) -> int:
        return cfg.gpus

    def fit(self, cfg: FakeServeConfig, load: Load) -> FakeServeConfig:
        if not cfg.fit_to_load:
            return cfg
        return dataclasses.replace(cfg, slots=max(cfg.slots, load.concurrency))

    @contextlib.contextmanager
    def serve(self, cfg: FakeServeConfig, artifact: Artifact, ctx: JobContext) -> Iterator[ServedModel]:
        started = time.monotonic()
        with _http_server(cfg, artifact, ctx) as url:
            yield self.served_type(cfg, artifact, url, time.monotonic() - started, ctx.log("server.log"), ctx)


@ENGINES.register("fake")
class FakeEngine(_FakeEngine):
    """Serves fake artifacts and checkpoints from a thread: an OpenAI API, tokenization, scoring."""

    formats = ("fake", "hf")
    served_type = FakeScoringServed


@ENGINES.register("fakeapi")
class FakeApiEngine(_FakeEngine):
    """Serves checkpoints behind an OpenAI API only: no prompt scoring, so no perplexity."""

    Config = FakeApiConfig
    formats = ("hf",)
    served_type = FakeApiServed


# --- benchmark -------------------------------------------------------------------------------


@dataclass
class FakeBenchConfig:
    samples: int = 20
    concurrency: int = 3
    fail_below_bits: float = 0.0  # fails on artifacts of fewer bits per weight, as a crashed tool would
    bug_below_bits: float = 0.0  # raises an unexpected exception there instead (a bug, not a QsweepError)
    sleep_s: float = neutral(0.0)  # time to send a signal in; changes no result
    squat_port: int = neutral(0)  # binds this port and keeps it until the process ends (0: none)
    interrupt_as_error: bool = neutral(False)  # Ctrl-C during sleep_s comes out as a RuntimeError


_squatted: list[socket.socket] = []  # FakeBenchConfig.squat_port's socket, open until the process ends


@BENCHMARKS.register("fakebench")
class FakeBench(Benchmark[FakeBenchConfig]):
    """Asks the served API once and scores samples 0/1 from the artifact's bits; paired delta."""

    requires = (ChatEndpoint,)

    def load(self, cfg: FakeBenchConfig) -> Load:
        return Load(concurrency=cfg.concurrency, tokens_per_request=64)

    def run(self, cfg: FakeBenchConfig, served: ServedModel, ctx: JobContext) -> BenchmarkResult:
        reply, _ = served.complete("The capital of France is", 2)
        if cfg.squat_port and not _squatted:  # another program takes the port a later job is set to use
            squatter = socket.socket()
            squatter.bind(("127.0.0.1", cfg.squat_port))
            squatter.listen()
            _squatted.append(squatter)
        deadline = time.monotonic() + cfg.sleep_s
        try:
            while time.monotonic() < deadline:
                time.sleep(0.05)
        except KeyboardInterrupt:
            if cfg.interrupt_as_error:  # as a library that catches everything and raises its own
                raise RuntimeError("the library's own error, raised while handling Ctrl-C") from None
            raise
        bits = served.artifact.metrics.get("bits_per_weight", 16.0)
        if bits < cfg.fail_below_bits:
            raise QsweepError("fake benchmark failed on purpose")
        if bits < cfg.bug_below_bits:
            raise ZeroDivisionError("a bug in the fake benchmark")
        if SABOTAGE == "running":  # broken on purpose: the controller dies without closing its runs
            os._exit(3)
        # Fewer bits, more wrong answers: sample i is right when i is below a bits-dependent share.
        right = math.ceil(cfg.samples * min(1.0, 0.5 + bits / 32))
        scores = {str(i): float(i < right and "Paris" in reply) for i in range(cfg.samples)}
        mean = stats.estimate(list(scores.values())).mean
        return BenchmarkResult({"fake_score": mean}, samples={"scores": scores})

    def compare(self, samples: dict, baseline: dict) -> dict[str, float]:
        cmp = stats.compare(samples["scores"], baseline["scores"])
        return {"fake_delta": cmp.delta, "fake_within_noise": float(cmp.within_noise)}


# --- invariants broken on purpose (tests/test_chaos.py shows its checks catch each) ------------

SABOTAGE = ""  # set by `sabotage`


def sabotage(name: str) -> None:
    """Break one invariant on purpose: running (the controller exits without closing its runs),
    orphan (a process left behind), tmp (a build folder left behind), exitcode (the exit code
    ignores failed jobs), result (a job that failed before measuring reports a result); '' none.
    Once per process (it patches qsweep)."""
    global SABOTAGE
    SABOTAGE = name
    if name == "exitcode":
        from qsweep import sweep

        multirun_end = sweep.SweepCallback.on_multirun_end

        def exit_zero(self, *args, **kwargs):
            with contextlib.suppress(sweep.SweepFailed):
                multirun_end(self, *args, **kwargs)

        sweep.SweepCallback.on_multirun_end = exit_zero
    elif name == "result":
        from qsweep import tracking

        finish = tracking.JobRecorder.finish

        def finish_with_a_score(self, status, *args, **kwargs):
            if status == "FAILED":
                self.metrics({"fake_score": 1.0})
            return finish(self, status, *args, **kwargs)

        tracking.JobRecorder.finish = finish_with_a_score


sabotage(os.environ.get("QSWEEP_FAKE_SABOTAGE", ""))  # a sweep run by hand can be broken too


# --- the options a YAML file would give ------------------------------------------------------

store = ConfigStore.instance()
store.store(group="method", name="fake-q4", node=FakeQuantConfig(noise=0.05, bits=4.0))
store.store(group="method", name="fake-q2", node=FakeQuantConfig(noise=0.4, bits=2.0))
store.store(group="method", name="fake-broken", node=FakeQuantConfig(fail=True))
store.store(group="engine", name="fake", node=FakeServeConfig())
store.store(group="engine", name="fakeapi", node=FakeApiConfig())
store.store(group="benchmark", name="fakebench", node=FakeBenchConfig(), package="benchmark.fakebench")
