"""Child processes: every one has a timeout, its own process group and a log file, and is
killed with its whole group whatever happens (error, timeout, Ctrl-C)."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qsweep import redact
from qsweep.errors import QsweepError

log = logging.getLogger(__name__)
# A command line: each word is passed as str(word), so paths and numbers go in as they are.
Command = Sequence[object]


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log file, joined with ' | ' to fit one error line."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())


def last_match(log: Path, pattern: str) -> Any:
    """The groups of `pattern`'s last match in the end of a log (a tool's progress bar), or None: a
    str where `pattern` has one group, a tuple of str where it has several (`re.findall`)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    found = re.findall(pattern, text)
    return found[-1] if found else None


class StopRequest:
    """Whether SIGINT or SIGTERM arrived during the job that owns this request."""

    requested = False


_current_stop: contextvars.ContextVar[StopRequest | None] = contextvars.ContextVar(
    "qsweep_stop", default=None
)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """For the duration of a job: SIGINT and SIGTERM raise KeyboardInterrupt where the job is, so its
    `finally` blocks stop servers and mark its run KILLED; the previous handlers come back after.

    Python drops an exception raised while it runs at-fork callbacks (a signal landing during a
    child's fork), so the request is also remembered and every polling loop calls `check_stop()`.
    Signal handlers can only be set from the main thread; elsewhere the launcher's own handling applies.
    """
    request = StopRequest()
    token = _current_stop.set(request)
    previous: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: object = None) -> None:
        request.requested = True
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _current_stop.reset(token)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block take effect at its end, as they would have: for
    steps that must not be cut in two (an MLflow run made and remembered as this process's)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are handled in the main thread only
        return
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if arrived:
            signal.raise_signal(arrived[0])  # its own handler, now restored, acts on it


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stopped_by(request: StopRequest) -> Iterator[StopRequest]:
    """In a worker thread (where no signal arrives): the tools it waits on stop, and KeyboardInterrupt
    is raised there, once another thread sets `request.requested`."""
    token = _current_stop.set(request)
    try:
        yield request
    finally:
        _current_stop.reset(token)


def stop_requested() -> bool:
    """Whether SIGINT or SIGTERM arrived during the current job. A signal that lands inside a
    library may come out as another exception (OmegaConf turned one into a ConfigKeyError): a job
    that fails after one was interrupted, not failed."""
    request = _current_stop.get()
    return request is not None and request.requested


def check_stop() -> None:
    """Raise KeyboardInterrupt if the current job was asked to stop; raise QsweepError if something
    the job depends on failed (`watching`)."""
    request = _current_stop.get()
    if request is not None and request.requested:
        raise KeyboardInterrupt("stop requested")
    for watch in _watches.get():
        problem = watch()
        if problem:
            raise QsweepError(problem)


# Checks every polling loop of the job runs (`check_stop`): each returns why the job cannot go on.
_watches: contextvars.ContextVar[tuple[Callable[[], str | None], ...]] = contextvars.ContextVar(
    "qsweep_watches", default=()
)


@contextlib.contextmanager
def watching(check: Callable[[], str | None]) -> Iterator[None]:
    """While in the block, every tool qsweep waits on is stopped as soon as `check` returns a reason
    (a server that died or stopped answering), and the reason is the error."""
    token = _watches.set((*_watches.get(), check))
    try:
        yield
    finally:
        _watches.reset(token)


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL if qsweep dies, even by SIGKILL, which no `finally`
    survives (Linux only; elsewhere the process-group cleanup below is all there is). SIGKILL, not
    SIGTERM: evalscope catches SIGTERM to wind down and, with nobody left to wait for it, lingered
    on a dead server; a tool whose controller is gone has nobody to finish for."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group, wait, then SIGKILL it; safe to call twice. SIGCONT follows the
    SIGTERM: a stopped process (SIGSTOP, a debugger) would hold the signal until the grace is over."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGCONT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    # The leader may be gone while children it spawned still run in the group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def run(
    cmd: Command,
    *,
    log_path: Path,
    timeout_s: float,
    what: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    progress_every_s: float = 30.0,
    progress: Callable[[], str] | None = None,
) -> float:
    """Run `cmd` to completion with its output appended to `log_path`; return the wall time.

    Raises QsweepError naming the step, the exit code, the log's last lines and its path.
    """
    started = time.monotonic()
    with background(cmd, log_path=log_path, env=env, cwd=cwd) as proc:
        next_note = started + progress_every_s
        while proc.poll() is None:
            check_stop()
            now = time.monotonic()
            if now - started > timeout_s:
                raise QsweepError(
                    f"{what} timed out after {timeout_s:.0f} s (raise its timeout_s); log {log_path}"
                )
            if now >= next_note:
                detail = progress() if progress else ""
                log.info(f"  {what}: running {now - started:.0f} s {detail}".rstrip())
                next_note = now + progress_every_s
            time.sleep(0.2)
    if proc.returncode != 0:
        raise QsweepError(f"{what} failed (exit {proc.returncode}): {tail(log_path)} (log: {log_path})")
    return time.monotonic() - started


def output(cmd: Command, *, timeout_s: float, env: Mapping[str, str] | None = None) -> str:
    """Run a short command and return its stdout+stderr; '' if it cannot run at all."""
    try:
        done = subprocess.run(
            [str(c) for c in cmd],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or "") + (done.stderr or "")


@contextlib.contextmanager
def background(
    cmd: Command,
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    grace_s: float = 10.0,
) -> Iterator[subprocess.Popen]:
    """A child in its own process group with output appended to `log_path`, killed with its whole
    group on exit from the block (normal exit too: it also reaps grandchildren left behind);
    `grace_s` between SIGTERM and SIGKILL."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(redact.argv(list(cmd)))}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as err:
            raise QsweepError(f"cannot start {cmd[0]}: {err.strerror}; run ./setup.sh") from None
        try:
            yield proc
        finally:
            kill_group(proc, grace_s)


def process_tree(pid: int) -> list[int]:
    """A process and its descendants, from Linux /proc ([] elsewhere or when it is gone)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    tree, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        if Path(f"/proc/{current}").exists():
            tree.append(current)
        frontier.extend(children.get(current, []))
    return tree


def peak_rss_mb(pids: list[int]) -> float | None:
    """Peak resident memory (VmHWM) of these processes, summed, in MB; None if none could be read.
    Pages shared between them (a model file mapped by several) count once per process."""
    total_kb, found = 0, False
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        peak = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        if peak:
            total_kb, found = total_kb + int(peak.group(1)), True
    return total_kb / 1024 if found else None


def gpu_memory_mb(pids: list[int]) -> float | None:
    """GPU memory held now by these processes (nvidia-smi), in MB; None without an NVIDIA GPU."""
    text = output(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"], timeout_s=10
    )
    used = [line.split(",") for line in text.splitlines() if "," in line]
    mine = [float(mb) for pid, mb in used if pid.strip().isdigit() and int(pid) in pids]
    return sum(mine) if mine else None
