"""Faults a scheduled retrain must survive: bad data, failing models, an unreachable store, transient
errors retried safely, identical reruns. The served champion never moves without a fair reason."""

from __future__ import annotations

import pytest

from flows.retrain import retrain
from mfpipe import prepare, recording, tracking
from mfpipe.config import load_config
from mfpipe.errors import MfpipeError, TransientError
from mfpipe.services import free_port

FAST = {"als": {"iterations": 3, "factors": 16}, "bpr": {"epochs": 10, "factors": 16}}


def config(store: str, **overrides):
    values = {"data": "synthetic:20000", "tracking_uri": store, "model_params": FAST, "threads": 2, **overrides}
    return load_config(overrides=values)


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def _versions_and_champion(store: str, name: str) -> tuple[int, str | None]:
    s = tracking.open_store(store)
    champion = tracking.alias_version(s, name, tracking.CHAMPION)
    return len(tracking.list_versions(s, name)) if champion else 0, champion.version if champion else None


def test_bad_data_fails_the_flow_run_with_its_reason_and_writes_nothing(store, tmp_path):
    bad = tmp_path / "ratings.csv"
    rows = [f"u{i % 30},i{i % 50},{99 if i == 7 else 4},{1_500_000_000 + i}" for i in range(600)]
    bad.write_text("user_id,item_id,rating,timestamp\n" + "\n".join(rows) + "\n")
    state = retrain(config(store, data=str(bad)), return_state=True)
    assert state.is_failed() and "validation failed" in state.message and "ratings.csv" in state.message
    missing = retrain(config(store, data=str(tmp_path / "missing.csv")), return_state=True)
    assert missing.is_failed() and "missing.csv: file not found" in missing.message
    assert tracking.open_store(store).client().search_registered_models() == []


def _task_states(flow_state) -> dict[str, str]:
    """Task name -> final state type of every task run of a finished flow run."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        return {t.name.rsplit("-", 1)[0]: t.state_type.value for t in client.read_task_runs(flow_run_filter=runs)}


def test_data_that_fails_validation_and_splitting_reports_validation_and_no_failed_task(store, tmp_path):
    """The split runs beside validation; on data it cannot split either (a missing user id) the run still
    fails with validation's one message, and the split task ends quietly instead of failing on its own."""
    bad = tmp_path / "ratings.csv"
    rows = [f"{'' if i == 7 else f'u{i % 30}'},i{i % 50},4,{1_500_000_000 + i}" for i in range(600)]
    bad.write_text("user_id,item_id,rating,timestamp\n" + "\n".join(rows) + "\n")
    state = retrain(config(store, data=str(bad)), return_state=True)
    assert state.is_failed() and "validation failed" in state.message and "user ids missing" in state.message
    assert _task_states(state)["split"] == "COMPLETED"
    assert tracking.open_store(store).client().search_registered_models() == []


def test_a_split_that_fails_on_valid_data_fails_the_run_with_its_message(store, monkeypatch):
    def unsplittable(frame, config):
        raise MfpipeError("synthetic:20000: no interaction is later than the cutoff")

    monkeypatch.setattr(prepare, "split", unsplittable)
    unique = {"cutoff_quantile": 0.77}  # a split setting no other test uses: never a cached split
    state = retrain(config(store, split=unique), return_state=True)
    assert state.is_failed() and "no interaction is later than the cutoff" in state.message
    assert tracking.open_store(store).client().search_registered_models() == []


def test_each_kind_of_model_failure_leaves_the_others_to_promote(store, monkeypatch):
    from mfpipe.models import svd

    def broken(self, train):
        raise RuntimeError("boom")

    monkeypatch.setattr(svd.SVD, "_fit", broken)
    params = {"als": {"iterations": 100_000, "factors": 16}, "bpr": {"epochs": 20, "learning_rate": 1e30}}
    outcome = retrain(config(store, model_params=params, train_timeout_seconds=4))
    by_model = {m["model"]: m for m in outcome.report["models"]}
    assert by_model["svd"]["status"] == "failed" and "RuntimeError: boom" in by_model["svd"]["error"]
    assert by_model["als"]["status"] == "failed" and "over its time limit" in by_model["als"]["error"]
    assert by_model["bpr"]["status"] == "failed" and "diverged" in by_model["bpr"]["error"]
    assert by_model["pop"]["status"] == "ok"
    assert outcome.report["champion"]["after"]["version"] == by_model["pop"]["version"]


