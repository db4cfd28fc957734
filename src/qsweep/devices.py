"""GPU slots: each job holds its own GPUs while it runs, so that jobs side by side (a parallel
launcher, two sweeps on one box) never share one.

A job asks for `JobPlan.gpus` devices (its engine's tensor parallelism, or `gpus.per_job`) out of
the GPUs this process may use (`visible`), and holds them with one lock file per device (`claim`):
an advisory `flock`, which the kernel drops when the holder exits, however it exits, so a killed
job frees its GPUs. The lock files name each GPU by its UUID where nvidia-smi says, so two jobs that
see different GPUs under the same index (a scheduler's per-job device isolation) never wait on each
other. For the job's duration `CUDA_VISIBLE_DEVICES` names only its own devices, and every tool it
starts inherits that. Under SLURM the scheduler has already given each job its GPUs
(CUDA_VISIBLE_DEVICES), and the claim picks among those.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qsweep.errors import QsweepError

log = logging.getLogger(__name__)

VISIBLE = "CUDA_VISIBLE_DEVICES"


@dataclass
class GpuSlotsConfig:
    """How jobs share out this machine's GPUs (`gpus.*`)."""

    # GPUs each job holds; None: what its engine asks for (vLLM's tensor_parallel_size, llama.cpp's
    # gpus) on a CUDA device, else none.
    per_job: int | None = None
    # The GPUs jobs share out (indices or UUIDs); None: CUDA_VISIBLE_DEVICES where set (a
    # scheduler's allocation), else every GPU nvidia-smi lists.
    ids: list[str] | None = None
    wait_s: int = 24 * 3600  # how long a job waits for free GPUs (others hold them) before it fails
    # The lock files: one folder per machine and user (a local /tmp, never a shared filesystem).
    lock_dir: str = f"${{oc.env:TMPDIR,/tmp}}/qsweep-gpu-slots-{os.getuid()}"


@functools.cache
def nvidia_gpus() -> list[tuple[str, str]]:
    """(index, UUID) of each GPU nvidia-smi lists; [] where there is none. Asked once per process:
    the pre-flight and every job want it."""
    from qsweep import envs, procs

    if not envs.has_cuda_gpu():
        return []
    listing = procs.output(["nvidia-smi", "-L"], timeout_s=20)
    return re.findall(r"^GPU (\d+):.*\(UUID: (\S+?)\)", listing, flags=re.M)


def visible(configured: list[str] | None = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs jobs may be given, as CUDA names them: `gpus.ids`, else CUDA_VISIBLE_DEVICES,
    else every GPU nvidia-smi lists (by index)."""
    if configured is not None:
        return [str(d) for d in configured]
    given = os.environ if environ is None else environ
    if given.get(VISIBLE) is not None:
        return [d.strip() for d in given[VISIBLE].split(",") if d.strip()]
    return [index for index, _ in nvidia_gpus()]


def lock_names(devices: list[str], listed: list[tuple[str, str]] | None = None) -> dict[str, str]:
    """Each device's lock-file name: its UUID where nvidia-smi lists it, else the name itself."""
    listed = nvidia_gpus() if listed is None else listed
    uuids = dict(listed)
    names = {}
    for device in devices:
        name = uuids.get(device, device)
        names[device] = re.sub(r"[^\w.-]", "_", name)
    return names


@dataclass
class Claim:
    """The devices a job holds, and the open lock files that hold them."""

    devices: list[str]
    _files: list = field(default_factory=list, repr=False)

    def release(self) -> None:
        for handle in self._files:
            handle.close()  # closing the file drops its flock
        self._files.clear()


def _try_claim(count: int, names: dict[str, str], lock_dir: Path) -> Claim | None:
    """`count` free devices, in their order, or None (holding nothing) if fewer are free."""
    claim = Claim([])
    for device, name in names.items():
        handle = open(lock_dir / f"{name}.lock", "a+")  # noqa: SIM115 - kept open: it is the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")  # who holds it, for a person looking
        handle.flush()
        claim.devices.append(device)
        claim._files.append(handle)
        if len(claim.devices) == count:
            return claim
    claim.release()
    return None


@contextlib.contextmanager
def claim(
    count: int,
    devices: list[str],
    lock_dir: Path,
    wait_s: float,
    poll_s: float = 2.0,
    listed: list[tuple[str, str]] | None = None,
    on_wait: Callable[[str], None] = log.info,
) -> Iterator[list[str]]:
    """Hold `count` of `devices` for the block, waiting up to `wait_s` while others hold them;
    yields the devices held ([] for `count` 0)."""
    if count <= 0:
        yield []
        return
    if count > len(devices):
        raise QsweepError(
            f"a job needs {count} GPU(s) and {len(devices)} are visible ({', '.join(devices) or 'none'}): "
            "lower engine.tensor_parallel_size (or gpus.per_job), or run it where more GPUs are"
        )
    names = lock_names(devices, listed)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    said = False
    while (held := _try_claim(count, names, lock_dir)) is None:
        if time.monotonic() >= deadline:
            raise QsweepError(
                f"no {count} free GPU(s) among {', '.join(devices)} for {wait_s:.0f} s: other jobs hold "
                f"them (lock files in {lock_dir}); raise gpus.wait_s or run fewer jobs at once"
            )
        if not said:
            on_wait(f"waiting for {count} free GPU(s) among {', '.join(devices)}: other jobs hold them")
            said = True
        time.sleep(poll_s)
    try:
        yield held.devices
    finally:
        held.release()


@contextlib.contextmanager
def visible_only(devices: list[str]) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES names exactly `devices` for the block (every tool started in it
    inherits that), then is restored."""
    before = os.environ.get(VISIBLE)
    os.environ[VISIBLE] = ",".join(devices)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(VISIBLE, None)
        else:
            os.environ[VISIBLE] = before


@contextlib.contextmanager
def job_gpus(count: int, cfg: GpuSlotsConfig) -> Iterator[list[str]]:
    """A job's GPUs for its duration: `count` claimed among the visible ones, and only those
    visible to it. A job that needs none on a machine with GPUs sees none, so that it never runs
    on devices another job holds."""
    devices = visible(cfg.ids)
    if not devices:
        if count:  # the pre-flight refuses this where it can know it (engine.device=cuda, no GPU)
            raise QsweepError(f"the job needs {count} GPU(s) and this machine has none visible")
        yield []
        return
    with claim(count, devices, Path(cfg.lock_dir), cfg.wait_s) as held, visible_only(held):
        yield held
