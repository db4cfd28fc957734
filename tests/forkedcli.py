"""`python -m qsweep ARGS` with the fake plug-ins, in a fork of a process that has imported qsweep,
Hydra, MLflow and the fakes once (multiprocessing's forkserver): the orchestration tests' sweeps
cost what the sweep does, not the second or two Python takes to import MLflow and Hydra each time.
The child is a process of its own: its pid, exit code, signals and output are a real process's."""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing import forkserver
from pathlib import Path

PRELOAD = ["forkedcli", "fakeplugins", "qsweep.cli", "qsweep.job", "mlflow.tracking",
           "mlflow.store.tracking.sqlalchemy_store", "hydra._internal.core_plugins.basic_sweeper",
           "hydra._internal.core_plugins.basic_launcher"]  # fmt: skip


@functools.cache
def forks():
    """The forkserver context (one per test process), started here with tests/ on its PYTHONPATH:
    Python 3.11's forkserver does not take the parent's sys.path, and would preload the fakes and
    this module nowhere (each child then imported them itself, and a signal could land there)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), before]))
    try:
        forkserver.ensure_running()
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
    return context


def controller(argv: list[str], environ: dict[str, str], cwd: str, out: str, err: str, sabotage: str) -> None:
    """The child: environment, working directory and output as a `python -m qsweep` would have
    them, then qsweep's CLI. Its exit code is also written to `<out>.exit`: multiprocessing reports
    255 where it loses a child's status (seen with several children at once)."""
    os.environ.clear()
    os.environ.update(environ)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), fd)
    os.chdir(cwd)
    import fakeplugins
    from qsweep import cli

    fakeplugins.sabotage(sabotage)
    sys.argv = ["qsweep", *argv]
    code = 1  # an exception escaping main
    try:
        cli.main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
        raise
    finally:
        Path(out + ".exit").write_text(str(code))


class Forked:
    """A controller started by `start`: what the tests use of subprocess.Popen (pid, poll, wait,
    send_signal, kill, communicate), with stdout and stderr merged or apart, read from files."""

    def __init__(self, process, out: Path, err: Path):
        self.process, self.out, self.err = process, out, err
        self.pid = process.pid
        self.stdout = self._follow()

    @property
    def returncode(self) -> int | None:
        code = self.process.exitcode
        said = Path(f"{self.out}.exit")
        if code == 255 and said.exists():
            return int(said.read_text())
        return code

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.is_alive():
            raise subprocess.TimeoutExpired(["qsweep"], timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.process.is_alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _follow(self) -> Iterator[str]:
        """The output's lines as they are written, until the process has ended and all is read."""
        with open(self.out, errors="replace") as output:
            pending = ""
            while True:
                chunk = output.readline()
                if chunk:
                    pending += chunk
                    if pending.endswith("\n"):
                        yield pending
                        pending = ""
                    continue
                if not self.process.is_alive():
                    rest = pending + output.read()
                    if rest:
                        yield rest
                    return
                time.sleep(0.05)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """What is left of the output once the process has ended (as Popen with stdout=PIPE)."""
        self.wait(timeout)
        rest = "".join(self.stdout)
        return rest, (self.err.read_text(errors="replace") if self.err != self.out else "")


def start(argv: list[str], environ: dict[str, str], cwd: Path, folder: Path, merged: bool = True,
          sabotage: str = "") -> Forked:  # fmt: skip
    """A controller for `argv`, its output in files under `folder` (stdout and stderr in one with
    `merged`)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.monotonic_ns()}"
    out = folder / f"controller-{stamp}.out"
    err = out if merged else folder / f"controller-{stamp}.err"
    for path in {out, err}:
        path.write_text("")
    process = forks().Process(
        target=controller, args=(argv, environ, str(cwd), str(out), str(err), sabotage), daemon=False
    )
    process.start()
    return Forked(process, out, err)


def run(argv: list[str], environ: dict[str, str], cwd: Path, folder: Path, timeout_s: float
        ) -> subprocess.CompletedProcess:  # fmt: skip
    """As subprocess.run(capture_output=True, text=True): the exit code, stdout and stderr."""
    proc = start(argv, environ, cwd, folder, merged=False)
    try:
        proc.wait(timeout_s)
    finally:
        proc.kill()
        proc.process.join(10)
    stdout, stderr = proc.out.read_text(errors="replace"), proc.err.read_text(errors="replace")
    return subprocess.CompletedProcess(["qsweep", *argv], proc.returncode, stdout, stderr)
