"""The GX suites in expectations/, the typed report, and `mfpipe validate`."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mfpipe.cli import app
from mfpipe.config import DataOptions
from mfpipe.errors import MfpipeError
from mfpipe.validation import EXPECTATIONS_DIR, load_suite, load_suite_json, validate_frame

NOW = time.time()


def good_frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """A canonical frame as `read_frame` returns it: 20 users x 40 items over ~3 years, unique pairs."""
    rng = np.random.default_rng(seed)
    pairs = rng.permutation(20 * 40)[:n]
    frame = pd.DataFrame(
        {
            "user_id": (pairs // 40).astype(str),
            "item_id": ("m" + pd.Series(pairs % 40).astype(str)).astype(str),
            "rating": rng.integers(1, 11, n) / 2.0,
            "timestamp": rng.uniform(1.3e9, 1.4e9, n),
        }
    )
    frame.attrs["source"] = "ratings.csv"
    return frame


@pytest.mark.parametrize("name", ["interactions", "ratings"])
def test_suite_loads_every_expectation(name):
    raw = load_suite_json(name)
    suite = load_suite(name)
    assert len(suite.expectations) == len(raw["expectations"]) > 0
    assert {str(e.severity.value) for e in suite.expectations} <= {"critical", "warning", "info"}


def test_suite_with_an_unknown_expectation_is_refused(tmp_path):
    raw = load_suite_json("ratings")
    raw["expectations"].append({"type": "expect_no_such_thing", "kwargs": {}, "severity": "critical"})
    (tmp_path / "ratings.json").write_text(json.dumps(raw))
    with pytest.raises(RuntimeError, match="expect_no_such_thing"):
        load_suite("ratings", tmp_path)


def test_rating_range_is_a_parameter_not_hard_coded():
    text = (EXPECTATIONS_DIR / "ratings.json").read_text()
    assert '"$PARAMETER": "rating_min"' in text and '"$PARAMETER": "rating_max"' in text


def test_good_frame_passes_every_expectation():
    report = validate_frame(good_frame(), DataOptions())
    assert report.success_critical
    assert report.failed() == []
    assert report.suite == "interactions+ratings"
    report.raise_for_critical()


def test_frame_without_ratings_runs_the_core_suite_only():
    report = validate_frame(good_frame().drop(columns="rating"), DataOptions())
    assert report.success_critical and report.suite == "interactions"
    assert all(r.column != "rating" for r in report.rows)


def _set(column, rows, value):
    def change(frame):
        frame[column] = frame[column].astype(object) if value is None else frame[column]
        frame.loc[rows, column] = value
        return frame

    return change


CRITICAL_CASES = {
    "rating above max": (
        _set("rating", [0, 1, 2], 7.0),
        "expect_column_values_to_be_between",
        "3 ratings outside [0.5, 5]",
    ),
    "rating below min": (_set("rating", [5], 0.0), "expect_column_values_to_be_between", "1 ratings outside"),
    "rating missing": (_set("rating", [3, 4], np.nan), "expect_column_values_to_not_be_null", "2 ratings missing"),
    "timestamp missing": (
        _set("timestamp", [0], np.nan),
        "expect_column_values_to_not_be_null",
        "1 timestamps missing",
    ),
    "timestamp negative": (_set("timestamp", [0], -5.0), "expect_column_values_to_be_between", "1 timestamps outside"),
    "timestamp future": (_set("timestamp", [9], NOW + 3 * 86400), "expect_column_values_to_be_between", "timestamps"),
    "user missing": (_set("user_id", [2], None), "expect_column_values_to_not_be_null", "1 user ids missing"),
    "item missing": (_set("item_id", [2], None), "expect_column_values_to_not_be_null", "1 item ids missing"),
    "user ids not strings": (
        lambda f: f.assign(user_id=np.arange(len(f))),
        "expect_column_values_to_be_of_type",
        "column user_id has type int64, expected str",
    ),
    "timestamp column missing": (
        lambda f: f.drop(columns="timestamp"),
        "expect_table_columns_to_match_set",
        "missing column(s) timestamp",
    ),
    "too few rows": (lambda f: f.head(5), "expect_table_row_count_to_be_between", "only 5 interactions"),
    "one user": (lambda f: f.assign(user_id="u1"), "expect_column_unique_value_count_to_be_between", "1 distinct user"),
    "one item": (lambda f: f.assign(item_id="i1"), "expect_column_unique_value_count_to_be_between", "1 distinct item"),
}


@pytest.mark.parametrize("case", list(CRITICAL_CASES))
def test_each_critical_expectation_catches_its_case(case):
    change, expectation, words = CRITICAL_CASES[case]
    frame = change(good_frame())
    frame.attrs["source"] = "ratings.csv"
    report = validate_frame(frame, DataOptions())
    assert not report.success_critical
    assert expectation in {r.name for r in report.failed("critical")}
    with pytest.raises(MfpipeError) as err:
        report.raise_for_critical()
    message = str(err.value)
    assert message.startswith("ratings.csv: ") and "\n" not in message
    assert words in message and f"({expectation}, critical)" in message


def test_rating_range_follows_the_options():
    frame = good_frame()
    frame.loc[0, "rating"] = 9.0
    assert not validate_frame(frame, DataOptions()).success_critical
    assert validate_frame(frame, DataOptions(rating_min=0, rating_max=10)).success_critical
    with pytest.raises(MfpipeError, match=r"outside \[1, 4\]"):
        validate_frame(frame, DataOptions(rating_min=1, rating_max=4)).raise_for_critical("x.csv")


def test_duplicate_pairs_are_a_warning_only():
    frame = good_frame()
    frame = pd.concat([frame, frame.head(4)], ignore_index=True)
    report = validate_frame(frame, DataOptions())
    assert report.success_critical
    (warning,) = report.failed("warning")
    assert warning.name == "expect_compound_columns_to_be_unique"
    assert warning.unexpected_count == 8  # both copies of 4 pairs
    report.raise_for_critical()


def test_report_json_and_table():
    frame = good_frame()
    frame.loc[0, "rating"] = 9.0
    report = validate_frame(frame, DataOptions())
    data = json.loads(json.dumps(report.to_json()))
    assert data["success_critical"] is False and data["source"] == "ratings.csv"
    assert len(data["expectations"]) == len(report.rows)
    row = next(r for r in data["expectations"] if not r["success"])
    assert row == {
        "name": "expect_column_values_to_be_between",
        "column": "rating",
        "severity": "critical",
        "success": False,
        "unexpected_count": 1,
        "unexpected_percent": pytest.approx(100 / len(frame)),
        "observed": "",
    }
    console = Console(record=True, width=200)
    console.print(report.table())
    text = console.export_text()
    assert "FAIL" in text and "1 ratings outside [0.5, 5]" in text and "compound_columns_to_be_unique" in text


def test_write_gx_result_and_data_docs(tmp_path):
    validate_frame(good_frame(seed=1), DataOptions())  # an earlier result must not leak into these docs
    frame = good_frame()
    frame.loc[0, "rating"] = 9.0
    report = validate_frame(frame, DataOptions())
    paths = report.write(tmp_path / "out")
    gx_result = json.loads(paths["gx_result"].read_text())
    assert gx_result["success"] is False and len(gx_result["results"]) == len(report.rows)
    assert json.loads(paths["report"].read_text())["success_critical"] is False
    assert paths["data_docs"] == tmp_path / "out" / "data_docs" / "index.html" and paths["data_docs"].is_file()
    pages = list((tmp_path / "out" / "data_docs" / "validations").rglob("*.html"))
    assert len(pages) == 1
    html = " ".join(re.sub(r"<[^>]+>", " ", pages[0].read_text()).split())  # the page text, tags stripped
    assert (
        "interactions+ratings" in html and "less than or equal to 5.0" in html and "Unsuccessful Expectations" in html
    )


# -- CLI: mfpipe validate ------------------------------------------------------------------------------
def _csv(path: Path, frame: pd.DataFrame) -> Path:
    out = frame.rename(columns={"user_id": "userId", "item_id": "movieId"}).assign(
        timestamp=frame["timestamp"].astype("int64")
    )
    out.to_csv(path, index=False)
    return path


def _run(*args: str):
    return CliRunner().invoke(app, ["validate", *args])


def test_cli_validate_accepts_good_data(tmp_path):
    path = _csv(tmp_path / "ratings.csv", good_frame())
    result = _run(str(path))
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "evaluable_users" in result.output


def test_cli_validate_json_and_out_on_failure(tmp_path):
    frame = good_frame()
    frame.loc[:2, "rating"] = 7.0
    path = _csv(tmp_path / "ratings.csv", frame)
    result = _run(str(path), "--json", "--out", str(tmp_path / "report"))
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["split"] is None
    assert data["validation"]["success_critical"] is False
    assert (tmp_path / "report" / "gx_result.json").is_file()
    assert (tmp_path / "report" / "data_docs" / "index.html").is_file()
    # the same data passes with the configured scale
    assert _run(str(path), "--json", "--rating-max", "7").exit_code == 0


def test_cli_validate_reports_an_infeasible_split(tmp_path):
    frame = good_frame()
    frame["rating"] = 1.0  # parses and passes the suite, but no validation item is relevant (>= 4)
    path = _csv(tmp_path / "ratings.csv", frame)
    result = _run(str(path), "--json")
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["validation"]["success_critical"] is True and "no evaluable user" in data["split_error"]
    assert _run(str(path), "--json", "--protocol", "random-per-user").exit_code == 0


def test_cli_validate_unparseable_file_writes_nothing(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_bytes(b"")
    result = _run(str(path), "--out", str(tmp_path / "report"))
    assert result.exit_code != 0
    assert isinstance(result.exception, MfpipeError) and "ratings.csv" in str(result.exception)
    assert not (tmp_path / "report").exists()
