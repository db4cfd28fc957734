"""A shared MLflow tracking server as a cluster uses one: a real `mlflow server` on 127.0.0.1 with
artifact serving, a sweep that logs to it over HTTP only (its runs, metrics, logs and report land in
the server's store and artifact folder, nothing in the client's), and a server that is down refused
at pre-flight in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import cli_env, run_cli
from fakeplugins import write_fake_checkpoint
from qsweep.engines.http import free_port

pytestmark = pytest.mark.slow  # a real server: seconds, but not the fast suite's


@pytest.fixture
def server(tmp_path):
    """`mlflow server` with a SQLite store and served artifacts; its URI."""
    port = free_port("127.0.0.1")
    folder = tmp_path / "server"
    folder.mkdir()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"]  # fmt: skip
    with open(folder / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=folder, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                break
            except OSError:
                alive = proc.poll() is None and time.monotonic() < deadline
                assert alive, (folder / "server.log").read_text()
                time.sleep(0.5)
        yield uri, folder, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_a_sweep_logs_to_a_tracking_server_over_http_artifacts_included(server, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, folder, proc = server
    model = write_fake_checkpoint(tmp_path / "fake-model")
    client_side = tmp_path / "client"
    done = run_cli("-m", "method=fake-q4,none", "engine=fake", "benchmark=[fakebench]", "model=local",
                   f"model.path={model}", f"tracking.uri={uri}", tmp=client_side, timeout_s=300,
                   fakes=True)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("qsweep")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # uploaded through the server
    every = client.search_runs([experiment.experiment_id])
    parents = [r for r in every if r.data.tags.get("qsweep.kind") == "sweep"]
    jobs = [r for r in every if r.data.tags.get("qsweep.kind") == "job"]
    assert len(parents) == 1 and len(jobs) == 2
    assert all(r.info.status == "FINISHED" and "fake_score" in r.data.metrics for r in jobs)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in jobs)
    logs = [a.path for a in client.list_artifacts(jobs[0].info.run_id, "logs")]
    assert "logs/qsweep.log" in logs, logs
    report = [a.path for a in client.list_artifacts(parents[0].info.run_id, "report")]
    assert "report/report.html" in report, report
    stored = {p.name for p in (folder / "artifacts").rglob("*") if p.is_file()}
    assert {"qsweep.log", "report.html"} <= stored  # in the server's artifact folder
    local = client_side / "mlruns"
    kept_locally = [p for p in local.rglob("*") if p.is_file() and p.name != ".qsweep.lock"]
    assert kept_locally == []  # nothing written to a local store

    os.killpg(proc.pid, signal.SIGTERM)  # the server goes down
    proc.wait(timeout=30)
    down = run_cli("method=none", "engine=fake", "benchmark=[fakebench]", "model=local",
                   f"model.path={model}", f"tracking.uri={uri}", tmp=client_side, timeout_s=120,
                   fakes=True)  # fmt: skip
    assert down.returncode == 2
    assert down.stderr.strip().splitlines() == [
        f"qsweep: tracking.uri={uri} does not answer ([Errno 111] Connection refused): start the server or "
        "fix the URI"
    ]
