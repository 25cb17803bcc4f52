"""Popularity baseline: the same top items for everyone (minus what each user has seen).

On temporal splits all-time popularity beats most factor models, so this baseline is meant to be hard
to beat, not a straw man: it can count only recent interactions (`window_days` before the end of train)
and only ratings at or above `min_rating`. Ties on the primary count are broken by the all-time count,
then by the lower item index, so a short window never degenerates into index order.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from mfpipe.data.interactions import Interactions
from mfpipe.errors import MfpipeError
from mfpipe.models.base import ModelParams, Recommender
from mfpipe.ranking import top_k_in_order

SECONDS_PER_DAY = 86_400


class PopularityParams(ModelParams):
    window_days: float | None = Field(None, gt=0, description="count only the last N days before the end of train")
    min_rating: float | None = Field(None, description="count only interactions rated at least this")


class Popularity(Recommender):
    """Scores are popularity ranks (higher = more popular); the raw counts are in `counts`."""

    name: ClassVar[str] = "pop"
    Params: ClassVar[type[ModelParams]] = PopularityParams
    params: PopularityParams

    def _fit(self, train: Interactions) -> None:
        keep = np.ones(len(train), bool)
        if self.params.window_days is not None:
            end = int(train.timestamps.max())
            keep &= train.timestamps > end - self.params.window_days * SECONDS_PER_DAY
        if self.params.min_rating is not None:
            if train.ratings is None:
                raise MfpipeError(
                    f"pop: min_rating={self.params.min_rating} needs ratings, and '{train.name}' has none"
                )
            keep &= train.ratings >= self.params.min_rating
        self.counts = np.bincount(train.items[keep], minlength=train.n_items).astype(np.float32)
        all_time = np.bincount(train.items, minlength=train.n_items)
        self.ranks = _ranks(self.counts, all_time)
        # The cold-start fallback of this model is the model itself (window and threshold included).
        self.popularity = self.ranks

    def score(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.ranks, (len(users), len(self.ranks))).copy()

    def recommend(self, users: np.ndarray, k: int = 10, exclude_seen: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The same lists as scoring the catalogue for every user, from one walk down the popularity order."""
        users = np.asarray(users, dtype=np.int64)
        rows = np.where((users >= 0) & (users < self.n_users), users, -1)
        order = np.argsort(-self.ranks, kind="stable")  # ranks are distinct: a strict order
        return top_k_in_order(order, self.ranks, k, rows, self.seen if exclude_seen else None)

    def _state(self) -> dict[str, np.ndarray]:
        return {"ranks": self.ranks, "counts": self.counts}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        self.ranks = state["ranks"]
        self.counts = state["counts"]
        self.popularity = self.ranks


def _ranks(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """float32 scores ordering items by primary count, then secondary count, then lower index first."""
    n = len(primary)
    order = np.lexsort((np.arange(n), -secondary, -primary))  # best first
    ranks = np.empty(n, np.float32)
    ranks[order] = np.arange(n, 0, -1, dtype=np.float32)
    return ranks
