"""Benchmarks against peer libraries, each reported as a ratio against the peer measured in the same run.

A benchmark is a function registered with `@benchmark("name")` that returns `BenchResult`s. Timings
use `interleaved`: ours, peer, ours, peer, ... (at least 3 each), medians, warm-up (JIT compile)
excluded, so drift of a shared machine hits both sides alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

BENCHMARKS: dict[str, Callable[..., list[BenchResult]]] = {}


@dataclass
class BenchResult:
    """One comparison. `ratio` > 1 means ours is better (faster, or higher throughput)."""

    benchmark: str
    case: str
    unit: str  # e.g. "samples/s" (higher is better) or "s" (lower is better)
    ours: float
    peer: float
    peer_name: str
    target: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        return self.unit != "s"

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.ours / self.peer if self.peer else float("inf")
        return self.peer / self.ours if self.ours else float("inf")

    @property
    def passed(self) -> bool | None:
        return None if self.target is None else self.ratio >= self.target

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "passed": self.passed}


def benchmark(name: str) -> Callable[[Callable[..., list[BenchResult]]], Callable[..., list[BenchResult]]]:
    """Register a benchmark under `name` (what `mfpipe bench --only NAME` selects)."""

    def register(fn: Callable[..., list[BenchResult]]) -> Callable[..., list[BenchResult]]:
        BENCHMARKS[name] = fn
        return fn

    return register


def interleaved(
    ours: Callable[[], Any], peer: Callable[[], Any], repeats: int = 3, warmup: bool = True
) -> tuple[float, float]:
    """Median wall seconds of `ours` and `peer`, run alternately `repeats` times each after one warm-up."""
    if warmup:
        ours()
        peer()
    ours_times: list[float] = []
    peer_times: list[float] = []
    for _ in range(repeats):
        for fn, times in ((ours, ours_times), (peer, peer_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ours_times), statistics.median(peer_times)
