"""Surprise SVD wrapper: vectorized scores equal Surprise's own predictions, index mapping included."""

from __future__ import annotations

import os

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


def test_predicts_held_out_ratings_better_than_the_global_mean() -> None:
    """RMSE on ratings the model never saw (on its train ratings any model can overfit)."""
    data, _ = planted(n_users=300, n_items=50, per_user=20, seed=1)
    held = np.random.default_rng(0).random(len(data)) < 0.2

    def part(rows: np.ndarray):
        return make_interactions(
            data.users[rows], data.items[rows], data.ratings[rows], data.timestamps[rows], data.n_users, data.n_items
        )

    train, held_out = part(~held), part(held)
    model = create("svd", {"n_factors": 6, "n_epochs": 40, "lr_all": 0.01}, seed=5).fit(train)
    got = model.rating_metrics(held_out)
    baseline = float(np.sqrt(np.mean((held_out.ratings - train.ratings.mean()) ** 2)))
    assert got["n"] == held.sum()
    assert got["rmse"] < 0.85 * baseline  # measured 0.68x (0.70-0.75x at planted seeds 2, 3)


def test_the_forked_fit_is_surprise_own_fit(model_and_data, monkeypatch) -> None:
    """The child process changes where Surprise runs, not what it computes (nor the no-fork fallback)."""
    model, data = model_and_data
    monkeypatch.delattr(os, "fork")
    in_process = create("svd", model.params.model_dump(), seed=model.seed).fit(data)
    for name in ("pu", "qi", "bu", "bi"):
        np.testing.assert_array_equal(getattr(in_process.algo, name), getattr(model.algo, name))


def test_a_failing_surprise_fit_is_one_line_with_its_cause(monkeypatch) -> None:
    import surprise

    def broken(self, trainset):  # runs in the forked child
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(surprise.SVD, "fit", broken)
    model = create("svd")
    with pytest.raises(MfpipeError, match=r"^svd: Surprise's fit failed \(RuntimeError: boom second line\)$") as info:
        model.fit(make_interactions([0, 1], [1, 0], [3.0, 4.0]))
    assert info.value.exit_code == 1 and model.seen is None


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
