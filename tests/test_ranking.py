"""Top-k selection: numba kernels against a brute-force sort, ties, -inf/NaN and seen-item rules."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from mfpipe.ranking import exclude_seen, top_k, top_k_excluding, top_k_factors, top_k_in_order


def brute_top_k(scores: np.ndarray, k: int, seen: list[set[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sort every finite, unseen entry by (score desc, index asc); pad with -1 / -inf."""
    items = np.full((scores.shape[0], k), -1, np.int32)
    values = np.full((scores.shape[0], k), -np.inf, np.float32)
    for r, row in enumerate(scores):
        ranked = sorted(
            (-float(s), j) for j, s in enumerate(row) if s > -np.inf and (seen is None or j not in seen[r])
        )[:k]
        for a, (neg, j) in enumerate(ranked):
            items[r, a], values[r, a] = j, -neg
    return items, values


@st.composite
def cases(draw):
    n_rows = draw(st.integers(0, 8))
    n_cols = draw(st.integers(1, 25))
    k = draw(st.integers(0, 30))
    # few distinct values so ties are common; -inf and NaN must never come back
    pool = st.sampled_from([0.0, 1.0, 2.0, 3.0, -1.5, -np.inf, np.nan])
    scores = np.array(draw(st.lists(pool, min_size=n_rows * n_cols, max_size=n_rows * n_cols)), np.float64)
    seen_mask = np.array(draw(st.lists(st.booleans(), min_size=n_rows * n_cols, max_size=n_rows * n_cols)), bool)
    return scores.reshape(n_rows, n_cols), seen_mask.reshape(n_rows, n_cols), k


@settings(max_examples=100, deadline=None)
@given(cases(), st.sampled_from([np.float32, np.float64]))
def test_top_k_matches_brute_force(case, dtype):
    scores, _, k = case
    scores = scores.astype(dtype)
    expected_items, expected_values = brute_top_k(scores, k)
    items, values = top_k(scores, k)
    assert items.dtype == np.int32 and values.dtype == np.float32
    np.testing.assert_array_equal(items, expected_items)
    np.testing.assert_array_equal(values, expected_values)


@settings(max_examples=100, deadline=None)
@given(cases())
def test_exclusion_fused_equals_exclude_then_top_k(case):
    scores, seen_mask, k = case
    seen = sp.csr_matrix(seen_mask.astype(np.float32))
    users = np.arange(scores.shape[0])[::-1].copy()  # rows follow `users`, not the seen row order
    seen_rows = [set(np.flatnonzero(seen_mask[u])) for u in users]
    expected = brute_top_k(scores, k, seen_rows)

    fused = top_k_excluding(scores, k, users, seen)
    masked = scores.copy()
    exclude_seen(masked, users, seen)
    two_step = top_k(masked, k)
    for got in (fused, two_step):
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    assert np.isneginf(masked[seen_mask[users]]).all()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.integers(1, 30), st.integers(1, 6), st.integers(0, 12), st.integers(1, 7))
def test_top_k_factors_equals_scoring_then_top_k(n_users, n_items, n_factors, k, block):
    rng = np.random.default_rng(n_users * 1000 + n_items)
    user_vectors = rng.normal(size=(n_users, n_factors)).astype(np.float32)
    item_vectors = rng.normal(size=(n_items, n_factors)).astype(np.float32)
    bias = rng.normal(size=n_items).astype(np.float32)
    seen = sp.random(n_users, n_items, density=0.3, format="csr", random_state=1, dtype=np.float32)
    users = np.arange(n_users)
    items, values = top_k_factors(user_vectors, item_vectors, k, users, seen, bias, block=block)
    expected_items, expected_values = top_k_excluding(user_vectors @ item_vectors.T + bias, k, users, seen)
    np.testing.assert_array_equal(items, expected_items)
    np.testing.assert_allclose(values, expected_values, rtol=1e-5, atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30), st.integers(1, 25), st.integers(0, 30), st.floats(0.0, 1.0))
def test_walking_a_shared_order_equals_ranking_its_scores(n_users, n_items, k, density):
    rng = np.random.default_rng(n_users * 100 + n_items)
    shared = rng.permutation(n_items).astype(np.float32)  # distinct, as popularity ranks are
    seen = sp.random(n_users, n_items, density=density, format="csr", random_state=2, dtype=np.float32)
    users = rng.integers(-1, n_users, n_users)  # -1: a cold user, nothing excluded
    order = np.argsort(-shared)
    expected = top_k_excluding(np.tile(shared, (n_users, 1)), k, users, seen)
    for got, want in zip(top_k_in_order(order, shared, k, users, seen), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_negative_user_excludes_nothing_and_unsorted_seen_is_handled():
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]], np.float32)
    seen = sp.csr_matrix((np.ones(2, np.float32), np.array([2, 0]), np.array([0, 2])), shape=(1, 3))
    assert not seen.has_sorted_indices
    items, _ = top_k_excluding(scores, 2, np.array([0, -1]), seen)
    np.testing.assert_array_equal(items, [[1, -1], [0, 1]])


def test_exclude_seen_on_a_non_contiguous_view_writes_through():
    scores = np.zeros((3, 4), np.float32)
    view = scores[:, ::2]  # columns 0 and 2
    exclude_seen(view, np.array([0, 1, 0]), sp.csr_matrix(np.array([[1, 0], [0, 1]], np.float32)))
    assert np.isneginf(scores[[0, 2], 0]).all() and np.isneginf(scores[1, 2])
    assert np.isfinite(scores[:, [1, 3]]).all()


def test_user_outside_seen_is_an_error_not_a_wild_write():
    with pytest.raises(ValueError, match="outside the seen matrix"):
        top_k_excluding(np.zeros((1, 3)), 2, np.array([5]), sp.csr_matrix((2, 3)))
    with pytest.raises(ValueError, match="outside the seen matrix"):
        exclude_seen(np.zeros((1, 3)), np.array([2]), sp.csr_matrix((2, 3)))
