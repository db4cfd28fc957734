"""Subprocesses (qsweep.procs): timeouts, process groups, signals, clear errors; the CPU-busy
check, the server watch and environment scans."""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import alive
from qsweep import envs, procs
from qsweep.errors import QsweepError


def test_run_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    with pytest.raises(QsweepError, match="timed out after 1 s"):
        procs.run(["sh", "-c", script], log_path=tmp_path / "log", timeout_s=1, what="sleeper")
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child), "the grandchild must die with its group"


def test_run_failure_names_the_step_exit_code_and_log(tmp_path):
    log = tmp_path / "step.log"
    with pytest.raises(QsweepError) as info:
        procs.run(["sh", "-c", "echo boom-detail; exit 3"], log_path=log, timeout_s=30, what="my step")
    message = str(info.value)
    assert "my step failed (exit 3)" in message and "boom-detail" in message and str(log) in message


def test_background_child_is_killed_on_exception(tmp_path):
    with pytest.raises(RuntimeError), procs.background(["sleep", "300"], log_path=tmp_path / "log") as proc:
        pid = proc.pid
        raise RuntimeError("benchmark crashed")
    assert not alive(pid)


def test_background_child_is_killed_even_if_it_ignores_sigterm(tmp_path):
    script = "trap '' TERM; sleep 300"
    with procs.background(["sh", "-c", script], log_path=tmp_path / "log", grace_s=1) as proc:
        pid = proc.pid
        time.sleep(0.3)
    assert not alive(pid)
    assert proc.returncode == -signal.SIGKILL


def test_a_stopped_child_is_stopped_without_waiting_out_the_grace(tmp_path):
    """SIGSTOP holds SIGTERM until SIGCONT: kill_group sends both, so a stopped server ends at once
    instead of after the grace and SIGKILL."""
    with procs.background(["sleep", "300"], log_path=tmp_path / "log", grace_s=30) as proc:
        os.kill(proc.pid, signal.SIGSTOP)
        stopping = time.monotonic()
    assert proc.returncode == -signal.SIGTERM and time.monotonic() - stopping < 10


def test_free_port_is_bindable_and_port_taken_sees_a_listener():
    import socket

    from qsweep.engines.http import free_port, port_taken

    port = free_port("127.0.0.1")
    assert 1024 <= port < 65536 and not port_taken("127.0.0.1", port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # raises if the port was not free
        sock.listen()
        assert port_taken("127.0.0.1", port)


def test_missing_executable_is_one_clear_error(tmp_path):
    with pytest.raises(QsweepError, match="cannot start /no/such/tool"):
        procs.run(["/no/such/tool"], log_path=tmp_path / "log", timeout_s=5, what="tool")


def test_cpu_busy_sees_other_work_but_not_our_own():
    """The load test's check for a shared machine: every core spinning in processes that are not
    ours reads as (nearly) all busy; the same spinning in our own children (a server still busy
    with earlier work) does not count."""
    import subprocess
    import sys

    from qsweep.benchmarks import perf

    cores = os.cpu_count() or 1
    spin = f"{sys.executable} -c 'while True: pass'"
    # `sh` starts the spinners in the background and exits: they are no longer our descendants
    started = subprocess.run(
        ["sh", "-c", " ".join(f"{spin} >/dev/null 2>&1 </dev/null & echo $!;" for _ in range(cores))],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    foreign = [int(pid) for pid in started.stdout.split()]
    try:
        time.sleep(0.3)
        busy = perf.cpu_busy(0.5)
    finally:
        for pid in foreign:
            os.kill(pid, signal.SIGKILL)
    assert busy is not None and busy > 0.8 and busy > perf.BUSY_NOTE_ABOVE

    before = perf.cpu_busy(0.5)  # whatever else this machine is doing
    own = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.3)
        busy = perf.cpu_busy(0.5)
    finally:
        for proc in own:
            proc.kill()
            proc.wait()
    assert busy is not None and busy < before + 0.25


def test_server_watch_notices_a_silent_server_without_ever_blocking(tmp_path):
    """A server that accepts connections but never replies (SIGSTOPped, hung): the watch reports
    it once request_timeout_s has passed, and each question to the watch returns at once."""
    import socket
    from types import SimpleNamespace

    from qsweep.measure import ServerWatch

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # connections queue up; nothing ever answers
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        served = SimpleNamespace(process=None, url=url, log=tmp_path / "server.log", health_path="/health",
                                 health_url=lambda: f"{url}/health")  # fmt: skip
        with ServerWatch(served, timeout_s=1.0) as watch:
            assert watch() is None
            deadline, slowest, reason = time.monotonic() + 10, 0.0, None
            while reason is None and time.monotonic() < deadline:
                asked = time.monotonic()
                reason = watch()
                slowest = max(slowest, time.monotonic() - asked)
                time.sleep(0.05)
    assert reason and reason.startswith("the server stopped answering (no /health reply for")
    assert slowest < 0.1, slowest


def test_environment_scans_survive_another_thread_setting_and_unsetting_a_variable(tmp_path):
    """MLflow's telemetry thread sets and unsets a variable while jobs run: a plain scan of
    os.environ then fails now and then (shown first, so the setting is known to provoke it); qsweep's
    scans (`environ.snapshot`, the secrets `redact` masks, a stage environment's variables) never do."""
    import sys
    import threading

    from qsweep import environ, redact

    stage = envs.StageEnv("llamacpp", tmp_path)
    scans = {
        "environ.snapshot": environ.snapshot,
        "redact.environment_secrets": redact.environment_secrets,
        "StageEnv.environ": stage.environ,
    }
    stop, switch = threading.Event(), sys.getswitchinterval()

    def toggle() -> None:
        while not stop.is_set():
            os.environ["_QSWEEP_TELEMETRY_LIKE"] = "x"
            del os.environ["_QSWEEP_TELEMETRY_LIKE"]

    def failures(scan, seconds: float, until_first: bool = False) -> int:
        count, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline and not (until_first and count):
            try:
                scan()
            except (KeyError, RuntimeError):
                count += 1
        return count

    thread = threading.Thread(target=toggle, daemon=True)
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows in milliseconds
    thread.start()
    try:
        naive = failures(lambda: [v for _, v in os.environ.items()], 10.0, until_first=True)
        assert naive, "the naive scan never failed: this test no longer provokes the race"
        assert {name: failures(scan, 1.0) for name, scan in scans.items()} == dict.fromkeys(scans, 0)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(switch)
        os.environ.pop("_QSWEEP_TELEMETRY_LIKE", None)
