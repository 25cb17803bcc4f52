"""The fold-in benchmark: sessions cut as documented, both arms compared on the same users."""

from __future__ import annotations

import numpy as np

from mfpipe.bench.foldin import foldin_benchmark, sessions
from mfpipe.config import Config
from mfpipe.prepare import prepare


def test_sessions_fold_the_first_items_and_keep_later_relevant_ones() -> None:
    _, split = prepare(Config(data="synthetic:20k"))
    found = sessions(split, 3)
    val = split.validation
    assert len(found["user"]) == found["truth"].shape[0] > 0
    for user, fold, truth in zip(found["user"][:20], found["fold"][:20], found["truth"][:20], strict=True):
        rows = np.flatnonzero(val.users == user)
        rows = rows[np.lexsort((rows, val.timestamps[rows]))]
        first = val.items[rows[:3]]
        assert set(fold) == set(first[first < split.train.n_items])
        later = rows[3:][split.relevant[rows[3:]]]
        assert set(truth.indices) == set(val.items[later]) and truth.nnz > 0


def test_foldin_on_synthetic_data() -> None:
    results = foldin_benchmark(data="synthetic:20k", models=("als", "pop"))
    assert [r.case for r in results] == [
        "warm users, 3 items folded in, als", "new users, 3 items folded in, als",
        "warm users, 3 items folded in, pop", "new users, 3 items folded in, pop",
    ]  # fmt: skip
    assert all(0 <= r.ours <= 1 and 0 <= r.peer <= 1 and r.details["users"] > 0 for r in results)
    assert results[2].ours == results[2].peer  # popularity has no vector: folding only excludes, as the baseline does
