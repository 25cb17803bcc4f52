"""The leaderboard, the run report's layout and timing, without MLflow or Prefect."""

from __future__ import annotations

import json

import pytest

from mfpipe import prepare, training
from mfpipe.config import load_config
from mfpipe.errors import MfpipeError
from mfpipe.evaluation import evaluate_model
from mfpipe.promotion import Decision
from mfpipe.report import (
    STAGES,
    ModelResult,
    Stages,
    best,
    build_report,
    leaderboard_markdown,
    model_result,
    raise_if_all_failed,
)


@pytest.fixture(scope="module")
def outcome():
    config = load_config(overrides={"data": "synthetic:3000", "k": 7, "models": "pop,als"})
    data, parts = prepare.prepare(config)
    pop = training.train_model("pop", parts, config, training.CoreBudget(1, ["pop"]))
    reports = {"pop": evaluate_model(pop.model, parts, config.k)}
    results = [
        model_result("pop", pop, reports["pop"], "", parts),
        model_result("als", None, None, "als: over its time limit", parts),
    ]
    return config, data, parts, results


def test_a_result_is_ok_once_evaluated_else_failed_with_its_error(outcome):
    _, _, _, results = outcome
    assert [(r.model, r.status) for r in results] == [("pop", "ok"), ("als", "failed")]
    assert results[1].error == "als: over its time limit" and best(results) is results[0]


def test_report_layout_and_timing(outcome):
    _, data, parts, results = outcome
    stages = Stages()
    with stages("train"):
        pass
    decision = Decision.unchanged("mfpipe-x", "test", "significant", None, k=7)
    document = build_report(data, parts, results, decision.to_json(), stages)
    assert set(document) == {"dataset", "protocol", "split", "models", "champion", "timing"}
    assert set(document["timing"]) == {"wall_seconds", "stages"} and tuple(document["timing"]["stages"]) == STAGES
    assert "ndcg@7" in document["models"][0]["metrics"] and "ndcg@10" not in document["models"][0]["metrics"]
    assert document["models"][1]["metrics"] == {} and document["models"][1]["error"]
    json.dumps(document)


def test_leaderboard_is_labelled_with_k_and_best_first(outcome):
    _, _, _, results = outcome
    text = leaderboard_markdown(results, 7)
    assert "NDCG@7" in text.splitlines()[0]
    assert text.splitlines()[2].startswith("| pop") and "failed: als" in text.splitlines()[3]


def test_a_run_where_every_model_failed_is_a_failed_run():
    with pytest.raises(MfpipeError, match="every model failed") as caught:
        raise_if_all_failed([ModelResult("bpr", "failed", error="diverged")])
    assert caught.value.exit_code == 1
    raise_if_all_failed([ModelResult("pop", "ok")])
