"""Chaos: many short sweeps of the fake plug-ins on one MLflow store and one artifact cache, each
with one fault drawn at random, and after each the invariants of a run checked:

- no run is RUNNING once its controller has exited by itself, nor, for a controller killed outright
  (SIGKILL), once the next sweep has started (which closes it, saying it was killed);
- no process is left behind;
- no `.tmp-*` build folder is left once a sweep has rebuilt everything without a fault, nor any of a
  controller that exited by itself;
- the exit code agrees with the recorded outcomes (0: every run FINISHED; 1: some FAILED; 130: some
  KILLED, or none made; 2: refused at pre-flight, no run made);
- a job that failed before measuring records no result.

The faults: an exception in a stage (a failing quantizer, a bug in a benchmark), a server that
crashes at start, dies or hangs mid-benchmark, SIGINT or SIGKILL of the controller at a random
moment, a store locked by another writer for seconds, a port taken at a random point, and none.
Each controller is a fork of a process that has imported qsweep, Hydra and MLflow already
(tests/forkedcli.py), so a sweep costs what the sweep does, not Python's start. The run prints the
seed (replay it with QSWEEP_CHAOS_SEED), each sweep's fault and outcome, and the invariants held;
QSWEEP_CHAOS_SWEEPS sets how many sweeps the fast test runs (4; the full run's: 200).
`test_each_invariant_broken_on_purpose_is_caught` breaks each invariant in the fakes
(fakeplugins.sabotage) and shows the checks see it."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import forkedcli
from conftest import REPO, TESTS, live_processes

SWEEP = ["-m", "engine=fake", "benchmark=[fakebench]", "report.at_end=false", "rerun=[all]",
         "engine.request_timeout_s=2", "engine.startup_timeout_s=5"]  # fmt: skip
# One job (compared with the baseline's stored results, or serving the baseline itself the first
# time), or two; a fault's own methods replace these.
METHODS = ["method=fake-q4", "method=fake-q4", "method=none,fake-q4"]
RESULT_METRICS = ("fake_score", "fake_delta", "fake_within_noise")
TIMEOUT_S = 90  # a controller still running after this hung: a failure of its own


@dataclass
class Fault:
    """One kind of fault: the overrides it adds, what the test does beside the sweep, and whether the
    jobs it fails fail before measuring (so must record no result)."""

    overrides: tuple[str, ...] = ()
    action: str = ""  # sigint, sigkill, lock, port: done by a thread of the test at a random moment
    fails_before_measuring: bool = False


FAULTS = {
    "none": Fault(),
    "quantizer fails": Fault(("method=fake-broken,fake-q4",), fails_before_measuring=True),
    "benchmark bug": Fault(("benchmark.fakebench.bug_below_bits=8",), fails_before_measuring=True),
    "server crashes at start": Fault(("engine.crash_on_start=true",), fails_before_measuring=True),
    "server dies mid-benchmark": Fault(("engine.die_after_requests=1",), fails_before_measuring=True),
    "server hangs mid-benchmark": Fault(("engine.hang_after_requests=1",), fails_before_measuring=True),
    "SIGINT at a random moment": Fault(action="sigint"),
    "SIGKILL at a random moment": Fault(action="sigkill"),
    "store locked for seconds": Fault(action="lock"),
    "port taken at a random point": Fault(action="port", fails_before_measuring=True),
}


@dataclass
class Sweep:
    index: int
    fault: str
    pid: int = 0
    code: int | None = None
    at_s: float = 0.0  # when the test's action struck, after the start
    violations: list[str] = field(default_factory=list)


class Chaos:
    """Sweeps one after another on one store and cache under `root`, checked after each."""

    def __init__(self, root: Path, seed: int, sabotage: str = ""):
        # imported here: at collection it would add the fakes' options to Hydra's ConfigStore before
        # tests/test_compose.py lists the real ones
        from fakeplugins import write_fake_checkpoint

        self.root, self.rng, self.sabotage = root, random.Random(seed), sabotage
        self.model = write_fake_checkpoint(root / "model")
        self.store = root / "mlruns"
        self.cache = root / "cache"
        self.sweeps: list[Sweep] = []
        self.killed: list[Sweep] = []  # SIGKILLed, their runs to be closed by the next sweep
        self.environ = {
            **os.environ,
            "QSWEEP_PLUGINS": "fakeplugins",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
            "QSWEEP_HOME": str(root / "home"),
        }

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=f"sqlite:///{self.store / 'mlflow.db'}")

    def runs_of(self, pid: int) -> list:
        """The runs the controller of process `pid` made (tag `qsweep.pid`)."""
        if not (self.store / "mlflow.db").exists():
            return []
        client = self.client()
        experiment = client.get_experiment_by_name("qsweep")
        if experiment is None:
            return []
        return client.search_runs([experiment.experiment_id], filter_string=f"tags.`qsweep.pid` = '{pid}'")

    def run(self, fault_name: str | None = None) -> Sweep:
        fault_name = fault_name or self.rng.choice(sorted(FAULTS))
        fault = FAULTS[fault_name]
        sweep = Sweep(len(self.sweeps), fault_name)
        methods = self.rng.choice(METHODS)
        args = [*SWEEP, methods, "model=local", f"model.path={self.model}", *fault.overrides]
        args += [f"paths.mlruns={self.store}", f"paths.artifact_cache={self.cache}"]
        args += [f"paths.outputs={self.root / 'outputs'}"]
        port = None
        if fault.action == "port":
            port = free_port()
            args.append(f"engine.port={port}")
        delay = self.rng.uniform(0.0, 2.0)  # a sweep here takes about 2 s
        started = time.monotonic()
        process = forkedcli.start(args, self.environ, REPO, self.root / f"sweep-{sweep.index:03d}",
                                  sabotage=self.sabotage)  # fmt: skip
        output = process.out
        sweep.pid = process.pid
        done = threading.Event()
        action = (fault.action, process, delay, done, port)
        actor = threading.Thread(target=self.act, args=action, daemon=True)
        actor.start()
        try:
            process.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            before = output.stat().st_size  # forkedcli.start made the file
            process.send_signal(signal.SIGUSR1)  # its faulthandler writes every thread's stack
            time.sleep(2)
            with open(output, "rb") as said:
                said.seek(before)
                stacks = said.read(6000).decode(errors="replace")
            sweep.violations.append(f"the controller still ran after {TIMEOUT_S} s (hung), in:\n{stacks}")
            process.kill()
            process.wait(10)
        done.set()
        actor.join(15)
        sweep.code, sweep.at_s = process.returncode, min(delay, time.monotonic() - started)
        self.sweeps.append(sweep)
        self.check(sweep, fault, output)
        return sweep

    def act(self, action: str, process, delay: float, done: threading.Event, port: int | None) -> None:
        """The test's part of a fault, `delay` seconds after the controller started."""
        if done.wait(delay):
            return
        if action in ("sigint", "sigkill"):
            process.send_signal(signal.SIGINT if action == "sigint" else signal.SIGKILL)
        elif action == "lock" and (self.store / "mlflow.db").exists():
            db = sqlite3.connect(self.store / "mlflow.db", timeout=30)
            try:
                db.execute("BEGIN EXCLUSIVE")
                done.wait(self.rng.uniform(0.5, 4.0))  # SQLite waits (tests/test_faults.py: longer)
                db.rollback()
            finally:
                db.close()
        elif action == "port":
            with socket.socket() as taker:  # bound as soon as the fake server is not on it
                while not done.is_set():
                    try:
                        taker.bind(("127.0.0.1", port))
                        taker.listen()
                        break
                    except OSError:
                        time.sleep(0.05)
                done.wait(TIMEOUT_S)

    # --- the invariants --------------------------------------------------------------------------

    def check(self, sweep: Sweep, fault: Fault, output: Path) -> None:
        try:
            self.check_invariants(sweep, fault, output)
        except Exception as err:  # the store itself unreadable, say: a failure of this sweep, not the lane
            sweep.violations.append(f"could not check: {type(err).__name__}: {str(err)[:300]}")

    def check_invariants(self, sweep: Sweep, fault: Fault, output: Path) -> None:
        mine = self.runs_of(sweep.pid)
        statuses = Counter(r.info.status for r in mine)
        said = output.read_text(errors="replace")[-1500:] if output.exists() else ""
        v = sweep.violations

        # runs left RUNNING: none by a controller that exited by itself; a SIGKILLed one's are closed
        # by the next sweep, which says it was killed
        if sweep.code != -9 and statuses["RUNNING"]:
            v.append(f"{statuses['RUNNING']} run(s) RUNNING after the controller exited ({sweep.code})")
        for killed in self.killed if mine else []:
            for run in self.runs_of(killed.pid):
                error = run.data.tags.get("qsweep.error", "")
                if run.info.status == "RUNNING":
                    v.append(f"run {run.info.run_name} of SIGKILLed sweep {killed.index} still RUNNING")
                elif error.startswith("abandoned") and "killed outright" not in error:
                    v.append(f"run {run.info.run_name} closed without saying it was killed: {error}")
        if mine:  # a sweep refused at pre-flight starts none: the next one that does closes them
            self.killed = []
        if sweep.code == -9:
            self.killed.append(sweep)

        # the exit code agrees with what was recorded
        code = sweep.code
        if code == 0 and (not mine or set(statuses) != {"FINISHED"}):
            v.append(f"exit 0 but the runs are {dict(statuses)}")
        elif code not in (0, -9) and not mine:
            pass  # stopped before making any run (a signal during Python's start): nothing to disagree with
        elif code == 1 and (not statuses["FAILED"] or statuses["KILLED"]):
            v.append(f"exit 1 but the runs are {dict(statuses)}")
        elif code == 130 and mine and not statuses["KILLED"]:
            v.append(f"exit 130 but the runs are {dict(statuses)}")
        elif code == 2 and mine:
            v.append(f"exit 2 (refused) but {len(mine)} run(s) were made")
        elif code not in (0, 1, 2, 130, -9):
            v.append(f"exit code {code}: {said[-300:]!r}")
        if code == 1 and mine and "Traceback" in said:  # (before any run: a Ctrl-C during Python's start)
            v.append("a traceback on the terminal")

        # a job that failed before measuring records no result
        if fault.fails_before_measuring:
            for run in mine:
                if run.info.status == "FAILED" and run.data.tags.get("qsweep.kind") == "job":
                    found = [m for m in RESULT_METRICS if m in run.data.metrics]
                    if found:
                        v.append(f"job {run.info.run_name} failed before measuring, yet records {found}")

        # no process left behind, no build folder left behind
        time.sleep(0.2)
        left = live_processes(str(self.root))
        if left:
            v.append(f"processes left behind: {[cmd[:120] for _, cmd in left]}")
            for pid, _ in left:  # not to be counted again after the next sweep
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        stray = sorted(str(p.relative_to(self.root)) for p in self.root.glob("cache/**/.tmp-*"))
        own = [p for p in stray if p.endswith(f"-{sweep.pid}")]
        own += [str(p.relative_to(self.root)) for p in self.root.glob("mlruns/.mlflow.db.tmp-*")]
        if own and code != -9:
            v.append(f"build folders left by a controller that exited by itself: {own}")
        if stray and code == 0:
            v.append(f"build folders left after a sweep that rebuilt everything: {stray}")

    def summary(self) -> str:
        lines = []
        for s in self.sweeps:
            outcome = "held" if not s.violations else "BROKEN: " + "; ".join(s.violations)
            when = f"at {s.at_s:4.1f} s" if FAULTS[s.fault].action else " " * 9
            lines.append(f"  sweep {s.index:3d} {s.fault:<30} exit {s.code!s:>4}  {when}  {outcome}")
        return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chaos_seed() -> int:
    return int(os.environ.get("QSWEEP_CHAOS_SEED") or random.SystemRandom().randrange(1 << 30))


