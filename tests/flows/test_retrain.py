"""The retrain flow end to end on small synthetic data, with the store in a temporary folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.retrain import retrain
from mfpipe import tracking
from mfpipe.cli import app
from mfpipe.config import load_config
from mfpipe.errors import MfpipeError

DATA = "synthetic:20000"
NAME = "mfpipe-synthetic-20k"
FAST = {
    "svd": {"n_epochs": 5, "n_factors": 16},
    "als": {"iterations": 3, "factors": 16},
    "bpr": {"epochs": 10, "factors": 16},
}
REPORT_KEYS = {"dataset", "protocol", "split", "models", "champion", "timing"}
MODEL_KEYS = {"model", "status", "error", "metrics", "train_seconds", "run_id", "registered_model", "version"}
SPLIT_KEYS = {"protocol", "seed", "cutoff", "relevance_threshold", "n_train", "n_validation", "n_test",
              "cold_users", "cold_items", "evaluable_users"}  # fmt: skip


def config(store: str, **overrides):
    return load_config(overrides={"data": DATA, "tracking_uri": store, "model_params": FAST, "threads": 2, **overrides})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def first(store):
    """The first run into an empty store: every model, the best becomes champion."""
    return retrain(config(store))


def test_every_model_runs_and_the_report_has_the_contract_layout(first):
    report = first.report
    assert set(report) == REPORT_KEYS
    assert set(report["dataset"]) == {"name", "digest", "rows"} and report["dataset"]["name"] == "synthetic-20k"
    assert set(report["split"]) >= SPLIT_KEYS
    assert [m["model"] for m in report["models"]] == ["svd", "als", "bpr", "pop"]
    for m in report["models"]:
        assert set(m) == MODEL_KEYS
        assert m["status"] == "ok" and m["error"] is None and m["registered_model"] == NAME
        assert 0 <= m["metrics"]["ndcg@10"] <= 1 and m["train_seconds"] > 0
        # Only the rating model reports rating errors (validation ratings of warm pairs).
        assert ({"rmse", "mae"} <= set(m["metrics"])) == (m["model"] == "svd")
    svd = report["models"][0]["metrics"]
    assert 0 < svd["mae"] <= svd["rmse"] < 5
    champion = report["champion"]
    assert set(champion) == {"registered_model", "before", "after", "promoted", "reason"}
    best = max(report["models"], key=lambda m: m["metrics"]["ndcg@10"])
    assert champion["promoted"] and champion["before"]["version"] is None
    assert champion["after"] == {
        "version": best["version"],
        "ndcg@10": pytest.approx(best["metrics"]["ndcg@10"]),
    }
    json.dumps(report)  # serialisable as is


def test_mlflow_holds_parent_child_runs_lineage_and_champion(first, store):
    s = tracking.open_store(store)
    client = s.client()
    version = tracking.alias_version(s, NAME, tracking.CHAMPION)
    assert version.version == first.report["champion"]["after"]["version"]
    for key in ("dataset_digest", "split_digest", "config_hash", "seed", "mfpipe_version", "ndcg_at_10", "model"):
        assert key in version.tags
    assert version.tags["dataset_digest"] == first.report["dataset"]["digest"]
    child = client.get_run(version.run_id)
    parent_id = child.data.tags["mlflow.parentRunId"]
    parent = client.get_run(parent_id)
    assert "prefect.flow_run_id" in parent.data.tags
    assert child.data.metrics["ndcg_at_10"] == pytest.approx(first.report["champion"]["after"]["ndcg@10"])
    assert {"ndcg_at_10_all", "ndcg_at_10_cold"} & set(child.data.metrics)
    svd = next(m for m in first.report["models"] if m["model"] == "svd")
    assert client.get_run(svd["run_id"]).data.metrics["rmse"] == pytest.approx(svd["metrics"]["rmse"])
    bpr = next(m for m in first.report["models"] if m["model"] == "bpr")
    history = client.get_metric_history(bpr["run_id"], "epoch_loss")
    assert [h.step for h in history] == list(range(1, len(history) + 1)) and len(history) > 1
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"validation", "split", "plots", "environment.json"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent_id, "plots")}
    assert {"plots/metric_comparison.png", "plots/ndcg_by_activity.png", "plots/learning_curves.png"} <= plots
    assert parent.inputs.dataset_inputs[0].dataset.digest == first.report["dataset"]["digest"]


def test_second_identical_run_keeps_the_champion(first, store):
    second = retrain(config(store))
    champion = second.report["champion"]
    assert not champion["promoted"], champion["reason"]
    assert champion["before"]["version"] == champion["after"]["version"] == first.report["champion"]["after"]["version"]
    assert "interval" in champion["reason"]
    challenger = tracking.alias_version(tracking.open_store(store), NAME, tracking.CHALLENGER)
    best = max(second.report["models"], key=lambda m: m["metrics"]["ndcg@10"])
    assert challenger.version == best["version"]


def test_a_failing_model_does_not_stop_the_others(tmp_path):
    store = f"sqlite:///{tmp_path / 's' / 'mlflow.db'}"
    params = {**FAST, "bpr": {"epochs": 5, "learning_rate": 1e30}}  # diverges: NaN loss
    outcome = retrain(config(store, models=["bpr", "pop"], model_params=params, split={"test_quantile": 0.9}))
    bpr, pop = outcome.report["models"]
    assert bpr["status"] == "failed" and "diverged" in bpr["error"] and bpr["version"] is None
    assert bpr["run_id"] is not None  # recorded as a failed child run
    assert tracking.open_store(store).client().get_run(bpr["run_id"]).info.status == "FAILED"
    assert pop["status"] == "ok" and outcome.report["champion"]["after"]["version"] == pop["version"]
    assert outcome.report["split"]["n_test"] > 0 and outcome.test_ndcg is not None  # champion scored on test
    parent = tracking.open_store(store).client().get_run(pop["run_id"]).data.tags["mlflow.parentRunId"]
    metrics = tracking.open_store(store).client().get_run(parent).data.metrics
    assert metrics["test_ndcg_at_10"] == pytest.approx(outcome.test_ndcg)


def test_dask_runner_needs_a_prefect_server():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows._plumbing import task_runner

    with temporary_settings({PREFECT_API_URL: None}), pytest.raises(MfpipeError, match="needs a Prefect server"):
        task_runner(load_config(overrides={"task_runner": "dask"}), 2)


def test_an_early_prefect_api_steps_aside_for_a_configured_server():
    """`mfpipe run` starts its API before Prefect's settings are read; a server named there wins, the early one ends."""
    import subprocess

    from prefect.settings import PREFECT_API_URL

    from flows import _plumbing
    from mfpipe.services import Service

    server = PREFECT_API_URL.value()  # the session's test server
    early = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with _plumbing.own_api(Service("Prefect API", "http://127.0.0.1:9", "", early, Path("unused.log"))):
        assert PREFECT_API_URL.value() == server and _plumbing.shared_api() == server
    assert early.wait(30) is not None


