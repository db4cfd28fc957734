"""The default sweep through the real CLI, in a temporary directory, checked in the MLflow store it wrote."""

from __future__ import annotations

import re

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow

SMALL = ["benchmark.ppl.max_tokens=2048"]


def runs(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("qsweep")
    every = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return client, every


def test_default_sweep_end_to_end_then_fully_cached(tmp_path, llamacpp_env):
    done = run_cli("-m", *SMALL, tmp=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3 job(s) composed and checked" in done.stdout
    for stage in ("model", "quantize", "serve", "benchmark_ppl"):
        assert f"stage {stage}:" in done.stdout  # each stage's wall time is printed

    client, every = runs(tmp_path)
    parents = [r for r in every if r.data.tags.get("qsweep.kind") == "sweep"]
    children = [r for r in every if r.data.tags.get("qsweep.kind") == "job"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3
    by_method = {}
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags.get("qsweep.error")
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        m, p, t = run.data.metrics, run.data.params, run.data.tags
        for key in ("ppl", "ppl_err", "artifact_size_mb", "bits_per_weight", "quantize_s", "server_start_s"):
            assert key in m, key
        assert p["choice.method"] == p["method.name"] and p["choice.engine"] == "llamacpp"
        assert p["benchmark.ppl.max_tokens"] == "2048" and p["gguf.tensor_types"]
        assert re.fullmatch(r"\S+-[0-9a-f]{7,}", t["llama_cpp.build"]) and t["qsweep.version"] and t["cpu"]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "logs", "smoke_completion.txt", "artifact_info.json"} <= artifacts
        logs = {a.path for a in client.list_artifacts(run.info.run_id, "logs")}
        assert "logs/server.log" in logs
        assert client.list_artifacts(run.info.run_id, "quantize_logs"), "quantize logs, also on a cache hit"
        by_method[p["method.name"]] = m
    assert set(by_method) == {"none", "gguf-q4_k_m", "gguf-iq4_xs"}
    base = by_method["none"]["ppl"]
    assert by_method["gguf-q4_k_m"]["ppl"] > base and by_method["gguf-iq4_xs"]["ppl"] > base
    assert by_method["none"]["bits_per_weight"] > 15 > 7 > by_method["gguf-iq4_xs"]["bits_per_weight"]

    # The same sweep again reuses every quantized file and measures the same perplexities.
    again = run_cli("-m", *SMALL, tmp=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    _, every = runs(tmp_path)
    second = [r for r in every if r.data.tags.get("qsweep.kind") == "job"][3:]
    assert len(second) == 3
    for run in second:
        assert run.data.tags["artifact.cache_hit"] == "true"
        assert run.data.metrics["ppl"] == pytest.approx(
            by_method[run.data.params["method.name"]]["ppl"], rel=1e-6
        )


def test_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path, llamacpp_env):
    done = run_cli(
        "-m", "method=none,gguf-q4_k_m", "engine.extra_args=[--no-such-flag]", *SMALL, tmp=tmp_path
    )
    assert done.returncode == 1
    assert "2 job(s) failed" in done.stderr and "Traceback" not in done.stderr
    _, every = runs(tmp_path)
    children = [r for r in every if r.data.tags.get("qsweep.kind") == "job"]
    assert [r.info.status for r in children] == ["FAILED", "FAILED"]
    assert all("llama-server exited" in r.data.tags["qsweep.error"] for r in children)
    assert [r.info.status for r in every if r.data.tags.get("qsweep.kind") == "sweep"] == ["FAILED"]
