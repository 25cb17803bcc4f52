"""Top-k selection over the full catalogue, with train-seen items excluded.

Shared by every model's `recommend` and by evaluation, so ranking ties and exclusion behave the same
everywhere. Ties are broken by the lower item index (deterministic). Entries scoring -inf (or NaN) are
never returned: their slots hold item -1 and score -inf.

The kernels are numba, parallel over rows: each row is scanned once with a k-sized heap (O(n log k),
no sort of the row), and seen items are skipped by walking the user's sorted CSR row alongside the scan
instead of writing -inf into the scores first. `top_k_factors` goes one step further for factor models:
it scores blocks of users with BLAS inside the parallel loop and selects from the block while it is in
cache, so the (users x items) score matrix never exists in memory. Every kernel (and evaluation's)
releases the GIL: the flow records one model while it ranks another.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import scipy.sparse as sp

_BLOCK = 128  # users scored per BLAS call in `top_k_factors`: a 128 x n_items block stays cache-friendly


@nb.njit(cache=True, inline="always")
def _better(s1: float, i1: int, s2: float, i2: int) -> bool:
    """Ranking order: higher score first, then lower item index."""
    return s1 > s2 or (s1 == s2 and i1 < i2)


@nb.njit(cache=True, inline="always")
def _offer(hs: np.ndarray, hi: np.ndarray, n: int, k: int, s: float, j: int) -> int:
    """Offer (score s, item j) to the min-heap (worst at the root) of n <= k entries; returns the new n.

    Items arrive in increasing index order, so a newcomer that only ties the root is worse and is
    rejected, which keeps the lower index on ties without comparing indices on the fast path.
    """
    if n == k:
        if not s > hs[0]:
            return n
        pos = 0
        while True:
            c = 2 * pos + 1
            if c >= k:
                break
            if c + 1 < k and _better(hs[c], hi[c], hs[c + 1], hi[c + 1]):
                c += 1
            if _better(s, j, hs[c], hi[c]):
                hs[pos] = hs[c]
                hi[pos] = hi[c]
                pos = c
            else:
                break
        hs[pos] = s
        hi[pos] = j
        return n
    if not s > -np.inf:  # -inf and NaN are never recommended
        return n
    pos = n
    while pos > 0:
        parent = (pos - 1) // 2
        if _better(hs[parent], hi[parent], s, j):
            hs[pos] = hs[parent]
            hi[pos] = hi[parent]
            pos = parent
        else:
            break
    hs[pos] = s
    hi[pos] = j
    return n + 1


@nb.njit(cache=True, nogil=True)
def _select_row(
    row: np.ndarray, k: int, seen: np.ndarray, out_items: np.ndarray, out_scores: np.ndarray, bias: np.ndarray | None
) -> None:
    """Best k entries of `row` (+ `bias`, None: none) skipping the sorted item indices `seen`, written best first
    (-1/-inf padded).

    The scan keeps the heap's admission threshold in a local (its root once full, -inf before): one compare
    per entry, and only an entry that beats it touches the heap. Offering every entry to the heap instead
    made selection twice as slow as scoring (3 ns per entry).
    """
    n = 0
    worst = -np.inf  # -inf and NaN never pass `s > worst`: they are never recommended
    n_cols = row.shape[0]
    start = 0
    for t in range(seen.shape[0] + 1):
        end = min(seen[t], n_cols) if t < seen.shape[0] else n_cols
        for j in range(start, end):
            s = row[j] if bias is None else row[j] + bias[j]
            if s > worst:
                n = _offer(out_scores, out_items, n, k, s, j)
                if n == k:
                    worst = out_scores[0]
        start = max(start, end + 1)
    for a in range(1, n):  # the heap holds <= k entries: insertion sort, best first
        s = out_scores[a]
        i = out_items[a]
        b = a - 1
        while b >= 0 and _better(s, i, out_scores[b], out_items[b]):
            out_scores[b + 1] = out_scores[b]
            out_items[b + 1] = out_items[b]
            b -= 1
        out_scores[b + 1] = s
        out_items[b + 1] = i
    for a in range(n, k):
        out_scores[a] = -np.inf
        out_items[a] = -1


@nb.njit(parallel=True, cache=True, nogil=True)
def _top_k_rows(
    scores: np.ndarray, k: int, rows: np.ndarray, indptr: np.ndarray, indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Row r of `scores` skips indices[indptr[rows[r]]:indptr[rows[r] + 1]] (rows[r] < 0: skips nothing)."""
    n_rows = scores.shape[0]
    out_items = np.empty((n_rows, k), np.int32)
    out_scores = np.empty((n_rows, k), np.float32)
    scratch_scores = np.empty((n_rows, k), scores.dtype)  # compare in the input precision
    for r in nb.prange(n_rows):
        u = rows[r]
        lo = indptr[u] if u >= 0 else 0
        hi = indptr[u + 1] if u >= 0 else 0
        _select_row(scores[r], k, indices[lo:hi], out_items[r], scratch_scores[r], None)
        for a in range(k):
            out_scores[r, a] = scratch_scores[r, a]
    return out_items, out_scores


