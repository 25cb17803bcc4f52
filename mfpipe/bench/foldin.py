"""Benchmark: what fold-in buys, per model, on a temporal split (default ml-latest-small, as in the issue).

Each validation user's interactions are taken in time order: the first `n_fold` are "since training" (what
`recommend --items` passes), the later ones are the truth (relevant: rating >= the split's threshold).
- warm users (seen in train): the trained vector ("no fold-in") against the vector folded in from their
  train history plus those items;
- brand-new users (only in validation): popularity against a fold-in from those items alone.
Both arms exclude the train history and the folded items (the baseline drops them from a longer list), so
only the vector differs. NDCG@10 over users with a relevant later interaction, mean of each arm and the
paired 95% bootstrap interval of fold-in minus baseline. Folded items the model does not know are skipped
(a new item cannot be folded in), as serving does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from mfpipe.bench import BenchResult, benchmark

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ml-latest-small"
MODELS = ("svd", "als", "bpr", "pop")
K = 10


def sessions(split: Any, n_fold: int) -> dict[str, Any]:
    """Per validation user with >= 1 relevant interaction after their first `n_fold`: user index, the known
    folded items (train indices) and the truth (relevant later items, validation index space)."""
    val, n_items = split.validation, split.train.n_items
    order = np.lexsort((np.arange(len(val)), val.timestamps, val.users))
    users, items, relevant = val.users[order], val.items[order], split.relevant[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    out: dict[str, list[Any]] = {"user": [], "fold": [], "truth": []}
    for lo, hi in zip(starts, np.r_[starts[1:], len(users)], strict=True):
        later = slice(lo + n_fold, hi)
        truth = items[later][relevant[later]]
        if hi - lo <= n_fold or len(truth) == 0:
            continue
        folded = items[lo : lo + n_fold]
        out["user"].append(int(users[lo]))
        out["fold"].append(np.unique(folded[folded < n_items]).astype(np.int64))
        out["truth"].append(np.unique(truth))
    truth = out["truth"]
    matrix = sp.csr_matrix(
        (np.ones(sum(map(len, truth)), bool), np.concatenate(truth or [np.zeros(0, np.int64)]),
         np.r_[0, np.cumsum([len(t) for t in truth])]),
        shape=(len(truth), val.n_items),
    )  # fmt: skip
    return {"user": np.asarray(out["user"], np.int64), "fold": out["fold"], "truth": matrix}


def arms(scorer: Any, users: np.ndarray, fold: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Top-K without fold-in (the folded items dropped from a longer list) and with it."""
    plain, _, _ = scorer.recommend(users, K + max((len(f) for f in fold), default=0))
    baseline = np.full((len(users), K), -1, np.int32)
    for r, row in enumerate(plain):
        kept = row[(row >= 0) & ~np.isin(row, fold[r])][:K]
        baseline[r, : len(kept)] = kept
    folded, _, _ = scorer.recommend(users, K, fold)
    return baseline, folded


@benchmark("foldin")
def foldin_benchmark(
    data: str = str(DATA),
    models: tuple[str, ...] = MODELS,
    n_fold: int = 3,
    seed: int = 42,
    report: Callable[[str], None] = lambda message: None,
) -> list[BenchResult]:
    """NDCG@10 with and without fold-in for warm and brand-new users of every model (see module docstring)."""
    from mfpipe.config import Config
    from mfpipe.evaluation import paired_comparison, per_user_metrics
    from mfpipe.models import create
    from mfpipe.prepare import prepare

    _, split = prepare(Config(data=data, seed=seed))
    found = sessions(split, n_fold)
    warm = found["user"] < split.train.n_users
    results = []
    for name in models:
        report(f"{name}: fit on {len(split.train)} train interactions")
        scorer = create(name, seed=seed).fit(split.train).scorer()  # no early stopping on the truth
        for group, rows, baseline_name in (("warm", warm, "no fold-in"), ("new", ~warm, "popularity")):
            users = np.where(warm[rows], found["user"][rows], -1)  # a brand-new user is unknown to the model
            fold = [f for f, keep in zip(found["fold"], rows, strict=True) if keep]
            baseline, folded = arms(scorer, users, fold)
            truth = found["truth"][np.flatnonzero(rows)]
            a = per_user_metrics(folded, truth, K)["ndcg"]
            b = per_user_metrics(baseline, truth, K)["ndcg"]
            diff = paired_comparison(a, b, seed)
            results.append(BenchResult(
                "foldin", f"{group} users, {n_fold} items folded in, {name}", "ndcg@10", float(np.nanmean(a)),
                float(np.nanmean(b)), baseline_name, None,
                {"users": int(rows.sum()), "diff": diff.mean_diff, "diff_ci95": list(diff.ci95),
                 "fold_in_wins": diff.a_wins, "baseline_wins": diff.b_wins, "ties": diff.ties,
                 "folded_items_known": float(np.mean([len(f) for f in fold])) if fold else 0.0},
            ))  # fmt: skip
    return results
