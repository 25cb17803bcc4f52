"""Ranking metrics: brute-force references, implicit's evaluator, uncertainty, reports and `mfpipe evaluate`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from mfpipe.bench.evaluation import make_interactions
from mfpipe.cli import main
from mfpipe.config import SplitOptions
from mfpipe.errors import MfpipeError
from mfpipe.evaluation import (
    METRICS,
    SCORE_BLOCK_BYTES,
    batch_users,
    display_name,
    evaluate_files,
    evaluate_model,
    metric_key,
    paired_comparison,
    per_user_metrics,
    recommend_batched,
    summarize,
)
from mfpipe.models.base import FactorModel
from mfpipe.split import split_interactions


# -- the reference: the definitions of DESIGN.md, written out in plain Python -----------------------
def brute_metrics(ranked: list[object | None], relevant: set, k: int) -> dict[str, float] | None:
    """Metrics of one list (position i holds the item at rank i + 1, None: empty) against `relevant`."""
    if not relevant:
        return None
    hits, dcg, ap, rr, counted = 0, 0.0, 0.0, 0.0, set()
    for i, item in enumerate(ranked[:k]):
        if item is None or item not in relevant or item in counted:
            continue
        counted.add(item)
        hits += 1
        dcg += 1 / math.log2(i + 2)
        ap += hits / (i + 1)
        rr = rr or 1 / (i + 1)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return {
        "ndcg": dcg / ideal,
        "precision": hits / k,
        "recall": hits / len(relevant),
        "map": ap / min(k, len(relevant)),
        "hit_rate": float(hits > 0),
        "mrr": rr,
    }


@st.composite
def ranking_cases(draw):
    n_users = draw(st.integers(0, 8))
    n_items = draw(st.integers(1, 15))
    n_cols = draw(st.integers(0, 12))
    k = draw(st.integers(1, 12))
    item = st.integers(-1, n_items - 1)  # -1: an empty slot; repeats allowed (count once)
    recs = np.array(draw(st.lists(item, min_size=n_users * n_cols, max_size=n_users * n_cols)), np.int32)
    relevant = [draw(st.sets(st.integers(0, n_items - 1), max_size=n_items)) for _ in range(n_users)]
    return recs.reshape(n_users, n_cols), relevant, n_items, k


@settings(max_examples=150, deadline=None)
@given(ranking_cases())
def test_per_user_metrics_match_brute_force(case):
    recs, relevant, n_items, k = case
    rows = [sorted(r) for r in relevant]
    truth = sp.csr_matrix(
        (np.ones(sum(map(len, rows)), bool), np.array([i for r in rows for i in r], np.int32),
         np.cumsum([0] + [len(r) for r in rows])),
        shape=(len(rows), n_items),
    )  # fmt: skip
    got = per_user_metrics(recs, truth, k)
    assert set(got) == set(METRICS)
    for u, rel in enumerate(relevant):
        expected = brute_metrics([None if i < 0 else int(i) for i in recs[u]], rel, k)
        for name in METRICS:
            if expected is None:
                assert math.isnan(got[name][u])
            else:
                assert got[name][u] == pytest.approx(expected[name], abs=1e-12), name


def test_repeated_truth_entries_count_once():
    truth = sp.coo_matrix((np.ones(3, bool), ([0, 0, 0], [2, 2, 5])), shape=(1, 6)).tocsr()
    got = per_user_metrics(np.array([[5, 2]]), truth, 2)
    assert got["recall"][0] == 1.0 and got["ndcg"][0] == pytest.approx(1.0)


# -- uncertainty ---------------------------------------------------------------------------------------
def test_summary_mean_se_and_interval():
    values = np.random.default_rng(3).random(300)
    s = summarize(np.append(values, np.nan), seed=7)  # users without relevant items (NaN) are dropped
    assert s.n == 300 and s.mean == pytest.approx(values.mean())
    assert s.se == pytest.approx(values.std(ddof=1) / math.sqrt(300))
    assert s.ci95[0] < s.mean < s.ci95[1]
    # a 95% interval of a mean is about +-1.96 SE wide: the resampling must really resample users
    assert (s.ci95[1] - s.ci95[0]) / (2 * 1.96 * s.se) == pytest.approx(1.0, abs=0.12)
    assert summarize(values, seed=7) == summarize(values, seed=7)
    assert summarize(values, seed=7).ci95 != summarize(values, seed=8).ci95


def test_summary_of_one_and_of_no_user():
    one = summarize(np.array([0.25]), seed=1)
    assert (one.mean, one.se, one.ci95, one.n) == (0.25, 0.0, (0.25, 0.25), 1)
    none = summarize(np.array([np.nan]), seed=1)
    assert none.n == 0 and math.isnan(none.mean)


def test_paired_comparison_sign_and_wins():
    rng = np.random.default_rng(0)
    b = rng.random(200)
    a = b + 0.05 + rng.normal(0, 0.02, 200)
    a[:10] = b[:10]  # ties
    better = paired_comparison(a, b, seed=1)
    assert better.mean_diff == pytest.approx((a - b).mean())
    assert better.ci95[0] > 0 and better.significant
    assert better.ties == 10 and better.a_wins + better.b_wins + better.ties == better.n == 200
    assert better.a_wins > better.b_wins
    worse = paired_comparison(b, a, seed=1)
    assert worse.mean_diff == pytest.approx(-better.mean_diff) and worse.ci95[1] < 0 and not worse.significant
    assert (worse.a_wins, worse.b_wins) == (better.b_wins, better.a_wins)
    same = paired_comparison(b, b, seed=1)
    assert same.mean_diff == 0 and not same.significant and same.ties == 200
    with pytest.raises(ValueError, match="same users"):
        paired_comparison(a, b[:5], seed=1)


def test_names_and_mlflow_keys():
    assert display_name("ndcg", 10) == "ndcg@10" and display_name("hit_rate", 5, "ci95") == "hit_rate@5_ci95"
    assert metric_key("ndcg", 10) == "ndcg_at_10"
    assert metric_key("ndcg", 10, "all") == "ndcg_at_10_all"
    assert metric_key("ndcg", 10, "cold") == "ndcg_at_10_cold"
    assert metric_key("ndcg", 10, "cold", "se") == "ndcg_at_10_se_cold"


# -- models: implicit's evaluator on the same ALS model, and the report -----------------------------
class ImplicitALS(FactorModel):
    """implicit's ALS, fitted here so the test depends on implicit only; scores = its own factors."""

    name: ClassVar[str] = "test-implicit-als"

    def _fit(self, train) -> None:
        from implicit.cpu.als import AlternatingLeastSquares

        self.peer = AlternatingLeastSquares(factors=16, iterations=4, random_state=0, num_threads=1)
        self.peer.fit(train.matrix, show_progress=False)
        self.user_factors, self.item_factors = self.peer.user_factors, self.peer.item_factors
        self.item_bias = np.zeros(train.n_items, np.float32)


