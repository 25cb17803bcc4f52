"""Random search: defaults first, distinct seeded draws, best = highest validation NDCG."""

from __future__ import annotations

import pytest

from mfpipe.config import SplitOptions
from mfpipe.errors import MfpipeError
from mfpipe.models import MODELS, create
from mfpipe.models.search import SPACES, candidates, search
from mfpipe.split import split_interactions
from tests.models.conftest import planted


def test_every_model_has_a_space_of_valid_params() -> None:
    assert set(SPACES) == set(MODELS)
    for name in SPACES:
        for params in candidates(name, 6, seed=1):
            create(name, params)  # a bad name or value would raise MfpipeError


def test_candidates_start_with_defaults_and_are_distinct_and_seeded() -> None:
    got = candidates("als", 12, seed=3)
    assert got[0] == {} and len(got) == 12
    assert len({tuple(sorted(p.items())) for p in got[1:]}) == 11
    assert got == candidates("als", 12, seed=3) != candidates("als", 12, seed=4)
    assert len(candidates("pop", 1000, seed=0)) == 1 + 6 * 4  # capped at the grid size


def test_bad_requests() -> None:
    with pytest.raises(MfpipeError, match="no search space for model 'nope'"):
        candidates("nope", 3, 0)
    with pytest.raises(MfpipeError, match="at least 1 trial"):
        candidates("als", 0, 0)


def test_search_reports_every_trial_and_the_best() -> None:
    data, _ = planted(n_users=80, n_items=40, per_user=12, seed=4)
    split = split_interactions(data, SplitOptions(protocol="random-per-user", seed=1))
    result = search("pop", split, n_trials=4, seed=2, threads=1)
    assert [t.params for t in result.trials] == candidates("pop", 4, seed=2)
    assert result.best.ndcg == max(t.ndcg for t in result.trials)
    assert all(0.0 <= t.ndcg <= 1.0 and t.seconds > 0 for t in result.trials)
    assert result.to_json()["best"]["params"] == result.best.params
    from mfpipe.evaluation import evaluate_model

    refit = create("pop", result.best.params, seed=2).fit(split.train)
    assert evaluate_model(refit, split, 10, seed=2).warm["ndcg"].mean == result.best.ndcg
