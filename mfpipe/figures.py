"""The plots logged to the run in MLflow: learning curves, metrics with intervals, NDCG by user activity.

Each returns a matplotlib figure on the Agg backend (no display; safe in worker threads), or None when
no model has what the plot shows.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd

from mfpipe.evaluation import METRICS, display_name
from mfpipe.report import ModelResult
from mfpipe.split import Split

ACTIVITY_BUCKETS = (1, 20, 50, 100, 200)  # train interactions per user: 1-19, 20-49, ..., 200+


def _figure(width: float = 7.0, height: float = 4.0, ncols: int = 1) -> tuple[Any, Any]:
    """A figure on the Agg backend (no display; safe in worker threads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height))


def learning_curves(results: list[ModelResult]) -> Any | None:
    """Loss and validation NDCG@10 per epoch for the models that record them."""
    curves = [r for r in results if r.history.get("epoch_loss")]
    if not curves:
        return None
    fig, (loss_ax, ndcg_ax) = _figure(10, 4, ncols=2)
    for r in curves:
        loss = r.history["epoch_loss"]
        loss_ax.plot(range(1, len(loss) + 1), loss, label=r.model)
        ndcg = r.history.get("epoch_ndcg_at_10", [])
        steps = r.history.get("eval_epoch") or list(range(1, len(ndcg) + 1))
        if ndcg:
            ndcg_ax.plot(steps[: len(ndcg)], ndcg, marker="o", label=r.model)
    loss_ax.set(title="training loss", xlabel="epoch")
    ndcg_ax.set(title="validation NDCG@10 (sample)", xlabel="epoch")
    loss_ax.legend()
    ndcg_ax.legend()
    fig.tight_layout()
    return fig


def metric_comparison(results: list[ModelResult], k: int) -> Any | None:
    """Bars of each metric per model with 95% intervals (warm users)."""
    done = [r for r in results if r.evaluation is not None]
    if not done:
        return None
    fig, ax = _figure(9, 4)
    width = 0.8 / len(done)
    x = np.arange(len(METRICS))
    for i, r in enumerate(done):
        means = np.array([r.evaluation.warm[m].mean for m in METRICS])
        ci = np.array([r.evaluation.warm[m].ci95 for m in METRICS], dtype=float)
        err = np.abs(np.vstack([means - ci[:, 0], ci[:, 1] - means]))
        ax.bar(x + i * width, means, width, yerr=np.nan_to_num(err), capsize=2, label=r.model)
    ax.set_xticks(x + width * (len(done) - 1) / 2, [display_name(m, k) for m in METRICS])
    ax.set(title="validation metrics, warm users (95% bootstrap interval)")
    ax.legend()
    fig.tight_layout()
    return fig


def activity_buckets(split: Split) -> pd.Series:
    """Label per train user: how many train interactions it has (bucketed)."""
    counts = np.bincount(split.train.users, minlength=split.train.n_users)
    edges = [*ACTIVITY_BUCKETS, np.inf]
    labels = [f"{lo}-{hi - 1}" if np.isfinite(hi) else f"{lo}+" for lo, hi in itertools.pairwise(edges)]
    return pd.Series(pd.cut(counts, edges, right=False, labels=labels))


def ndcg_by_activity(results: list[ModelResult], split: Split, k: int) -> Any | None:
    """Mean NDCG@k of warm users grouped by how active they were in train."""
    done = [r for r in results if r.evaluation is not None]
    if not done:
        return None
    buckets = activity_buckets(split)
    fig, ax = _figure(8, 4)
    labels = list(buckets.cat.categories)
    width = 0.8 / len(done)
    for i, r in enumerate(done):
        per_user = r.evaluation.per_user
        warm = per_user[per_user["warm"]]
        means = warm.groupby(buckets.iloc[warm["user"].to_numpy()].to_numpy(), observed=False)["ndcg"].mean()
        ax.bar(np.arange(len(labels)) + i * width, [means.get(b, np.nan) for b in labels], width, label=r.model)
    ax.set_xticks(np.arange(len(labels)) + width * (len(done) - 1) / 2, labels)
    ax.set(title=f"NDCG@{k} by user activity", xlabel="train interactions per user", ylabel=f"NDCG@{k}")
    ax.legend()
    fig.tight_layout()
    return fig


def all_figures(results: list[ModelResult], split: Split, k: int) -> dict[str, Any]:
    """Artifact path -> figure, for the figures that have something to show."""
    figures = {
        "plots/learning_curves.png": learning_curves(results),
        "plots/metric_comparison.png": metric_comparison(results, k),
        "plots/ndcg_by_activity.png": ndcg_by_activity(results, split, k),
    }
    return {path: fig for path, fig in figures.items() if fig is not None}
