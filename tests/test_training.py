"""One model's fit: the shared core budget, the deadline, divergence (no Prefect needed)."""

from __future__ import annotations

import pickle
import time

import pytest

from mfpipe import prepare, training
from mfpipe.config import load_config
from mfpipe.errors import MfpipeError
from mfpipe.models import create
from mfpipe.models.base import TrainingTimeout


def test_a_finished_model_gives_its_cores_to_the_ones_still_training():
    budget = training.CoreBudget(4, ["svd", "als", "bpr", "pop"])
    svd, als, bpr, pop = (create(name) for name in ("svd", "als", "bpr", "pop"))
    assert [budget.start(n, m) for n, m in (("svd", svd), ("als", als), ("bpr", bpr), ("pop", pop))] == [1, 1, 1, 1]
    budget.finish("pop")  # light: changes nothing
    assert (svd.threads, als.threads, bpr.threads) == (1, 1, 1)
    budget.finish("svd")
    assert (als.threads, bpr.threads) == (2, 2)
    budget.finish("als")
    assert bpr.threads == 4


def test_a_trained_model_keeps_its_cores_for_its_evaluation():
    import numba

    budget = training.CoreBudget(2, ["als", "bpr"])
    als, bpr = create("als"), create("bpr")
    budget.start("als", als), budget.start("bpr", bpr)
    budget.trained("als")
    assert bpr.threads == 1 and "als" not in budget.snapshot()
    before = numba.get_num_threads()
    with budget.evaluation("als"):
        assert numba.get_num_threads() == 1  # its own share, not every core
        assert bpr.threads == 1
    assert numba.get_num_threads() == before and bpr.threads == 2


def test_models_not_started_yet_keep_their_share_reserved():
    budget = training.CoreBudget(4, ["als", "bpr"])
    als = create("als")
    assert budget.start("als", als) == 2  # bpr has not started, but it will: half the cores stay free


def test_a_budget_sent_to_another_process_starts_afresh():
    budget = training.CoreBudget(2, ["als", "bpr"])
    budget.start("als", create("als"))
    copy = pickle.loads(pickle.dumps(budget))
    assert copy.cores == 2 and copy.share() == 1


@pytest.fixture(scope="module")
def parts():
    return prepare.prepare(load_config(overrides={"data": "synthetic:3000"}))[1]


def test_train_model_stops_at_its_deadline(parts):
    config = load_config(overrides={"train_timeout_seconds": 1e-9, "model_params": {"bpr": {"epochs": 500}}})
    with pytest.raises(TrainingTimeout, match=r"bpr: stopped .* over its time limit") as caught:
        training.train_model("bpr", parts, config, training.CoreBudget(1, ["bpr"]))
    assert caught.value.exit_code == 1


def test_train_model_reports_divergence(parts):
    config = load_config(overrides={"model_params": {"bpr": {"epochs": 5, "learning_rate": 1e30}}})
    with pytest.raises(MfpipeError, match="diverged") as caught:
        training.train_model("bpr", parts, config, training.CoreBudget(1, ["bpr"]))
    assert caught.value.exit_code == 1


@pytest.mark.parametrize("name", ["svd", "als", "bpr", "pop"])
def test_train_model_fits_on_the_train_slice_only(parts, monkeypatch, name):
    """Validation is what candidates are scored and promoted on: no model may see it while fitting."""
    calls = []
    real = training.create

    def spying(*args, **kwargs):
        model = real(*args, **kwargs)
        fit = model.fit

        def recorded_fit(*fit_args, **fit_kwargs):
            calls.append((fit_args, fit_kwargs))
            return fit(*fit_args, **fit_kwargs)

        monkeypatch.setattr(model, "fit", recorded_fit)
        return model

    monkeypatch.setattr(training, "create", spying)
    quick = {"bpr": {"epochs": 2}, "als": {"iterations": 1}, "svd": {"n_epochs": 1}}.get(name, {})
    config = load_config(overrides={"model_params": {name: quick}})
    training.train_model(name, parts, config, training.CoreBudget(1, [name]))
    ((args, kwargs),) = calls
    assert args == (parts.train,) and set(kwargs) == {"deadline"}


def test_train_model_returns_what_it_took(parts):
    trained = training.train_model("als", parts, load_config(), training.CoreBudget(2, ["als"]))
    assert trained.threads == 2 and trained.train_seconds > 0 and trained.params["factors"] > 0


def test_progress_of_the_models_still_training_is_reported(parts):
    budget = training.CoreBudget(2, ["bpr", "pop"])
    bpr = create("bpr", {"epochs": 3, "eval_every": 1, "early_stopping": False})  # no refit: 2 checks
    budget.start("bpr", bpr)
    assert budget.snapshot() == {"bpr": "not started (2 thread(s))"}
    bpr.fit(parts.train)
    assert budget.snapshot()["bpr"].startswith("after epoch 2 of 3, loss ")  # the last check before the end
    reports = []
    stop = training.watch(budget, reports.append, every=0.05)
    time.sleep(0.3)
    stop.set()
    budget.finish("bpr")
    assert reports and set(reports[0]) == {"bpr"} and budget.snapshot() == {}
