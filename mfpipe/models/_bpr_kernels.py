"""numba kernels of our BPR: Hogwild SGD over (user, positive, negative) triples.

Why the kernels look like this (measured on this machine, see the BPR notes in DESIGN.md): memory
traffic, not arithmetic, limits BPR. So

- positives are drawn from one contiguous array of (user, item) pairs (one load gives both);
- each thread runs its own chunk of every epoch of a segment with its own xorshift generator: no atomics,
  no shared counters, no barrier between epochs;
- the samples are pipelined: the pair slot is drawn two samples ahead and the factor rows, biases and
  the membership word one sample ahead, each with a real `llvm.prefetch`, so the DRAM misses of the
  next sample overlap the arithmetic of the current one;
- "is the negative unseen?" (the main cost left) is one bit test: a dense user x item bitset when it is
  small, otherwise a hashed bitset (a one-hash Bloom filter: never a false "unseen") with an exact binary
  search over the user's sorted CSR row only when the bit is set;
- dynamic negative sampling (more than one candidate, keep the hardest) draws its second candidate a
  sample ahead (prefetched like the first); any further ones in the update stage, unprefetched.

Floating point: float32 factors, `fastmath` without `nnan`/`ninf`, so a diverging run still shows as a
non-finite loss (the model turns it into an error) instead of being optimised away.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

FASTMATH = {"contract", "reassoc", "arcp", "nsz", "afn"}
GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing multiplier
HASH_BITS_PER_PAIR = 16  # hashed bitset size: ~6% false "maybe seen", each settled by a binary search
CACHE_LINE_FLOATS = 16
MAX_TRIES = 512  # negative redraws before a triple is skipped (only users who saw nearly every item)


@intrinsic
def prefetch(typingctx, arr, index):
    """Hint the CPU to load `arr[index]` (an int, or a tuple for n-d arrays) into cache; never faults."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, signature, args):
        aryty, idxty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        if isinstance(idxty, types.BaseTuple):
            raw, tys = cgutils.unpack_tuple(builder, args[1], len(idxty)), list(idxty)
        else:
            raw, tys = [args[1]], [idxty]
        inds = [context.cast(builder, v, t, types.intp) for v, t in zip(raw, tys, strict=True)]
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, inds, wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])  # read, keep in all levels, data
        return context.get_dummy_value()

    return types.void(arr, index), codegen


# -- random numbers --------------------------------------------------------------------------------
@njit(inline="always")
def _xorshift(x: np.uint64) -> np.uint64:
    x ^= x << np.uint64(13)
    x ^= x >> np.uint64(7)
    x ^= x << np.uint64(17)
    return x