@nb.njit(parallel=True, cache=True, nogil=True)
def _top_k_factors(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    item_bias: np.ndarray,
    k: int,
    rows: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    block: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Blocked BLAS scoring + selection: each thread scores `block` users and selects before moving on.

    `item_vectors.T` is a transposed view, which BLAS reads as such: no copy of the item factors per call
    (evaluation ranks in batches, and a copy per batch took a quarter of its time at synthetic:10M).
    """
    n_rows, n_factors = user_vectors.shape
    out_items = np.empty((n_rows, k), np.int32)
    out_scores = np.empty((n_rows, k), np.float32)
    n_blocks = (n_rows + block - 1) // block
    for b in nb.prange(n_blocks):
        lo = b * block
        hi = min(n_rows, lo + block)
        chunk = np.empty((hi - lo, n_factors), np.float32)
        for r in range(hi - lo):
            chunk[r] = user_vectors[lo + r]
        block_scores = np.dot(chunk, item_vectors.T)
        for r in range(hi - lo):
            u = rows[lo + r]
            start = indptr[u] if u >= 0 else 0
            stop = indptr[u + 1] if u >= 0 else 0
            _select_row(block_scores[r], k, indices[start:stop], out_items[lo + r], out_scores[lo + r], item_bias)
    return out_items, out_scores


@nb.njit(parallel=True, cache=True, nogil=True)
def _fill_seen(scores: np.ndarray, rows: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> None:
    for r in nb.prange(scores.shape[0]):
        u = rows[r]
        for p in range(indptr[u], indptr[u + 1]):
            scores[r, indices[p]] = -np.inf


def _csr_arrays(seen: sp.csr_matrix | None) -> tuple[np.ndarray, np.ndarray]:
    """indptr (int64) and per-row sorted indices (int32) of `seen`; empty arrays when there is none."""
    if seen is None:
        return np.zeros(1, np.int64), np.zeros(0, np.int32)
    if not seen.has_sorted_indices:
        seen = seen.sorted_indices()
    return seen.indptr.astype(np.int64, copy=False), seen.indices.astype(np.int32, copy=False)


def _row_users(n_rows: int, users: np.ndarray | None, seen: sp.csr_matrix | None, n_cols: int) -> np.ndarray:
    """The seen-row of each score row (-1: none), checked so the kernels never index out of bounds."""
    if users is None or seen is None:
        return np.full(n_rows, -1, np.int64)
    users = np.asarray(users, dtype=np.int64)
    if users.shape != (n_rows,):
        raise ValueError(f"users has shape {users.shape}, expected ({n_rows},)")
    if n_rows and users.max() >= seen.shape[0]:
        raise ValueError(f"user index {users.max()} is outside the seen matrix ({seen.shape[0]} rows)")
    if seen.shape[1] > n_cols:
        raise ValueError(f"seen has {seen.shape[1]} item columns, more than the {n_cols} scored")
    return users


def _empty(n_rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n_rows, k), -1, np.int32), np.full((n_rows, k), -np.inf, np.float32)


def _float_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float64)
    return np.ascontiguousarray(scores)


def exclude_seen(scores: np.ndarray, users: np.ndarray, seen: sp.csr_matrix) -> None:
    """Set scores of items each user saw in train to -inf, in place. Rows of `scores` follow `users`."""
    rows = _row_users(scores.shape[0], users, seen, scores.shape[1])
    if scores.shape[0] == 0:
        return
    if rows.min() < 0:
        raise ValueError("exclude_seen: user indices must be >= 0")
    indptr, indices = _csr_arrays(seen)
    work = scores if scores.flags.c_contiguous else np.ascontiguousarray(scores)
    _fill_seen(work, rows, indptr, indices)
    if work is not scores:
        scores[...] = work


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (int32) and scores (float32) of the k best columns per row, best first.

    Entries scoring -inf (or NaN) are never returned: their slots hold item -1 and score -inf.
    """
    return top_k_excluding(scores, k)


def top_k_excluding(
    scores: np.ndarray, k: int, users: np.ndarray | None = None, seen: sp.csr_matrix | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`top_k` of `scores` with each row skipping the items `seen[users[row]]`, without modifying `scores`.

    Equal to `exclude_seen` followed by `top_k`, in one pass and without the write. A negative user
    index excludes nothing (cold users served by a fallback have no history).
    """
    scores = _float_scores(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D, got shape {scores.shape}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    rows = _row_users(scores.shape[0], users, seen, scores.shape[1])
    if k == 0:
        return _empty(scores.shape[0], 0)
    indptr, indices = _csr_arrays(seen)
    return _top_k_rows(scores, int(k), rows, indptr, indices)


@nb.njit(parallel=True, cache=True, nogil=True)
def _top_k_in_order(order: np.ndarray, k: int, rows: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Row r: the first k items of `order` not in indices[indptr[rows[r]]:...] (sorted), -1 padded."""
    out = np.full((len(rows), k), -1, np.int32)
    for r in nb.prange(len(rows)):
        u = rows[r]
        row = indices[indptr[u] : indptr[u + 1]] if u >= 0 else indices[:0]
        n = 0
        for j in order:
            if n == k:
                break
            at = np.searchsorted(row, j)
            if at < len(row) and row[at] == j:
                continue
            out[r, n] = j
            n += 1
    return out


def top_k_in_order(
    order: np.ndarray, scores: np.ndarray, k: int, users: np.ndarray, seen: sp.csr_matrix | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`top_k_excluding` for a score shared by every user (`scores`, strictly ranked by `order`, best first).

    Walks the order and skips each user's seen items: O(k + |seen|) per user instead of a pass over the
    catalogue, which made the popularity baseline cost as much to evaluate as a factor model.
    """
    rows = _row_users(len(users), users, seen, len(order))
    indptr, indices = _csr_arrays(seen)
    items = _top_k_in_order(np.asarray(order, np.int32), int(k), rows, indptr, indices)
    values = np.where(items >= 0, np.asarray(scores, np.float32)[items], np.float32(-np.inf)).astype(np.float32)
    return items, values


def top_k_factors(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    k: int,
    users: np.ndarray | None = None,
    seen: sp.csr_matrix | None = None,
    item_bias: np.ndarray | None = None,
    block: int = _BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """`top_k_excluding(user_vectors @ item_vectors.T + item_bias, k, users, seen)` without the score matrix.

    `user_vectors` are the rows to rank (one per entry of `users`, which index `seen`). Computed in
    float32; scores differ from a numpy matmul only by BLAS rounding (last-ulp), so exact near-ties
    may order differently than a separately computed score matrix.
    """
    user_vectors = np.ascontiguousarray(user_vectors, dtype=np.float32)
    item_vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)  # no copy of a model's own factors
    n_items = item_vectors.shape[0]
    bias = np.zeros(n_items, np.float32) if item_bias is None else np.asarray(item_bias, np.float32)
    if user_vectors.shape[1] != item_vectors.shape[1] or bias.shape != (n_items,):
        raise ValueError("top_k_factors: user/item factor widths or item_bias length do not match")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    rows = _row_users(user_vectors.shape[0], users, seen, n_items)
    if k == 0:
        return _empty(user_vectors.shape[0], 0)
    indptr, indices = _csr_arrays(seen)
    block = _even_blocks(user_vectors.shape[0], max(1, int(block)), nb.get_num_threads())
    return _top_k_factors(user_vectors, item_vectors, bias, int(k), rows, indptr, indices, block)


def _even_blocks(n_rows: int, most: int, threads: int) -> int:
    """Rows per block: at most `most`, in a number of blocks that the threads share evenly.

    Evaluation ranks ml-32m's catalogue in batches of 160 users: blocks of 128 + 32 left one of two
    threads idle for most of each batch.
    """
    n_blocks = -(-n_rows // most)
    n_blocks = -(-n_blocks // threads) * threads
    return max(1, -(-n_rows // max(1, n_blocks)))
