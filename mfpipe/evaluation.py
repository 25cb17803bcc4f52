"""Top-k ranking metrics over the full catalogue, with uncertainty, for models (files: `file_evaluation`).

Definitions (DESIGN.md "Definitions"; tests pin them), for one user with relevant set R and top-k list:
- NDCG@k: binary gain, discount 1/log2(rank+1), divided by the ideal DCG over min(k, |R|) positions.
- Precision@k = hits/k, Recall@k = hits/|R|, HitRate@k = [hits > 0], MRR@k = 1/rank of the first hit.
- MAP@k = sum over hit ranks r of (hits within r)/r, divided by min(k, |R|).
Ranks are positions 1..k; an empty slot (item -1, e.g. a gap in a ranks file) is never a hit but keeps
its position. An item repeated in one list counts once, at its first rank. Users with no relevant item
get NaN (the report excludes them and counts them as skipped); users with relevant items but no
recommendation score 0. Every metric is macro-averaged over users with its standard error and a seeded
95% percentile bootstrap interval over users.

Where `implicit.evaluation.ranking_metrics_at_k` (implicit 0.7.3) differs: its "ndcg" and "map" are the
same per-user quantities, macro-averaged, so they agree with ours on the same recommendations. Its
"precision" is micro-averaged AND uses the denominator min(K, |R|): sum over users of hits divided by
sum over users of min(K, |R|), which is neither our Precision@k (mean of hits/k) nor a mean of
per-user ratios. It masks seen items with -FLT_MAX, not -inf, so a user with fewer than K unseen items
gets seen items at the tail where we leave the slot empty; it has "auc" and no recall, hit rate or MRR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numba as nb
import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:  # only for hints: `mfpipe evaluate` on files needs neither
    from mfpipe.models.base import Recommender
    from mfpipe.split import Split

METRICS: tuple[str, ...] = ("ndcg", "precision", "recall", "map", "hit_rate", "mrr")
N_BOOTSTRAP = 2000
VARIANTS: dict[str, str] = {"warm": "", "all": "all", "cold": "cold"}  # group -> MLflow key suffix


# -- names -----------------------------------------------------------------------------------------
def display_name(name: str, k: int, stat: str = "") -> str:
    """`ndcg@10`, `ndcg@10_se`, `ndcg@10_ci95`: the names of CLI output, JSON and reports."""
    return f"{name}@{k}" + (f"_{stat}" if stat else "")


def metric_key(name: str, k: int, variant: str = "", stat: str = "") -> str:
    """The one mapping to MLflow keys (no `@`): `ndcg_at_10`, `ndcg_at_10_all`, `ndcg_at_10_se_cold`.

    `variant` "" is the warm users (the promotion metric); "all"/"cold" always end the key.
    """
    return f"{name}_at_{k}" + (f"_{stat}" if stat else "") + (f"_{variant}" if variant else "")


# -- per-user metrics --------------------------------------------------------------------------------
@nb.njit(parallel=True, cache=True, nogil=True)
def _metrics_kernel(
    recs: np.ndarray, k: int, indptr: np.ndarray, indices: np.ndarray, discount: np.ndarray, out: np.ndarray
) -> None:
    """out[m, u] for the METRICS order; one user per iteration, relevant rows sorted (binary search)."""
    n_cols = min(k, recs.shape[1])
    for u in nb.prange(recs.shape[0]):
        lo = indptr[u]
        n_rel = indptr[u + 1] - lo
        if n_rel == 0:
            for m in range(6):
                out[m, u] = np.nan
        else:
            row = indices[lo : lo + n_rel]
            hits = 0
            dcg = 0.0
            ap = 0.0
            rr = 0.0
            for i in range(n_cols):
                item = recs[u, i]
                if item < 0:
                    continue
                pos = np.searchsorted(row, item)
                if pos >= n_rel or row[pos] != item:
                    continue
                repeated = False
                for j in range(i):
                    if recs[u, j] == item:
                        repeated = True
                if repeated:
                    continue
                hits += 1
                dcg += discount[i]
                ap += hits / (i + 1.0)
                if rr == 0.0:
                    rr = 1.0 / (i + 1.0)
            ideal = 0.0
            for i in range(min(k, n_rel)):
                ideal += discount[i]
            out[0, u] = dcg / ideal
            out[1, u] = hits / k
            out[2, u] = hits / n_rel
            out[3, u] = ap / min(k, n_rel)
            out[4, u] = 1.0 if hits > 0 else 0.0
            out[5, u] = rr


def _canonical(truth: sp.spmatrix) -> sp.csr_matrix:
    """CSR with sorted, unique, non-zero entries (a repeated relevant pair counts once)."""
    truth = sp.csr_matrix(truth)
    if not truth.has_canonical_format:
        truth = truth.copy()
        truth.sum_duplicates()
    if truth.nnz and not truth.data.all():
        truth = truth.copy()
        truth.eliminate_zeros()
    return truth


def per_user_metrics(recommended: np.ndarray, truth: sp.spmatrix, k: int) -> dict[str, np.ndarray]:
    """Per-user NDCG, Precision, Recall, MAP, HitRate, MRR at k (float64 arrays, NaN: no relevant item).

    `recommended` (n_users, >= 0 columns) holds item indices best first, -1 for an empty slot; only
    the first k columns count. Row u of `truth` marks user u's relevant items (any item space that
    contains the recommended indices).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    recs = np.ascontiguousarray(recommended, dtype=np.int64)
    truth = _canonical(truth)
    if recs.ndim != 2 or recs.shape[0] != truth.shape[0]:
        raise ValueError(f"recommended has shape {recs.shape}; truth has {truth.shape[0]} rows")
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    out = np.empty((len(METRICS), recs.shape[0]), np.float64)
    _metrics_kernel(recs, int(k), truth.indptr.astype(np.int64), truth.indices.astype(np.int64), discount, out)
    return dict(zip(METRICS, out, strict=True))


