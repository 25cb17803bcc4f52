"""What changed between the data the champion was trained on and this run's train data.

A retrain that promotes (or keeps) a champion says little without knowing how far the data moved: a
new model that wins on data full of unseen users is a different story from one that wins on the same
users a week later. So every registered version can carry `profile(train)`, a small JSON summary of
its train data (small enough for an MLflow model-version tag, whose limit is 5000 characters), and a
run compares the champion's profile and catalogue (its user and item ids) with its own train data in
`compare`, which is the `drift` block of the run report.

Histograms use bins fixed in this module, never bins derived from the data, so two profiles written
years apart by different datasets compare bin by bin; `BINS_VERSION` names the bin layout, and a
profile written with another layout compares as "unknown" (None) rather than wrongly.

PSI (population-stability index) over those bins: sum over bins of (p_now - p_before) * ln(p_now /
p_before), where each share p is floored at `PSI_EPSILON` (1e-4) so that a bin empty on one side
contributes a large but finite term instead of infinity, and a bin empty on both sides contributes 0.
The conventional reading: below 0.1 stable, 0.1 to 0.25 a moderate shift, above 0.25 a major one.

Pure library: no MLflow, no Prefect. Nothing returned here holds NaN or infinity (None instead), so
the block goes into JSON as it is.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import numpy as np

from mfpipe.data.interactions import Interactions

BINS_VERSION = 1
# Rating bins [0.5, 1.0), [1.0, 1.5), ..., [5.0, 5.5); a rating below 1.0 falls in the first, one of 5.0
# or more in the last (scales other than MovieLens' still get a histogram, coarser at its ends).
RATING_CUTS = np.arange(1.0, 5.01, 0.5)
# Interactions per user: [1, 2), [2, 4), ..., [8192, 16384), [16384, inf): powers of two (the counts
# are heavy-tailed, so equal-width bins would put almost every user in the first one).
ACTIVITY_CUTS = 2.0 ** np.arange(1, 15)
PSI_EPSILON = 1e-4
PSI_MODERATE = 0.1
PSI_MAJOR = 0.25
TOP_SHARE = 0.01  # popularity concentration: share of interactions on the top 1% of items


def profile(train: Interactions) -> dict[str, Any]:
    """A JSON-able summary of train data, small enough to be a model-version tag (a few hundred characters).

    Keys: `bins` (the bin layout), `rows`, `users`, `items` (those with at least one interaction),
    `rating_mean` and `rating_hist` (counts per rating bin; both None for data without ratings),
    `activity_hist` (users per interactions-per-user bin), `top1pct_share` (share of interactions on
    the most popular 1% of items, at least one item), `time_min` and `time_max` (Unix seconds).
    """
    rows = len(train)
    per_user = np.bincount(train.users, minlength=train.n_users)
    per_item = np.bincount(train.items, minlength=train.n_items)
    per_user, per_item = per_user[per_user > 0], per_item[per_item > 0]
    ratings = train.ratings
    rated = ratings is not None and rows > 0
    return {
        "bins": BINS_VERSION,
        "rows": rows,
        "users": len(per_user),
        "items": len(per_item),
        "rating_mean": _finite(float(np.mean(ratings, dtype=np.float64))) if rated else None,
        "rating_hist": _hist(ratings, RATING_CUTS) if rated else None,
        "activity_hist": _hist(per_user, ACTIVITY_CUTS),
        "top1pct_share": _top_share(per_item, rows),
        "time_min": int(train.timestamps.min()) if rows else None,
        "time_max": int(train.timestamps.max()) if rows else None,
    }


def compare(
    before: dict[str, Any] | None, before_user_ids: Any, before_item_ids: Any, now: Interactions
) -> dict[str, Any]:
    """The report's `drift` block: the champion's train data (`before`, its profile, and the ids of its
    catalogue) against this run's train data `now`.

    `new_users_share` / `new_items_share`: the share of this train's users / items (those with an
    interaction) the champion never saw, ids compared as strings; `new_users_interactions_share`: the
    share of this train's interactions by those users. `rating_psi`, `activity_psi`: PSI over the fixed
    bins (module docstring); `max_psi` the larger of those known and `psi_level` its reading
    (`stable`, `moderate`, `major`). A champion without a profile (`before` None, versions registered
    before profiles existed) still gets the id-based fields; every field it cannot know is None.
    """
    now_profile = profile(now)
    user_ids = np.asarray(now.user_ids).astype(str)
    item_ids = np.asarray(now.item_ids).astype(str)
    active_users = np.unique(now.users)
    new_user = ~np.isin(user_ids[active_users], np.asarray(before_user_ids).astype(str))
    new_item = ~np.isin(item_ids[np.unique(now.items)], np.asarray(before_item_ids).astype(str))
    by_new_user = np.zeros(now.n_users, bool)
    by_new_user[active_users[new_user]] = True
    before = before or {}
    same_bins = before.get("bins") == BINS_VERSION
    rating_psi = psi(before.get("rating_hist"), now_profile["rating_hist"]) if same_bins else None
    activity_psi = psi(before.get("activity_hist"), now_profile["activity_hist"]) if same_bins else None
    known = [value for value in (rating_psi, activity_psi) if value is not None]
    max_psi = max(known) if known else None
    return {
        "rows_before": before.get("rows"),
        "rows_now": now_profile["rows"],
        "users_before": before.get("users"),
        "users_now": now_profile["users"],
        "items_before": before.get("items"),
        "items_now": now_profile["items"],
        "new_users": int(new_user.sum()),
        "new_users_share": _share(int(new_user.sum()), len(new_user)),
        "new_items": int(new_item.sum()),
        "new_items_share": _share(int(new_item.sum()), len(new_item)),
        "new_users_interactions_share": _share(int(by_new_user[now.users].sum()), len(now)),
        "rating_mean_before": before.get("rating_mean"),
        "rating_mean_now": now_profile["rating_mean"],
        "rating_psi": rating_psi,
        "activity_psi": activity_psi,
        "max_psi": max_psi,
        "psi_level": psi_level(max_psi),
        "top1pct_share_before": before.get("top1pct_share"),
        "top1pct_share_now": now_profile["top1pct_share"],
        "time_max_before": _iso(before.get("time_max")),
        "time_max_now": _iso(now_profile["time_max"]),
    }


def psi(before: list[int] | None, now: list[int] | None) -> float | None:
    """PSI of two histograms over the same bins (counts); None when either is missing, empty or of
    another length (bins that do not line up cannot be compared)."""
    if before is None or now is None or len(before) != len(now) or sum(before) == 0 or sum(now) == 0:
        return None
    p = np.maximum(np.asarray(before, np.float64) / sum(before), PSI_EPSILON)
    q = np.maximum(np.asarray(now, np.float64) / sum(now), PSI_EPSILON)
    return _finite(float(np.sum((q - p) * np.log(q / p))))


def psi_level(value: float | None) -> str | None:
    """The conventional reading of a PSI: `stable` (< 0.1), `moderate` (< 0.25) or `major`."""
    if value is None:
        return None
    return "stable" if value < PSI_MODERATE else "moderate" if value < PSI_MAJOR else "major"


def drift_markdown(block: dict[str, Any]) -> str:
    """The drift block as a markdown table with a one-line verdict (a Prefect artifact)."""
    level = block.get("psi_level")
    verdict = "unknown (the champion has no data profile)" if level is None else level
    lines = [
        "## Data drift: champion's train data vs this run's",
        "",
        f"Largest PSI {_cell(block.get('max_psi'))}: **{verdict}** "
        "(PSI < 0.1 stable, 0.1-0.25 moderate, > 0.25 major).",
        "",
        "| measure | champion's data | this run |",
        "|---|---|---|",
    ]
    for label, key in (("rows", "rows"), ("users", "users"), ("items", "items"), ("rating mean", "rating_mean"),
                       ("top-1% items' share", "top1pct_share"), ("latest interaction", "time_max")):  # fmt: skip
        lines.append(f"| {label} | {_cell(block.get(f'{key}_before'))} | {_cell(block.get(f'{key}_now'))} |")
    lines += ["", "| change | value |", "|---|---|"]
    for label, key in (("new users", "new_users"), ("new users' share", "new_users_share"),
                       ("interactions by new users", "new_users_interactions_share"), ("new items", "new_items"),
                       ("new items' share", "new_items_share"), ("rating PSI", "rating_psi"),
                       ("activity PSI", "activity_psi")):  # fmt: skip
        lines.append(f"| {label} | {_cell(block.get(key))} |")
    return "\n".join(lines) + "\n"


def _hist(values: np.ndarray, cuts: np.ndarray) -> list[int]:
    """Counts per bin: bin 0 below cuts[0], bin i in [cuts[i-1], cuts[i]), the last at cuts[-1] or above."""
    index = np.searchsorted(cuts, np.asarray(values, np.float64), side="right")
    return np.bincount(index, minlength=len(cuts) + 1).astype(int).tolist()


def _top_share(per_item: np.ndarray, rows: int) -> float | None:
    if rows == 0:
        return None
    top = max(1, math.ceil(TOP_SHARE * len(per_item)))
    return _finite(float(np.sort(per_item)[::-1][:top].sum() / rows))


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _iso(seconds: int | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
