"""Our numba BPR: reproducibility, learning, the negative sampler, early stopping, divergence."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from mfpipe.errors import MfpipeError
from mfpipe.models import _bpr_kernels as kernels
from mfpipe.models.bpr import BPR, BPRParams, EarlyStopping, HeldOut, Sampler, aligned_zeros
from mfpipe.models.popularity import Popularity
from tests.models.conftest import make_interactions, planted


def random_seen(n_users: int, n_items: int, per_user: int, seed: int = 0, skew: float = 0.0) -> sp.csr_matrix:
    """User x item CSR with `per_user` distinct items per user, item i drawn with weight 1/(i+1)**skew."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_items + 1) ** skew
    rows = [np.sort(rng.choice(n_items, per_user, replace=False, p=weights / weights.sum())) for _ in range(n_users)]
    indices = np.concatenate(rows)
    indptr = np.arange(n_users + 1) * per_user
    return sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(n_users, n_items))


def fit(data, **params) -> BPR:
    return BPR(seed=7, deterministic=True, **params).fit(data)


def test_deterministic_mode_reproduces_exactly(small) -> None:
    a, b = fit(small, epochs=15), fit(small, epochs=15)
    for name in ("user_factors", "item_factors", "item_bias"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.history == b.history
    other = BPR(seed=8, deterministic=True, epochs=15).fit(small)
    assert not np.array_equal(a.item_factors, other.item_factors)


def test_factors_are_float32_with_cache_line_aligned_rows(small) -> None:
    model = fit(small, epochs=1)
    assert model.user_factors.shape == (small.n_users, 64) and model.item_factors.shape == (small.n_items, 64)
    for array in (model.user_factors, model.item_factors):
        assert array.dtype == np.float32 and array.ctypes.data % 64 == 0 and array.flags.c_contiguous
    assert model.item_bias.shape == (small.n_items,) and model.item_bias.dtype == np.float32
    assert aligned_zeros(3, 5).ctypes.data % 64 == 0


def test_loss_decreases_and_sampled_auc_rises(small) -> None:
    model = fit(small, epochs=30)
    loss, auc = model.history["epoch_loss"], model.history["epoch_auc"]
    assert len(loss) == len(auc) == 30
    assert loss[-1] < 0.7 * loss[0]
    assert auc[-1] > auc[0] and auc[-1] > 0.8


def test_learns_planted_structure_better_than_popularity() -> None:
    data, held_out = planted(n_users=300, n_items=120, per_user=15, seed=3)

    def hit_rate(model) -> float:
        items, _ = model.recommend(np.arange(data.n_users), k=10)
        return float(np.mean([h in row for h, row in zip(held_out, items, strict=True)]))

    bpr, pop = hit_rate(fit(data)), hit_rate(Popularity().fit(data))
    assert bpr > pop + 0.05, (bpr, pop)


@pytest.mark.parametrize(("shape", "per_user"), [((40, 30), 9), ((300, 3000), 5), ((20, 400), 380)])
def test_membership_is_exact_and_negatives_are_never_seen(shape, per_user) -> None:
    seen = random_seen(*shape, per_user)
    sampler = Sampler(seen, popularity=False)
    users, items = np.divmod(np.arange(shape[0] * shape[1]), shape[1])
    np.testing.assert_array_equal(sampler.is_seen(users, items), seen.toarray().ravel() > 0)
    for popularity in (False, True):
        sampler.popularity = popularity
        users = np.repeat(np.arange(shape[0]), 200)
        negatives = sampler.negatives(users, seed=1)
        assert (negatives >= 0).all()
        assert not seen[users, negatives].any()


@st.composite
def user_item_sets(draw) -> sp.csr_matrix:
    """A CSR with sorted rows: empty users, users who saw a few items, users who saw (nearly) all."""
    n_items = draw(st.integers(1, 300))
    rows = draw(st.lists(st.sets(st.integers(0, n_items - 1), max_size=n_items), min_size=1, max_size=12))
    if draw(st.booleans()):  # a heavy user: many overfull home buckets, probing and wrap-around
        rows.append(set(range(0, n_items, draw(st.integers(1, 3)))))
    indices = np.array([j for row in rows for j in sorted(row)], np.int32)
    indptr = np.cumsum([0] + [len(row) for row in rows])
    return sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(len(rows), n_items))


