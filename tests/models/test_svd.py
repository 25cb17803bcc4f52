"""Surprise SVD wrapper: vectorized scores equal Surprise's own predictions, index mapping included."""

from __future__ import annotations

import numpy as np
import pytest

from mfpipe.errors import MfpipeError
from mfpipe.models import create
from mfpipe.models.svd import SVD, surprise_trainset
from tests.models.conftest import make_interactions, planted


@pytest.fixture(scope="module")
def model_and_data():
    data, _ = planted(n_users=30, n_items=25, per_user=8, seed=1)
    return create("svd", {"n_factors": 6, "n_epochs": 15}, seed=5).fit(data), data


def test_trainset_equals_surprise_own_loader(model_and_data) -> None:
    """Our direct trainset holds what `load_from_df(...).build_full_trainset()` holds, ids = our indices."""
    import pandas as pd
    from surprise import Dataset, Reader

    _, data = model_and_data
    ours = surprise_trainset(data)
    frame = pd.DataFrame({"u": data.users, "i": data.items, "r": data.ratings.astype(np.float64)})
    theirs = Dataset.load_from_df(frame, Reader(rating_scale=(1, 5))).build_full_trainset()

    def as_raw(trainset) -> set[tuple[int, int, float]]:
        return {(trainset.to_raw_uid(u), trainset.to_raw_iid(i), r) for u, i, r in trainset.all_ratings()}

    assert as_raw(ours) == as_raw(theirs) and len(as_raw(ours)) == len(data)
    assert ours.global_mean == pytest.approx(theirs.global_mean, rel=1e-12)
    assert all(ours.to_inner_uid(u) == u for u in range(data.n_users))
    assert {i: sorted(v) for i, v in ours.ir.items()} == {
        theirs.to_raw_iid(i): sorted((theirs.to_raw_uid(u), r) for u, r in v) for i, v in theirs.ir.items()
    }


def test_vectorized_scores_equal_surprise_predict(model_and_data) -> None:
    model, data = model_and_data
    scores = model.score(np.arange(data.n_users))
    expected = np.array(
        [[model.algo.predict(u, i, clip=False).est for i in range(data.n_items)] for u in range(data.n_users)]
    )
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_rating_metrics_match_surprise_accuracy(model_and_data) -> None:
    from surprise import accuracy

    model, data = model_and_data
    rng = np.random.default_rng(0)
    users = rng.integers(0, data.n_users + 3, 60)  # a few cold users (>= n_users) are left out
    items = rng.integers(0, data.n_items, 60)
    ratings = rng.integers(1, 6, 60).astype(np.float32)
    validation = make_interactions(users, items, ratings, n_users=data.n_users + 3, n_items=data.n_items)
    got = model.rating_metrics(validation)
    warm = users < data.n_users
    predictions = model.algo.test(
        list(zip(users[warm].tolist(), items[warm].tolist(), ratings[warm].tolist(), strict=True))
    )
    assert got["n"] == warm.sum() < len(users)
    assert got["rmse"] == pytest.approx(accuracy.rmse(predictions, verbose=False), rel=1e-9)
    assert got["mae"] == pytest.approx(accuracy.mae(predictions, verbose=False), rel=1e-9)


def test_learns_ratings_better_than_the_global_mean(model_and_data) -> None:
    model, data = model_and_data
    rmse = model.rating_metrics(data)["rmse"]
    baseline = float(np.sqrt(np.mean((data.ratings - data.ratings.mean()) ** 2)))
    assert rmse < 0.8 * baseline


def test_needs_ratings() -> None:
    with pytest.raises(MfpipeError, match="svd: needs explicit ratings"):
        create("svd").fit(make_interactions([0, 1], [1, 0]))
    model = create("svd").fit(make_interactions([0, 1], [1, 0], [3.0, 4.0]))
    with pytest.raises(MfpipeError, match="no ratings"):
        model.rating_metrics(make_interactions([0], [0]))


def test_no_warm_pairs_gives_nan_not_an_error(model_and_data) -> None:
    model, data = model_and_data
    cold = make_interactions([data.n_users], [0], [3.0], n_users=data.n_users + 1, n_items=data.n_items)
    got = model.rating_metrics(cold)
    assert got["n"] == 0 and np.isnan(got["rmse"])


def test_loaded_model_keeps_biases_and_scale(model_and_data, tmp_path) -> None:
    model, data = model_and_data
    restored = SVD.load(model.save(tmp_path / "svd.npz"))
    assert restored.rating_metrics(data) == model.rating_metrics(data)
