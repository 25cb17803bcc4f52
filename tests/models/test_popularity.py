"""Popularity baseline: counts, recency window, rating threshold, tie-breaks, fallback = itself."""

from __future__ import annotations

import numpy as np
import pytest

from mfpipe.errors import MfpipeError
from mfpipe.models import create
from tests.models.conftest import DAY, START, make_interactions

# item 0: 3 old interactions; item 1: 2 recent; item 2: 1 recent, rated 5; item 3: 2 old, low ratings.
DATA = make_interactions(
    users=[0, 1, 2, 0, 1, 3, 2, 3],
    items=[0, 0, 0, 1, 1, 2, 3, 3],
    ratings=[3.0, 3.0, 2.0, 4.0, 5.0, 5.0, 1.0, 2.0],
    timestamps=[START + d * DAY for d in (0, 1, 2, 95, 96, 99, 3, 4)],
    n_items=5,
)


def ranking(params: dict) -> list[int]:
    items, _ = create("pop", params).fit(DATA).recommend(np.array([-1]), k=5)
    return items[0].tolist()


def test_all_time_counts_then_lower_index() -> None:
    assert ranking({}) == [0, 1, 3, 2, 4]


def test_recency_window_counts_only_the_last_days() -> None:
    # Last 10 days before the end of train (day 99): items 1 (2) and 2 (1); the rest by all-time count.
    assert ranking({"window_days": 10}) == [1, 2, 0, 3, 4]
    model = create("pop", {"window_days": 10}).fit(DATA)
    np.testing.assert_array_equal(model.counts, [0, 2, 1, 0, 0])


def test_rating_threshold() -> None:
    assert ranking({"min_rating": 4.0}) == [1, 2, 0, 3, 4]
    with pytest.raises(MfpipeError, match=r"min_rating=4\.0 needs ratings"):
        create("pop", {"min_rating": 4.0}).fit(make_interactions([0], [0]))


def test_every_user_gets_the_same_order_minus_seen_items() -> None:
    model = create("pop", {"window_days": 10}).fit(DATA)
    items, _ = model.recommend(np.array([0, 3]), k=5)
    assert items[0].tolist() == [2, 3, 4, -1, -1]  # user 0 saw items 0 and 1
    assert items[1].tolist() == [1, 0, 4, -1, -1]  # user 3 saw items 2 and 3
    np.testing.assert_array_equal(model.popularity, model.score(np.array([0]))[0])


def test_window_must_be_positive() -> None:
    with pytest.raises(MfpipeError, match="window_days"):
        create("pop", {"window_days": 0})
