"""Fit one model on a split's train part: its share of the cores, the divergence check, the `Trained` result.

The flow runs one `train_model` per model in parallel (a Prefect task each); this module decides how
many threads each gets and what a finished fit hands on to evaluation and recording.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mfpipe.config import Config
from mfpipe.errors import MfpipeError
from mfpipe.models import create
from mfpipe.models.base import Recommender
from mfpipe.split import Split


def thread_budget(models: list[str], threads: int) -> int:
    """Threads per training task so the parallel tasks together fit the machine.

    The popularity baseline is a bincount and needs no share; the others split the cores evenly.
    """
    heavy = max(1, sum(1 for m in models if m != "pop"))
    return max(1, threads // heavy)


@dataclass
class Trained:
    """A fitted model and what it took to fit it."""

    name: str
    model: Recommender
    train_seconds: float
    threads: int
    params: dict[str, Any]


def train_model(name: str, split: Split, config: Config, threads: int) -> Trained:
    """Fit one model on the train slice with `threads` threads for BLAS, numba and implicit.

    The validation truth is passed for models that record learning curves or stop early. A model whose
    scores come out non-finite (diverged) is an error, so it is reported failed, never promoted.
    """
    from threadpoolctl import threadpool_limits

    model = create(name, config.model_params.get(name), threads=threads, seed=config.seed)
    started = time.perf_counter()
    with threadpool_limits(limits=threads, user_api="blas"):
        model.fit(split.train, split.truth("validation"))
    seconds = time.perf_counter() - started
    probe = np.arange(min(split.train.n_users, 256))
    _, scores = model.recommend(probe, 10, exclude_seen=False)
    if np.isnan(scores).any() or np.isposinf(scores).any():
        raise MfpipeError(f"{name}: training diverged (non-finite scores); check its parameters", exit_code=1)
    return Trained(name, model, seconds, threads, model.params.model_dump(mode="json"))
