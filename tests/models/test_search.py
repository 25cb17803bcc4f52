"""Optuna search on an inner temporal split of the train part: validation never used, seeded, defaults first."""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
import pytest

import mfpipe.models.search as search_module
from mfpipe.config import SplitOptions
from mfpipe.data.interactions import Interactions
from mfpipe.errors import MfpipeError
from mfpipe.evaluation import evaluate_model
from mfpipe.models import MODELS, create
from mfpipe.models.search import SPACES, defaults, inner_split, search
from mfpipe.split import split_interactions
from tests.models.conftest import DAY, START, make_interactions, planted

N_USERS, N_ITEMS = 60, 40
TRAIN_DAYS, CUTOFF_DAY = 100, 100
EARLY_HITS = np.arange(0, 5)  # popular all along the train period
LATE_HITS = np.arange(5, 10)  # popular only in the last weeks of train


def _rows(rng: np.random.Generator, day_lo: int, day_hi: int, items: np.ndarray, per_user: int) -> list[tuple]:
    """Each user takes `per_user` distinct items of `items`, on random days in [day_lo, day_hi)."""
    rows = []
    for u in range(N_USERS):
        for i in rng.choice(items, per_user, replace=False):
            rows.append((u, int(i), int(rng.integers(day_lo, day_hi))))
    return rows


def shifting_tastes(validation_items: np.ndarray) -> Interactions:
    """The same train rows (before day 100) followed by a validation part whose users take `validation_items`.

    In train, EARLY_HITS are popular throughout and LATE_HITS only in the last 30 days, so all-time
    popularity and a short window rank them differently, and which one the validation slice rewards
    depends on `validation_items` alone.
    """
    rng = np.random.default_rng(0)
    tail = np.arange(10, N_ITEMS)
    train = _rows(rng, 0, TRAIN_DAYS, np.concatenate([EARLY_HITS, tail]), 8)
    train += [(u, int(i), d) for u, i, d in _rows(rng, TRAIN_DAYS - 30, TRAIN_DAYS, LATE_HITS, 2) if u % 3]
    seen = {(u, i) for u, i, _ in train}
    held_out = _rows(rng, CUTOFF_DAY, CUTOFF_DAY + 20, validation_items, 3)
    later = [(u, i, d) for u, i, d in held_out if (u, i) not in seen]
    users, items, days = (np.array(c) for c in zip(*(train + later), strict=True))
    return make_interactions(users, items, np.full(len(users), 5.0), START + DAY * days, N_USERS, N_ITEMS)


def outer(data: Interactions) -> Any:
    cutoff = np.datetime_as_string(np.datetime64(START + DAY * CUTOFF_DAY, "s"))
    return split_interactions(data, SplitOptions(protocol="temporal", cutoff=cutoff))


def comparable(result: Any) -> list[dict[str, Any]]:
    """Every trial's record except its wall time."""
    return [t.to_json(10) | {"seconds": None} for t in result.trials]


def test_every_model_has_a_space_that_holds_its_defaults() -> None:
    assert set(SPACES) == set(MODELS)
    for name, distributions in SPACES.items():
        for key, value in defaults(name).items():
            dist = distributions[key]
            assert dist._contains(dist.to_internal_repr(value)), f"{name}.{key}={value} outside its space"
        create(name, defaults(name))


def test_the_validation_slice_is_never_used_to_choose() -> None:
    """Two data sets with the same train part and opposite validation parts: the validation slice would pick
    different settings, and the search returns the same trials for both."""
    early, late = outer(shifting_tastes(EARLY_HITS)), outer(shifting_tastes(LATE_HITS))
    assert early.train.digest == late.train.digest and early.validation.digest != late.validation.digest

    def on_validation(split: Any, params: dict[str, Any]) -> float:
        return evaluate_model(create("pop", params).fit(split.train), split).warm["ndcg"].mean

    all_time, recent = {"window_days": None}, {"window_days": 30}
    assert on_validation(early, all_time) > on_validation(early, recent)
    assert on_validation(late, recent) > on_validation(late, all_time)

    calls: list[Interactions] = []
    real_split = search_module.split_interactions

    def spy(data: Interactions, options: SplitOptions) -> Any:
        calls.append(data)
        return real_split(data, options)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(search_module, "split_interactions", spy)
        a = search("pop", early.train, n_trials=8, seed=5)
        b = search("pop", late.train, n_trials=8, seed=5)
    assert comparable(a) == comparable(b)
    assert a.best_params == b.best_params
    assert calls == [early.train, late.train]  # only the train part is ever split
    assert a.inner_split["protocol"] == "temporal"
    assert a.inner_split["n_train"] + a.inner_split["n_validation"] == len(early.train)


