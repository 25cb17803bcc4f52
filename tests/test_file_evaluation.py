"""`mfpipe evaluate`: metrics of a recommendations file against a relevance file, and its one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mfpipe.cli import main
from mfpipe.errors import MfpipeError
from mfpipe.evaluation import METRICS
from mfpipe.file_evaluation import evaluate_files
from tests.test_evaluation import brute_metrics


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
