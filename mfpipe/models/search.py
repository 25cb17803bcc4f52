"""Random search over a small per-model space, scored by warm-user NDCG@k on the validation split.

Trial 0 is always the model's defaults, so a search can only report something at least as good as
them on the data it ran on (it picks on validation: report the chosen model on a test slice or another
seed before trusting the gain). Draws are distinct points of the grid, seeded.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mfpipe.errors import MfpipeError
from mfpipe.models import create
from mfpipe.split import Split

SPACES: dict[str, dict[str, list[Any]]] = {
    "svd": {
        "n_factors": [10, 20, 50, 100, 200],
        "n_epochs": [3, 5, 10, 20, 40],
        "lr_all": [0.001, 0.002, 0.005, 0.01],
        "reg_all": [0.02, 0.05, 0.1, 0.2, 0.5],
        "init_std_dev": [0.01, 0.05, 0.1],
    },
    "als": {
        "factors": [16, 32, 64, 128],
        "regularization": [0.01, 0.05, 0.1, 1.0, 10.0, 30.0],
        "alpha": [0.25, 0.5, 1.0, 2.0, 5.0, 10.0],
        "iterations": [5, 10, 15, 20],
        "binary": [False, True],
    },
    "bpr": {
        "factors": [32, 64, 128],
        "learning_rate": [0.01, 0.02, 0.05, 0.1],
        "reg_user": [0.0001, 0.001, 0.01],
        "reg_item": [0.0001, 0.001, 0.01],
        "negative_sampling": ["uniform", "popularity"],
    },
    "pop": {
        "window_days": [None, 30, 90, 180, 365, 730],
        "min_rating": [None, 3.0, 3.5, 4.0],
    },
}


@dataclass(frozen=True)
class Trial:
    params: dict[str, Any]
    ndcg: float
    seconds: float


@dataclass
class SearchResult:
    model: str
    k: int
    trials: list[Trial] = field(default_factory=list)

    @property
    def best(self) -> Trial:
        return max(self.trials, key=lambda t: t.ndcg)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "k": self.k,
            "best": {"params": self.best.params, f"ndcg@{self.k}": self.best.ndcg},
            "trials": [{"params": t.params, f"ndcg@{self.k}": t.ndcg, "seconds": t.seconds} for t in self.trials],
        }


def candidates(name: str, n_trials: int, seed: int) -> list[dict[str, Any]]:
    """Defaults ({}) then up to n_trials - 1 distinct random points of the model's grid."""
    if name not in SPACES:
        raise MfpipeError(f"no search space for model '{name}'; choose from {', '.join(SPACES)}")
    if n_trials < 1:
        raise MfpipeError(f"--search needs at least 1 trial, got {n_trials}")
    space = SPACES[name]
    grid = list(itertools.product(*space.values()))
    picks = np.random.default_rng(seed).permutation(len(grid))[: n_trials - 1]
    return [{}] + [dict(zip(space, grid[i], strict=True)) for i in picks]


def search(
    name: str, split: Split, n_trials: int = 20, seed: int = 42, k: int = 10, threads: int | None = None
) -> SearchResult:
    """Fit each candidate on split.train and score it on the validation users (warm NDCG@k)."""
    from mfpipe.evaluation import evaluate_model

    validation = split.truth("validation")[: split.train.n_users]
    result = SearchResult(name, k)
    for params in candidates(name, n_trials, seed):
        start = time.perf_counter()
        model = create(name, params, threads=threads, seed=seed).fit(split.train, validation)
        ndcg = evaluate_model(model, split, k, seed=seed).warm["ndcg"].mean
        result.trials.append(Trial(params, float(ndcg), time.perf_counter() - start))
    return result