@settings(max_examples=150, deadline=None)
@given(seen=user_item_sets())
def test_membership_sets_agree_with_brute_force(seen) -> None:
    sampler = Sampler(seen, popularity=False)
    n_users, n_items = seen.shape
    users, items = np.divmod(np.arange(n_users * n_items), n_items)
    np.testing.assert_array_equal(sampler.is_seen(users, items), seen.toarray().ravel() > 0)
    # Layout: one pair row per interaction, every set at most half full, buckets of one aligned line.
    counts = np.diff(seen.indptr)
    np.testing.assert_array_equal(sampler.pairs[:, 0], np.repeat(np.arange(n_users), counts))
    np.testing.assert_array_equal(sampler.pairs[:, 1], seen.indices)
    np.testing.assert_array_equal(
        sampler.pairs[:, 2:], np.column_stack([sampler.first, sampler.n_buckets])[sampler.pairs[:, 0]]
    )
    assert (2 * counts <= 16 * sampler.n_buckets).all() and sampler.slots.ctypes.data % 64 == 0
    assert np.count_nonzero(sampler.slots >= 0) == seen.nnz


def test_membership_sets_probe_past_full_buckets_and_wrap_around() -> None:
    """40 items that all hash to the last of the user's 5 buckets fill it and the first one (wrap-around):
    lookups must probe past full buckets. The hash is the kernels' documented one (Fibonacci hashing,
    multiply-shift onto the bucket count); if it changes, the full-bucket check below says so."""
    n_items, n_buckets = 200_000, 5  # 40 items -> ceil(2 * 40 / 16) buckets
    candidates = np.arange(n_items, dtype=np.uint64)
    home = (((candidates * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)) * np.uint64(n_buckets)) >> np.uint64(32)
    indices = np.flatnonzero(home == n_buckets - 1)[:40].astype(np.int32)
    seen = sp.csr_matrix((np.ones(40, np.float32), indices, [0, 40]), shape=(1, n_items))
    sampler = Sampler(seen, popularity=False)
    buckets = sampler.slots.reshape(-1, 16)
    assert len(buckets) == n_buckets and (buckets[[n_buckets - 1, 0]] >= 0).all()
    items = np.arange(n_items)
    np.testing.assert_array_equal(sampler.is_seen(np.zeros(n_items, np.int64), items), np.isin(items, indices))
    negatives = sampler.negatives(np.zeros(5000, np.int64), seed=2)
    assert not np.isin(negatives, indices).any()