# -- uncertainty -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricSummary:
    """Mean over users, its standard error, a 95% bootstrap interval and the number of users."""

    mean: float
    se: float
    ci95: tuple[float, float]
    n: int


@dataclass(frozen=True)
class PairedComparison:
    """a - b on the same users: mean difference, its SE and paired 95% bootstrap interval, win counts."""

    mean_diff: float
    se: float
    ci95: tuple[float, float]
    a_wins: int
    b_wins: int
    ties: int
    n: int

    @property
    def significant(self) -> bool:
        """True when the whole interval lies above zero (a is better than b beyond resampling noise)."""
        return self.n > 0 and self.ci95[0] > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "mean_diff": finite_or_none(self.mean_diff), "se": finite_or_none(self.se),
            "ci95": [finite_or_none(v) for v in self.ci95],
            "a_wins": self.a_wins, "b_wins": self.b_wins, "ties": self.ties, "n": self.n,
        }  # fmt: skip


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@nb.njit(cache=True, inline="always")
def _splitmix64(z: np.uint64) -> np.uint64:
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@nb.njit(parallel=True, cache=True, nogil=True)
def _bootstrap_kernel(values: np.ndarray, seed: np.uint64, n_boot: int) -> np.ndarray:
    """(n, m) values -> (m, n_boot) resample means; draw i of resample b is splitmix64(seed, b, i).

    A counter-based generator: every draw is a pure function of (seed, b, i), so results do not depend
    on the thread count and no index matrix is materialised.
    """
    n, m = values.shape
    means = np.zeros((m, n_boot), np.float64)
    n_u = np.uint64(n)
    for b in nb.prange(n_boot):
        stream = _splitmix64(seed ^ (_GOLDEN * np.uint64(b + 1)))
        sums = np.zeros(m, np.float64)
        for i in range(n):
            z = _splitmix64(stream + _GOLDEN * np.uint64(i + 1))
            j = ((z >> np.uint64(32)) * n_u) >> np.uint64(32)  # uniform in [0, n) for n < 2**32
            for c in range(m):
                sums[c] += values[j, c]
        for c in range(m):
            means[c, b] = sums[c] / n
    return means


def _bootstrap_means(values: np.ndarray, seed: int, n_boot: int = N_BOOTSTRAP) -> np.ndarray:
    """(m, n) values -> (m, n_boot) means of user resamples shared by all m rows (same users drawn)."""
    seed_u64 = np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)
    return _bootstrap_kernel(np.ascontiguousarray(values.T, dtype=np.float64), seed_u64, int(n_boot))