def test_mfpipe_run_sends_no_heartbeats_unless_configured(monkeypatch):
    """Prefect's engine joins its heartbeat thread (which sleeps a second at a time) at the end of a run."""
    from prefect.settings import get_current_settings, temporary_settings

    from flows import _plumbing

    with _plumbing.no_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency == 180  # Prefect's default, outside
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")
    with temporary_settings(), _plumbing.no_heartbeats():  # settings read again: the environment's value
        assert get_current_settings().flows.heartbeat_frequency == 60


def test_failed_validation_trains_nothing_and_moves_nothing(first, store, tmp_path):
    bad = tmp_path / "ratings.csv"
    rows = [f"u{i % 30},i{i % 50},{99 if i == 7 else 4},{1_500_000_000 + i}" for i in range(600)]
    bad.write_text("user_id,item_id,rating,timestamp\n" + "\n".join(rows) + "\n")
    s = tracking.open_store(store)
    versions = len(tracking.list_versions(s, NAME))
    champion = tracking.alias_version(s, NAME, tracking.CHAMPION).version
    with pytest.raises(MfpipeError, match="validation failed"):
        retrain(config(store, data=str(bad), registered_model=NAME))
    assert len(tracking.list_versions(s, NAME)) == versions
    assert tracking.alias_version(s, NAME, tracking.CHAMPION).version == champion


