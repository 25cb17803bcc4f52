"""The plots logged to the run in MLflow: learning curves, metrics with intervals, NDCG by user activity,
and what a model's strongest latent dimensions mean (`factor_report`).

Each returns a matplotlib figure outside pyplot (no display; safe in worker threads), or None when
no model has what the plot shows.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mfpipe.evaluation import METRICS, display_name
from mfpipe.report import ModelResult
from mfpipe.split import Split

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ACTIVITY_BUCKETS = (1, 20, 50, 100, 200)  # train interactions per user: 1-19, 20-49, ..., 200+


def _figure(width: float = 7.0, height: float = 4.0, ncols: int = 1) -> tuple[Any, Any]:
    """A figure outside pyplot: no display, no global figure registry, so threads may draw several at once."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, ncols)


def learning_curves(results: list[ModelResult]) -> Any | None:
    """Loss per epoch, and NDCG@10 on the pairs a model holds out of its train part to stop early."""
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
    ndcg_ax.set(title="early-stopping NDCG@10 (held-out train pairs)", xlabel="epoch")
    for ax in (loss_ax, ndcg_ax):
        if ax.lines:
            ax.legend()
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


def factor_report(
    item_factors: np.ndarray, item_ids: np.ndarray, titles: dict[str, str], dims: int = 4, top: int = 5
) -> Figure:
    """What the strongest latent dimensions mean: for each, the `top` items at either end, titles when known.

    `item_factors` is items x factors (row i belongs to `item_ids[i]`); the dimensions shown are the
    `dims` columns with the largest variance over the items (ties: lower column first), strongest
    first. A dimension's sign is arbitrary, so both ends are listed: the highest values (top half of
    its panel, highest first) and the lowest (bottom half, lowest last). Items are labelled with
    `titles[str(id)]`, else their id. With fewer than 2 x `top` items, each end gets half of them.
    Returns a matplotlib Figure (Agg, no pyplot state), one panel per dimension.
    """
    from matplotlib.figure import Figure

    factors = np.asarray(item_factors, dtype=np.float64)
    ids = np.asarray(item_ids).astype(str)
    if factors.ndim != 2 or factors.shape[0] == 0 or factors.shape[1] == 0:
        raise ValueError(f"item_factors must be a non-empty items x factors matrix, got shape {factors.shape}")
    if ids.shape != (factors.shape[0],):
        raise ValueError(f"{ids.size} item ids for {factors.shape[0]} rows of item factors")
    if dims < 1 or top < 1:
        raise ValueError(f"dims and top must be >= 1, got dims={dims}, top={top}")
    variance = factors.var(axis=0)
    total = float(variance.sum())
    strongest = np.argsort(-variance, kind="stable")[:dims]
    per_end = min(top, max(1, factors.shape[0] // 2))

    ends = [_ends(factors[:, dim], per_end) for dim in strongest]
    labels = [[titles.get(item, item)[:60] for item in ids[picked]] for picked in ends]
    fig = Figure(figsize=(9.0, 0.8 + len(strongest) * (0.45 * 2 * per_end + 0.7)))
    axes = fig.subplots(len(strongest), 1, squeeze=False)[:, 0]
    _make_room(fig, [name for names in labels for name in names], per_end)
    for ax, dim, picked, names in zip(axes, strongest, ends, labels, strict=True):
        values = factors[:, dim]
        y = np.arange(len(picked))[::-1]
        colours = ["tab:blue"] * per_end + ["tab:orange"] * per_end
        ax.barh(y, values[picked], color=colours)
        ax.set_yticks(y, names, fontsize=8)
        ax.axvline(0.0, color="grey", linewidth=0.8)
        share = float(variance[dim]) / total if total > 0 else 0.0
        ax.set_title(f"dimension {dim}: variance {variance[dim]:.3g} ({share:.0%} of all dimensions)", fontsize=10)
    axes[-1].set_xlabel("item factor value")
    fig.suptitle(f"The {len(strongest)} strongest latent dimensions: the {per_end} items at each end")
    return fig


def _ends(values: np.ndarray, per_end: int) -> np.ndarray:
    """Rows of the `per_end` highest values (highest first), then of the `per_end` lowest (lowest last)."""
    order = np.argsort(values, kind="stable")
    return np.concatenate([order[::-1][:per_end], order[:per_end][::-1]])


def _make_room(fig: Figure, labels: list[str], per_end: int) -> None:
    """Margins that fit the longest item label, measured once, in place of a layout engine.

    A constrained layout measures every tick label of every panel on each draw, and saving draws
    twice: about half the time of rendering this tall figure (seconds per run, for three models).
    """
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    width, height = fig.get_size_inches()
    renderer, font = RendererAgg(1, 1, fig.dpi), FontProperties(size=8)
    label = max(renderer.get_text_width_height_descent(text, font, ismath=False)[0] for text in labels) / fig.dpi
    panel = 0.45 * 2 * per_end
    fig.subplots_adjust(left=(label + 0.25) / width, right=1 - 0.2 / width, top=1 - 0.95 / height,
                        bottom=0.55 / height, hspace=0.7 / panel)  # fmt: skip


def all_figures(results: list[ModelResult], split: Split, k: int) -> dict[str, Any]:
    """Artifact path -> figure, for the figures that have something to show."""
    figures = {
        "plots/learning_curves.png": learning_curves(results),
        "plots/metric_comparison.png": metric_comparison(results, k),
        "plots/ndcg_by_activity.png": ndcg_by_activity(results, split, k),
    }
    return {path: fig for path, fig in figures.items() if fig is not None}
