"""Benchmark: SVD top-10 for every user, our vectorized scoring vs a Surprise `predict` loop.

Same fitted model on both sides (our `SVD` wraps `surprise.SVD`; the peer calls `algo.predict(u, i,
clip=False)` for every (user, item) pair, drops the user's train items and keeps the 10 best, ties to
the lower item index like ours). Data: the built-in synthetic generator at 100k interactions, the size
of ml-latest-small. The predict loop over all users takes minutes, so the peer is timed on a fixed
sample of users and scaled to all users (said in the result's details); both top-10 lists are compared
on that sample and must be identical.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mfpipe.bench import BenchResult, benchmark, interleaved

TARGET = 100.0


def predict_loop_top_k(algo, users: np.ndarray, n_items: int, seen, k: int) -> np.ndarray:
    """The peer: one `predict` call per (user, item), then top-k per user (what Surprise users write)."""
    out = np.full((len(users), k), -1, np.int64)
    for row, user in enumerate(users):
        est = np.array([algo.predict(int(user), item, clip=False).est for item in range(n_items)])
        est[seen.indices[seen.indptr[user] : seen.indptr[user + 1]]] = -np.inf
        best = np.lexsort((np.arange(n_items), -est))[:k]
        out[row, : len(best)] = np.where(np.isfinite(est[best]), best, -1)
    return out


@benchmark("svd-topk")
def svd_topk_benchmark(
    n_interactions: int = 100_000,
    sample_users: int = 20,
    k: int = 10,
    repeats: int = 3,
    seed: int = 42,
    report: Callable[[str], None] = lambda message: None,
) -> list[BenchResult]:
    """Median seconds for top-k of all users: ours measured, the peer's sample time scaled to all users."""
    from mfpipe.data.synthetic import generate, size_label
    from mfpipe.models.svd import SVD

    report(f"fitting SVD on {n_interactions} synthetic interactions")
    data = generate(n_interactions, seed=seed)
    model = SVD(seed=seed).fit(data)
    users = np.arange(data.n_users)
    sample = np.random.default_rng(seed).choice(users, size=min(sample_users, data.n_users), replace=False)

    report(f"timing top-{k}: ours for {data.n_users} users, the predict loop for {len(sample)}")
    ours_seconds, peer_sample_seconds = interleaved(
        lambda: model.recommend(users, k),
        lambda: predict_loop_top_k(model.algo, sample, data.n_items, data.matrix, k),
        repeats=repeats,
    )
    ours_top = model.recommend(sample, k)[0]
    peer_top = predict_loop_top_k(model.algo, sample, data.n_items, data.matrix, k)
    identical = int((ours_top == peer_top).all(axis=1).sum())
    scale = data.n_users / len(sample)
    return [
        BenchResult(
            benchmark="svd-topk",
            case=f"synthetic-{size_label(n_interactions)} top-{k}",
            unit="s",
            ours=ours_seconds,
            peer=peer_sample_seconds * scale,
            peer_name="surprise predict(clip=False) loop",
            target=TARGET,
            details={
                "users": data.n_users,
                "items": data.n_items,
                "factors": model.params.n_factors,
                "peer_timed_users": len(sample),
                "peer_scaled_by": scale,
                "peer_sample_seconds": peer_sample_seconds,
                "identical_top_k_users": identical,
                "compared_users": len(sample),
                "top_k_identical": identical == len(sample),
            },
        )
    ]