def _summaries(values: np.ndarray, seed: int) -> list[MetricSummary]:
    """MetricSummary of each row of a finite (m, n) array, bootstrapping the same resamples for all rows."""
    m, n = values.shape
    if n == 0:
        return [MetricSummary(math.nan, math.nan, (math.nan, math.nan), 0) for _ in range(m)]
    means = values.mean(axis=1)
    # Sample SE; with one user there is no spread to measure and the bootstrap is the point itself.
    se = values.std(axis=1, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(m)
    lo, hi = np.quantile(_bootstrap_means(values, seed), [0.025, 0.975], axis=1)
    return [MetricSummary(float(means[i]), float(se[i]), (float(lo[i]), float(hi[i])), n) for i in range(m)]


def summarize(values: np.ndarray, seed: int = 42) -> MetricSummary:
    """Mean, SE (sample std / sqrt(n)) and seeded 95% percentile bootstrap interval; NaN users are dropped."""
    values = np.asarray(values, dtype=np.float64)
    return _summaries(values[np.isfinite(values)][None, :], seed)[0]


def paired_comparison(a: np.ndarray, b: np.ndarray, seed: int = 42) -> PairedComparison:
    """Compare per-user metrics of two models on the same users (pairs with a NaN are dropped)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same users: shapes {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    diff = summarize(a - b, seed)
    return PairedComparison(
        mean_diff=diff.mean, se=diff.se, ci95=diff.ci95,
        a_wins=int((a > b).sum()), b_wins=int((b > a).sum()), ties=int((a == b).sum()), n=diff.n,
    )  # fmt: skip


# -- reports -----------------------------------------------------------------------------------------
def finite_or_none(value: float | None) -> float | None:
    """JSON and MLflow tags have no NaN: an undefined figure (e.g. no cold users) is None."""
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True)
class GroupSummary:
    """Metrics of one group of users (warm, cold or all): `group["ndcg"]` is a MetricSummary."""

    metrics: dict[str, MetricSummary]
    n_users: int
    coverage: float

    def __getitem__(self, name: str) -> MetricSummary:
        return self.metrics[name]

    def to_json(self, k: int) -> dict[str, Any]:
        """`n_users`, then `ndcg@10`, … and their `_se` / `_ci95` companions (the Contracts layout)."""
        out: dict[str, Any] = {"n_users": self.n_users}
        out.update({display_name(m, k): finite_or_none(s.mean) for m, s in self.metrics.items()})
        out.update({display_name(m, k, "se"): finite_or_none(s.se) for m, s in self.metrics.items()})
        out.update({display_name(m, k, "ci95"): [finite_or_none(v) for v in s.ci95] for m, s in self.metrics.items()})
        return out


def summarize_group(per_user: dict[str, np.ndarray], seed: int, coverage: float = math.nan) -> GroupSummary:
    """GroupSummary of per-user metric arrays (users with NaN, i.e. no relevant item, are dropped)."""
    stacked = np.vstack([np.asarray(per_user[m], np.float64) for m in METRICS])
    stacked = stacked[:, np.isfinite(stacked).all(axis=0)]
    summaries = _summaries(stacked, seed)
    return GroupSummary(dict(zip(METRICS, summaries, strict=True)), stacked.shape[1], coverage)


@dataclass(frozen=True, eq=False)
class EvaluationReport:
    """Warm, cold and all evaluated users of one model on one part of a split.

    `per_user` has one row per evaluated user: `user` (index in the part's space), `user_id`, `warm`,
    `n_relevant` and the metrics. `n_skipped` counts users of the part with no relevant item.
    """

    k: int
    part: str
    warm: GroupSummary
    cold: GroupSummary
    all: GroupSummary
    coverage: float
    per_user: pd.DataFrame
    n_skipped: int

    @property
    def n_cold(self) -> int:
        return self.cold.n_users

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k, "part": self.part, "n_users": self.all.n_users, "n_skipped": self.n_skipped,
            "n_cold_users": self.n_cold, "coverage": finite_or_none(self.coverage),
            **{g: {**getattr(self, g).to_json(self.k), "coverage": finite_or_none(getattr(self, g).coverage)}
               for g in VARIANTS},
        }  # fmt: skip

    def mlflow_metrics(self) -> dict[str, float]:
        """Flat MLflow keys via `metric_key`: mean, `_se`, `_ci95_lo`, `_ci95_hi` per metric and group.

        Undefined figures (an empty cold group) are left out: MLflow would store them as NaN.
        """
        out: dict[str, float] = {"n_skipped_users": float(self.n_skipped)}
        for group, variant in VARIANTS.items():
            summary: GroupSummary = getattr(self, group)
            out[metric_key("n_users", self.k, variant)] = float(summary.n_users)
            out[metric_key("coverage", self.k, variant)] = summary.coverage
            for name, s in summary.metrics.items():
                out[metric_key(name, self.k, variant)] = s.mean
                out[metric_key(name, self.k, variant, "se")] = s.se
                out[metric_key(name, self.k, variant, "ci95_lo")] = s.ci95[0]
                out[metric_key(name, self.k, variant, "ci95_hi")] = s.ci95[1]
        return {key: value for key, value in out.items() if math.isfinite(value)}


# -- models ------------------------------------------------------------------------------------------
SCORE_BLOCK_BYTES = 64 * 2**20  # per model's score block: the flow evaluates every model at once


def batch_users(n_items: int) -> int:
    """Users ranked at once: a float64 score block of at most SCORE_BLOCK_BYTES (within 64..2048 users).

    A fixed 2048 made SVD's float64 block (and its float32 copy) 1.4 GB per model at ml-32m's catalogue;
    at 64 MB a block still holds hundreds of users, enough for the matrix product to run at full speed.
    """
    return int(np.clip(SCORE_BLOCK_BYTES // (8 * max(n_items, 1)), 64, 2048))


def recommend_batched(model: Recommender, users: np.ndarray, k: int, batch_size: int | None = None) -> np.ndarray:
    """model.recommend over `users` in batches (`batch_size` users' scores at a time; default `batch_users`)."""
    step = max(1, batch_size or batch_users(model.n_items))
    out = np.full((len(users), k), -1, np.int32)
    for start in range(0, len(users), step):
        out[start : start + step] = model.recommend(users[start : start + step], k)[0]
    return out


def _coverage(recs: np.ndarray, n_items: int) -> float:
    return float(np.unique(recs[recs >= 0]).size / n_items) if n_items else math.nan


@dataclass(frozen=True, eq=False)
class ScoredUsers:
    """Every evaluated user of one part: index, warm flag, |R|, top-k list and per-user metrics."""

    users: np.ndarray
    warm: np.ndarray
    n_relevant: np.ndarray
    recommended: np.ndarray
    metrics: dict[str, np.ndarray]
    n_skipped: int


def score_users(
    model: Recommender, split: Split, k: int = 10, part: str = "validation", batch_size: int | None = None
) -> ScoredUsers:
    """Rank the full train catalogue for every user of `part` with >= 1 relevant item and score the lists.

    Warm users (index < train users) get model.recommend with their train items excluded; cold users
    get the model's fallback (recommend for index -1, the same list for all). Relevant items unseen in
    train stay in |R| although no model can recommend them.
    """
    truth = _canonical(split.truth(part))
    n_relevant = np.diff(truth.indptr)
    users = np.flatnonzero(n_relevant > 0)
    warm = users < split.train.n_users
    recs = np.full((len(users), k), -1, np.int32)
    recs[warm] = recommend_batched(model, users[warm], k, batch_size)
    if (~warm).any():
        recs[~warm] = model.recommend(np.array([-1]), k)[0][0]
    metrics = per_user_metrics(recs, truth[users], k)
    return ScoredUsers(users, warm, n_relevant[users], recs, metrics, int((n_relevant == 0).sum()))


def evaluate_model(
    model: Recommender,
    split: Split,
    k: int = 10,
    part: str = "validation",
    batch_size: int | None = None,
    seed: int = 42,
) -> EvaluationReport:
    """`score_users`, then warm / cold / all summaries with SE and bootstrap intervals, and coverage."""
    scored = score_users(model, split, k, part, batch_size)
    n_items = split.train.n_items
    ids = np.asarray((split.validation if part == "validation" else split.test).user_ids)
    per_user = pd.DataFrame(
        {"user": scored.users, "user_id": ids[scored.users].astype(str), "warm": scored.warm}
        | {"n_relevant": scored.n_relevant}
        | scored.metrics
    )

    def group(mask: np.ndarray) -> GroupSummary:
        metrics = {m: v[mask] for m, v in scored.metrics.items()}
        return summarize_group(metrics, seed, _coverage(scored.recommended[mask], n_items))

    warm, cold = group(scored.warm), group(~scored.warm)
    everyone = warm if cold.n_users == 0 else group(np.ones(len(scored.users), bool))  # same users: same summary
    return EvaluationReport(
        k=k, part=part, warm=warm, cold=cold, all=everyone,
        coverage=_coverage(scored.recommended, n_items), per_user=per_user, n_skipped=scored.n_skipped,
    )  # fmt: skip


def rating_metrics(model: Recommender, split: Split) -> dict[str, float]:
    """RMSE and MAE on the validation ratings for models that predict ratings (SVD); {} for the others."""
    if not hasattr(model, "rating_metrics") or not split.validation.has_ratings:
        return {}
    values = model.rating_metrics(split.validation)
    return {name: values[name] for name in ("rmse", "mae") if math.isfinite(values[name])}
