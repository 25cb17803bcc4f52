"""Drift between the champion's train data and this run's: profile, PSI, new users/items, the markdown."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mfpipe import drift
from mfpipe.config import DataOptions
from mfpipe.data import read_frame, to_interactions
from mfpipe.data.interactions import Interactions
from tests.conftest import require

ML_SMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"


def make(
    pairs: list[tuple[str, str]], ratings: list[float] | None = None, user_ids: list[str] | None = None
) -> Interactions:
    """Interactions from (user id, item id) pairs, timestamps 0, 1, 2, ...; `user_ids` may add users
    without any interaction to the index map."""
    users = list(dict.fromkeys([u for u, _ in pairs] + (user_ids or [])))
    items = list(dict.fromkeys(i for _, i in pairs))
    return Interactions(
        user_ids=np.array(users),
        item_ids=np.array(items),
        users=np.array([users.index(u) for u, _ in pairs], np.int32),
        items=np.array([items.index(i) for _, i in pairs], np.int32),
        ratings=None if ratings is None else np.array(ratings, np.float32),
        timestamps=np.arange(len(pairs), dtype=np.int64),
    )


def block(before: Interactions, now: Interactions) -> dict:
    """The drift block as a run computes it: the champion's profile read back from its tag (JSON)."""
    tag = json.dumps(drift.profile(before))
    return drift.compare(json.loads(tag), before.user_ids, before.item_ids, now)


def test_identical_data_has_no_drift():
    data = make([("u1", "i1"), ("u1", "i2"), ("u2", "i1"), ("u3", "i3")], [4.0, 3.5, 5.0, 1.0])
    out = block(data, data)
    assert out["rating_psi"] == 0.0 and out["activity_psi"] == 0.0 and out["max_psi"] == 0.0
    assert out["new_users_share"] == 0.0 and out["new_items_share"] == 0.0
    assert out["new_users_interactions_share"] == 0.0
    assert out["rows_before"] == out["rows_now"] == 4
    assert out["rating_mean_before"] == out["rating_mean_now"] == pytest.approx(13.5 / 4)
    assert out["psi_level"] == "stable"


def test_rating_psi_by_hand():
    pairs = [("u1", "i1"), ("u2", "i1"), ("u3", "i1"), ("u4", "i1")]
    before = make(pairs, [1.0, 1.0, 5.0, 5.0])  # bins 1.0 and 5.0: 1/2, 1/2
    now = make(pairs, [1.0, 5.0, 5.0, 5.0])  # 1/4, 3/4; the eight other bins empty on both sides: 0
    expected = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    out = block(before, now)
    assert out["rating_psi"] == pytest.approx(expected, rel=1e-12)
    assert out["activity_psi"] == 0.0  # one interaction per user on both sides
    assert out["max_psi"] == out["rating_psi"]
    assert out["psi_level"] == "major"  # 0.2747


def test_a_bin_empty_on_one_side_counts_with_epsilon():
    pairs = [("u1", "i1"), ("u2", "i1")]
    out = block(make(pairs, [1.0, 1.0]), make(pairs, [1.0, 5.0]))
    eps = drift.PSI_EPSILON
    expected = (0.5 - 1.0) * math.log(0.5 / 1.0) + (0.5 - eps) * math.log(0.5 / eps)
    assert out["rating_psi"] == pytest.approx(expected, rel=1e-12)


def test_new_users_and_items_shares_compare_ids_as_strings():
    before_users, before_items = np.array([1, 2, 3]), np.array([10, 20])  # the champion's catalogue, as numbers
    now = make(
        [("2", "20"), ("3", "20"), ("4", "30"), ("5", "20"), ("5", "10"), ("3", "10")],
        user_ids=["9"],  # in the index map without an interaction: not one of this train's users
    )
    out = drift.compare(None, before_users, before_items, now)
    assert (out["new_users"], out["new_users_share"]) == (2, 2 / 4)  # 4 and 5 of 2, 3, 4, 5
    assert (out["new_items"], out["new_items_share"]) == (1, 1 / 3)  # 30 of 10, 20, 30
    assert out["new_users_interactions_share"] == 3 / 6
    # No profile (a version registered before profiles existed): what needs one is unknown, not zero.
    for key in ("rows_before", "rating_mean_before", "rating_psi", "activity_psi", "max_psi", "psi_level"):
        assert out[key] is None
    assert out["rows_now"] == 6


def test_implicit_data_has_no_rating_fields():
    before = make([("u1", "i1"), ("u2", "i2")])
    now = make([("u1", "i1"), ("u1", "i2"), ("u2", "i2")])
    assert drift.profile(now)["rating_hist"] is None and drift.profile(now)["rating_mean"] is None
    out = block(before, now)
    assert out["rating_mean_before"] is None and out["rating_mean_now"] is None and out["rating_psi"] is None
    assert out["activity_psi"] is not None and out["activity_psi"] > 0
    assert out["max_psi"] == out["activity_psi"]


def test_activity_bins_are_powers_of_two():
    pairs = [("a", "i1")] + [("b", f"i{n}") for n in range(3)] + [("c", f"i{n}") for n in range(4)]
    hist = drift.profile(make(pairs))["activity_hist"]
    assert len(hist) == len(drift.ACTIVITY_CUTS) + 1
    assert hist[:3] == [1, 1, 1]  # 1 in [1, 2), 3 in [2, 4), 4 in [4, 8)
    assert sum(hist) == 3


def test_profile_of_another_bin_layout_is_not_compared():
    data = make([("u1", "i1"), ("u2", "i1")], [4.0, 2.0])
    old = {**drift.profile(data), "bins": drift.BINS_VERSION + 1}
    out = drift.compare(old, data.user_ids, data.item_ids, data)
    assert out["rating_psi"] is None and out["activity_psi"] is None and out["rows_before"] == 2


def test_ml_latest_small_profile_fits_in_a_tag_and_nothing_is_nan(tmp_path):
    require((ML_SMALL / "ratings.csv").is_file(), f"{ML_SMALL} missing")
    data = to_interactions(read_frame(str(ML_SMALL), DataOptions(), tmp_path))
    summary = drift.profile(data)
    text = json.dumps(summary, allow_nan=False)
    assert json.loads(text) == summary
    assert len(text) < 5000
    assert (summary["rows"], summary["users"], summary["items"]) == (100836, 610, 9724)
    assert sum(summary["rating_hist"]) == 100836
    assert sum(summary["activity_hist"]) == 610
    older = make([(str(u), str(i)) for u, i in [(1, 1), (2, 50), (3, 1)]], [4.0, 3.0, 5.0])
    out = block(older, data)
    json.dumps(out, allow_nan=False)
    assert out["new_users_share"] == pytest.approx(607 / 610)
    assert out["max_psi"] > 0


def test_markdown_shows_the_block():
    pairs = [("u1", "i1"), ("u2", "i1")]
    text = drift.drift_markdown(block(make(pairs, [1.0, 1.0]), make([*pairs, ("u3", "i2")], [1.0, 5.0, 5.0])))
    assert "| new users | 1 |" in text and "| new users' share | 0.3333 |" in text
    assert "**major**" in text
    unknown = drift.drift_markdown(drift.compare(None, ["u1"], ["i1"], make(pairs)))
    assert "unknown" in unknown and "| rows | - | 2 |" in unknown