@pytest.fixture(scope="module")
def random_split():
    return split_interactions(make_interactions(400, 300, 25, seed=1), SplitOptions(protocol="random-per-user"))


def test_ndcg_and_map_equal_implicit_ranking_metrics_at_k(random_split):
    """Same model, same users, same exclusions: implicit's ndcg and map are our macro NDCG@k and MAP@k.

    Its "precision" is sum(hits) / sum(min(K, |R|)) over users (micro-averaged, capped denominator);
    checked here from our per-user figures so the difference stays documented by a test.
    """
    from implicit.evaluation import ranking_metrics_at_k

    split, k = random_split, 10
    model = ImplicitALS().fit(split.train)
    truth = split.truth("validation")[: split.train.n_users]
    theirs = ranking_metrics_at_k(model.peer, split.train.matrix, truth, K=k, show_progress=False)
    report = evaluate_model(model, split, k=k)
    assert report.cold.n_users == 0 and report.warm.n_users == int((np.diff(truth.indptr) > 0).sum())
    assert abs(report.warm["ndcg"].mean - theirs["ndcg"]) <= 1e-9
    assert abs(report.warm["map"].mean - theirs["map"]) <= 1e-9
    users = report.per_user
    micro = (users["precision"] * k).sum() / np.minimum(k, users["n_relevant"]).sum()
    assert micro == pytest.approx(theirs["precision"], abs=1e-12)
    assert report.warm["precision"].mean != pytest.approx(theirs["precision"])


def test_batches_bound_the_score_block_and_do_not_change_the_lists():
    assert batch_users(100) == 2048 and batch_users(10**7) == 64
    assert 64 < batch_users(56_000) < 2048 and batch_users(56_000) * 56_000 * 8 <= SCORE_BLOCK_BYTES
    data = make_interactions(300, 120, 20, seed=2)
    model = ImplicitALS().fit(data)
    users = np.arange(data.n_users)
    whole = model.recommend(users, 10)[0]
    for size in (None, 1, 7, 300):
        np.testing.assert_array_equal(recommend_batched(model, users, 10, size), whole)


