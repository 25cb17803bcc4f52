"""Fold-in: a user's vector recomputed on frozen item factors, and the served numpy scorer behind it."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from mfpipe import pyfunc_model
from mfpipe.models import create
from tests.models.conftest import planted

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def data():
    return planted(n_users=80, n_items=60, per_user=12, seed=3)[0]


@pytest.fixture(scope="module")
def fitted(data):
    return {name: create(name, {"epochs": 20} if name == "bpr" else None, threads=1).fit(data)
            for name in ("als", "svd", "bpr", "pop")}  # fmt: skip


def test_als_fold_in_matches_implicit_recalculate_user(fitted):
    als = fitted["als"]
    peer = als.implicit_model()
    peer.item_factors = als.item_factors
    peer.user_factors = als.user_factors
    history = als.seen[5].indices
    new = np.array([1, 2, 59])
    items = np.union1d(history, new)
    row = sp.csr_matrix(
        (np.full(len(items), 1 + als.params.alpha, np.float32), items, [0, len(items)]), shape=(1, als.n_items)
    )
    expected = peer.recalculate_user(0, row)
    np.testing.assert_allclose(als.fold_in(5, new), expected, rtol=2e-3, atol=2e-4)
    # A user the model never saw: the same solve from the new items alone.
    alone = sp.csr_matrix((np.full(3, 1 + als.params.alpha, np.float32), new, [0, 3]), shape=(1, als.n_items))
    np.testing.assert_allclose(als.fold_in(-1, new), peer.recalculate_user(0, alone), rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("name", ["svd", "bpr"])
def test_ridge_fold_in_solves_the_regularised_least_squares(fitted, name):
    """The gradient of sum (t - q x)^2 + reg*n*|x|^2 vanishes at the folded-in vector."""
    model = fitted[name]
    items = np.array([0, 3, 7, 11])
    x = model.fold_in(-1, items).astype(np.float64)
    q = np.asarray(model.item_factors, np.float64)[items]
    if name == "svd":
        targets = model.rating_scale[1] - model.global_mean - model.item_bias[items]
        reg = model.params.reg_all
    else:
        targets, reg = np.ones(len(items)), model.params.reg_user
    gradient = q.T @ (targets - q @ x) - reg * len(items) * x
    assert np.abs(gradient).max() < 1e-4 * max(1.0, np.abs(q.T @ targets).max())


def test_popularity_has_no_vector_and_excludes_the_items(fitted, data):
    pop = fitted["pop"]
    assert pop.fold_in(0, np.array([1])) is None
    scorer = pop.scorer()
    best = scorer.recommend(np.array([-1]), 3)[0][0]
    items, _, source = scorer.recommend(np.array([-1, 0]), 3, [best[:2], best[:1]])
    assert not set(best[:2]) & set(items[0])
    assert source.tolist() == ["popularity", "fold-in"]
    assert not set(data.matrix[0].indices) & set(items[1])


@pytest.mark.parametrize("name", ["als", "svd", "bpr", "pop"])
def test_served_scorer_ranks_as_the_model(fitted, name):
    """The numpy scorer of the logged pyfunc gives the model's own top-k (seen excluded, unknown -> popularity)."""
    model = fitted[name]
    users = np.array([0, 5, -1, 79, 12])
    expected_items, expected_scores = model.recommend(users, 7)
    items, scores, source = model.scorer().recommend(users, 7)
    np.testing.assert_array_equal(items, expected_items)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-4)
    assert source.tolist() == ["model", "model", "popularity", "model", "model"]


def test_fold_in_excludes_history_and_new_items(fitted):
    scorer = fitted["als"].scorer()
    new = np.array([0, 1, 2])
    items, _, source = scorer.recommend(np.array([4]), 10, [new])
    assert source.tolist() == ["fold-in"]
    assert not (set(new) | set(scorer.history(4))) & set(items[0][items[0] >= 0])


def test_top_k_is_exact_with_ties_and_exclusions():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=(50, 300)), 1).astype(np.float32)  # many ties
    scores[3, :295] = -np.inf  # fewer candidates than k
    probe = np.sort(rng.choice(300, 40, replace=False))
    items, values = pyfunc_model.top_k(scores, 10, probe)
    for r in range(50):
        order = sorted((j for j in range(300) if scores[r, j] > -np.inf), key=lambda j: (-scores[r, j], j))[:10]
        assert items[r][: len(order)].tolist() == order
        assert (items[r][len(order) :] == -1).all() and (values[r][len(order) :] == -np.inf).all()


def test_top_k_of_one_row_is_that_row_of_many():
    """A served request takes the 1-row path of `top_k`; it answers as the row would among others."""
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=(30, 200)), 1).astype(np.float32)  # many ties
    scores[4, :195] = -np.inf
    probe = np.sort(rng.choice(200, 25, replace=False))
    for k in (1, 10, 30):
        items, values = pyfunc_model.top_k(scores, k, probe)
        for r in range(len(scores)):
            one_items, one_values = pyfunc_model.top_k(scores[r : r + 1], k, probe)
            np.testing.assert_array_equal(one_items[0], items[r])
            np.testing.assert_array_equal(one_values[0], values[r])


@pytest.mark.parametrize("n", [0, 1, 2, 128, 129, 130, 257, 385, 512])
def test_chunks_cover_the_rows_and_leave_no_row_alone(n):
    rows = np.arange(n) * 3
    chunks = pyfunc_model._chunks(rows)
    assert np.array_equal(np.concatenate(chunks) if chunks else rows, rows)
    assert all(len(c) <= pyfunc_model.CHUNK + 1 for c in chunks)
    assert all(len(c) > 1 for c in chunks) or n == 1  # one row alone only when it is alone in its group


@pytest.mark.parametrize("name", ["als", "pop"])
def test_one_user_answers_as_in_a_batch(fitted, name, monkeypatch):
    """The 1-user path, and a batch cut into chunks, give the same items as the batch in one product."""
    monkeypatch.setattr(pyfunc_model, "CHUNK", 3)
    scorer = fitted[name].scorer()
    users = np.array([0, 5, -1, 79, 12, 3, 40, -1, 7])
    new = [np.array([1, 2]) if u in (5, -1) else np.zeros(0, np.int64) for u in users]
    items, scores, source = scorer.recommend(users, 6, new)
    for r in range(len(users)):
        one_items, one_scores, one_source = scorer.recommend(users[r : r + 1], 6, new[r : r + 1])
        np.testing.assert_array_equal(one_items[0], items[r])
        np.testing.assert_allclose(one_scores[0], scores[r], rtol=1e-6)
        assert one_source.tolist() == [source[r]]