def test_cli_recommend_champion_promote(first, store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    runner = CliRunner()
    for user in ("1", "a user never seen"):  # a train user of the synthetic data, and a cold one
        out = runner.invoke(app, ["recommend", "--user", user, "--k", "5", "--dataset", "synthetic-20k", "--json"])
        assert out.exit_code == 0, out.output
        answer = json.loads(out.output)
        assert len(answer["items"]) == 5 and all(isinstance(r["item_id"], str) for r in answer["items"])
    shown = runner.invoke(app, ["champion", "--dataset", "synthetic-20k"])
    current = first.report["champion"]["after"]["version"]
    assert shown.exit_code == 0 and f"champion: {NAME} v{current}" in shown.output
    other = next(m["version"] for m in first.report["models"] if m["version"] != current)
    moved = runner.invoke(app, ["promote", "--version", other, "--reason", "hand test", "--dataset", "synthetic-20k"])
    assert moved.exit_code == 0, moved.output
    s = tracking.open_store(store)
    now = tracking.alias_version(s, NAME, tracking.CHAMPION)
    assert now.version == other and "hand test" in now.tags["champion.reason"]
    back = runner.invoke(app, ["promote", "--rollback", "--dataset", "synthetic-20k"])
    assert back.exit_code == 0, back.output
    assert tracking.alias_version(s, NAME, tracking.CHAMPION).version == current
    both = runner.invoke(app, ["promote", "--dataset", "synthetic-20k"])
    assert isinstance(both.exception, MfpipeError) and both.exception.exit_code == 2


def test_search_tunes_on_an_inner_split_and_logs_every_trial_nested(tmp_path):
    store = f"sqlite:///{tmp_path / 's' / 'mlflow.db'}"
    outcome = retrain(config(store, models=["als", "pop"], search_trials=3))
    als = next(m for m in outcome.report["models"] if m["model"] == "als")
    client = tracking.open_store(store).client()
    trials = client.search_runs([client.get_run(als["run_id"]).info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{als['run_id']}'")  # fmt: skip
    assert sorted(int(t.data.tags["trial"]) for t in trials) == [0, 1, 2]
    assert all("inner_ndcg_at_10" in t.data.metrics for t in trials if t.data.tags["state"] == "complete")
    searched = client.download_artifacts(als["run_id"], "search/search.json", str(tmp_path))
    best = json.loads(Path(searched).read_text())["best"]
    run_params = client.get_run(als["run_id"]).data.params
    logged = {key: value if isinstance(value, str) else json.dumps(value) for key, value in best["params"].items()}
    assert all(run_params[key] == text for key, text in logged.items())  # the refit used the best setting


def test_task_arguments_are_cheap_for_prefect_to_walk():
    """Prefect walks every dict, list and dataclass of a task's arguments twice per call: the split the
    tasks receive must not carry its thousands of item titles as a dict (seconds per run)."""
    from prefect.utilities.collections import visit_collection

    from mfpipe import prepare

    cfg = load_config(overrides={"data": "synthetic:5000"})
    data, parts = prepare.split(prepare.load(cfg), cfg)
    assert data.titles is not None and len(data.titles) > 300
    assert data.titles[data.item_ids[0]] and dict(data.titles) == dict(parts.train.titles)
    visited = []
    visit_collection((data, parts), lambda value: visited.append(value), return_data=False)
    assert len(visited) < 100
