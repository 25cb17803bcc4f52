"""Spec resolution, dataset names, frame -> Interactions (duplicates)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mfpipe.config import DataOptions
from mfpipe.data import dataset_name, read_frame, synthetic_size, to_interactions
from mfpipe.data.synthetic import generate
from mfpipe.errors import MfpipeError


def frame_of(rows: list[tuple], with_ratings: bool = True) -> pd.DataFrame:
    columns = ["user_id", "item_id", "rating", "timestamp"] if with_ratings else ["user_id", "item_id", "timestamp"]
    frame = pd.DataFrame(rows, columns=columns).astype({"user_id": "str", "item_id": "str", "timestamp": "float64"})
    frame.attrs.update(name="t", source="t.csv")
    return frame


def test_duplicates_keep_the_latest_and_ties_the_last_row():
    frame = frame_of(
        [
            ("a", "x", 1.0, 10.0),
            ("b", "y", 2.0, 5.0),
            ("a", "x", 2.0, 30.0),  # latest of (a, x) ...
            ("a", "x", 3.0, 20.0),
            ("b", "y", 4.0, 5.0),  # tie on (b, y): the last row wins
            ("a", "y", 5.0, 1.0),
        ]
    )
    data = to_interactions(frame)
    assert data.duplicates_removed == 3
    out = data.to_frame()
    assert out[["user_id", "item_id"]].values.tolist() == [["a", "x"], ["b", "y"], ["a", "y"]]  # file order
    assert out["rating"].tolist() == [2.0, 4.0, 5.0] and out["timestamp"].tolist() == [30, 5, 1]


def test_index_maps_and_dtypes():
    data = to_interactions(frame_of([("u9", "i1", 4.0, 1.5), ("u1", "i1", 3.0, 2.0), ("u9", "i2", 5.0, 3.0)]))
    assert data.user_ids.tolist() == ["u9", "u1"] and data.item_ids.tolist() == ["i1", "i2"]
    assert data.users.dtype == np.int32 and data.items.dtype == np.int32
    assert data.timestamps.dtype == np.int64 and data.timestamps.tolist() == [1, 2, 3]
    assert data.ratings.dtype == np.float32 and data.name == "t" and data.source == "t.csv"


def test_implicit_data_has_no_ratings():
    data = to_interactions(frame_of([("u", "i", 1.0), ("v", "i", 2.0)], with_ratings=False))
    assert data.ratings is None and len(data) == 2


def test_missing_ids_are_refused_with_the_source():
    frame = frame_of([("u", "i", 4.0, 1.0), (None, "i", 4.0, 2.0)])
    with pytest.raises(MfpipeError, match=r"t\.csv: missing values in 'user_id'"):
        to_interactions(frame)


@pytest.mark.parametrize(
    ("spec", "n"),
    [("synthetic", 100_000), ("synthetic:5000", 5000), ("synthetic:100k", 100_000), ("synthetic:1M", 10**6)],
)
def test_synthetic_sizes(spec, n):
    assert synthetic_size(spec) == n


@pytest.mark.parametrize("spec", ["synthetic:abc", "movielens", "ml-7m", "synthetic:"])
def test_unknown_spec_lists_the_accepted_forms(tmp_path, spec):
    with pytest.raises(MfpipeError, match=r"synthetic\[:N\].*ml-100k"):
        read_frame(spec, DataOptions(), tmp_path)


def test_synthetic_below_minimum(tmp_path):
    with pytest.raises(MfpipeError, match="at least 100"):
        read_frame("synthetic:50", DataOptions(), tmp_path)


def test_an_existing_path_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("synthetic").write_text("user_id,item_id,rating,timestamp\n1,2,3,1300000000\n")
    frame = read_frame("synthetic", DataOptions(), tmp_path)
    assert len(frame) == 1 and frame.attrs["name"] == "synthetic"


def test_synthetic_frame_round_trips_to_the_same_interactions(tmp_path):
    frame = read_frame("synthetic:5000", DataOptions(), tmp_path, seed=3)
    assert [str(t) for t in frame.dtypes] == ["str", "str", "float64", "float64"]
    assert frame.attrs["name"] == "synthetic-5k" and frame.attrs["titles"]
    # Same dataset identity whether generated directly or read through the frame.
    assert to_interactions(frame).digest == generate(5000, seed=3).digest


@pytest.mark.parametrize(
    ("spec", "name"),
    [("synthetic", "synthetic-100k"), ("synthetic:20000", "synthetic-20k"), ("ml-latest-small", "ml-latest-small")],
)
def test_dataset_name_without_reading(spec, name):
    assert dataset_name(spec) == name


def test_dataset_name_of_files(tmp_path):
    (tmp_path / "ratings.csv.gz").write_bytes(b"")
    (tmp_path / "ml-x.zip").write_bytes(b"")
    assert dataset_name(str(tmp_path / "ratings.csv.gz")) == "ratings"
    assert dataset_name(str(tmp_path / "ml-x.zip")) == "ml-x"
