"""The MLflow store: where it lives, experiments, runs and per-epoch curves."""

from __future__ import annotations

from pathlib import Path

from mfpipe import tracking


def test_default_store_is_sqlite_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    store = tracking.open_store(None)
    assert store.uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert store.artifact_root == tmp_path / "mlruns" / "artifacts"
    assert tracking.resolve_uri("sqlite:///x.db", {"MLFLOW_TRACKING_URI": "http://h:1"}) == "sqlite:///x.db"
    assert tracking.resolve_uri(None, {"MLFLOW_TRACKING_URI": "http://h:1"}) == "http://h:1"


def test_experiment_artifacts_live_beside_a_sqlite_store(tmp_path):
    store = tracking.open_store(f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}")
    exp = store.client().get_experiment(tracking.experiment_id(store, "ml latest/small"))
    assert exp.name == "mfpipe-ml-latest-small"
    assert Path(exp.artifact_location.removeprefix("file://")).parent == tmp_path / "db" / "artifacts"


def test_curves_are_logged_per_epoch(tmp_path):
    store = tracking.open_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tracking.start_run(store, tracking.experiment_id(store, "x"), "bpr", {})
    tracking.log_curves(store, run, {"epoch_loss": [0.7, 0.5, float("nan"), 0.3]})
    history = store.client().get_metric_history(run, "epoch_loss")
    assert [(h.step, h.value) for h in history] == [(1, 0.7), (2, 0.5), (4, 0.3)]
