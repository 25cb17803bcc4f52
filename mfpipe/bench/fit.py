"""Benchmark: end-to-end fit time of every model on 1M synthetic interactions, and ALS seconds/iteration.

Nothing outside measures our fit pipeline, so each model's peer is the library it wraps called directly
with the same hyperparameters and threads on input prepared beforehand (implicit ALS on the prebuilt
confidence CSR, Surprise SVD on a prebuilt trainset, implicit BPR for our numba BPR, pandas
`value_counts` for popularity). For the wrappers (svd, als) the ratio is our overhead (input building,
parameter export), ~1 means none; for bpr it is a real algorithm comparison at equal epochs (implicit
samples negatives by popularity, ours uniformly: quality is the BPR benchmark's business). ALS
seconds per iteration are fit seconds / iterations on each side (ours includes building the
confidence matrix, the peer not). Medians of interleaved runs (ours, peer, ...); numba JIT warmed up
on a small slice first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from mfpipe.bench import BenchResult, benchmark, interleaved

FIT_MODELS = ("als", "svd", "bpr", "pop")


def _peer(name: str, model: Any, data: Any, threads: int) -> tuple[Callable[[], Any], str]:
    """A zero-argument callable fitting the wrapped library directly, and its name."""
    if name == "als":
        confidence = model.confidence(data)
        return lambda: model.implicit_model().fit(confidence, show_progress=False), "implicit ALS (direct call)"
    if name == "svd":
        import surprise

        from mfpipe.models.svd import surprise_trainset

        trainset = surprise_trainset(data)
        params = model.params.model_dump()
        return lambda: surprise.SVD(**params, random_state=model.seed).fit(trainset), "surprise SVD (direct call)"
    if name == "bpr":
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        p = model.params
        matrix = data.csr(np.ones(len(data), np.float32))

        def implicit_bpr() -> None:
            BayesianPersonalizedRanking(
                factors=p.factors, learning_rate=p.learning_rate, regularization=p.reg_item,
                iterations=p.epochs, num_threads=threads, random_state=model.seed,
            ).fit(matrix, show_progress=False)  # fmt: skip

        return implicit_bpr, "implicit BPR (same factors, epochs, threads)"
    import pandas as pd

    items = pd.Series(data.items)
    return lambda: items.value_counts(), "pandas value_counts"


@benchmark("fit")
def fit_benchmark(
    n_interactions: int = 1_000_000,
    models: tuple[str, ...] = FIT_MODELS,
    repeats: int = 3,
    threads: int | None = None,
    seed: int = 42,
    report: Callable[[str], None] = lambda message: None,
) -> list[BenchResult]:
    """Median end-to-end fit seconds of each model vs its library called directly (see module docstring)."""
    from mfpipe.data.synthetic import generate, size_label
    from mfpipe.models import create

    threads = threads or os.cpu_count() or 1
    report(f"generating {size_label(n_interactions)} synthetic interactions")
    data = generate(n_interactions, seed=seed)
    results = []
    for name in models:
        report(f"{name}: {repeats} interleaved fits (ours, peer)")
        model = create(name, threads=threads, seed=seed)
        if name == "bpr":  # compile (or load the cached) JIT kernels outside the timings
            create(name, {"epochs": 1}, threads=threads).fit(generate(10_000, seed=seed))
        peer, peer_name = _peer(name, model, data, threads)
        ours_seconds, peer_seconds = interleaved(lambda m=model: m.fit(data), peer, repeats=repeats, warmup=False)
        details: dict[str, Any] = {
            "interactions": len(data),
            "users": data.n_users,
            "items": data.n_items,
            "threads": threads,
            "params": model.params.model_dump(),
        }
        if name == "als":
            iterations = model.params.iterations
            details |= {
                "ours_s_per_iteration": ours_seconds / iterations,
                "peer_s_per_iteration": peer_seconds / iterations,
            }
        results.append(
            BenchResult(
                benchmark="fit",
                case=f"{name} synthetic-{size_label(n_interactions)}",
                unit="s",
                ours=ours_seconds,
                peer=peer_seconds,
                peer_name=peer_name,
                details=details,
            )
        )
    return results
