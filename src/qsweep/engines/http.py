"""Small HTTP helpers for talking to engine servers (stdlib only: the controller stays light)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from qsweep.errors import QsweepError
from qsweep.procs import check_stop, tail


def free_port(host: str) -> int:
    """A port nothing listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_taken(host: str, port: int) -> bool:
    """Whether something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, port)) == 0


def server_port(host: str, port: int) -> int:
    """The port to start a server on: `port`, refused if another process listens there (the new
    server would not bind, and whatever answers there would be measured instead), or a free one."""
    if not port:
        return free_port(host)
    if port_taken(host, port):
        raise QsweepError(
            f"engine.port={port} on {host} is in use by another process: free it, pick another, "
            "or use engine.port=0 for a free one"
        )
    return port


def post_json(url: str, body: dict, timeout_s: float) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    return _json_reply(request, url, timeout_s)


def get_json(url: str, timeout_s: float) -> dict:
    return _json_reply(urllib.request.Request(url), url, timeout_s)


def _json_reply(request: urllib.request.Request, url: str, timeout_s: float) -> dict:
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:300]
        raise QsweepError(f"{url} answered HTTP {err.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        raise QsweepError(f"{url} did not answer ({err}); is the server still running?") from None


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, log: Path, what: str) -> None:
    """Poll `url` until it answers 200 while `proc` runs; fail fast if the server exits, or after
    `timeout_s`. An answer while `proc` is gone is another process's: never taken."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check_stop()
        if proc.poll() is not None:
            raise QsweepError(
                f"{what} exited with code {proc.returncode} while starting: {tail(log)} (log: {log})"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200 and proc.poll() is None:
                    return
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            pass  # not listening yet, or 503 while the model loads
        time.sleep(0.25)
    raise QsweepError(
        f"{what} did not become healthy within {timeout_s:.0f} s (raise startup_timeout_s); log: {log}"
    )
