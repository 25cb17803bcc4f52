"""The code of every logged model (MLflow models-from-code): top-k, fold-in, popularity fallback.

This file is self-contained on purpose: it is what a registered version carries as its code, so
`mlflow.pyfunc.load_model` and `mlflow models serve` work in an environment holding only the version's
own `requirements.txt` (mlflow-skinny, numpy, pandas) on any host, with no mfpipe installed. It imports
nothing from mfpipe; mfpipe imports it (the models' fold-in, `mfpipe recommend`, `mfpipe serve`) so the
answer is computed by one piece of code everywhere.

Nothing is unpickled: the arrays come from two `.npz` artifacts read with `allow_pickle=False`, in the
format `mfpipe.models.base.Recommender.save` writes (a JSON `meta` with the model name and params,
`state__*` learned arrays, the train-seen CSR, the popularity fallback) and `catalog.npz` (external
ids, titles).

Scoring is numpy only: per block of users one BLAS product, train-seen items set to -inf, then an exact
top-k without a full `argpartition` of every row (see `top_k`).

Fold-in recomputes one user's vector from their train history plus new items, on the frozen item
factors: ALS solves implicit's exact least squares (what `recalculate_user` does, confidence 1 + alpha
per item), SVD and BPR a ridge regression of a "liked" target on the items' factors. Popularity has no
vectors: new items are only excluded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

DEFAULT_K = 10
BLOCK = 512  # users grouped by position, as always: a group with one user left to score is a 1-row product
CHUNK = 128  # users per BLAS call inside a group: a 128 x n_items float32 block stays in the L2 cache
PROBE = 256  # columns whose k-th best score bounds a row's k-th best from below (see `top_k`)
MODEL, FOLD_IN, POPULARITY = "model", "fold-in", "popularity"  # the `source` of each answer
OUTPUT_COLUMNS = ("user_id", "rank", "item_id", "score", "title", "source")


def als_user_vector(
    item_factors: np.ndarray, gram: np.ndarray, items: np.ndarray, confidence: float, regularization: float
) -> np.ndarray:
    """Hu-Koren-Volinsky user solve: (YtY + reg I + Yu'(Cu - I)Yu) x = Yu' Cu 1, as implicit's `_least_squares`.

    `gram` is YtY over all items (the zeros every user implicitly has); `items` the user's items, each
    with the same `confidence`.
    """
    y = item_factors[items].astype(np.float64)
    a = gram + regularization * np.eye(gram.shape[0]) + (confidence - 1.0) * (y.T @ y)
    b = confidence * y.sum(axis=0)
    return np.linalg.solve(a, b).astype(np.float32)


def ridge_user_vector(
    item_factors: np.ndarray, items: np.ndarray, targets: np.ndarray, regularization: float
) -> np.ndarray:
    """argmin_x sum_i (t_i - q_i x)^2 + reg * |items| * |x|^2 (per-interaction regularisation, as in SGD).

    A tiny floor on the ridge keeps the system solvable when `regularization` is 0 and the items are
    fewer than the factors.
    """
    y = item_factors[items].astype(np.float64)
    ridge = max(regularization * len(items), 1e-6)
    return np.linalg.solve(y.T @ y + ridge * np.eye(y.shape[1]), y.T @ targets).astype(np.float32)


def fold_in_rule(
    name: str, params: dict[str, Any], state: dict[str, np.ndarray]
) -> Callable[[np.ndarray], np.ndarray] | None:
    """items (train indices, unique) -> user vector, for model `name`; None when it has no user vectors."""
    if name == "als":
        factors = np.asarray(state["item_factors"], np.float32)
        gram = factors.T.astype(np.float64) @ factors.astype(np.float64)
        confidence = 1.0 + float(params["alpha"])  # binary confidence (the tuned default); see DESIGN/fold-in
        return lambda items: als_user_vector(factors, gram, items, confidence, float(params["regularization"]))
    if name == "svd":
        factors, bias = np.asarray(state["item_factors"]), np.asarray(state["item_bias"])
        liked = float(np.asarray(state["rating_scale"])[1]) - float(state["global_mean"])  # a top rating

        def svd_vector(items: np.ndarray) -> np.ndarray:
            return ridge_user_vector(factors, items, liked - bias[items], float(params["reg_all"]))

        return svd_vector
    if name == "bpr":
        factors = np.asarray(state["item_factors"])
        return lambda items: ridge_user_vector(factors, items, np.ones(len(items)), float(params["reg_user"]))
    return None


def top_k(scores: np.ndarray, k: int, probe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best k columns per row (int32 items, -1 padded; float32 scores, -inf padded); ties: lower index first.

    Exact, and cheaper than `argpartition` over every row: the k-th best score among the `probe` columns
    (popular items, which score high) is a lower bound of the row's k-th best, so only entries at or above
    it can be in the top k; those few candidates are sorted. Entries at -inf (excluded) are never returned.
    """
    n_rows, n_cols = scores.shape
    out_items = np.full((n_rows, k), -1, np.int32)
    out_scores = np.full((n_rows, k), -np.inf, np.float32)
    if n_rows == 0 or k == 0:
        return out_items, out_scores
    if n_rows == 1:  # a served request: 1-D calls, no row bookkeeping
        found, values = _top_k_row(scores[0], k, probe)
        out_items[0, : len(found)], out_scores[0, : len(found)] = found, values
        return out_items, out_scores
    if k < len(probe):
        threshold = np.partition(scores[:, probe], len(probe) - k, axis=1)[:, len(probe) - k]
        flat = np.flatnonzero(scores >= threshold[:, None])  # 1-D: much cheaper than a 2-D nonzero
    else:
        flat = np.flatnonzero(scores > -np.inf)
    values = scores.ravel()[flat]
    flat, values = flat[values > -np.inf], values[values > -np.inf]
    rows, cols = np.divmod(flat, n_cols)
    order = np.lexsort((cols, -values, rows))
    rows, cols, values = rows[order], cols[order], values[order]
    starts = np.searchsorted(rows, np.arange(n_rows))
    rank = np.arange(len(rows)) - starts[rows]
    keep = rank < k
    out_items[rows[keep], rank[keep]] = cols[keep]
    out_scores[rows[keep], rank[keep]] = values[keep]
    return out_items, out_scores


def _top_k_row(row: np.ndarray, k: int, probe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`top_k` of one row (at most k items, best first, ties by lower index), by the same probe bound."""
    if k < len(probe):
        found = np.flatnonzero(row >= np.partition(row[probe], len(probe) - k)[len(probe) - k])
    else:
        found = np.flatnonzero(row > -np.inf)
    values = row[found]
    finite = values > -np.inf
    found, values = found[finite], values[finite]
    order = np.lexsort((found, -values))[:k]
    return found[order], values[order]


def _chunks(rows: np.ndarray) -> list[np.ndarray]:
    """`rows` in pieces of about CHUNK, never a piece of one row unless `rows` is one row.

    BLAS answers a 1-row product as a matrix-vector product, whose sums can differ in the last bit from
    the same row inside a matrix product; so a user is scored alone exactly when it was before the split.
    """
    if len(rows) <= CHUNK + 1:
        return [rows] if len(rows) else []
    cuts = list(range(CHUNK, len(rows), CHUNK))
    if len(rows) - cuts[-1] == 1:
        cuts.pop()  # the last row joins the piece before it
    return np.split(rows, cuts)


def _flat_rows(indptr: np.ndarray, indices: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row position, item) of every stored entry of CSR rows `users`, vectorised."""
    starts, stops = indptr[users], indptr[users + 1]
    lengths = stops - starts
    rows = np.repeat(np.arange(len(users)), lengths)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return rows, indices[offsets + np.arange(len(rows))]


@dataclass(eq=False)
class Scorer:
    """One saved model's arrays, scored in numpy over the train index space."""

    name: str
    params: dict[str, Any]
    state: dict[str, np.ndarray]
    seen_indptr: np.ndarray
    seen_indices: np.ndarray
    popularity: np.ndarray

    def __post_init__(self) -> None:
        self.n_users = len(self.seen_indptr) - 1
        self.n_items = len(self.popularity)
        self.has_factors = "item_factors" in self.state
        if self.has_factors:  # scores = [u, offset_u, 1] @ [V' ; 1 ; bias]: biases ride in the one BLAS product
            factors = np.asarray(self.state["item_factors"], np.float32)
            mean = float(self.state["global_mean"]) if "global_mean" in self.state else 0.0
            offsets = np.asarray(self.state.get("user_bias", np.zeros(self.n_users)), np.float32) + np.float32(mean)
            self.item_side = np.ascontiguousarray(
                np.vstack([factors.T, np.ones(self.n_items, np.float32), np.asarray(self.state["item_bias"])]),
                np.float32,
            )
            self.user_side = np.column_stack(
                [np.asarray(self.state["user_factors"], np.float32), offsets, np.ones(self.n_users, np.float32)]
            ).astype(np.float32)
            self.folded_tail = np.array([mean, 1.0], np.float32)  # a folded-in user has no learned bias
        else:  # popularity: everyone's scores are its ranks
            self.ranks = np.asarray(self.state["ranks"], np.float32)
        self.probe = np.sort(np.argsort(-self.popularity, kind="stable")[: min(PROBE, self.n_items)])
        self.rule = fold_in_rule(self.name, self.params, self.state)
        self._popular_top: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def load(cls, path: Path | str) -> Scorer:
        """Read a model `.npz` written by mfpipe (no pickle)."""
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            state = {k[len("state__") :]: data[k] for k in data.files if k.startswith("state__")}
            return cls(meta["name"], meta["params"], state, data["seen_indptr"].astype(np.int64),
                       data["seen_indices"].astype(np.int32), np.asarray(data["popularity"], np.float32))  # fmt: skip

    def history(self, user: int) -> np.ndarray:
        """Train items of a known user (empty for -1)."""
        if user < 0:
            return np.zeros(0, np.int32)
        return self.seen_indices[self.seen_indptr[user] : self.seen_indptr[user + 1]]

    def fold_in(self, user: int, items: np.ndarray) -> np.ndarray | None:
        """The user's vector from their train history (user >= 0) plus `items`; None without user vectors."""
        if self.rule is None:
            return None
        return self.rule(np.union1d(self.history(user), items).astype(np.int64))

    def recommend(
        self, users: np.ndarray, k: int, new_items: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k (items, scores) and the `source` of each row, for user indices (-1: unknown).

        `new_items[r]` (train item indices) are folded into row r's user and excluded from its answer;
        train-seen items are always excluded. Unknown users with no known new item get popularity.
        """
        users = np.asarray(users, np.int64)
        if len(users) == 1:  # a served request: the same kernels, without the bookkeeping of many rows
            return self._one(int(users[0]), k, None if new_items is None else new_items[0])
        extra = list(new_items) if new_items is not None else [np.zeros(0, np.int64)] * len(users)
        folded = np.array([len(e) > 0 for e in extra], bool)
        source = self.sources(users, folded)
        items = np.full((len(users), k), -1, np.int32)
        scores = np.full((len(users), k), -np.inf, np.float32)
        cold = (users < 0) & ~folded
        if cold.any():  # one answer for every unknown user: popularity, nothing to exclude
            items[cold], scores[cold] = self._popular(k)
        out = np.empty((min(CHUNK + 1, len(users)), self.n_items), np.float32)  # reused: no page faults per block
        for start in range(0, len(users), BLOCK):
            rows = np.arange(start, min(start + BLOCK, len(users)))
            for chunk in _chunks(rows[~cold[rows]]):
                chunk_extra = [extra[r] for r in chunk] if new_items is not None else None
                items[chunk], scores[chunk] = self._block(users[chunk], chunk_extra, folded[chunk], k, out)
        return items, scores, source

    def _one(self, user: int, k: int, extra: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`recommend` of one user index, as the general path computes it (a 1-row block, same `top_k`)."""
        extra = np.zeros(0, np.int64) if extra is None else np.asarray(extra)
        folded = np.array([len(extra) > 0])
        source = self.sources(np.array([user]), folded)
        if user < 0 and not folded[0]:
            items, scores = self._popular(k)
            return items[None, :].copy(), scores[None, :].copy(), source
        out = np.empty((1, self.n_items), np.float32)
        return (*self._block(np.array([user], np.int64), [extra], folded, k, out), source)

    def _popular(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of popularity (the answer of every unknown user), computed once per k; read-only."""
        if k not in self._popular_top:
            items, scores = top_k(self.popularity[None, :], k, self.probe)
            items[0].flags.writeable = scores[0].flags.writeable = False
            self._popular_top[k] = (items[0], scores[0])
        return self._popular_top[k]

    def sources(self, users: np.ndarray, folded: np.ndarray) -> np.ndarray:
        """`source` per row: fold-in when known new items were given, else model (known user) or popularity."""
        source = np.where(folded, FOLD_IN, np.where(users >= 0, MODEL, POPULARITY)).astype(object)
        if not self.has_factors:
            source[folded & (users < 0)] = POPULARITY  # no vector to fold: popularity minus the items
        return source

    def _block(
        self, users: np.ndarray, extra: list[np.ndarray] | None, folded: np.ndarray, k: int, out: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        """Top-k for a block of known or folded-in users (train-seen and new items excluded), scored in `out`."""
        block = out[: len(users)]
        if self.has_factors:
            vectors = self.user_side[np.maximum(users, 0)]
            for r in np.flatnonzero(folded):
                vectors[r] = np.concatenate([self.fold_in(int(users[r]), extra[r]), self.folded_tail])
            np.matmul(vectors, self.item_side, out=block)
        else:
            block[:] = self.ranks
        if len(users) == 1:  # one user (a served request): a slice of the CSR, no fancy-index bookkeeping
            block[0, self.history(int(users[0]))] = -np.inf
        else:
            known = np.flatnonzero(users >= 0)
            rows, cols = _flat_rows(self.seen_indptr, self.seen_indices, users[known])
            block[known[rows], cols] = -np.inf
        for r in np.flatnonzero(folded):
            block[r, extra[r]] = -np.inf
        return top_k(block, k, self.probe)


@dataclass(eq=False)
class Catalog:
    """External ids of the model's index space and item titles, with O(1) id lookups."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    titles: np.ndarray  # object, aligned with item_ids, None where unknown

    def __post_init__(self) -> None:
        self.user_index = {u: i for i, u in enumerate(self.user_ids.tolist())}
        self.item_index = {t: i for i, t in enumerate(self.item_ids.tolist())}
        self.item_objects = self.item_ids.astype(object)
        self.item_strings = pd.array(self.item_objects, dtype="str")  # the frame's `item_id`, taken per row

    @classmethod
    def load(cls, path: Path | str) -> Catalog:
        with np.load(Path(path), allow_pickle=False) as data:
            item_ids = data["item_ids"].astype(str)
            titles = dict(zip(data["title_keys"].tolist(), data["title_values"].tolist(), strict=True))
            aligned = np.array([titles.get(i) for i in item_ids.tolist()], dtype=object)
            return cls(data["user_ids"].astype(str), item_ids, aligned)

    def users(self, user_ids: Sequence[str]) -> np.ndarray:
        get = self.user_index.get
        return np.fromiter((get(u, -1) for u in user_ids), np.int64, len(user_ids))

    def items(self, item_ids: Sequence[str] | None) -> np.ndarray:
        """Known item indices of `item_ids`, unique (unknown ids dropped: nothing to fold in or exclude)."""
        if item_ids is None or len(item_ids) == 0:
            return np.zeros(0, np.int64)
        get = self.item_index.get
        found = np.fromiter((get(str(i), -1) for i in item_ids), np.int64, len(item_ids))
        return np.unique(found[found >= 0])


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def parse_inputs(
    columns: Mapping[str, Sequence[Any]], params: Mapping[str, Any] | None = None
) -> tuple[list[str], list[int], list[list[str] | None] | None]:
    """Input columns -> (user ids, k per row, items per row or None); `params["k"]` fills rows without k."""
    if "user_id" not in columns:
        raise ValueError("input needs a 'user_id' column")
    users = [str(u) for u in columns["user_id"]]
    default_k = int((params or {}).get("k", DEFAULT_K))
    ks = [default_k if _missing(v) else int(v) for v in columns.get("k", [None] * len(users))]
    if "items" not in columns:
        return users, ks, None
    items: list[list[str] | None] = []
    for cell in columns["items"]:
        if isinstance(cell, str):
            raise ValueError("'items' must be a list of item ids per row, not a string")
        items.append(None if _missing(cell) else [str(i) for i in cell])
    return users, ks, items


def _strings(values: np.ndarray, take: np.ndarray, converted: Any = None) -> Any:
    """`values[take]` as the frame's str column, converted once per value, not per row (10x fewer for a
    batch); an empty column stays object, as pandas infers it from an empty object array."""
    if not len(take):
        return values[take]
    return (pd.array(values, dtype="str") if converted is None else converted).take(take)


class Ranked(NamedTuple):
    """Ranked rows, best first per user: input `row`, `rank`, `item` (catalogue index), `score`; with the
    `users` and `sources` of the input rows. The pyfunc's frame, `columns` and the HTTP answer are written
    from it, each taking ids and titles from per-item arrays instead of building them per row."""

    users: np.ndarray
    sources: np.ndarray
    row: np.ndarray
    rank: np.ndarray
    item: np.ndarray
    score: np.ndarray


@dataclass(eq=False)
class Recommendations:
    """A loaded version: external ids in, ranked rows (`OUTPUT_COLUMNS`) out."""

    scorer: Scorer
    catalog: Catalog

    @classmethod
    def load(cls, model_path: Path | str, catalog_path: Path | str) -> Recommendations:
        return cls(Scorer.load(model_path), Catalog.load(catalog_path))

    def ranked(
        self, user_ids: Sequence[str], k: int | Sequence[int], items: Sequence[Sequence[str] | None] | None = None
    ) -> Ranked:
        """Ranked rows, best first per user, train-seen and given items excluded (see `Ranked`)."""
        users = np.asarray([str(u) for u in user_ids], dtype=object)
        ks = np.asarray(k, np.int64)
        ks = np.full(len(users), ks) if ks.ndim == 0 else ks
        if len(users) and ks.min() < 1:
            raise ValueError("k must be at least 1")
        new = [self.catalog.items(i) for i in items] if items is not None else None
        top, scores, source = self.scorer.recommend(self.catalog.users(users), int(ks.max()) if len(users) else 0, new)
        rows, cols = np.nonzero((top >= 0) & (np.arange(1, top.shape[1] + 1) <= ks[:, None]))
        return Ranked(
            users, source, rows, (cols + 1).astype(np.int64), top[rows, cols], scores[rows, cols].astype(np.float64)
        )

    def columns(
        self, user_ids: Sequence[str], k: int | Sequence[int], items: Sequence[Sequence[str] | None] | None = None
    ) -> dict[str, np.ndarray]:
        """Ranked rows as columns (`OUTPUT_COLUMNS`): best first per user, train-seen and given items excluded."""
        out = self.ranked(user_ids, k, items)
        return {
            "user_id": out.users[out.row],
            "rank": out.rank,
            "item_id": self.catalog.item_objects[out.item],
            "score": out.score,
            "title": self.catalog.titles[out.item],
            "source": out.sources[out.row],
        }

    def source(self, user_id: str, items: Sequence[str] | None = None) -> str:
        """How one user's answer is made (also when nothing is left to recommend)."""
        folded = np.array([len(self.catalog.items(items)) > 0])
        return str(self.scorer.sources(self.catalog.users([str(user_id)]), folded)[0])

    def frame(self, model_input: pd.DataFrame, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """The pyfunc's answer: input columns `user_id`, optional `k` (per row) and `items` (list per row)."""
        out = self.ranked(*parse_inputs({c: model_input[c].tolist() for c in model_input.columns}, params))
        return pd.DataFrame({
            "user_id": _strings(out.users, out.row),
            "rank": out.rank,
            "item_id": _strings(self.catalog.item_objects, out.item, self.catalog.item_strings),
            "score": out.score,
            "title": pd.Series(self.catalog.titles[out.item], dtype=object),  # None stays None (str would be NaN)
            "source": _strings(out.sources, out.row),
        })  # fmt: skip


if __name__ != "mfpipe.pyfunc_model":  # run by MLflow as a logged model's code: define and set the model
    import mlflow

    class RecommenderPyfunc(mlflow.pyfunc.PythonModel):
        """The logged pyfunc: loads the version's two `.npz` artifacts, answers `Recommendations.frame`."""

        def load_context(self, context: Any) -> None:
            self.recommendations = Recommendations.load(context.artifacts["model"], context.artifacts["catalog"])

        def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
            return self.recommendations.frame(pd.DataFrame(model_input), params)

    mlflow.models.set_model(RecommenderPyfunc())