def test_report_warm_cold_all_and_keys():
    data = make_interactions(300, 120, 20, seed=2)
    split = split_interactions(data, SplitOptions(protocol="temporal", cutoff_quantile=0.7))
    model = ImplicitALS().fit(split.train)
    report = evaluate_model(model, split, k=5, batch_size=64)
    truth = split.truth("validation")
    n_rel = np.diff(truth.indptr)
    assert report.cold.n_users == int(((n_rel > 0) & (np.arange(len(n_rel)) >= split.train.n_users)).sum()) > 0
    assert report.warm.n_users + report.cold.n_users == report.all.n_users == len(report.per_user)
    assert report.n_skipped == int((n_rel == 0).sum())
    frame = report.per_user
    assert list(frame.columns[:5]) == ["user", "user_id", "warm", "n_relevant", "ndcg"]
    np.testing.assert_array_equal(frame["n_relevant"], n_rel[frame["user"]])  # cold items stay in |R|
    assert report.all["ndcg"].mean == pytest.approx(frame["ndcg"].mean())
    assert report.cold["ndcg"].mean == pytest.approx(frame.loc[~frame["warm"], "ndcg"].mean())
    # the warm rows are exactly model.recommend with seen items excluded, scored by the definitions
    warm_users = frame.loc[frame["warm"], "user"].to_numpy()
    recs, _ = model.recommend(warm_users, 5)
    for row, user in zip(recs, warm_users, strict=True):
        relevant = set(truth.indices[truth.indptr[user] : truth.indptr[user + 1]].tolist())
        expected = brute_metrics([int(i) for i in row], relevant, 5)
        assert frame.set_index("user").loc[user, "ndcg"] == pytest.approx(expected["ndcg"])
    assert 0 < report.coverage <= 1
    blob = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert blob["warm"]["ndcg@5"] == pytest.approx(report.warm["ndcg"].mean) and "ndcg@5_ci95" in blob["cold"]
    keys = report.mlflow_metrics()
    assert keys["ndcg_at_5"] == report.warm["ndcg"].mean and keys["ndcg_at_5_cold"] == report.cold["ndcg"].mean
    assert keys["ndcg_at_5_all"] == report.all["ndcg"].mean and not any("@" in key for key in keys)


# -- files and `mfpipe evaluate` -------------------------------------------------------------------------
def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@st.composite
def file_cases(draw):
    ids = st.sampled_from(["7", "007", "a", "A", "x y"])  # ids that differ only as strings
    items = st.sampled_from(["1", "01", "10", "b", "B", "c"])
    k = draw(st.integers(1, 6))
    truth = draw(st.lists(st.tuples(ids, items), min_size=1, max_size=15))  # repeats allowed
    recs: dict[str, dict[int, str]] = {}
    for user in draw(st.sets(st.sampled_from(["7", "007", "a", "zz"]))):
        ranks = draw(st.lists(st.integers(1, 9), unique=True, max_size=6))
        chosen = draw(st.lists(items, unique=True, min_size=len(ranks), max_size=len(ranks)))
        recs[user] = dict(zip(ranks, chosen, strict=True))
    return truth, recs, k