def run_chaos(root: Path, sweeps: int, seed: int, lanes: int = 1) -> list[Chaos]:
    """`sweeps` faulted sweeps (and one more after the last of each lane), in `lanes` independent
    lanes side by side (each its own store and cache: they time nothing)."""
    chaoses = [Chaos(root / f"lane{i}", seed + i) for i in range(lanes)]
    started = time.monotonic()

    def lane(chaos: Chaos, count: int) -> None:
        for _ in range(count):
            chaos.run()
        chaos.run("none")  # the sweep after the last: closes a SIGKILLed one's runs, rebuilds everything

    counts = [sweeps // lanes + (i < sweeps % lanes) for i in range(lanes)]
    with ThreadPoolExecutor(max_workers=lanes) as pool:
        for done in [pool.submit(lane, c, n) for c, n in zip(chaoses, counts, strict=True)]:
            done.result()  # a lane that broke down fails the test here
    faults = Counter(s.fault for chaos in chaoses for s in chaos.sweeps)
    total = sum(len(chaos.sweeps) for chaos in chaoses)
    print(f"\nchaos: seed {seed} (replay: QSWEEP_CHAOS_SEED={seed}), {total} sweeps in {lanes} lane(s) in "
          f"{time.monotonic() - started:.0f} s; faults drawn: {dict(sorted(faults.items()))}")  # fmt: skip
    for i, chaos in enumerate(chaoses):
        print(f"lane {i} (seed {seed + i}):\n{chaos.summary()}")
    return chaoses


def assert_held(chaoses: list[Chaos]) -> None:
    broken = [s for chaos in chaoses for s in chaos.sweeps if s.violations]
    assert not broken, "invariants broken (seed and sweeps in the output above): " + "; ".join(
        f"sweep {s.index} ({s.fault}): {', '.join(s.violations)}" for s in broken
    )
    print(
        "chaos: every invariant held after every sweep: no run left RUNNING, no process left behind, "
        "no build folder left behind, exit codes agreeing with the runs, no result from a job that "
        "failed before measuring"
    )


def test_random_faults_keep_the_run_invariants(tmp_path):
    sweeps = int(os.environ.get("QSWEEP_CHAOS_SWEEPS") or 4)
    assert_held(run_chaos(tmp_path, sweeps, chaos_seed()))


@pytest.mark.slow
def test_two_hundred_random_faults_keep_the_run_invariants(tmp_path):
    assert_held(run_chaos(tmp_path, 200, chaos_seed(), lanes=3))


BROKEN_ON_PURPOSE = {
    # sabotage: (the fault that shows it, words of the violation the checks must report)
    "running": ("none", "RUNNING after the controller exited"),
    "orphan": ("none", "processes left behind"),
    "tmp": ("none", "build folders left"),
    "exitcode": ("quantizer fails", "exit 0 but the runs are"),
    "result": ("server dies mid-benchmark", "failed before measuring, yet records"),
}


@pytest.mark.slow
@pytest.mark.parametrize("sabotage", sorted(BROKEN_ON_PURPOSE))
def test_each_invariant_broken_on_purpose_is_caught(sabotage, tmp_path):
    fault, words = BROKEN_ON_PURPOSE[sabotage]
    chaos = Chaos(tmp_path / "chaos", seed=0, sabotage=sabotage)
    sweep = chaos.run(fault)
    print(chaos.summary())
    assert any(words in v for v in sweep.violations), sweep.violations
