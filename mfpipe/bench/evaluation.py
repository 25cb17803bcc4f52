"""Benchmark: our evaluation vs `implicit.evaluation.ranking_metrics_at_k` on the same implicit ALS model.

Both sides rank the full train catalogue for the same users with the same train items excluded, on the
same number of threads (numba's pool for ours, implicit's `num_threads` for the peer, BLAS single
threaded), and compute NDCG@10 from the same factors; the NDCG@10 values must agree to 1e-9.
Case 1, ours = `score_users` (model.recommend in batches + per-user metrics: what `evaluate_model` runs
before its bootstrap); the full `evaluate_model`, bootstrap included, is timed once and reported in
details. Case 2, ours = `ranking.top_k_factors` (BLAS blocks scored and selected inside one numba
parallel loop, never materialising the score matrix) + `per_user_metrics`: what a factor model's
`recommend` gains when it uses the fused kernel.
Data: random interactions drawn from a Zipf item popularity (scipy/numpy only), split 75/25 per
user, so every user is warm and the peer evaluates exactly our users.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from mfpipe.bench import BenchResult, benchmark, interleaved

NDCG_TOLERANCE = 1e-9
TARGET = 2.0


def make_interactions(n_users: int, n_items: int, per_user: int, seed: int = 0):  # -> Interactions
    """`per_user` draws per user from Zipf item popularity, unique pairs, no ratings (all relevant)."""
    from mfpipe.data.interactions import Interactions

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_items + 1) ** 0.9
    items = rng.choice(n_items, size=n_users * per_user, p=weights / weights.sum())
    pairs = np.unique(np.repeat(np.arange(n_users, dtype=np.int64), per_user) * n_items + items)
    users, items = (pairs // n_items).astype(np.int32), (pairs % n_items).astype(np.int32)
    return Interactions(
        user_ids=np.array([f"u{i}" for i in range(n_users)]),
        item_ids=np.array([f"i{i}" for i in range(n_items)]),
        users=users,
        items=items,
        ratings=None,
        timestamps=np.arange(len(users), dtype=np.int64),
        name=f"bench-{n_users}x{n_items}",
    )


@benchmark("evaluation")
def evaluation_benchmark(
    n_users: int = 20_000,
    n_items: int = 5_000,
    per_user: int = 40,
    factors: int = 64,
    k: int = 10,
    repeats: int = 3,
    threads: int | None = None,
    report: Callable[[str], None] = lambda message: None,
) -> list[BenchResult]:
    """Median seconds of ours vs implicit's ranking_metrics_at_k (>= 3 interleaved runs, JIT excluded)."""
    import numba

    from mfpipe.parallel import numba_threads

    threads = threads or numba.config.NUMBA_NUM_THREADS
    with numba_threads(threads):
        return _compare(n_users, n_items, per_user, factors, k, max(3, repeats), threads, report)


def _compare(
    n_users: int, n_items: int, per_user: int, factors: int, k: int, repeats: int, threads: int, report: Callable
) -> list[BenchResult]:
    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.evaluation import ranking_metrics_at_k

    from mfpipe.config import SplitOptions
    from mfpipe.evaluation import evaluate_model, per_user_metrics, score_users
    from mfpipe.models.als import ALS
    from mfpipe.ranking import top_k_factors
    from mfpipe.split import split_interactions

    report(f"data {n_users} users x {n_items} items, ALS fit")
    split = split_interactions(
        make_interactions(n_users, n_items, per_user), SplitOptions(protocol="random-per-user", seed=42)
    )
    model = ALS(factors=factors, iterations=3, threads=threads).fit(split.train)
    peer = AlternatingLeastSquares(factors=factors, num_threads=threads, dtype=np.float32)
    peer.user_factors, peer.item_factors = model.user_factors, model.item_factors
    train = split.train.matrix
    test = split.truth("validation")[: split.train.n_users].astype(np.float32)  # warm users: all of them here

    def ours() -> float:
        scored = score_users(model, split, k)
        return float(np.mean(scored.metrics["ndcg"][scored.warm]))

    def theirs() -> float:
        return float(ranking_metrics_at_k(peer, train, test, K=k, show_progress=False, num_threads=threads)["ndcg"])

    def fused() -> float:
        truth = split.truth("validation")
        users = np.flatnonzero(np.diff(truth.indptr) > 0)
        vectors = model.user_factors[users]
        recs, _ = top_k_factors(vectors, model.item_factors, k, users, model.seen, model.item_bias)
        return float(np.mean(per_user_metrics(recs, truth[users], k)["ndcg"]))

    ndcg_peer = theirs()
    base = {"items": split.train.n_items, "factors": factors, "threads": threads, "repeats": repeats}
    results = []
    for label, fn in (("ALS via recommend", ours), ("ALS fused top-k", fused)):
        report(f"{label}: warm-up and {repeats} interleaved runs")
        ndcg_ours = fn()  # also the warm-up: compiles (or loads) the numba kernels
        diff = abs(ndcg_ours - ndcg_peer)
        if diff > NDCG_TOLERANCE:
            raise AssertionError(f"{label}: NDCG@{k} {ndcg_ours!r} differs from implicit's {ndcg_peer!r} ({diff:.3g})")
        ours_s, peer_s = interleaved(fn, theirs, repeats=repeats, warmup=False)
        details = {**base, f"ndcg@{k}_ours": ndcg_ours, f"ndcg@{k}_implicit": ndcg_peer, "ndcg_abs_diff": diff}
        case = f"{label}, {n_users} users x {n_items} items"
        results.append(
            BenchResult("evaluation", case, "s", ours_s, peer_s, "implicit ranking_metrics_at_k", TARGET, details)
        )
    report("evaluate_model with bootstrap")
    evaluate_model(model, split, k)  # warm-up: the bootstrap kernel
    start = time.perf_counter()
    full = evaluate_model(model, split, k)
    results[0].details |= {"users": full.all.n_users, "evaluate_model_with_bootstrap_s": time.perf_counter() - start}
    return results