def test_when_every_model_fails_nothing_is_promoted_and_the_run_fails(store):
    params = {"bpr": {"epochs": 5, "learning_rate": 1e30}}
    state = retrain(config(store, models=["bpr"], model_params=params), return_state=True)
    assert state.is_failed() and "every model failed" in state.message
    s = tracking.open_store(store)
    parents = s.client().search_runs([tracking.experiment_id(s, "synthetic-20k")], "tags.`mfpipe.role` = 'retrain'")
    assert [p.info.status for p in parents] == ["FAILED"]
    assert tracking.alias_version(s, "mfpipe-synthetic-20k", tracking.CHAMPION) is None


@pytest.mark.timeout(120)
def test_an_unreachable_store_fails_before_any_training(monkeypatch):
    from mfpipe import training

    calls = []
    monkeypatch.setattr(training, "train_model", lambda *a, **k: calls.append(a))
    url = f"http://127.0.0.1:{free_port()}"
    state = retrain(config(url), return_state=True)
    assert state.is_failed() and f"MLflow store {url}" in state.message and calls == []
    with pytest.raises(MfpipeError) as caught:
        state.result()
    assert caught.value.exit_code == 1


def test_transient_faults_are_retried_without_duplicates(store, monkeypatch):
    """A load, an open-run and a registration fail once each: one parent run, one version per model."""
    faults = {"load": 1, "split record": 1, "register": 1}

    def once(name, real):
        def wrapper(*args, **kwargs):
            if faults[name]:
                faults[name] -= 1
                raise TransientError(f"{name}: connection reset")
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(prepare, "load", once("load", prepare.load))
    monkeypatch.setattr(recording, "record_split", once("split record", recording.record_split))
    monkeypatch.setattr(tracking, "register", once("register", tracking.register))
    outcome = retrain(config(store, models=["pop", "als"], seed=7))  # seed 7: not in the load cache yet
    assert faults == {"load": 0, "split record": 0, "register": 0}
    s = tracking.open_store(store)
    exp = tracking.experiment_id(s, "synthetic-20k")
    assert len(s.client().search_runs([exp], "tags.`mfpipe.role` = 'retrain'")) == 1
    children = s.client().search_runs([exp], "tags.model LIKE '%'")
    assert sorted(c.data.tags["model"] for c in children if "mlflow.parentRunId" in c.data.tags) == ["als", "pop"]
    assert len(tracking.list_versions(s, "mfpipe-synthetic-20k")) == 2
    assert all(m["status"] == "ok" for m in outcome.report["models"])


def test_a_user_error_is_never_retried(store, monkeypatch):
    calls = []

    def bad_file(config):
        calls.append(1)
        raise MfpipeError("x.csv: not a table")

    monkeypatch.setattr(prepare, "load", bad_file)
    state = retrain(config(store, seed=8), return_state=True)  # seed 8: not in the load cache
    assert state.is_failed() and calls == [1]


def test_identical_deterministic_reruns_agree_and_skip_unchanged_skips_only_then(store):
    params = {"bpr": {"epochs": 10, "factors": 16, "deterministic": True}}
    first = retrain(config(store, models=["pop", "bpr"], model_params=params))
    second = retrain(config(store, models=["pop", "bpr"], model_params=params))
    assert [m["metrics"] for m in first.report["models"]] == [m["metrics"] for m in second.report["models"]]
    assert not second.report["champion"]["promoted"]
    assert second.report["champion"]["after"] == first.report["champion"]["after"]
    skipped = retrain(config(store, models=["pop", "bpr"], model_params=params, skip_unchanged=True))
    assert skipped.report["models"] == [] and "unchanged" in skipped.report["champion"]["reason"]
    changed = retrain(config(store, models=["pop"], model_params=params, skip_unchanged=True, k=5))
    assert [m["model"] for m in changed.report["models"]] == ["pop"]  # the config changed: not skipped
