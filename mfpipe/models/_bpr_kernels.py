"""numba kernels of our BPR: Hogwild SGD over (user, positive, negative) triples.

Why the kernels look like this (measured on this machine, see the BPR notes in DESIGN.md): memory
traffic, not arithmetic, limits BPR. So

- positives are drawn from one contiguous array of pair rows (user, item, first bucket, bucket count):
  one load gives the user, the positive and where the user's membership table lives;
- each thread runs its own chunk of every epoch of a segment with its own xorshift generator: no atomics,
  no shared counters, no barrier between epochs;
- each thread draws its positives from its own share of the pair rows, which are in user order: no two
  threads write one user's row, and each core caches half the users (synthetic:10M on 2 threads: 12.8 ->
  15.0 M samples/s). Over an epoch every pair is as likely as before; negatives still come from anywhere.
  NDCG@10 is unchanged: 0.3596 against 0.3603, the mean of two runs x six seeds x random-per-item and
  random-per-user on ml-latest-small and its ML-100K-shaped cut (`benchmarks/dense_proxy.py`); two seeds
  alone had suggested a loss, which more seeds did not bear out;
- positives come in runs of `positive_run` consecutive pair rows from a uniform random start (wrapping
  within the thread's share), so every pair is still equally likely, but a run mostly stays with one user:
  their factor row and pair rows are loaded once per run instead of once per sample. The user row is a
  quarter of a sample's cache lines. synthetic:1M, 2 threads: runs of 4 (the default) give ~1.3x the
  samples/s of single draws, with NDCG@10 unchanged over 72 fits of the defaults; runs of 8 gave ~1.5x
  but lost 0.006-0.008 on the dense proxy, random-per-user (benchmarks/TUNING.md, "positive_run");
- the samples are pipelined: the pair slot is drawn three samples ahead and the factor rows, biases
  and the negative's membership bucket two samples ahead, each with a real `llvm.prefetch`, so the misses
  of the next samples overlap the arithmetic of the current one (two ahead rather than one: ~15% more
  samples/s on 1M and 10M interactions, the loads of one sample take longer than its arithmetic);
- "is the negative unseen?" is exact and costs one cache line: every user has an open-addressing hash
  set of their items in buckets of 16 int32 slots (one aligned cache line each), at most half full. A
  lookup compares the whole home bucket (prefetched a sample ahead, like the rows) and stops at its
  first empty slot, so it almost never reads a second line. The hashed bitset it replaces sent ~6% of
  the lookups on to a binary search over the user's CSR row: a chain of dependent misses per lookup;
- dynamic negative sampling (more than one candidate, keep the hardest) draws its second candidate
  two samples ahead (prefetched like the first); any further ones in the update stage, unprefetched;
- the 64-float dot product and update are written by hand as four 16-float vectors per row (`_dot64`,
  `_update64`), every load before any store: numba's loops have a runtime trip count, so LLVM emitted
  8-float steps, remainder loops and runtime alias checks between the two item rows (synthetic:1M: ~1.3x
  samples/s, 0.43 -> 0.66 of the memory ceiling; other row lengths keep the loops);
- no libm call per sample: `exp` is an inline polynomial and the epoch loss is kept as a running product
  of the sampled sigmoids (one multiply; a log per chunk instead of a `log1p` per sample). The two calls
  cost about as much as the whole 64-float update on cache-resident rows.

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
FAST = tuple(sorted(FASTMATH))  # the same flags on the hand-written vector instructions
GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing multiplier
BUCKET = 16  # int32 slots per membership bucket: one 64-byte cache line
EMPTY = -1  # a free membership slot
FOUND, FREE = (1 << BUCKET) - 1, ((1 << BUCKET) - 1) << BUCKET  # halves of `_bucket_masks`
CACHE_LINE_BYTES = 64
CACHE_LINE_FLOATS = 16
VECTOR_ROWS = 4  # 16-float vectors in a row of the hand-vectorised step (64 floats)
MAX_TRIES = 512  # negative redraws before a triple is skipped (only users who saw nearly every item)
# exp: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, and Cephes' degree-6 polynomial for e^r
# (relative error ~2e-7, float32's own); outside [EXP_LO, EXP_HI] e^x is 0 or inf in float32.
LOG2E = np.float32(1.44269504)
LN2_HI, LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
P0, P1, P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
P3, P4, P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
EXP_LO, EXP_HI = np.float32(-87.3), np.float32(88.7)
LIKELIHOOD_FLOOR = 1e-200  # the running product of sigmoids is rescaled below this (float64 range)


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


def _is_factor_matrix(ty):
    return isinstance(ty, types.Array) and ty.ndim == 2 and ty.dtype == types.float32 and ty.layout == "C"


def _three_rows(context, builder, signature, args):
    """Pointers to the rows u, i, j (args 2-4) of the user and item factor matrices (args 0-1), each as
    VECTOR_ROWS consecutive <16 x float> (C-contiguous rows of 64 floats)."""
    vectors = ir.VectorType(ir.FloatType(), CACHE_LINE_FLOATS).as_pointer()

    def row(matrix, index):
        aryty, rowty = signature.args[matrix], signature.args[index]
        ary = context.make_array(aryty)(context, builder, args[matrix])
        at = [context.cast(builder, args[index], rowty, types.intp), context.get_constant(types.intp, 0)]
        return builder.bitcast(cgutils.get_item_pointer(context, builder, aryty, ary, at, wraparound=False), vectors)

    return row(0, 2), row(1, 3), row(1, 4)


def _splat(builder, value, lanes):
    """A vector of `lanes` copies of `value`."""
    i32 = ir.IntType(32)
    vector = builder.insert_element(ir.Constant(ir.VectorType(value.type, lanes), ir.Undefined), value, i32(0))
    return builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))


@intrinsic
def _dot64(typingctx, user_factors, item_factors, u, i, j):
    """sum_f user_factors[u, f] * (item_factors[i, f] - item_factors[j, f]) over rows of exactly 64 floats.

    Written by hand: numba's loop has a runtime trip count, so LLVM emits 8-float steps plus remainder
    loops, and the rows (same array for i and j) get runtime alias checks. Here: four 16-float vectors per
    row, one product per vector and a tree reduction.
    """
    if not (_is_factor_matrix(user_factors) and _is_factor_matrix(item_factors)):
        return None

    def codegen(context, builder, signature, args):
        pu, pi, pj = _three_rows(context, builder, signature, args)
        i32 = ir.IntType(32)
        terms = []
        for k in range(VECTOR_ROWS):
            wu, hi, hj = (builder.load(builder.gep(ptr, [i32(k)]), align=4) for ptr in (pu, pi, pj))
            terms.append(builder.fmul(wu, builder.fsub(hi, hj, flags=FAST), flags=FAST))
        while len(terms) > 1:
            terms = [builder.fadd(terms[k], terms[k + 1], flags=FAST) for k in range(0, len(terms), 2)]
        total, lanes = terms[0], CACHE_LINE_FLOATS
        while lanes > 1:
            half = lanes // 2
            low = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(i32, half), list(range(half))))
            high = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(i32, half), list(range(half, lanes))))
            total, lanes = builder.fadd(low, high, flags=FAST), half
        return builder.extract_element(total, i32(0))

    return types.float32(user_factors, item_factors, u, i, j), codegen


@intrinsic
def _update64(typingctx, user_factors, item_factors, u, i, j, step, keep_user, keep_item):
    """The BPR update of rows of exactly 64 floats, all loads before any store (i != j: a verified negative):
    wu' = keep_user wu + step (hi - hj), hi' = keep_item hi + step wu, hj' = keep_item hj - step wu,
    with step = lr z, keep_user = 1 - lr reg_user, keep_item = 1 - lr reg_item."""
    if not (_is_factor_matrix(user_factors) and _is_factor_matrix(item_factors)):
        return None

    def codegen(context, builder, signature, args):
        pu, pi, pj = _three_rows(context, builder, signature, args)
        i32 = ir.IntType(32)
        step, keep_user, keep_item = (_splat(builder, value, CACHE_LINE_FLOATS) for value in args[5:8])
        rows = [tuple(builder.load(builder.gep(ptr, [i32(k)]), align=4) for ptr in (pu, pi, pj))
                for k in range(VECTOR_ROWS)]  # fmt: skip
        for k, (wu, hi, hj) in enumerate(rows):
            pull = builder.fmul(step, wu, flags=FAST)
            diff = builder.fmul(step, builder.fsub(hi, hj, flags=FAST), flags=FAST)
            builder.store(builder.fadd(builder.fmul(keep_user, wu, flags=FAST), diff, flags=FAST),
                          builder.gep(pu, [i32(k)]), align=4)  # fmt: skip
            builder.store(builder.fadd(builder.fmul(keep_item, hi, flags=FAST), pull, flags=FAST),
                          builder.gep(pi, [i32(k)]), align=4)  # fmt: skip
            builder.store(builder.fsub(builder.fmul(keep_item, hj, flags=FAST), pull, flags=FAST),
                          builder.gep(pj, [i32(k)]), align=4)  # fmt: skip
        return context.get_dummy_value()

    return types.void(user_factors, item_factors, u, i, j, step, keep_user, keep_item), codegen


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE-754 bit pattern is the int32 `bits` (to build 2**n for exp)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _bucket_masks(typingctx, slots, offset, j):
    """Bit k of the low half: slots[offset + k] == j; of the high half: slot k is free (k < BUCKET).

    One vector load and two vector compares of the whole (cache-line aligned) bucket; written by hand
    because numba's loop over the 16 slots stays scalar (~60 instructions per bucket).
    """
    if not (isinstance(slots, types.Array) and slots.dtype == types.int32 and isinstance(offset, types.Integer)):
        return None
    if not isinstance(j, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        aryty, offty, jty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        index = context.cast(builder, args[1], offty, types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [index], wraparound=False)
        i32, lanes = ir.IntType(32), ir.VectorType(ir.IntType(32), BUCKET)
        bucket = builder.load(builder.bitcast(ptr, lanes.as_pointer()), align=CACHE_LINE_BYTES)
        item = builder.trunc(context.cast(builder, args[2], jty, types.int64), i32)

        def mask(value):
            equal = builder.icmp_signed("==", bucket, _splat(builder, value, BUCKET))
            bits = builder.bitcast(equal, ir.IntType(BUCKET))
            return builder.zext(bits, i32)

        return builder.or_(mask(item), builder.shl(mask(i32(EMPTY)), i32(BUCKET)))

    return types.int32(slots, offset, j), codegen


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
def sampling_tables(indptr: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the kernels sample from, for a user x item CSR: (pairs, slots, first bucket, bucket count).

    `pairs` has one int32 row (user, item, first bucket of the user, the user's bucket count) per
    interaction; `slots` holds every user's hash set of items. A user with n items gets ceil(2n / BUCKET)
    buckets (at least one), so every set is at most half full: a bucket is rarely full, and a lookup
    that meets a free slot can stop. `slots` starts on a cache line, so each bucket is exactly one line.
    Bucket numbers are int32 (up to 2**31 buckets, 2**35 slots).
    """
    counts = np.diff(indptr)
    n_buckets = np.maximum(1, -(-2 * counts // BUCKET)).astype(np.int32)
    first = np.zeros(len(n_buckets), np.int32)
    np.cumsum(n_buckets[:-1], out=first[1:])
    total = int(n_buckets.sum(dtype=np.int64)) * BUCKET
    buffer = np.empty(total * 4 + CACHE_LINE_BYTES, np.uint8)
    start = -buffer.ctypes.data % CACHE_LINE_BYTES
    slots = buffer[start : start + total * 4].view(np.int32)
    pairs = np.empty((len(indices), 4), np.int32)
    _fill(indptr, indices, first, n_buckets, slots, pairs)
    return pairs, slots, first, n_buckets


@njit(inline="always")
def _home(j, n_buckets):
    """The bucket (of a user's n_buckets) where item j's search starts: Fibonacci hash, multiply-shift."""
    h = (np.uint64(j) * GOLDEN) >> np.uint64(32)
    return np.int64((h * np.uint64(n_buckets)) >> np.uint64(32))


@njit(cache=True)
def _fill(indptr, indices, first, n_buckets, slots, pairs):
    """Pair rows, and each user's items inserted by linear probing over buckets (a bucket fills from
    its first slot, so per-bucket counts place an item without reading the table)."""
    slots[:] = EMPTY
    used = np.zeros(n_buckets.max() if len(n_buckets) else 0, np.int64)
    for u in range(len(indptr) - 1):
        used[: n_buckets[u]] = 0
        for p in range(indptr[u], indptr[u + 1]):
            j = indices[p]
            pairs[p, 0], pairs[p, 1], pairs[p, 2], pairs[p, 3] = u, j, first[u], n_buckets[u]
            b = _home(j, n_buckets[u])
            while used[b] == BUCKET:  # a set at most half full always has room
                b = b + 1 if b + 1 < n_buckets[u] else 0
            slots[(np.int64(first[u]) + b) * BUCKET + used[b]] = j
            used[b] += 1


@njit(inline="always")
def _is_seen(slots, first, n_buckets, j):
    """Exact: is j in the user's set (their `first` bucket and bucket count)? Usually one bucket read."""
    b = _home(j, n_buckets)
    while True:
        masks = _bucket_masks(slots, (np.int64(first) + b) * BUCKET, j)
        if masks & FOUND:
            return True
        if masks & FREE:
            return False
        b = b + 1 if b + 1 < n_buckets else 0


@njit(inline="always")
def _prefetch_home(slots, first, n_buckets, j):
    prefetch(slots, (np.int64(first) + _home(j, n_buckets)) * BUCKET)


@njit(cache=True)
def is_seen_many(slots, first, n_buckets, users, items):
    """Vector form of the membership test (what the sampler uses), for tests and checks."""
    out = np.empty(len(users), np.bool_)
    for k in range(len(users)):
        u = users[k]
        out[k] = _is_seen(slots, first[u], n_buckets[u], items[k])
    return out


# -- sampling -------------------------------------------------------------------------------------
@njit(inline="always")
def _draw_slots(state, first_pair, n_own, nnz, n_items, popularity, p, left, run):
    """Pair slot of the positive and the negative: an item (uniform) or any pair slot (popularity).

    The positive is the slot after `p` while the run has `left` samples to go (wrapping within the thread's
    `n_own` rows from `first_pair`), else the start of a new run of `run`: a uniform slot of them.
    Returns (state, p, q, left)."""
    if left > 0:
        p = p + 1 if p + 1 < first_pair + n_own else first_pair
        left -= 1
    else:
        state, p = _bounded(state, n_own)
        p += first_pair
        left = run - 1
    state, q = _bounded(state, nnz if popularity else n_items)
    return state, p, q, left


@njit(inline="always")
def _draw_negative(state, pairs, n_items, popularity):
    """A candidate negative item, as `_draw_slots` draws the negative: uniform, or a pair slot's item."""
    state, q = _bounded(state, pairs.shape[0] if popularity else n_items)
    return state, pairs[q, 1] if popularity else q


@njit(inline="always")
def _resolve(pairs, p, q, popularity):
    """(user, positive, candidate negative, user's first bucket, user's bucket count) of the drawn slots."""
    return pairs[p, 0], pairs[p, 1], pairs[q, 1] if popularity else q, pairs[p, 2], pairs[p, 3]


@njit(inline="always")
def _verified(state, pairs, slots, n_items, popularity, first, n_buckets, j):
    """Redraw the negative until the user has not seen it; -1 after MAX_TRIES (a user who saw nearly all)."""
    for _ in range(MAX_TRIES):
        if not _is_seen(slots, first, n_buckets, j):
            return state, j
        state, j = _draw_negative(state, pairs, n_items, popularity)
    return state, -1


@njit(inline="always")
def _prefetch_pairs(pairs, p, q, popularity):
    prefetch(pairs, (p, 0))
    if popularity:
        prefetch(pairs, (q, 0))


@njit(inline="always")
def _prefetch_rows(user_factors, item_factors, item_bias, slots, first, n_buckets, u, i, j):
    for f in range(0, user_factors.shape[1], CACHE_LINE_FLOATS):
        prefetch(user_factors, (u, f))
        prefetch(item_factors, (i, f))
        prefetch(item_factors, (j, f))
    prefetch(item_bias, i)
    prefetch(item_bias, j)
    _prefetch_home(slots, first, n_buckets, j)


@njit(cache=True)
def draw_negatives(pairs, slots, first, n_buckets, n_items, popularity, users, state):
    """One verified negative per entry of `users`, drawn exactly as the training loop draws them."""
    out = np.empty(len(users), np.int32)
    for k in range(len(users)):
        u = users[k]
        state, j = _draw_negative(state, pairs, n_items, popularity)
        state, out[k] = _verified(state, pairs, slots, n_items, popularity, first[u], n_buckets[u], j)
    return out


@njit(inline="always")
def _item_score(user_factors, item_factors, item_bias, u, j):
    x = item_bias[j]
    for f in range(user_factors.shape[1]):
        x += user_factors[u, f] * item_factors[j, f]
    return x


@njit(inline="always")
def _hardest(user_factors, item_factors, item_bias, pairs, slots, n_items, popularity,
             state, u, first, n_buckets, j, k, candidates):  # fmt: skip
    """Dynamic negative sampling (Zhang et al. 2013): the highest-scoring of `candidates` verified
    negatives (harder negatives, faster convergence). `k` is the second candidate, drawn and prefetched
    two samples ahead; any further ones are drawn here, unprefetched."""
    best = _item_score(user_factors, item_factors, item_bias, u, j)
    for c in range(candidates - 1):
        if c > 0:
            state, k = _draw_negative(state, pairs, n_items, popularity)
        state, k = _verified(state, pairs, slots, n_items, popularity, first, n_buckets, k)
        if k >= 0:
            value = _item_score(user_factors, item_factors, item_bias, u, k)
            if value > best:
                best, j = value, k
    return state, j


# -- the SGD step ---------------------------------------------------------------------------------
@njit(inline="always")
def _exp(x):
    """float32 e**x without a libm call (inlined, ~15 instructions); NaN stays NaN, -inf gives 0, inf inf."""
    xc = min(max(x, EXP_LO), EXP_HI)
    n = np.floor(xc * LOG2E + np.float32(0.5))
    r = xc - n * LN2_HI - n * LN2_LO
    p = ((((P0 * r + P1) * r + P2) * r + P3) * r + P4) * r + P5
    p = p * r * r + r + np.float32(1.0)
    value = p * _float32_from_bits(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))
    if x < EXP_LO:
        return np.float32(0.0)
    if x > EXP_HI:
        return np.float32(np.inf)
    return value if x == x else x


@njit(inline="always")
def _sgd_step(user_factors, item_factors, item_bias, u, i, j, lr, reg_user, reg_item, reg_bias):
    """One BPR update; returns the triple's sigmoid(x_uij) (its likelihood) and whether it was ranked right.

    Rows of 64 floats (the default) take the hand-vectorised `_dot64` / `_update64`; others the loops."""
    vector = user_factors.shape[1] == VECTOR_ROWS * CACHE_LINE_FLOATS
    if vector:
        x = item_bias[i] - item_bias[j] + _dot64(user_factors, item_factors, u, i, j)
    else:
        x = item_bias[i] - item_bias[j]
        for f in range(user_factors.shape[1]):
            x += user_factors[u, f] * (item_factors[i, f] - item_factors[j, f])
    e = _exp(x)
    z = np.float32(1.0) / (np.float32(1.0) + e)  # sigmoid(-x) = d ln sigmoid(x) / dx
    if vector:
        one = np.float32(1.0)
        _update64(user_factors, item_factors, u, i, j, lr * z, one - lr * reg_user, one - lr * reg_item)
    else:
        for f in range(user_factors.shape[1]):
            wu = user_factors[u, f]
            hi = item_factors[i, f]
            hj = item_factors[j, f]
            user_factors[u, f] = wu + lr * (z * (hi - hj) - reg_user * wu)
            item_factors[i, f] = hi + lr * (z * wu - reg_item * hi)
            item_factors[j, f] = hj + lr * (-z * wu - reg_item * hj)
    item_bias[i] += lr * (z - reg_bias * item_bias[i])
    item_bias[j] += lr * (-z - reg_bias * item_bias[j])
    # sigmoid(x) = e^x / (1 + e^x); above x = 16 it is 1 to float32 precision (and e^x may overflow).
    # Written so a NaN x gives a NaN likelihood (the divergence check) and an x of -inf a zero one.
    likelihood = np.float32(1.0) if x > np.float32(16.0) else e * z
    return likelihood, x > 0


@njit(inline="always")
def _touch_rows(user_factors, item_factors, u, i, j):
    """The memory side of a step without its arithmetic: read one float per cache line of each row."""
    sink = np.float32(0.0)
    for f in range(0, user_factors.shape[1], CACHE_LINE_FLOATS):
        sink += user_factors[u, f] + item_factors[i, f] + item_factors[j, f]
    return sink


@njit(fastmath=FASTMATH, cache=True)
def _run_chunk(
    user_factors, item_factors, item_bias, pairs, slots, n_items, popularity,
    state, first_pair, n_own, count, lr, reg_user, reg_item, reg_bias, candidates, positive_run, learn,
):  # fmt: skip
    """`count` pipelined samples of one thread, positives from its own pair rows in runs of
    `positive_run`: (state, loss sum, correct, skipped).

    The loss sum is -ln of the product of the sampled sigmoids, kept as a float64 mantissa rescaled by
    LIKELIHOOD_FLOOR when it gets small (one multiply per sample, one log per chunk).
    With `learn` False the step (and the extra candidates) are left out: the loop only draws, verifies
    and reads the three rows (the memory ceiling); the loss slot returns their sum so the loads stay.
    """
    nnz = pairs.shape[0]
    likelihood = 1.0
    rescaled = 0
    correct = 0
    skipped = 0
    sink = np.float32(0.0)
    p, left = np.int64(first_pair), 0
    state, p, q, left = _draw_slots(state, first_pair, n_own, nnz, n_items, popularity, p, left, positive_run)
    u1, i1, j1, first1, buckets1 = _resolve(pairs, p, q, popularity)
    _prefetch_rows(user_factors, item_factors, item_bias, slots, first1, buckets1, u1, i1, j1)
    state, p, q, left = _draw_slots(state, first_pair, n_own, nnz, n_items, popularity, p, left, positive_run)
    u2, i2, j2, first2, buckets2 = _resolve(pairs, p, q, popularity)
    _prefetch_rows(user_factors, item_factors, item_bias, slots, first2, buckets2, u2, i2, j2)
    state, p, q, left = _draw_slots(state, first_pair, n_own, nnz, n_items, popularity, p, left, positive_run)
    _prefetch_pairs(pairs, p, q, popularity)
    k1 = np.int64(0)
    k2 = np.int64(0)
    if candidates > 1 and learn:
        state, k1 = _draw_negative(state, pairs, n_items, popularity)
        state, k2 = _draw_negative(state, pairs, n_items, popularity)
    for _ in range(count):
        u, i, j, k, first, buckets = u1, i1, j1, k1, first1, buckets1
        u1, i1, j1, k1, first1, buckets1 = u2, i2, j2, k2, first2, buckets2
        u2, i2, j2, first2, buckets2 = _resolve(pairs, p, q, popularity)
        _prefetch_rows(user_factors, item_factors, item_bias, slots, first2, buckets2, u2, i2, j2)
        if candidates > 1 and learn:
            state, k2 = _draw_negative(state, pairs, n_items, popularity)
            _prefetch_rows(user_factors, item_factors, item_bias, slots, first2, buckets2, u2, k2, k2)
        state, p, q, left = _draw_slots(state, first_pair, n_own, nnz, n_items, popularity, p, left, positive_run)
        _prefetch_pairs(pairs, p, q, popularity)
        state, j = _verified(state, pairs, slots, n_items, popularity, first, buckets, j)
        if j >= 0 and candidates > 1 and learn:
            state, j = _hardest(
                user_factors, item_factors, item_bias, pairs, slots, n_items, popularity,
                state, u, first, buckets, j, k, candidates,
            )  # fmt: skip
        if j < 0:
            skipped += 1
        elif learn:
            step_likelihood, right = _sgd_step(
                user_factors, item_factors, item_bias, u, i, j, lr, reg_user, reg_item, reg_bias
            )
            likelihood *= step_likelihood
            if likelihood < LIKELIHOOD_FLOOR:
                likelihood /= LIKELIHOOD_FLOOR
                rescaled += 1
            correct += right
        else:
            sink += _touch_rows(user_factors, item_factors, u, i, j)
    loss = rescaled * -np.log(LIKELIHOOD_FLOOR) - np.log(likelihood)
    return state, loss if learn else np.float64(sink), correct, skipped


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def train_epochs(
    user_factors, item_factors, item_bias, pairs, slots, n_items, popularity,
    states, samples_per_epoch, learning_rates, reg_user, reg_item, reg_bias, candidates, positive_run, learn,
    loss, correct, skipped,
):  # fmt: skip
    """Run len(learning_rates) epochs of `samples_per_epoch` triples, split over one chunk per state.

    Chunk t uses `states[t]` (updated in place) and writes its sums to loss/correct/skipped[t, epoch].
    One chunk (deterministic mode) is exactly reproducible; several run Hogwild in parallel.
    Without the GIL: the other models' threads (and the flow's) run Python meanwhile.
    """
    n_chunks = states.shape[0]
    n_epochs = learning_rates.shape[0]
    nnz = pairs.shape[0]
    reg_user, reg_item, reg_bias = np.float32(reg_user), np.float32(reg_item), np.float32(reg_bias)
    for t in prange(n_chunks):
        count = samples_per_epoch // n_chunks + (1 if t < samples_per_epoch % n_chunks else 0)
        first_pair = nnz * t // n_chunks
        n_own = nnz * (t + 1) // n_chunks - first_pair
        state = states[t]
        for e in range(n_epochs):
            lr = np.float32(learning_rates[e])
            state, chunk_loss, chunk_correct, chunk_skipped = _run_chunk(
                user_factors, item_factors, item_bias, pairs, slots, n_items,
                popularity, state, first_pair, n_own, count, lr, reg_user, reg_item, reg_bias, candidates,
                positive_run, learn,
            )  # fmt: skip
            loss[t, e] = chunk_loss
            correct[t, e] = chunk_correct
            skipped[t, e] = chunk_skipped
        states[t] = state
