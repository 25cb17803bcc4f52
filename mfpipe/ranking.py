"""Top-k selection over the full catalogue, with train-seen items excluded.

Shared by every model's `recommend` and by evaluation, so ranking ties and exclusion behave the same
everywhere. Ties are broken by the lower item index (deterministic).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def exclude_seen(scores: np.ndarray, users: np.ndarray, seen: sp.csr_matrix) -> None:
    """Set scores of items each user saw in train to -inf, in place. Rows of `scores` follow `users`."""
    rows = seen[users]
    counts = np.diff(rows.indptr)
    scores[np.repeat(np.arange(len(users)), counts), rows.indices] = -np.inf


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (int32) and scores (float32) of the k best columns per row, best first.

    Entries scoring -inf are never returned: their slots hold item -1 and score -inf.
    """
    n_rows, n_cols = scores.shape
    k_eff = min(k, n_cols)
    if k_eff == 0:
        return np.full((n_rows, k), -1, np.int32), np.full((n_rows, k), -np.inf, np.float32)
    if k_eff < n_cols:
        part = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
    else:
        part = np.tile(np.arange(n_cols), (n_rows, 1))
    part_scores = np.take_along_axis(scores, part, axis=1)
    # Sort by score descending, then item index ascending, for a stable deterministic order.
    order = np.lexsort((part, -part_scores), axis=1)
    items = np.take_along_axis(part, order, axis=1).astype(np.int32)
    values = np.take_along_axis(part_scores, order, axis=1).astype(np.float32)
    items[~np.isfinite(values) & (values < 0)] = -1
    if k_eff < k:
        pad = k - k_eff
        items = np.pad(items, ((0, 0), (0, pad)), constant_values=-1)
        values = np.pad(values, ((0, 0), (0, pad)), constant_values=-np.inf)
    return items, values