def test_one_step_matches_the_bpr_update_and_its_loss() -> None:
    """One user, one positive, one other item: the only triple is (0, 0, 1); one epoch is one step."""
    data = make_interactions([0], [0], n_users=1, n_items=2)
    params = {"learning_rate": 0.5, "reg_user": 0.1, "reg_item": 0.01, "reg_bias": 0.2, "init_std": 1.0}
    model = BPR(seed=3, deterministic=True, epochs=1, negative_candidates=1, **params).fit(data)
    start = BPR(seed=3, **params)
    start.init_state(1, 2)
    w, h, b = start.user_factors[0].astype(np.float64), start.item_factors.astype(np.float64), np.zeros(2)
    x = w @ (h[0] - h[1])
    z = 1 / (1 + np.exp(x))
    lr = 0.5
    np.testing.assert_allclose(model.user_factors[0], w + lr * (z * (h[0] - h[1]) - 0.1 * w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.item_factors[0], h[0] + lr * (z * w - 0.01 * h[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.item_factors[1], h[1] + lr * (-z * w - 0.01 * h[1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.item_bias, b + lr * (np.array([z, -z]) - 0.2 * b), rtol=1e-5, atol=1e-7)
    # The loss is -ln of a float32 sigmoid: near 1 its absolute error is float32's epsilon.
    assert model.history["epoch_loss"] == pytest.approx([np.log1p(np.exp(-x))], rel=1e-5, abs=1.2e-7)


def test_epoch_loss_is_the_mean_negative_log_sigmoid_over_many_rescalings() -> None:
    """Near-zero factors and no learning: every x_uij is ~0, so the loss is ln 2 per triple. 25k triples
    drive the running product of sigmoids (2**-25000) through many rescalings."""
    seen = random_seen(500, 400, 50, seed=4)
    users, items = seen.nonzero()
    data = make_interactions(users, items, n_users=500, n_items=400)
    model = BPR(seed=1, deterministic=True, epochs=2, init_std=1e-6, learning_rate=1e-9).fit(data)
    assert model.history["epoch_loss"] == pytest.approx([np.log(2)] * 2, rel=1e-5)


def test_a_user_who_saw_everything_is_skipped_not_looped() -> None:
    data = make_interactions([0, 0, 0, 1], [0, 1, 2, 0], n_users=2, n_items=3)
    sampler = Sampler(data.matrix, popularity=False)
    assert (sampler.negatives(np.zeros(5, np.int64), seed=1) == -1).all()
    assert set(sampler.negatives(np.ones(50, np.int64), seed=1).tolist()) == {1, 2}
    model = fit(data, epochs=3)
    assert np.isfinite(model.history["epoch_loss"]).all()


def test_popularity_sampling_follows_popularity_and_uniform_does_not() -> None:
    seen = random_seen(400, 50, 10, seed=2, skew=1.0)
    popularity = np.asarray(seen.sum(axis=0)).ravel()
    probe = sp.csr_matrix((np.ones(1, np.float32), [0], [0, 1]), shape=(1, 50))  # a user who saw item 0
    seen_with_probe = sp.vstack([seen, probe]).tocsr()
    user = np.full(100_000, 400)
    counts = {}
    for mode in (True, False):
        counts[mode] = np.bincount(Sampler(seen_with_probe, popularity=mode).negatives(user, seed=3), minlength=50)
        assert counts[mode][0] == 0  # the probe's own item is never a negative
    expected = popularity[1:] / popularity[1:].sum()
    np.testing.assert_allclose(counts[True][1:] / 100_000, expected, atol=0.01)
    np.testing.assert_allclose(counts[False][1:] / 100_000, 1 / 49, atol=0.01)


def test_held_out_pairs_are_a_seeded_share_of_sampled_users_train_pairs() -> None:
    data, _ = planted(n_users=120, n_items=60, per_user=10, seed=2)
    params = BPRParams(eval_users=50, holdout_share=0.3)
    held = HeldOut.from_train(data, params, seed=4)
    assert held is not None and len(held.users) == 50 and np.all(np.diff(held.users) > 0)
    seen = data.matrix.toarray() > 0
    truth, remaining = held.truth.toarray() > 0, held.remaining.toarray() > 0
    assert (truth.sum(axis=1) == 3).all()  # 30% of 10 distinct items, for every sampled user
    assert not (truth & remaining[held.users]).any()  # held out means not sampled
    np.testing.assert_array_equal(remaining[held.users] | truth, seen[held.users])
    others = np.setdiff1d(np.arange(data.n_users), held.users)
    np.testing.assert_array_equal(remaining[others], seen[others])  # users not sampled keep every pair
    again = HeldOut.from_train(data, params, seed=4)
    np.testing.assert_array_equal(again.users, held.users)
    np.testing.assert_array_equal(again.truth.toarray(), held.truth.toarray())


def test_latest_hold_out_takes_each_users_latest_pairs_at_least_one_never_all() -> None:
    # user 0: 5 items, item 4 rated last; user 1: 2 items, item 0 last; user 2: one item (cannot give one).
    data = make_interactions([0, 0, 0, 0, 0, 1, 1, 2], [0, 1, 2, 3, 4, 1, 0, 2], timestamps=[1, 2, 3, 4, 9, 5, 7, 8])
    held = HeldOut.from_train(data, BPRParams(holdout="latest", holdout_share=0.2), seed=0)
    assert held is not None
    assert held.users.tolist() == [0, 1]
    assert held.truth.toarray().astype(int).tolist() == [[0, 0, 0, 0, 1], [1, 0, 0, 0, 0]]
    assert HeldOut.from_train(make_interactions([0, 1], [0, 1]), BPRParams(), seed=0) is None


def test_early_stopping_stops_where_more_epochs_hurt_and_refits_that_many() -> None:
    """No regularisation and no decay: held-out NDCG peaks after a few epochs and then falls. The fit stops
    there, its final model is a plain fit of the chosen epochs on every pair (bit for bit), and it ranks
    items the model never saw better than a fit that ran all its epochs."""
    data, unseen = planted(n_users=200, n_items=80, per_user=12, seed=5)
    params = {"eval_every": 2, "patience": 3, "learning_rate": 0.1, "lr_decay": 1.0, "reg_user": 0.0, "reg_item": 0.0}
    model = fit(data, epochs=200, **params)
    curve, evaluated = model.history["epoch_ndcg_at_10"], model.history["eval_epoch"]
    chosen = int(evaluated[int(np.argmax(curve))])
    assert evaluated[-1] == chosen + 2 * 3 < 200 and max(curve) > curve[-1]  # patience ran out
    assert len(model.history["epoch_loss"]) == evaluated[-1] and len(model.history["refit_epoch_loss"]) == chosen
    plain = fit(data, epochs=chosen, early_stopping=False, **params)
    for name in ("user_factors", "item_factors", "item_bias"):
        np.testing.assert_array_equal(getattr(model, name), getattr(plain, name))
    full = fit(data, epochs=200, early_stopping=False, **params)
    assert "epoch_ndcg_at_10" not in full.history and len(full.history["epoch_loss"]) == 200
    truth = sp.csr_matrix((np.ones(len(unseen), bool), (np.arange(len(unseen)), unseen)), shape=data.matrix.shape)
    from mfpipe.evaluation import per_user_metrics

    def ndcg(m: BPR) -> float:
        return float(np.mean(per_user_metrics(m.recommend(np.arange(data.n_users), 10)[0], truth, 10)["ndcg"]))

    assert ndcg(model) > ndcg(full) + 0.03


def test_below_the_refit_share_the_best_evaluated_state_is_kept_not_refitted() -> None:
    """The same curve as above, held-out pairs a fifth of the train pairs: refitted at the default share,
    kept when the share asked for is higher. The kept model is the one of the best evaluation, exactly."""
    data, _ = planted(n_users=200, n_items=80, per_user=12, seed=5)
    params = {"eval_every": 2, "patience": 3, "learning_rate": 0.1, "lr_decay": 1.0, "reg_user": 0.0, "reg_item": 0.0}
    held = HeldOut.from_train(data, BPRParams(), seed=7)
    assert held is not None and 0.15 < held.share(data.matrix) < 0.25
    assert "refit_epoch_loss" in fit(data, epochs=200, **params).history
    kept = fit(data, epochs=200, refit_share=0.5, **params)
    curve = kept.history["epoch_ndcg_at_10"]
    assert "refit_epoch_loss" not in kept.history and max(curve) > curve[-1]  # stopped past its best
    assert EarlyStopping(kept, held).ndcg() == pytest.approx(max(curve), abs=1e-12)


def test_on_large_data_evaluations_come_every_eval_samples_pairs(small) -> None:
    pairs = small.matrix.nnz
    model = fit(small, epochs=100, eval_every=5, eval_samples=2 * pairs, patience=2, learning_rate=1e-12)
    assert model.epochs_per_evaluation(pairs) == 2 and model.epochs_per_evaluation(10 * pairs) == 1
    assert model.history["eval_epoch"][:3] == [2.0, 4.0, 6.0]  # chunks of 2 epochs, not 5
    assert BPR(eval_every=5, eval_samples=10**9).epochs_per_evaluation(pairs) == 5  # small data: eval_every


def test_a_flat_curve_runs_out_of_patience_and_a_single_evaluation_is_a_plain_fit(small) -> None:
    # Learning rate ~0: the held-out NDCG never improves after the first evaluation.
    model = fit(small, epochs=100, eval_every=2, patience=3, learning_rate=1e-12)
    assert model.history["eval_epoch"] == [2.0, 4.0, 6.0, 8.0] and len(model.history["epoch_loss"]) == 8
    assert len(model.history["refit_epoch_loss"]) == 2
    single = fit(small, epochs=5, eval_every=5)  # one evaluation would choose nothing: no early stopping
    assert len(single.history["epoch_loss"]) == 5 and set(single.history) == {"epoch_loss", "epoch_auc"}


def test_divergence_is_a_failed_run_and_threads_are_restored(small) -> None:
    before = numba.get_num_threads()
    with pytest.raises(MfpipeError, match="diverged") as info:
        BPR(seed=1, learning_rate=1e30, epochs=20, threads=1).fit(small)
    assert info.value.exit_code == 1
    assert numba.get_num_threads() == before


def test_hogwild_threads_learn_too(small) -> None:
    model = BPR(seed=1, epochs=30, threads=2).fit(small)
    assert model.n_threads == min(2, numba.config.NUMBA_NUM_THREADS)
    assert model.history["epoch_loss"][-1] < 0.7 * model.history["epoch_loss"][0]


def updated_users(sampler: Sampler, n_chunks: int, samples: int, positive_run: int, seed: int) -> np.ndarray:
    """The users whose rows one epoch of `samples` triples changed (no regularisation: only sampled users move)."""
    n_users, n_items = int(sampler.pairs[-1, 0]) + 1, sampler.n_items
    model = BPR(seed=seed)
    model.init_state(n_users, n_items)
    before = model.user_factors.copy()
    out = np.zeros((n_chunks, 1)), np.zeros((n_chunks, 1), np.int64), np.zeros((n_chunks, 1), np.int64)
    kernels.train_epochs(
        model.user_factors, model.item_factors, model.item_bias, sampler.pairs, sampler.slots, n_items, False,
        kernels.thread_states(seed, n_chunks), samples, np.full(1, 0.1, np.float32), 0.0, 0.0, 0.0, 1,
        positive_run, True, *out,
    )  # fmt: skip
    return np.flatnonzero((model.user_factors != before).any(axis=1))


def test_each_hogwild_chunk_draws_its_positives_from_its_own_share_of_the_users() -> None:
    """Chunk t samples positives from its slice of the pair rows (sorted by user), so no two threads
    write one user's row. One triple per epoch lands in chunk 0: its user is always a first-half user,
    while a single chunk draws users from both halves."""
    seen = random_seen(40, 30, 5, seed=5)
    pairs_user = np.repeat(np.arange(40), np.diff(seen.indptr))
    first_half = set(pairs_user[: len(pairs_user) // 2].tolist())
    sampler = Sampler(seen, popularity=False)
    two_chunks = {int(updated_users(sampler, 2, 1, 1, seed)[0]) for seed in range(60)}
    one_chunk = {int(updated_users(sampler, 1, 1, 1, seed)[0]) for seed in range(60)}
    assert two_chunks <= first_half and len(two_chunks) > 5
    assert one_chunk - first_half


def is_cyclic_block(users: np.ndarray, n: int, length: int) -> bool:
    """Are the sorted `users` exactly `length` consecutive ones of 0..n-1, wrapping from n-1 to 0?"""
    gaps = np.diff(np.concatenate([users, users[:1] + n]))
    return len(users) == length and sorted(gaps.tolist()) == [1] * (length - 1) + [n - length + 1]


def test_positives_come_in_runs_of_consecutive_pairs_from_a_uniform_start() -> None:
    """One pair per user, so a run of 8 positives moves 8 consecutive users (wrapping at the end of the
    pairs); single draws do not. Over many seeds every pair joins runs equally often."""
    sampler = Sampler(random_seen(64, 200, 1, seed=6), popularity=False)
    counts = np.zeros(64, np.int64)
    for seed in range(400):
        users = updated_users(sampler, 1, 8, 8, seed)
        assert is_cyclic_block(users, 64, 8)
        counts[users] += 1
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()  # mean 50
    assert not any(is_cyclic_block(updated_users(sampler, 1, 8, 1, seed), 64, 8) for seed in range(20))


def test_invalid_params_are_one_line_errors() -> None:
    with pytest.raises(MfpipeError, match="negative_sampling"):
        BPR(negative_sampling="zipf")
