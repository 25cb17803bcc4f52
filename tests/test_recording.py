"""What a run writes to MLflow, written without Prefect: parent run, child runs, versions, the end."""

from __future__ import annotations

import json
import math
import threading

import pytest

from mfpipe import prepare, recording, tracking, training
from mfpipe.config import load_config
from mfpipe.errors import TransientError
from mfpipe.evaluation import evaluate_model
from mfpipe.report import ModelResult, model_result


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One run at k=5: pop finished and registered, bpr failed; the parent closed."""
    store = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    config = load_config(overrides={"data": "synthetic:3000", "tracking_uri": store, "k": 5, "models": "pop,bpr"})
    data, parts = prepare.prepare(config)
    validated = prepare.validate(prepare.load(config), config, tmp_path_factory.mktemp("gx"))
    pop = training.train_model("pop", parts, config, training.CoreBudget(1, ["pop"]))
    reports = {"pop": evaluate_model(pop.model, parts, config.k, seed=config.seed)}
    results = [
        model_result("pop", pop, reports["pop"], "", parts),
        model_result("bpr", None, None, "bpr: training diverged", parts),
    ]
    ctx = recording.open_run(config, data, "flow-run-id", None)
    recording.record_validation(ctx, validated)
    recording.record_split(ctx, parts)
    for result in results:
        recording.record_model(ctx, result, pop if result.model == "pop" else None, parts, config)
    recording.close_run(ctx, ok=True, error=None)
    return ctx, results, data, parts


def test_the_parent_run_holds_lineage_split_and_validation(recorded):
    ctx, _, data, parts = recorded
    parent = ctx.store.client().get_run(ctx.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["dataset_digest"] == data.digest and parent.data.tags["split_digest"] == parts.digest
    assert parent.data.tags["prefect.flow_run_id"] == "flow-run-id" and parent.data.tags["validation.success"] == "True"
    artifacts = {a.path for a in ctx.store.client().list_artifacts(ctx.parent_run_id)}
    assert {"validation", "split", "environment.json"} <= artifacts


def test_a_finished_model_is_a_version_with_metrics_named_after_k(recorded):
    ctx, results, _, _ = recorded
    pop = next(r for r in results if r.model == "pop")
    assert pop.version is not None and pop.registered_model == ctx.registered_model
    version = tracking.get_version(ctx.store, ctx.registered_model, pop.version)
    assert float(version.tags["ndcg_at_5"]) == pytest.approx(pop.score)
    assert "ndcg_at_10" not in version.tags
    run = ctx.store.client().get_run(pop.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == ctx.parent_run_id
    assert run.data.metrics["ndcg_at_5"] == pytest.approx(pop.score)


def test_the_logged_model_carries_the_metrics_of_its_run(recorded):
    """Logged before its metrics (no read-back per metric key), the model is still linked to each of them."""
    ctx, results, _, _ = recorded
    pop = next(r for r in results if r.model == "pop")
    client = ctx.store.client()
    [model] = client.search_logged_models([ctx.experiment_id], filter_string=f"source_run_id = '{pop.run_id}'")
    linked = {m.key: m.value for m in model.metrics}
    assert linked == client.get_run(pop.run_id).data.metrics
    assert linked["ndcg_at_5"] == pytest.approx(pop.score)


def test_a_failed_model_is_a_failed_child_run_and_no_version(recorded):
    ctx, results, _, _ = recorded
    bpr = next(r for r in results if r.model == "bpr")
    assert bpr.status == "failed" and bpr.version is None
    run = ctx.store.client().get_run(bpr.run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "bpr: training diverged"
    assert len(tracking.list_versions(ctx.store, ctx.registered_model)) == 1


def test_an_interrupted_registration_leaves_its_child_run_failed(recorded, monkeypatch):
    ctx, results, _, parts = recorded
    pop = next(r for r in results if r.model == "pop")

    def broken(*args, **kwargs):
        raise ConnectionError("store went away")

    monkeypatch.setattr(tracking, "register", broken)
    result = ModelResult("als", "ok", evaluation=pop.evaluation, train_seconds=1.0)
    trained = training.train_model("pop", parts, load_config(overrides={"k": 5}), training.CoreBudget(1, ["pop"]))
    with pytest.raises(TransientError, match="store went away"):  # retried by the flow's record task
        recording.record_model(ctx, result, trained, parts, load_config(overrides={"k": 5}))
    assert ctx.store.client().get_run(result.run_id).info.status == "FAILED"


def test_epoch_curves_put_sparse_ndcg_at_its_epochs():
    history = {"epoch_loss": [3.0, 2.0, 1.0], "epoch_ndcg_at_10": [0.1, 0.2], "eval_epoch": [2, 3]}
    curves = recording.epoch_curves(history)
    assert curves["epoch_loss"] == [3.0, 2.0, 1.0] and set(curves) == {"epoch_loss", "epoch_ndcg_at_10"}
    first, *rest = curves["epoch_ndcg_at_10"]
    assert math.isnan(first) and rest == [0.1, 0.2]


def test_what_a_person_compares_in_the_mlflow_ui(recorded):
    ctx, results, _, parts = recorded
    client = ctx.store.client()
    assert client.get_experiment(ctx.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    pop = next(r for r in results if r.model == "pop")
    run = client.get_run(pop.run_id)
    contexts = {t.value for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert contexts == {"training", "validation"}
    assert "tables/per_user_metrics.json" in {a.path for a in client.list_artifacts(pop.run_id, "tables")}
    version = client.get_model_version(ctx.registered_model, pop.version)
    assert version.description.startswith("**pop**: NDCG@5 ") and parts.summary.protocol in version.description
    profile = json.loads(version.tags["data_profile"])
    assert profile["rows"] == parts.summary.n_train


def _factor_model_run(tmp_path):
    """An ALS model trained, evaluated and its parent run opened, ready to be recorded."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(overrides={"data": "synthetic:3000", "tracking_uri": store, "models": "als"})
    data, parts = prepare.prepare(config)
    als = training.train_model("als", parts, config, training.CoreBudget(1, ["als"]))
    result = model_result("als", als, evaluate_model(als.model, parts, config.k), "", parts)
    ctx = recording.open_run(config, data, None, None)
    recording.record_split(ctx, parts)
    return config, parts, als, result, ctx


def _figure_threads(since: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in set(threading.enumerate()) - since if t.name.startswith("mfpipe-figure")]


def test_a_factor_model_logs_what_its_dimensions_mean(tmp_path):
    before = set(threading.enumerate())
    config, parts, als, result, ctx = _factor_model_run(tmp_path)
    recording.record_model(ctx, result, als, parts, config)
    assert "plots/factors.png" in {a.path for a in ctx.store.client().list_artifacts(result.run_id, "plots")}
    recording.close_run(ctx, ok=True, error=None)
    assert not _figure_threads(before)  # the run's drawing thread ends with the run


def test_a_drawing_that_fails_fails_the_record_and_its_child_run(tmp_path, monkeypatch):
    before = set(threading.enumerate())
    config, parts, als, result, ctx = _factor_model_run(tmp_path)

    def broken(*args, **kwargs):
        raise ValueError("cannot draw")

    monkeypatch.setattr(recording, "factor_report", broken)
    with pytest.raises(ValueError, match="cannot draw"):
        recording.record_model(ctx, result, als, parts, config)
    assert ctx.store.client().get_run(result.run_id).info.status == "FAILED" and result.version is None
    recording.close_run(ctx, ok=False, error="cannot draw")
    assert not _figure_threads(before)