def test_trial_zero_is_the_defaults_scored_on_the_inner_split() -> None:
    data, _ = planted(n_users=80, n_items=40, per_user=12, seed=4)
    result = search("pop", data, n_trials=3, seed=2)
    first = result.trials[0]
    assert first.number == 0 and first.params == defaults("pop") == {"window_days": None, "min_rating": None}
    split = inner_split(data)
    assert first.value == evaluate_model(create("pop").fit(split.train), split, seed=2).warm["ndcg"].mean


def test_seeded_search_is_deterministic_for_deterministic_models() -> None:
    data, _ = planted(n_users=80, n_items=40, per_user=12, seed=4)
    fixed = {"deterministic": True, "epochs": 20, "eval_every": 5}

    def run(seed: int) -> list[dict[str, Any]]:
        return comparable(search("bpr", data, 5, seed, threads=1, fixed=fixed))

    first = run(3)
    assert all(set(t["params"]) == set(SPACES["bpr"]) - {"epochs"} for t in first)  # fixed: not searched
    assert first == run(3)
    assert first[1:] != run(4)[1:]
    assert all(t["curve"] for t in first if t["state"] == "complete")  # BPR's learning curve reached Optuna


def test_failed_trials_are_recorded_and_the_search_goes_on() -> None:
    data, _ = planted(n_users=80, n_items=40, per_user=12, seed=4)
    unrated = Interactions(data.user_ids, data.item_ids, data.users, data.items, None, data.timestamps, "unrated")
    seen: list[tuple[int, dict[str, Any], float | None, str]] = []
    result = search("pop", unrated, n_trials=12, seed=0, on_trial=lambda *args: seen.append(args))
    states = [t.state for t in result.trials]
    assert "failed" in states and "complete" in states
    for trial in result.trials:  # min_rating needs ratings: exactly those trials failed, with the reason
        assert (trial.state == "failed") == (trial.params["min_rating"] is not None)
        assert (trial.value is None) == (trial.state == "failed")
    assert "needs ratings" in next(t.error for t in result.trials if t.state == "failed")
    assert result.best.params["min_rating"] is None
    assert seen == [(t.number, t.params, t.value, t.state) for t in result.trials]


def test_a_trial_over_its_time_limit_fails_and_no_completed_trial_is_an_error() -> None:
    data, _ = planted(n_users=80, n_items=40, per_user=12, seed=4)
    result = search("als", data, n_trials=2, seed=0, threads=1, trial_timeout=0.0)
    assert [t.state for t in result.trials] == ["failed", "failed"]
    assert "time limit" in (result.trials[0].error or "")
    assert result.to_json()["best"] is None
    with pytest.raises(MfpipeError, match="no search trial completed"):
        _ = result.best


def test_learning_curves_drive_the_pruner() -> None:
    data, _ = planted(n_users=80, n_items=40, per_user=12, seed=4)
    fixed = {"deterministic": True, "epochs": 40, "eval_every": 5}
    result = search("bpr", data, 3, 0, threads=1, fixed=fixed, pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    assert [t.state for t in result.trials] == ["pruned"] * 3
    assert all(list(t.curve) == [5] for t in result.trials)  # stopped after its first evaluation


def test_bad_requests_are_one_line_errors() -> None:
    data, _ = planted(n_users=80, n_items=40, per_user=12, seed=4)
    with pytest.raises(MfpipeError, match="no search space for model 'nope'"):
        search("nope", data, 3)
    with pytest.raises(MfpipeError, match="at least 1 trial"):
        search("pop", data, 0)
    with pytest.raises(MfpipeError, match="invalid parameter 'factors'"):
        search("bpr", data, 2, fixed={"factors": 0})
    with pytest.raises(MfpipeError, match="inner split"):
        search("pop", data, 2, inner=SplitOptions(protocol="temporal", cutoff="2000-01-01"))