@settings(max_examples=60, deadline=None)
@given(file_cases())
def test_evaluate_files_matches_brute_force(tmp_path_factory, case):
    truth_rows, recs, k = case
    folder = tmp_path_factory.mktemp("files")
    rec_lines = [f"{u},{i},{r}" for u, ranked in recs.items() for r, i in ranked.items()]
    recs_csv = write(folder / "recs.csv", "user_id,item_id,rank\n" + "".join(line + "\n" for line in rec_lines))
    truth_csv = write(folder / "truth.csv", "user_id,item_id\n" + "".join(f"{u},{i}\n" for u, i in truth_rows))
    got = evaluate_files(recs_csv, truth_csv, k)
    relevant: dict[str, set[str]] = {}
    for user, item in truth_rows:
        relevant.setdefault(user, set()).add(item)
    per_user = [
        brute_metrics([recs.get(user, {}).get(rank) for rank in range(1, k + 1)], rel, k)
        for user, rel in relevant.items()
    ]
    assert got["k"] == k and got["n_users"] == len(relevant)
    for name in METRICS:
        assert got[f"{name}@{k}"] == pytest.approx(np.mean([m[name] for m in per_user]), abs=1e-12)


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["mfpipe", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def test_cli_layout_exact(tmp_path, monkeypatch, capsys):
    recs = write(tmp_path / "r.csv", "user_id,item_id,rank\n007,b,1\n007,a,3\n7,c,1\nonly_recs,c,1\n")
    truth = write(tmp_path / "t.csv", "user_id,item_id\n007,a\n007,a\n7,a\n8,c\n")
    code, out, err = run_cli(["evaluate", "--recs", str(recs), "--truth", str(truth), "--k", "3"], monkeypatch, capsys)
    assert code == 0 and err == ""
    blob = json.loads(out)
    names = [f"{m}@3" for m in METRICS]
    assert list(blob) == ["k", "n_users", *names, *(n + "_se" for n in names), *(n + "_ci95" for n in names)]
    assert blob["k"] == 3 and blob["n_users"] == 3  # 007, 7 ("7" != "007") and 8 (no recs: scores 0)
    assert blob["precision@3"] == pytest.approx(1 / 3 / 3)  # one hit in 3 slots, for one user of 3
    assert blob["ndcg@3"] == pytest.approx((1 / math.log2(4)) / 3)  # the gap: item a sits at rank 3
    assert blob["mrr@3"] == pytest.approx(1 / 3 / 3) and blob["recall@3"] == pytest.approx(1 / 3)
    lo, hi = blob["ndcg@3_ci95"]
    assert lo <= blob["ndcg@3"] <= hi and blob["ndcg@3_se"] > 0


def test_ranks_beyond_k_are_ignored(tmp_path):
    recs = write(tmp_path / "r.csv", "user_id,item_id,rank\nu,a,2\nu,b,+1\nu,c,99999999999999999999999\n")
    truth = write(tmp_path / "t.csv", "user_id,item_id\nu,a\n")
    assert evaluate_files(recs, truth, 1)["hit_rate@1"] == 0.0
    assert evaluate_files(recs, truth, 2)["mrr@2"] == 0.5


@pytest.mark.parametrize(
    ("recs_text", "message"),
    [
        ("user_id,item_id,rank\nu,a,1\nu,b,1\n", "rank '1' twice"),
        ("user_id,item_id,rank\nu,a,1\nu,b,2\nu,a,7\n", "item 'a' twice"),
        ("user_id,item_id,rank\nu,a,03\nu,b,3.0\n", "rank '3' twice"),
        ("user_id,item_id,rank\nu,a,0\n", "rank '0' on line 2 is not an integer >= 1"),
        ("user_id,item_id,rank\nu,a,-1\n", "not an integer >= 1"),
        ("user_id,item_id,rank\nu,a,1.5\n", "not an integer >= 1"),
        ("user_id,item_id,rank\nu,a,\n", "not an integer >= 1"),
        ("user_id,item_id,rank\nu,a,first\n", "not an integer >= 1"),
        ("user_id,item_id\nu,a\n", "missing column(s) rank"),
        ("", "file is empty"),
        ("user_id,item_id,rank\n,a,1\n", "empty user_id on line 2"),
    ],
)
def test_malformed_recs_are_one_line_errors(tmp_path, recs_text, message):
    recs = write(tmp_path / "recs.csv", recs_text)
    truth = write(tmp_path / "truth.csv", "user_id,item_id\nu,a\n")
    with pytest.raises(MfpipeError, match=f"recs.csv: .*{message.replace('(', '[(]').replace(')', '[)]')}"):
        evaluate_files(recs, truth, 10)


@pytest.mark.parametrize(
    ("truth_text", "message"),
    [("user_id\nu\n", "missing column"), ("user_id,item_id\n", "no rows"), ("", "file is empty")],
)
def test_malformed_truth_is_an_error_naming_it(tmp_path, truth_text, message):
    recs = write(tmp_path / "recs.csv", "user_id,item_id,rank\nu,a,1\n")
    with pytest.raises(MfpipeError, match=f"truth.csv: .*{message}"):
        evaluate_files(recs, write(tmp_path / "truth.csv", truth_text), 10)


def test_cli_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys):
    truth = write(tmp_path / "t.csv", "user_id,item_id\nu,a\n")
    code, out, err = run_cli(
        ["evaluate", "--recs", str(tmp_path / "missing.csv"), "--truth", str(truth)], monkeypatch, capsys
    )
    assert code == 2 and out == "" and err.count("\n") == 1 and "missing.csv: no such file" in err
    code, _, err = run_cli(["evaluate", "--recs", str(truth), "--truth", str(truth), "--k", "0"], monkeypatch, capsys)
    assert code == 2 and "--k must be >= 1" in err


def test_console_entry_prints_json_only(tmp_path):
    recs = write(tmp_path / "r.csv", "user_id,item_id,rank\nu,a,1\n")
    truth = write(tmp_path / "t.csv", "user_id,item_id\nu,a\n")
    done = subprocess.run(
        [sys.executable, "-m", "mfpipe", "evaluate", "--recs", str(recs), "--truth", str(truth)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ndcg@10"] == 1.0


def test_benchmark_runs_small_and_agrees_with_implicit():
    """The benchmark itself (tiny sizes): both cases run and carry implicit's NDCG to 1e-9."""
    from mfpipe.bench import BENCHMARKS

    results = BENCHMARKS["evaluation"](n_users=300, n_items=200, per_user=10, factors=8, threads=1)
    assert [r.benchmark for r in results] == ["evaluation", "evaluation"]
    for r in results:
        assert r.ours > 0 and r.peer > 0 and r.details["ndcg_abs_diff"] <= 1e-9
