"""`figures.factor_report`: the strongest latent dimensions and the items at both of their ends."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.figure import Figure

from mfpipe.figures import factor_report

N_ITEMS, N_FACTORS = 40, 6
STRONG, SECOND = 2, 5  # planted: column 2 spreads most, column 5 next


def _planted() -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Small noise everywhere; columns 2 and 5 carry planted items far out at both ends."""
    rng = np.random.default_rng(0)
    factors = rng.uniform(-0.3, 0.3, size=(N_ITEMS, N_FACTORS))
    factors[[10, 11, 12], STRONG] = [9.0, 8.0, 7.0]
    factors[[20, 21, 22], STRONG] = [-9.0, -8.0, -7.0]
    factors[[1, 2, 3], SECOND] = [3.0, 2.5, 2.0]
    factors[[30, 31, 32], SECOND] = [-3.0, -2.5, -2.0]
    ids = np.array([f"m{i}" for i in range(N_ITEMS)])
    titles = {"m10": "Alien (1979)", "m20": "Toy Story (1995)", "m1": "Heat (1995)", "m32": "Fargo (1996)"}
    return factors, ids, titles


def _panels(fig: Figure) -> list[tuple[str, list[str]]]:
    """(title, item labels from top to bottom) of each panel."""
    return [(ax.get_title(), [t.get_text() for t in ax.get_yticklabels()]) for ax in fig.axes]


def test_picks_the_strongest_dimensions_and_the_items_at_both_ends() -> None:
    factors, ids, titles = _planted()
    fig = factor_report(factors, ids, titles, dims=2, top=3)

    panels = _panels(fig)
    assert [title.split(":")[0] for title, _ in panels] == [f"dimension {STRONG}", f"dimension {SECOND}"]
    # Highest first down to the lowest; a title where known, else the id.
    assert panels[0][1] == ["Alien (1979)", "m11", "m12", "m22", "m21", "Toy Story (1995)"]
    assert panels[1][1] == ["Heat (1995)", "m2", "m3", "Fargo (1996)", "m31", "m30"]
    share = factors.var(axis=0)[STRONG] / factors.var(axis=0).sum()
    assert f"({share:.0%} of all dimensions)" in panels[0][0]
    fig.savefig(io.BytesIO(), format="png")  # it renders


def test_the_sign_of_a_dimension_does_not_change_which_items_it_shows() -> None:
    factors, ids, titles = _planted()
    flipped = factors.copy()
    flipped[:, STRONG] *= -1
    panel = _panels(factor_report(flipped, ids, titles, dims=1, top=3))[0]
    assert panel[1] == ["Toy Story (1995)", "m21", "m22", "m12", "m11", "Alien (1979)"]


def test_fewer_factors_or_items_than_asked() -> None:
    factors, ids, titles = _planted()
    assert len(factor_report(factors, ids, titles, dims=10).axes) == N_FACTORS
    few = factor_report(factors[:5], ids[:5], {}, dims=1, top=5)  # 5 items: 2 at each end
    assert len(_panels(few)[0][1]) == 4


def test_mismatched_or_empty_input_is_an_error() -> None:
    factors, ids, titles = _planted()
    with pytest.raises(ValueError, match="item ids"):
        factor_report(factors, ids[:-1], titles)
    with pytest.raises(ValueError, match="items x factors"):
        factor_report(np.zeros((0, 4)), np.array([]), titles)
    with pytest.raises(ValueError, match=">= 1"):
        factor_report(factors, ids, titles, top=0)


def test_the_longest_item_label_fits_in_the_figure() -> None:
    factors, ids, _ = _planted()
    long = {"m10": "A" * 60, "m20": "The Adventures of Milo and Otis (Koneko monogatari) (1986)"}
    fig = factor_report(factors, ids, long)
    fig.savefig(io.BytesIO(), format="png")
    labels = [label for ax in fig.axes for label in ax.get_yticklabels()]
    assert min(label.get_window_extent().x0 for label in labels) >= 0
