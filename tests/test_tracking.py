"""MLflow tracking (qsweep.tracking): params and secrets, a locked or new SQLite store, and how an
interrupt closes the runs."""

from __future__ import annotations

import signal

import pytest

from qsweep import tracking


def test_params_are_flattened_and_secrets_masked():
    flat = tracking.flatten(
        {"engine": {"port": 0, "api_key": "sk-123", "extra": {"hf_token": "abc"}}, "n": None}
    )
    assert flat == {"engine.port": "0", "engine.api_key": "***", "engine.extra.hf_token": "***", "n": ""}


def test_only_a_locked_sqlite_store_is_waited_out(monkeypatch):
    """MLflow's wrapping of SQLite's lock error is retried until it passes; any other error, even
    one that mentions a lock, is raised at once."""
    import sqlite3

    from qsweep import tracking

    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            try:
                raise sqlite3.OperationalError("database is locked")
            except sqlite3.OperationalError as err:
                raise RuntimeError("(sqlite3.OperationalError) see above") from err
        return "done"

    assert tracking.patiently(locked_twice, "log") == "done" and len(calls) == 3

    def other():
        calls.append(1)
        raise RuntimeError("the run is locked for edits by a policy")

    calls.clear()
    with pytest.raises(RuntimeError, match="policy"):
        tracking.patiently(other, "log")
    assert len(calls) == 1


def test_a_new_sqlite_store_is_made_whole_or_not_at_all(tmp_path, monkeypatch):
    """MLflow's migrations make a new store beside it, then it is renamed into place: a process
    killed during them (here: failing) leaves no store that no later MLflow can open."""
    import mlflow.tracking

    store = tmp_path / "mlruns" / "mlflow.db"
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    real = mlflow.tracking.MlflowClient

    class Killed(Exception):
        pass

    class DiesMidMigration(real):
        def search_experiments(self, *args, **kwargs):
            raise Killed

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", DiesMidMigration)
    with pytest.raises(Killed):
        tracking.create_sqlite_store(uri)
    assert list(store.parent.iterdir()) == []  # neither the store nor the file it was made in
    monkeypatch.setattr(mlflow.tracking, "MlflowClient", real)
    (store.parent / ".mlflow.db.tmp-1-dead").write_text("a killed creation's half-made file")
    tracking.create_sqlite_store(uri)
    assert store.is_file() and [p.name for p in store.parent.iterdir()] == ["mlflow.db"]
    assert real(tracking_uri=uri).get_experiment_by_name("Default") is not None


def test_an_interrupt_after_the_last_run_closed_keeps_the_recorded_outcome(monkeypatch, capsys):
    """Ctrl-C landing after the sweep's last run was set FINISHED in the store but before this
    process forgot it (a race the chaos test found): exit 0 with every run FINISHED, not 130 with
    nothing marked KILLED."""
    from types import SimpleNamespace

    from qsweep import cli

    store = {"job": "RUNNING", "parent": "RUNNING"}
    client = SimpleNamespace(
        get_run=lambda run_id: SimpleNamespace(
            info=SimpleNamespace(status=store[run_id]), data=SimpleNamespace(tags={})
        ),
        set_terminated=lambda run_id, status: store.__setitem__(run_id, status),
        set_tag=lambda *args: None,
    )
    monkeypatch.setattr(tracking, "_open_runs", {})
    monkeypatch.setattr(tracking, "_closed_statuses", [])

    def sweep():
        tracking.opened(client, "parent")
        tracking.opened(client, "job")
        tracking.terminate(client, "job", "FINISHED")
        # the parent closed in the store; the interrupt lands before this process forgets it
        client.set_terminated("parent", "FINISHED")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "hydra_main", sweep)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the test process keeps its handlers
    with pytest.raises(SystemExit) as done:
        cli.run_hydra()
    assert done.value.code == 0 and store == {"job": "FINISHED", "parent": "FINISHED"}
    assert "interrupted after every run was recorded" in capsys.readouterr().err
    assert tracking.open_runs() == [] and tracking.closed_statuses() == ["FINISHED", "FINISHED"]
