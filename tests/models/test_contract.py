"""One contract, every registered model: the behaviour evaluation, serving and the flow rely on."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from mfpipe.config import MODEL_NAMES
from mfpipe.errors import MfpipeError
from mfpipe.models import MODELS, Recommender, create, load
from mfpipe.ranking import top_k
from tests.models.conftest import make_interactions

NAMES = sorted(MODELS)


def fit(name: str, data, seed: int = 42) -> Recommender:
    # One thread: the deterministic mode every model offers (Hogwild BPR is only reproducible so).
    return create(name, threads=1, seed=seed).fit(data)


@pytest.fixture(scope="module", params=NAMES)
def fitted(request, small) -> Recommender:
    return fit(request.param, small)


def test_registry_covers_every_configurable_model() -> None:
    assert set(MODELS) == set(MODEL_NAMES)
    for name, cls in MODELS.items():
        assert cls.name == name


def test_unknown_model_and_bad_params_are_one_line_errors() -> None:
    with pytest.raises(MfpipeError, match="unknown model 'nope'"):
        create("nope")
    for name in NAMES:
        with pytest.raises(MfpipeError, match=f"{name}: invalid parameter 'no_such_param'"):
            create(name, {"no_such_param": 1})


@pytest.mark.parametrize("name", NAMES)
def test_unfitted_and_empty(name: str) -> None:
    model = create(name)
    with pytest.raises(MfpipeError, match="not fitted"):
        model.recommend(np.array([0]), 5)
    with pytest.raises(MfpipeError, match="empty"):
        model.fit(make_interactions([], [], [], n_users=0, n_items=0))


def test_shapes_and_dtypes(fitted: Recommender, small) -> None:
    users = np.arange(small.n_users)
    scores = fitted.score(users[:7])
    assert scores.shape == (7, small.n_items) and scores.dtype == np.float32
    items, values = fitted.recommend(users, k=5)
    assert items.shape == values.shape == (small.n_users, 5)
    assert items.dtype == np.int32 and values.dtype == np.float32
    assert ((items >= -1) & (items < small.n_items)).all()
    assert (items >= 0).all()  # every user has unseen items left to fill 5 slots
    assert (np.diff(values, axis=1) <= 0).all()  # best first


def test_recommendations_follow_scores(fitted: Recommender, small) -> None:
    users = np.arange(small.n_users)
    items, values = fitted.recommend(users, k=5)
    np.testing.assert_array_equal(values, np.take_along_axis(fitted.score(users), items, axis=1))


def test_no_seen_items_and_no_duplicates(fitted: Recommender, small) -> None:
    users = np.arange(small.n_users)
    items, _ = fitted.recommend(users, k=small.n_items)
    seen = small.matrix
    for u, row in zip(users, items, strict=True):
        got = row[row >= 0]
        assert len(got) == len(set(got.tolist()))
        assert not set(got.tolist()) & set(seen.indices[seen.indptr[u] : seen.indptr[u + 1]].tolist())
        # Everything unseen is ranked, and nothing else: padding only where the catalogue runs out.
        assert len(got) == small.n_items - (seen.indptr[u + 1] - seen.indptr[u])


def test_exclude_seen_false_ranks_the_whole_catalogue(fitted: Recommender, small) -> None:
    items, _ = fitted.recommend(np.arange(small.n_users), k=small.n_items, exclude_seen=False)
    assert (items >= 0).all()
    assert all(len(set(row.tolist())) == small.n_items for row in items)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_seed(name: str, small) -> None:
    users = np.arange(small.n_users)
    a = fit(name, small, seed=3).recommend(users, 10)
    b = fit(name, small, seed=3).recommend(users, 10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_save_load_round_trip(fitted: Recommender, small, tmp_path) -> None:
    users = np.array([-1, *range(small.n_users), small.n_users + 3])
    path = fitted.save(tmp_path / "m" / "model.npz")
    for restored in (type(fitted).load(path), load(path)):
        assert type(restored) is type(fitted)
        assert restored.params == fitted.params and restored.seed == fitted.seed
        for got, want in zip(restored.recommend(users, 7), fitted.recommend(users, 7), strict=True):
            np.testing.assert_array_equal(got, want)


def test_load_rejects_other_models_and_junk(fitted: Recommender, tmp_path) -> None:
    path = fitted.save(tmp_path / "model.npz")
    other = next(cls for name, cls in MODELS.items() if name != fitted.name)
    with pytest.raises(MfpipeError, match=f"holds a '{fitted.name}' model"):
        other.load(path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a model")
    with pytest.raises(MfpipeError, match="not a readable saved model"):
        load(junk)
    with pytest.raises(MfpipeError, match="not a readable saved model"):
        load(tmp_path / "missing.npz")


def test_unknown_users_get_the_popularity_fallback(fitted: Recommender, small) -> None:
    items, _ = fitted.recommend(np.array([-1, small.n_users, 0]), k=6)
    expected, _ = top_k(fitted.popularity[None, :], 6)
    np.testing.assert_array_equal(items[0], expected[0])
    np.testing.assert_array_equal(items[1], expected[0])
    # The fallback follows item popularity: the most frequent train item comes first.
    counts = np.bincount(small.items, minlength=small.n_items)
    assert counts[items[0, 0]] == counts.max()


def test_validation_matrix_wider_than_train_is_accepted(small) -> None:
    wider = sp.random(small.n_users, small.n_items + 5, density=0.05, format="csr", random_state=0)
    wider.data[:] = 1
    for name in NAMES:
        model = create(name, threads=1).fit(small, wider.astype(bool))
        assert model.recommend(np.arange(3), 4)[0].shape == (3, 4)


# -- tiny and degenerate data: a clear MfpipeError or a sensible result ------------------------------
DEGENERATE = {
    "one user": make_interactions([0, 0, 0], [0, 1, 2], [4.0, 3.0, 5.0], n_items=5),
    "one item": make_interactions([0, 1, 2], [0, 0, 0], [4.0, 3.0, 5.0]),
    "one interaction": make_interactions([0], [0], [4.0]),
    "user saw every item": make_interactions([0, 0, 0, 1, 2], [0, 1, 2, 0, 1], [5.0, 4.0, 3.0, 4.0, 2.0]),
    "no ratings": make_interactions([0, 0, 1, 2, 2], [0, 1, 1, 2, 0]),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
@pytest.mark.parametrize("name", NAMES)
def test_degenerate_data(name: str, case: str) -> None:
    data = DEGENERATE[case]
    try:
        model = fit(name, data)
    except MfpipeError as exc:
        assert name in str(exc) and "\n" not in str(exc)
        return
    users = np.arange(-1, data.n_users)
    items, values = model.recommend(users, k=4)
    assert items.shape == values.shape == (len(users), 4)
    assert np.isfinite(values[items >= 0]).all()
    assert (values[items < 0] == -np.inf).all()
    seen = data.matrix
    for u, row in zip(users[1:], items[1:], strict=True):
        n_unseen = data.n_items - (seen.indptr[u + 1] - seen.indptr[u])
        assert (row >= 0).sum() == min(4, n_unseen)  # -1 padded exactly where nothing is left
    assert (items[0] >= 0).sum() == min(4, data.n_items)  # the unknown user gets the whole fallback


@pytest.mark.parametrize("name", NAMES)
def test_k_larger_than_the_catalogue(name: str, small) -> None:
    model = fit(name, small)
    k = small.n_items + 7
    items, values = model.recommend(np.array([-1, 0, 1]), k=k)
    assert items.shape == (3, k)
    assert (items[0] >= 0).sum() == small.n_items
    assert (items[:, small.n_items :] == -1).all() and (values[:, small.n_items :] == -np.inf).all()