@njit(inline="always")
def _bounded(state, n):
    """Next state and a uniform integer in [0, n), n < 2**32 (multiply-shift, no modulo)."""
    state = _xorshift(state)
    return state, np.int64(((state >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32))


def thread_states(seed: int, n: int) -> np.ndarray:
    """n independent non-zero xorshift states derived from one seed."""
    states = np.random.SeedSequence(seed).generate_state(n, np.uint64)
    states[states == 0] = GOLDEN
    return states


# -- membership: "has user u seen item j?" ----------------------------------------------------------
def membership_table(indptr: np.ndarray, indices: np.ndarray, n_items: int) -> tuple[np.ndarray, int]:
    """Bitset words and hash shift (0: dense exact bitset) for `is_seen` over a CSR with sorted rows."""
    n_users = len(indptr) - 1
    nnz = len(indices)
    hashed_bits = 1 << max(6, int(np.ceil(np.log2(max(1, nnz) * HASH_BITS_PER_PAIR))))
    dense_bits = n_users * n_items
    if dense_bits <= 2 * hashed_bits:
        shift = 0
        words = np.zeros(dense_bits // 64 + 1, np.uint64)
    else:
        shift = 64 - int(np.log2(hashed_bits))
        words = np.zeros(hashed_bits // 64, np.uint64)
    _fill_bits(indptr, indices, n_items, shift, words)
    return words, shift


@njit(inline="always")
def _bit_position(u, j, n_items, shift):
    key = np.uint64(u) * np.uint64(n_items) + np.uint64(j)
    if shift == 0:
        return key
    return (key * GOLDEN) >> np.uint64(shift)


@njit(cache=True)
def _fill_bits(indptr, indices, n_items, shift, words):
    for u in range(len(indptr) - 1):
        for p in range(indptr[u], indptr[u + 1]):
            pos = _bit_position(u, indices[p], n_items, shift)
            words[pos >> np.uint64(6)] |= np.uint64(1) << (pos & np.uint64(63))


@njit(inline="always")
def _in_row(indices, lo, hi, j):
    """Binary search for j in the sorted slice indices[lo:hi]."""
    while lo < hi:
        mid = (lo + hi) >> 1
        value = indices[mid]
        if value == j:
            return True
        if value < j:
            lo = mid + 1
        else:
            hi = mid
    return False


@njit(inline="always")
def _is_seen(indptr, indices, words, shift, n_items, u, j):
    pos = _bit_position(u, j, n_items, shift)
    if (words[pos >> np.uint64(6)] >> (pos & np.uint64(63))) & np.uint64(1) == np.uint64(0):
        return False
    if shift == 0:
        return True
    return _in_row(indices, indptr[u], indptr[u + 1], j)


@njit(cache=True)
def is_seen_many(indptr, indices, words, shift, n_items, users, items):
    """Vector form of the membership test (what the sampler uses), for tests and checks."""
    out = np.empty(len(users), np.bool_)
    for k in range(len(users)):
        out[k] = _is_seen(indptr, indices, words, shift, n_items, users[k], items[k])
    return out


# -- sampling -------------------------------------------------------------------------------------
@njit(inline="always")
def _draw_slots(state, nnz, n_items, popularity):
    """Pair slot of the positive, and the negative: an item (uniform) or a pair slot (popularity)."""
    state, p = _bounded(state, nnz)
    state, q = _bounded(state, nnz if popularity else n_items)
    return state, p, q


@njit(inline="always")
def _resolve(pairs, p, q, popularity):
    """(user, positive, candidate negative) of the drawn slots."""
    return pairs[p, 0], pairs[p, 1], pairs[q, 1] if popularity else q


@njit(inline="always")
def _verified(state, pairs, indptr, indices, words, shift, n_items, popularity, u, j):
    """Redraw the negative until the user has not seen it; -1 after MAX_TRIES (a user who saw nearly all)."""
    nnz = pairs.shape[0]
    for _ in range(MAX_TRIES):
        if not _is_seen(indptr, indices, words, shift, n_items, u, j):
            return state, j
        state, _, q = _draw_slots(state, nnz, n_items, popularity)
        j = pairs[q, 1] if popularity else q
    return state, -1


@njit(inline="always")
def _prefetch_pairs(pairs, p, q, popularity):
    prefetch(pairs, (p, 0))
    if popularity:
        prefetch(pairs, (q, 0))


@njit(inline="always")
def _prefetch_rows(user_factors, item_factors, item_bias, words, shift, n_items, u, i, j):
    for f in range(0, user_factors.shape[1], CACHE_LINE_FLOATS):
        prefetch(user_factors, (u, f))
        prefetch(item_factors, (i, f))
        prefetch(item_factors, (j, f))
    prefetch(item_bias, i)
    prefetch(item_bias, j)
    prefetch(words, _bit_position(u, j, n_items, shift) >> np.uint64(6))


@njit(cache=True)
def draw_negatives(pairs, indptr, indices, words, shift, n_items, popularity, users, state):
    """One verified negative per entry of `users`, drawn exactly as the training loop draws them."""
    out = np.empty(len(users), np.int32)
    nnz = pairs.shape[0]
    for k in range(len(users)):
        state, p, q = _draw_slots(state, nnz, n_items, popularity)
        _, _, j = _resolve(pairs, p, q, popularity)
        state, out[k] = _verified(state, pairs, indptr, indices, words, shift, n_items, popularity, users[k], j)
    return out


@njit(inline="always")
def _item_score(user_factors, item_factors, item_bias, u, j):
    x = item_bias[j]
    for f in range(user_factors.shape[1]):
        x += user_factors[u, f] * item_factors[j, f]
    return x


@njit(inline="always")
def _hardest(user_factors, item_factors, item_bias, pairs, indptr, indices, words, shift, n_items, popularity,
             state, u, j, k, candidates):  # fmt: skip
    """Dynamic negative sampling (Zhang et al. 2013): the highest-scoring of `candidates` verified
    negatives (harder negatives, faster convergence). `k` is the second candidate, drawn and prefetched a
    sample ahead; any further ones are drawn here, unprefetched."""
    best = _item_score(user_factors, item_factors, item_bias, u, j)
    nnz = pairs.shape[0]
    for c in range(candidates - 1):
        if c > 0:
            state, p, q = _draw_slots(state, nnz, n_items, popularity)
            _, _, k = _resolve(pairs, p, q, popularity)
        state, k = _verified(state, pairs, indptr, indices, words, shift, n_items, popularity, u, k)
        if k >= 0:
            value = _item_score(user_factors, item_factors, item_bias, u, k)
            if value > best:
                best, j = value, k
    return state, j


# -- the SGD step ---------------------------------------------------------------------------------
@njit(inline="always")
def _sgd_step(user_factors, item_factors, item_bias, u, i, j, lr, reg_user, reg_item, reg_bias):
    """One BPR update; returns the triple's loss -ln sigmoid(x_uij) and whether it was ranked right."""
    x = item_bias[i] - item_bias[j]
    for f in range(user_factors.shape[1]):
        x += user_factors[u, f] * (item_factors[i, f] - item_factors[j, f])
    e = np.exp(x)
    z = np.float32(1.0) / (np.float32(1.0) + e)  # sigmoid(-x) = d ln sigmoid(x) / dx
    for f in range(user_factors.shape[1]):
        wu = user_factors[u, f]
        hi = item_factors[i, f]
        hj = item_factors[j, f]
        user_factors[u, f] = wu + lr * (z * (hi - hj) - reg_user * wu)
        item_factors[i, f] = hi + lr * (z * wu - reg_item * hi)
        item_factors[j, f] = hj + lr * (-z * wu - reg_item * hj)
    item_bias[i] += lr * (z - reg_bias * item_bias[i])
    item_bias[j] += lr * (-z - reg_bias * item_bias[j])
    # -ln sigmoid(x) = ln(1 + e^x) - x; below e^-16 it is 0 to float32 precision. Written so a NaN x
    # gives a NaN loss (the divergence check) and an x of -inf an infinite one.
    loss = np.float32(0.0) if x > np.float32(16.0) else np.log1p(e) - x
    return loss, x > 0


@njit(inline="always")
def _touch_rows(user_factors, item_factors, u, i, j):
    """The memory side of a step without its arithmetic: read one float per cache line of each row."""
    sink = np.float32(0.0)
    for f in range(0, user_factors.shape[1], CACHE_LINE_FLOATS):
        sink += user_factors[u, f] + item_factors[i, f] + item_factors[j, f]
    return sink


@njit(fastmath=FASTMATH, cache=True)
def _run_chunk(
    user_factors, item_factors, item_bias, pairs, indptr, indices, words, shift, n_items, popularity,
    state, count, lr, reg_user, reg_item, reg_bias, candidates, learn,
):  # fmt: skip
    """`count` pipelined samples of one thread: (state, loss sum, correct, skipped).

    With `learn` False the step (and the extra candidates) are left out: the loop only draws, verifies
    and reads the three rows (the memory ceiling); the loss slot returns their sum so the loads stay.
    """
    nnz = pairs.shape[0]
    loss = 0.0
    correct = 0
    skipped = 0
    sink = np.float32(0.0)
    state, p, q = _draw_slots(state, nnz, n_items, popularity)
    u1, i1, j1 = _resolve(pairs, p, q, popularity)
    _prefetch_rows(user_factors, item_factors, item_bias, words, shift, n_items, u1, i1, j1)
    state, p, q = _draw_slots(state, nnz, n_items, popularity)
    _prefetch_pairs(pairs, p, q, popularity)
    k1 = np.int64(0)
    if candidates > 1 and learn:
        state, _, q2 = _draw_slots(state, nnz, n_items, popularity)
        k1 = pairs[q2, 1] if popularity else q2
    for _ in range(count):
        u, i, j, k = u1, i1, j1, k1
        u1, i1, j1 = _resolve(pairs, p, q, popularity)
        _prefetch_rows(user_factors, item_factors, item_bias, words, shift, n_items, u1, i1, j1)
        if candidates > 1 and learn:
            state, _, q2 = _draw_slots(state, nnz, n_items, popularity)
            k1 = pairs[q2, 1] if popularity else q2
            _prefetch_rows(user_factors, item_factors, item_bias, words, shift, n_items, u1, k1, k1)
        state, p, q = _draw_slots(state, nnz, n_items, popularity)
        _prefetch_pairs(pairs, p, q, popularity)
        state, j = _verified(state, pairs, indptr, indices, words, shift, n_items, popularity, u, j)
        if j >= 0 and candidates > 1 and learn:
            state, j = _hardest(
                user_factors, item_factors, item_bias, pairs, indptr, indices, words, shift, n_items, popularity,
                state, u, j, k, candidates,
            )  # fmt: skip
        if j < 0:
            skipped += 1
        elif learn:
            step_loss, right = _sgd_step(
                user_factors, item_factors, item_bias, u, i, j, lr, reg_user, reg_item, reg_bias
            )
            loss += step_loss
            correct += right
        else:
            sink += _touch_rows(user_factors, item_factors, u, i, j)
    return state, loss if learn else np.float64(sink), correct, skipped


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def train_epochs(
    user_factors, item_factors, item_bias, pairs, indptr, indices, words, shift, n_items, popularity,
    states, samples_per_epoch, learning_rates, reg_user, reg_item, reg_bias, candidates, learn,
    loss, correct, skipped,
):  # fmt: skip
    """Run len(learning_rates) epochs of `samples_per_epoch` triples, split over one chunk per state.

    Chunk t uses `states[t]` (updated in place) and writes its sums to loss/correct/skipped[t, epoch].
    One chunk (deterministic mode) is exactly reproducible; several run Hogwild in parallel.
    """
    n_chunks = states.shape[0]
    n_epochs = learning_rates.shape[0]
    reg_user, reg_item, reg_bias = np.float32(reg_user), np.float32(reg_item), np.float32(reg_bias)
    for t in prange(n_chunks):
        count = samples_per_epoch // n_chunks + (1 if t < samples_per_epoch % n_chunks else 0)
        state = states[t]
        for e in range(n_epochs):
            lr = np.float32(learning_rates[e])
            state, chunk_loss, chunk_correct, chunk_skipped = _run_chunk(
                user_factors, item_factors, item_bias, pairs, indptr, indices, words, shift, n_items,
                popularity, state, count, lr, reg_user, reg_item, reg_bias, candidates, learn,
            )  # fmt: skip
            loss[t, e] = chunk_loss
            correct[t, e] = chunk_correct
            skipped[t, e] = chunk_skipped
        states[t] = state
