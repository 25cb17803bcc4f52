"""numba's thread count, set for a block of work: the one place every caller sets and restores it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numba


@contextmanager
def numba_threads(n: int) -> Iterator[None]:
    """numba's parallel loops in this (Python) thread use `n` threads inside the block (numba's setting
    is per thread, so concurrent fits and evaluations each keep their own)."""
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(previous)
