"""Split definitions (DESIGN.md): temporal cutoff, relevance, cold accounting, random protocols, files, CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mfpipe.cli import app
from mfpipe.config import SplitOptions
from mfpipe.data.interactions import Interactions
from mfpipe.errors import MfpipeError
from mfpipe.split import split_interactions, write_split
from tests.conftest import require

CONTRACT_KEYS = [
    "protocol", "seed", "cutoff", "relevance_threshold", "n_train", "n_validation", "n_test",
    "cold_users", "cold_items", "evaluable_users",
]  # fmt: skip
ML_SMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"


def make(users, items, timestamps, ratings=None, name="toy") -> Interactions:
    """Interactions from full-data indices; ids are strings that differ from the indices."""
    users, items = np.asarray(users), np.asarray(items)
    return Interactions(
        user_ids=np.array([f"u{i:03d}" for i in range(users.max() + 1)]),
        item_ids=np.array([f"i,{i}" for i in range(items.max() + 1)]),  # a comma: ids are written verbatim
        users=users.astype(np.int32),
        items=items.astype(np.int32),
        ratings=None if ratings is None else np.asarray(ratings, np.float32),
        timestamps=np.asarray(timestamps, np.int64),
        name=name,
        source=f"{name}.csv",
    )


def random_data(n=3000, n_users=200, n_items=300, seed=0, ratings=True) -> Interactions:
    rng = np.random.default_rng(seed)
    pairs = rng.choice(n_users * n_items, n, replace=False)
    return make(
        pairs // n_items,
        pairs % n_items,
        rng.integers(1_000_000_000, 1_100_000_000, n),
        rng.integers(1, 11, n) / 2 if ratings else None,
    )


def external(part: Interactions) -> set[tuple[str, str, int]]:
    return set(zip(part.user_ids[part.users], part.item_ids[part.items], part.timestamps.tolist(), strict=True))


# -- temporal ------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    timestamps=st.lists(st.integers(0, 2_000_000_000), min_size=12, max_size=80),
    q=st.floats(0.05, 0.9),
    extra=st.one_of(st.none(), st.floats(0.01, 0.09)),
    seed=st.integers(0, 1000),
)
def test_no_train_timestamp_after_any_validation_timestamp(timestamps, q, extra, seed):
    rng = np.random.default_rng(seed)
    n = len(timestamps)
    data = make(rng.integers(0, 3, n), rng.integers(0, 4, n), timestamps)
    options = SplitOptions(cutoff_quantile=q, test_quantile=None if extra is None else q + extra)
    try:
        split = split_interactions(data, options)
    except MfpipeError:
        assume(False)  # an empty side or no evaluable user is refused (tested below)
    assert split.train.timestamps.max() < split.validation.timestamps.min()
    cutoff = np.quantile(np.asarray(timestamps), q)
    assert split.train.timestamps.max() < cutoff <= split.validation.timestamps.min()
    if split.test is not None:
        assert split.validation.timestamps.max() < split.test.timestamps.min()
    parts = [split.train, split.validation] + ([split.test] if split.test is not None else [])
    assert sum(len(p) for p in parts) == len(data)


def test_cutoff_is_the_linear_quantile():
    data = random_data()
    split = split_interactions(data, SplitOptions(cutoff_quantile=0.8))
    cutoff = np.quantile(data.timestamps, 0.8)
    assert split.summary.cutoff == datetime.fromtimestamp(cutoff, UTC).isoformat()
    assert split.summary.n_train == int((data.timestamps < cutoff).sum())
    assert split.summary.n_validation == int((data.timestamps >= cutoff).sum())
    assert split.summary.n_test == 0 and split.test is None


def test_explicit_cutoff_date_naive_is_utc():
    data = make([0, 1, 0, 1] * 3, [0, 1, 2, 3] * 3, np.arange(12) * 100 + 999_999_500, [5] * 12)
    naive = split_interactions(data, SplitOptions(cutoff="2001-09-09T01:46:40"))  # = 1e9 s
    aware = split_interactions(data, SplitOptions(cutoff="2001-09-09T03:46:40+02:00"))
    assert naive.summary.cutoff == aware.summary.cutoff == "2001-09-09T01:46:40+00:00"
    assert naive.train.timestamps.max() < 1_000_000_000 <= naive.validation.timestamps.min()
    with pytest.raises(MfpipeError, match="not an ISO-8601 date"):
        split_interactions(data, SplitOptions(cutoff="next tuesday"))


def test_test_slice_after_second_cutoff():
    data = random_data()
    split = split_interactions(data, SplitOptions(cutoff_quantile=0.7, test_quantile=0.85))
    test_cutoff = np.quantile(data.timestamps, 0.85)
    assert split.summary.test_cutoff == datetime.fromtimestamp(test_cutoff, UTC).isoformat()
    assert split.validation.timestamps.max() < test_cutoff <= split.test.timestamps.min()
    assert split.summary.n_test == len(split.test) == int((data.timestamps >= test_cutoff).sum())
    assert np.array_equal(split.test_relevant, split.test.ratings >= 4.0)
    with pytest.raises(MfpipeError, match="must be later"):
        split_interactions(data, SplitOptions(cutoff_quantile=0.8, test_quantile=0.5))


# -- relevance -----------------------------------------------------------------------------------------
def test_relevance_rules():
    data = random_data()
    temporal = split_interactions(data, SplitOptions())
    assert temporal.summary.relevance_threshold == 4.0
    assert np.array_equal(temporal.relevant, temporal.validation.ratings >= 4.0)
    custom = split_interactions(data, SplitOptions(relevance_threshold=3.0))
    assert (
        np.array_equal(custom.relevant, custom.validation.ratings >= 3.0)
        and custom.relevant.sum() > temporal.relevant.sum()
    )
    for protocol in ("random-per-user", "random-per-item"):
        split = split_interactions(data, SplitOptions(protocol=protocol))
        assert split.summary.relevance_threshold is None and split.relevant.all()
        strict = split_interactions(data, SplitOptions(protocol=protocol, relevance_threshold=4.5))
        assert np.array_equal(strict.relevant, strict.validation.ratings >= 4.5)
    unrated = split_interactions(random_data(ratings=False), SplitOptions())
    assert unrated.summary.relevance_threshold is None and unrated.relevant.all()
    with pytest.raises(MfpipeError, match="needs ratings"):
        split_interactions(random_data(ratings=False), SplitOptions(relevance_threshold=4))


def test_truth_matrix_matches_relevant_rows():
    split = split_interactions(random_data(), SplitOptions())
    truth = split.truth()
    assert truth.shape == (split.validation.n_users, split.validation.n_items)
    assert truth.nnz == split.relevant.sum()


# -- cold accounting and index spaces ------------------------------------------------------------------
def test_cold_users_and_items_are_counted():
    # train: users 0,1 items 0,1,2 (t < 100); validation: warm user 0 on cold item 3, cold user 2 on warm item 0
    users = [0, 1, 0, 1, 0, 1, 0, 2, 1, 0]
    items = [0, 1, 2, 0, 1, 2, 3, 0, 2, 0]
    ts = [10, 20, 30, 40, 50, 60, 100, 110, 120, 5]
    ratings = [5, 5, 5, 5, 5, 5, 4.5, 5, 3, 5]
    split = split_interactions(make(users, items, ts, ratings), SplitOptions(cutoff="1970-01-01T00:01:40"))
    s = split.summary
    assert (s.n_train, s.n_validation) == (7, 3)
    assert (s.cold_users, s.cold_items) == (1, 1)
    assert s.evaluable_users == 1  # user 0 (warm, relevant item 3); user 2 is cold; user 1's item is not relevant
    assert s.relevant_cold_items == 1 and s.n_relevant == 2
    assert s.warnings and "--cutoff-quantile 0.9" in s.warnings[0] and "only 1 evaluable users" in s.warnings[0]


@pytest.mark.parametrize("protocol", ["temporal", "random-per-user", "random-per-item"])
def test_index_spaces(protocol):
    data = random_data(seed=3)
    split = split_interactions(
        data, SplitOptions(protocol=protocol, test_quantile=0.9 if protocol == "temporal" else None)
    )
    train = split.train
    # train maps are compact: every train user and item has an interaction
    assert np.bincount(train.users, minlength=train.n_users).min() > 0
    assert np.bincount(train.items, minlength=train.n_items).min() > 0
    for part in (split.validation, split.test):
        if part is None:
            continue
        assert np.array_equal(part.user_ids[: train.n_users], train.user_ids)
        assert np.array_equal(part.item_ids[: train.n_items], train.item_ids)
        cold = part.user_ids[train.n_users :]
        assert not set(cold) & set(train.user_ids) and len(set(cold)) == len(cold)
        assert set(cold) == set(part.user_ids[part.users]) - set(train.user_ids)
        assert part.users.dtype == np.int32 and part.items.dtype == np.int32
    parts = [p for p in (train, split.validation, split.test) if p is not None]
    assert set().union(*map(external, parts)) == external(data)


# -- random protocols ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("protocol", "group"), [("random-per-user", "users"), ("random-per-item", "items")])
def test_random_protocols_are_stratified_and_seeded(protocol, group):
    data = random_data(n=6000, seed=1)
    split = split_interactions(data, SplitOptions(protocol=protocol, seed=7))
    full_ids = (data.user_ids if group == "users" else data.item_ids)[getattr(data, group)]
    ids = {
        name: pd.Series((part.user_ids if group == "users" else part.item_ids)[getattr(part, group)]).value_counts()
        for name, part in (("train", split.train), ("validation", split.validation))
    }
    counts = pd.Series(full_ids).value_counts()
    held = ids["validation"].reindex(counts.index, fill_value=0)
    expected = counts - np.floor(counts * 0.75 + 0.5).astype(int)
    assert held.equals(expected.rename(held.name))  # 25% of every user's (item's) rows, rounded
    assert 0.22 < len(split.validation) / len(data) < 0.28
    again = split_interactions(data, SplitOptions(protocol=protocol, seed=7))
    assert again.digest == split.digest and external(again.validation) == external(split.validation)
    other = split_interactions(data, SplitOptions(protocol=protocol, seed=8))
    assert external(other.validation) != external(split.validation)
    assert split.summary.cutoff is None and split.summary.seed == 7


def test_random_protocol_rejects_temporal_flags():
    with pytest.raises(MfpipeError, match="temporal protocol"):
        split_interactions(random_data(), SplitOptions(protocol="random-per-user", cutoff="2003-01-01"))


# -- refusals ------------------------------------------------------------------------------------------
def test_empty_sides_and_no_evaluable_users_are_errors():
    data = random_data()
    with pytest.raises(MfpipeError, match="leaves train empty"):
        split_interactions(data, SplitOptions(cutoff="1990-01-01"))
    with pytest.raises(MfpipeError, match="leaves validation empty"):
        split_interactions(data, SplitOptions(cutoff="2030-01-01"))
    low = make([0, 1, 0, 1] * 3, [0, 1, 2, 3] * 3, np.arange(12), [1.0] * 12)
    with pytest.raises(MfpipeError, match=r"toy.csv: .*no evaluable user"):
        split_interactions(low, SplitOptions())
    with pytest.raises(MfpipeError, match=r"toy.csv: too few interactions to split \(5 interactions"):
        split_interactions(make([0, 1, 0, 1, 0], [0, 1, 1, 0, 2], np.arange(5)), SplitOptions())


# -- files ---------------------------------------------------------------------------------------------
def test_write_split_files(tmp_path):
    data = random_data()
    split = split_interactions(data, SplitOptions(test_quantile=0.9))
    out = tmp_path / "split"
    paths = write_split(split, out)
    assert sorted(p.name for p in out.iterdir()) == ["split.json", "test.csv", "train.csv", "validation.csv"]
    assert set(paths) == {"train", "validation", "test", "split"}
    train = pd.read_csv(out / "train.csv", dtype={"user_id": str, "item_id": str})
    assert list(train.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert train["timestamp"].dtype == np.int64
    assert set(zip(train.user_id, train.item_id, train.timestamp, strict=True)) == external(split.train)
    validation = pd.read_csv(out / "validation.csv", dtype={"user_id": str, "item_id": str})
    assert list(validation.columns) == ["user_id", "item_id", "rating", "timestamp", "relevant"]
    assert validation["relevant"].tolist() == split.relevant.astype(int).tolist()
    assert list(pd.read_csv(out / "test.csv").columns) == ["user_id", "item_id", "rating", "timestamp"]
    meta = json.loads((out / "split.json").read_text())
    assert list(meta)[: len(CONTRACT_KEYS)] == CONTRACT_KEYS
    assert meta["digest"] == split.digest and meta["n_test"] == len(split.test)
    # a later split without a test slice replaces the files and removes the stale test.csv
    write_split(split_interactions(data, SplitOptions()), out)
    assert not (out / "test.csv").exists() and json.loads((out / "split.json").read_text())["n_test"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["split"]  # no temporary folder left behind


def test_write_split_leaves_nothing_on_error(tmp_path, monkeypatch):
    split = split_interactions(random_data(), SplitOptions())

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError):
        write_split(split, tmp_path / "split")
    assert list(tmp_path.iterdir()) == []


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli_split_ml_latest_small(tmp_path):
    require((ML_SMALL / "ratings.csv").is_file(), f"{ML_SMALL} not present")
    out = tmp_path / "split"
    result = CliRunner().invoke(app, ["split", str(ML_SMALL), "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "split.json").read_text())
    assert list(meta)[: len(CONTRACT_KEYS)] == CONTRACT_KEYS
    assert meta["protocol"] == "temporal" and meta["relevance_threshold"] == 4.0
    assert meta["evaluable_users"] == 28  # DESIGN.md: MovieLens users rate in bursts
    assert meta["n_train"] + meta["n_validation"] == 100836
    assert sorted(p.name for p in out.iterdir()) == ["split.json", "train.csv", "validation.csv"]
    assert "28 evaluable users" in result.output and "--cutoff-quantile 0.9" in result.output


def test_cli_split_test_slice_and_bad_flag(tmp_path):
    require((ML_SMALL / "ratings.csv").is_file(), f"{ML_SMALL} not present")
    out = tmp_path / "split"
    result = CliRunner().invoke(app, ["split", str(ML_SMALL), "--out", str(out), "--test-quantile", "0.9"])
    assert result.exit_code == 0, result.output
    assert (out / "test.csv").is_file()
    bad = CliRunner().invoke(app, ["split", str(ML_SMALL), "--out", str(tmp_path / "x"), "--cutoff", "1990-01-01"])
    assert isinstance(bad.exception, MfpipeError) and "leaves train empty" in str(bad.exception)
    assert not (tmp_path / "x").exists()


def test_random_protocol_with_nothing_to_hold_out_is_an_error():
    data = make(np.arange(12), np.arange(12) % 3, np.arange(12))  # one interaction per user: all stay in train
    with pytest.raises(MfpipeError, match="leaves validation empty; every group has too few"):
        split_interactions(data, SplitOptions(protocol="random-per-user"))
