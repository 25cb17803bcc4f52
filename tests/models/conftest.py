"""Small hand-built and planted-structure Interactions for model tests (fast, no files)."""

from __future__ import annotations

import numpy as np
import pytest

from mfpipe.data.interactions import Interactions

DAY = 86_400
START = 1_600_000_000


def make_interactions(
    users: list[int] | np.ndarray,
    items: list[int] | np.ndarray,
    ratings: list[float] | np.ndarray | None = None,
    timestamps: list[int] | np.ndarray | None = None,
    n_users: int | None = None,
    n_items: int | None = None,
) -> Interactions:
    """Interactions from index pairs; ids are 'u<i>' / 'i<j>'; timestamps default to one per day in row order."""
    users = np.asarray(users, np.int32)
    items = np.asarray(items, np.int32)
    n_users = n_users if n_users is not None else int(users.max(initial=-1)) + 1
    n_items = n_items if n_items is not None else int(items.max(initial=-1)) + 1
    if timestamps is None:
        timestamps = START + DAY * np.arange(len(users))
    return Interactions(
        user_ids=np.array([f"u{i}" for i in range(n_users)]),
        item_ids=np.array([f"i{j}" for j in range(n_items)]),
        users=users,
        items=items,
        ratings=None if ratings is None else np.asarray(ratings, np.float32),
        timestamps=np.asarray(timestamps, np.int64),
        name="tiny",
    )


def planted(
    n_users: int = 60, n_items: int = 40, per_user: int = 10, seed: int = 0, rank: int = 3
) -> tuple[Interactions, np.ndarray]:
    """Interactions drawn from a planted low-rank taste model with popularity skew.

    Returns (train, held_out) where held_out[u] is one further item user u likes, drawn from the same
    model, so a model that learns the structure ranks it higher than popularity does. Rows are shuffled
    (no model may rely on input sorted by user).
    """
    rng = np.random.default_rng(seed)
    taste = rng.normal(size=(n_users, rank))
    traits = rng.normal(size=(n_items, rank))
    logits = taste @ traits.T * 1.5 - 0.08 * np.arange(n_items)[None, :]
    users, items, ratings, held_out = [], [], [], np.empty(n_users, np.int32)
    for u in range(n_users):
        p = np.exp(logits[u] - logits[u].max())
        chosen = rng.choice(n_items, size=per_user + 1, replace=False, p=p / p.sum())
        held_out[u] = chosen[-1]
        users += [u] * per_user
        items += list(chosen[:per_user])
        ratings += list(np.clip(np.round(3 + logits[u, chosen[:per_user]] / 2), 1, 5))
    order = rng.permutation(len(users))
    stamps = START + DAY * rng.integers(0, 365, size=len(users))
    data = make_interactions(
        np.array(users)[order], np.array(items)[order], np.array(ratings)[order], stamps, n_users, n_items
    )
    return data, held_out


@pytest.fixture(scope="session")
def small() -> Interactions:
    return planted()[0]
