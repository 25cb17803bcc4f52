"""Generic table reader: every structural problem is one MfpipeError naming the file; valid quirks pass."""

from __future__ import annotations

import gzip
import os
import pwd
import random
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mfpipe.config import DataOptions
from mfpipe.data import read_frame
from mfpipe.errors import MfpipeError

GOOD = "user_id,item_id,rating,timestamp\n1,10,4.0,1300000000\n1,11,3.5,1300000100\n2,10,5,1300000200\n"


def read(path: Path, **options) -> pd.DataFrame:
    return read_frame(str(path), DataOptions(**options), path.parent / "data-home")


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


# -- bad input: one case each --------------------------------------------------------------------------
def _gzip_named_csv(tmp_path: Path) -> Path:
    return write(tmp_path, "ratings.csv", gzip.compress(GOOD.encode()))


def _header(columns: str) -> str:
    """GOOD with another header line (one value per column of the new header)."""
    n = columns.count(",") + 1
    rows = [",".join([*row.split(","), *row.split(",")][:n]) for row in GOOD.splitlines()[1:]]
    return "\n".join([columns, *rows]) + "\n"


def _parquet_with_columns(tmp_path: Path, names: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "r.parquet"
    pq.write_table(pa.table([pa.array([1, 2]) for _ in names], names=names), path)
    return path


def _zip_with_damaged_ratings(tmp_path: Path) -> Path:
    """A stored (uncompressed) member with one byte changed: only its CRC check can notice."""
    path = tmp_path / "ml.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("ml/ratings.csv", GOOD)
    data = path.read_bytes()
    at = data.index(b"1300000100")
    path.write_bytes(data[:at] + b"2" + data[at + 1 :])
    return path


BAD_INPUTS = {
    "missing file": (lambda t: t / "nope.csv", {}, "file not found"),
    "directory": (lambda t: (t / "folder").mkdir() or t / "folder", {}, "not a MovieLens layout"),
    "empty": (lambda t: write(t, "empty.csv", b""), {}, "empty (0 bytes)"),
    "header only": (lambda t: write(t, "h.csv", "user_id,item_id,rating,timestamp\n"), {}, "no data rows"),
    "binary garbage": (lambda t: write(t, "junk.csv", random.Random(0).randbytes(5000)), {}, "binary"),
    "gzip without .gz": (_gzip_named_csv, {}, "gzip-compressed but not named .gz"),
    "truncated gzip": (lambda t: write(t, "r.csv.gz", gzip.compress(GOOD.encode())[:-12]), {}, "truncated"),
    ".gz that is not gzip": (lambda t: write(t, "r.csv.gz", GOOD), {}, "not gzip-compressed"),
    "wrong delimiter": (lambda t: write(t, "r.csv", GOOD.replace(",", "#")), {}, "wrong delimiter"),
    "wrong --sep": (lambda t: write(t, "r.csv", GOOD.replace(",", ";")), {"sep": ","}, "check --sep"),
    "missing user column": (lambda t: write(t, "r.csv", GOOD.replace("user_id", "who")), {}, "no user column"),
    "missing item column": (lambda t: write(t, "r.csv", GOOD.replace("item_id", "what")), {}, "no item column"),
    "missing rating column": (lambda t: write(t, "r.csv", GOOD.replace("rating", "score")), {}, "no rating column"),
    "missing timestamp column": (lambda t: write(t, "r.csv", GOOD.replace("timestamp", "when")), {}, "no timestamp"),
    "given column absent": (lambda t: write(t, "r.csv", GOOD), {"user_col": "uid"}, "'uid' (--user-col) not found"),
    "truncated last line": (lambda t: write(t, "r.csv", GOOD + "2,11,4"), {}, "last line is truncated"),
    "extra fields in a row": (lambda t: write(t, "r.csv", GOOD + "2,11,4,1300000300,9\n"), {}, "malformed row"),
    "headerless, not MovieLens": (lambda t: write(t, "r.csv", "1,10,4\n2,11,3\n"), {}, "no header line"),
    "zip that is not MovieLens": (lambda t: Path(shutil.make_archive(str(t / "a"), "zip", t)), {}, "zip"),
    # a file with nothing but blank lines once crashed the delimiter sniffer (IndexError)
    "only blank lines": (lambda t: write(t, "r.csv", "\n   \n\t\n\r\n"), {}, "has only blank lines"),
    "a BOM and a space": (lambda t: write(t, "r.csv", "\ufeff \n"), {}, "has only blank lines"),
    "header only, then blank lines": (
        lambda t: write(t, "r.csv", GOOD.splitlines()[0] + "\n\n  \n"),
        {},
        "no data rows",
    ),
    # ambiguous headers: pandas would rename a repeated name (`rating.1`) and one of them would be ignored
    "a column named twice": (
        lambda t: write(t, "r.csv", _header("user_id,item_id,rating,rating,timestamp")),
        {},
        "column 'rating' appears 2 times in the header: rename the duplicates",
    ),
    "a column named twice in a TSV": (
        lambda t: write(t, "r.tsv", _header("user_id,item_id,item_id,rating,timestamp").replace(",", "\t")),
        {},
        "column 'item_id' appears 2 times in the header",
    ),
    "two aliases of one column": (
        lambda t: write(t, "r.csv", _header("userId,user_id,item_id,rating,timestamp")),
        {},
        "2 columns could be the user column ('userId', 'user_id'): choose one with --user-col",
    ),
    "user beside user_id": (
        lambda t: write(t, "r.csv", _header("user,user_id,item_id,rating,timestamp")),
        {},
        "could be the user column ('user', 'user_id')",
    ),
    "movieId beside item": (
        lambda t: write(t, "r.csv", _header("user_id,movieId,item,rating,timestamp")),
        {},
        "could be the item column ('movieId', 'item'): choose one with --item-col",
    ),
    "case variants": (
        lambda t: write(t, "r.csv", _header("user_id,item_id,Rating,rating,timestamp")),
        {},
        "could be the rating column ('Rating', 'rating')",
    ),
    "names equal but for spaces": (
        lambda t: write(t, "r.csv", _header("user_id,item_id, timestamp,timestamp ,rating")),
        {},
        "could be the timestamp column ('timestamp', 'timestamp ')",
    ),
    "given column matches two by case": (
        lambda t: write(t, "r.csv", _header("UID,Uid,item_id,rating,timestamp")),
        {"user_col": "uid"},
        "--user-col 'uid' matches several columns ('UID', 'Uid'): give the exact name",
    ),
    "given column named twice": (
        lambda t: write(t, "r.csv", _header("who,who,item_id,rating,timestamp")),
        {"user_col": "who"},
        "column 'who' appears 2 times in the header",
    ),
    "one column for two roles": (
        lambda t: write(t, "r.csv", GOOD),
        {"user_col": "item_id"},
        "column 'item_id' would be both the user and the item column: name them with --user-col and --item-col",
    ),
    "Parquet with a column named twice": (
        lambda t: _parquet_with_columns(t, ["user_id", "item_id", "rating", "rating", "timestamp"]),
        {},
        "column 'rating' appears 2 times",
    ),
    "Parquet with case variants": (
        lambda t: _parquet_with_columns(t, ["user_id", "Item_Id", "item_id", "rating", "timestamp"]),
        {},
        "could be the item column ('Item_Id', 'item_id')",
    ),
    # every row one value wider than the header: pandas would take the first column as the index and
    # shift every value one column left (users read as items), silently
    "rows wider than the header": (
        lambda t: write(t, "r.csv", GOOD.replace("\n", ",9\n").replace(",9\n", "\n", 1)),
        {"sep": ","},
        "data row 1 has 5 fields but the header names 4",
    ),
    "not Parquet": (lambda t: write(t, "r.parquet", GOOD), {}, "is not a readable Parquet file"),
    "zip with a damaged ratings file": (_zip_with_damaged_ratings, {}, "corrupt or truncated"),
    ".zip that is not a zip": (lambda t: write(t, "ml.zip", GOOD), {}, "not a valid zip archive"),
    "0-byte .zip": (lambda t: write(t, "ml.zip", b""), {}, "not a valid zip archive"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_error_naming_the_file(tmp_path, case):
    make, options, problem = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(MfpipeError) as info:
        read(path, **options)
    message = str(info.value)
    assert str(path) in message and problem in message
    assert "\n" not in message


def test_missing_column_message_lists_the_columns_found(tmp_path):
    path = write(tmp_path, "r.csv", GOOD.replace("user_id", "who"))
    with pytest.raises(MfpipeError, match=r"columns: who, item_id, rating, timestamp; name it with --user-col"):
        read(path)


def test_missing_rating_column_suggests_implicit_mode(tmp_path):
    path = write(tmp_path, "r.csv", "user_id,item_id,timestamp\n1,10,1300000000\n")
    with pytest.raises(MfpipeError, match="--rating-col none"):
        read(path)
    frame = read(path, rating_col="none")
    assert list(frame.columns) == ["user_id", "item_id", "timestamp"]


def _read_as_nobody(path: Path) -> str:
    """Run the read in a forked child that dropped root (root reads everything); returns the error."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        os.close(read_fd)
        nobody = pwd.getpwnam("nobody")
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        try:
            read(path)
            message = "no error"
        except MfpipeError as exc:
            message = str(exc)
        except BaseException as exc:
            message = f"unexpected {type(exc).__name__}: {exc}"
        os.write(write_fd, message.encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


def test_unreadable_file_as_an_unprivileged_user():
    """chmod 000 and read as `nobody` (a forked child drops root: the venv's interpreter lives under
    /root, which `runuser -u nobody` cannot execute). The folder is world-traversable."""
    folder = Path(tempfile.mkdtemp(prefix="mfpipe-unreadable-"))
    try:
        folder.chmod(0o755)
        path = write(folder, "ratings.csv", GOOD)
        path.chmod(0o000)
        if os.geteuid() == 0:
            message = _read_as_nobody(path)
        else:
            with pytest.raises(MfpipeError) as info:
                read(path)
            message = str(info.value)
        assert message == f"{path}: permission denied (cannot read the file)"
    finally:
        shutil.rmtree(folder)


# -- values are not judged here: they become NaN / raw values for the GX suite ---------------------------
def test_bad_values_are_kept_for_the_suite(tmp_path):
    text = (
        "user_id,item_id,rating,timestamp\n1,10,abc,1300000000\n1,11,NaN,-5\n2,10,9,4102444800\n"
        "2,12,,not-a-date\n3,1,4,1300000000\n"
    )
    frame = read(write(tmp_path, "r.csv", text))
    assert frame["rating"].isna().tolist() == [True, True, False, True, False]
    assert frame["rating"][2] == 9.0
    assert frame["timestamp"].tolist()[:3] == [1300000000.0, -5.0, 4102444800.0]
    assert np.isnan(frame["timestamp"][3])


# -- valid quirks ---------------------------------------------------------------------------------------
def test_canonical_dtypes_attrs_and_row_order(tmp_path):
    frame = read(write(tmp_path, "ratings.csv", GOOD))
    assert list(frame.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert [str(frame[c].dtype) for c in frame.columns] == ["str", "str", "float64", "float64"]
    assert frame["user_id"].tolist() == ["1", "1", "2"] and frame["item_id"].tolist() == ["10", "11", "10"]
    assert frame.attrs["name"] == "ratings" and frame.attrs["source"] == str(tmp_path / "ratings.csv")


def test_bom_crlf_extra_columns_aliases(tmp_path):
    text = "\ufeffUserId,MOVIEID,Rating,TimeStamp,tag\r\n7,42,4.5,1300000000,x\r\n8,43,3,1300000001,y\r\n"
    frame = read(write(tmp_path, "r.csv", text))
    assert frame["user_id"].tolist() == ["7", "8"] and frame["item_id"].tolist() == ["42", "43"]
    assert frame["rating"].tolist() == [4.5, 3.0]


def test_quoted_ids_with_commas_and_huge_ids_stay_verbatim(tmp_path):
    huge = "123456789012345678901234567890"
    text = f'user,item,rating,timestamp\n"Doe, Jane","The Film, Part 2",4,1300000000\n{huge},007,3,1300000001\n'
    frame = read(write(tmp_path, "r.csv", text))
    assert frame["user_id"].tolist() == ["Doe, Jane", huge]
    assert frame["item_id"].tolist() == ["The Film, Part 2", "007"]


def test_explicit_columns_and_separator(tmp_path):
    text = "a;b;c;d\nu1;i1;2;1300000000\nu2;i2;3;1300000001\n"
    frame = read(write(tmp_path, "r.txt", text), user_col="a", item_col="b", rating_col="c", timestamp_col="d", sep=";")
    assert frame["user_id"].tolist() == ["u1", "u2"] and frame["rating"].tolist() == [2.0, 3.0]


def test_iso_timestamps_utc_when_naive(tmp_path):
    text = "user_id,item_id,rating,timestamp\n1,1,4,2020-01-01T00:00:00\n1,2,4,2020-01-01T01:00:00+01:00\n"
    frame = read(write(tmp_path, "r.csv", text))
    assert frame["timestamp"].tolist() == [1577836800.0, 1577836800.0]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n"),
        ("ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n"),
    ],
)
def test_headerless_movielens_layouts(tmp_path, name, text):
    frame = read(write(tmp_path, name, text))
    assert frame["user_id"].tolist()[0] in ("196", "1") and len(frame) == 2
    assert frame["rating"].notna().all() and frame["timestamp"].notna().all()


def test_tsv_gzip_and_parquet(tmp_path):
    expected = read(write(tmp_path, "r.csv", GOOD))
    tsv = read(write(tmp_path, "r.tsv.gz", gzip.compress(GOOD.replace(",", "\t").encode())))
    pd.testing.assert_frame_equal(tsv, expected, check_like=False)
    raw = pd.read_csv(tmp_path / "r.csv")  # integer ids: they must print as integers
    raw.to_parquet(tmp_path / "r.parquet")
    pd.testing.assert_frame_equal(read(tmp_path / "r.parquet"), expected)


def test_whitespace_after_delimiters_is_not_part_of_ids(tmp_path):
    frame = read(write(tmp_path, "r.csv", GOOD.replace(",", ", ")))
    assert frame["item_id"].tolist() == ["10", "11", "10"]


# -- the quirks a demanding user brings: accepted, and read right -----------------------------------------
def test_a_single_data_row_is_read(tmp_path):
    frame = read(write(tmp_path, "r.csv", "user_id,item_id,rating,timestamp\n1,10,4,1300000000\n"))
    assert frame.to_dict("list") == {"user_id": ["1"], "item_id": ["10"], "rating": [4.0], "timestamp": [1.3e9]}


@pytest.mark.parametrize(
    "text",
    [
        GOOD.replace("\n", ",\n"),  # every line ends with the delimiter
        GOOD.replace("\n", ",\n").replace(",\n", "\n", 1),  # only the rows do: pandas would shift the columns
        GOOD.replace("\n", "\r\n"),
        "\ufeff" + GOOD,
        "".join('"' + line.replace(",", '","') + '"\n' for line in GOOD.splitlines()),
        GOOD + "\n\n   \n",
    ],
    ids=["trailing delimiter", "trailing delimiter on rows only", "CRLF", "BOM", "all quoted", "blank tail"],
)
def test_legitimate_layouts_give_the_same_frame(tmp_path, text):
    expected = read(write(tmp_path, "good.csv", GOOD))
    frame = read(write(tmp_path, "r.csv", text))
    pd.testing.assert_frame_equal(frame, expected)


def test_a_value_after_a_trailing_delimiter_past_the_sample_is_an_error(tmp_path):
    """Only the first 64 KiB are sampled; a wide row further down is still caught, not dropped."""
    rows = "".join(f"{i},{i % 7},4,{1300000000 + i}," + "\n" for i in range(8000))
    path = write(tmp_path, "r.csv", "user_id,item_id,rating,timestamp\n" + rows + "1,2,3,1300000000,extra\n")
    with pytest.raises(MfpipeError, match=r"data row 8001 has more fields than the 4 columns of the header"):
        read(path)


def test_exact_given_name_wins_over_case_variants(tmp_path):
    path = write(tmp_path, "r.csv", "uid,UID,item_id,rating,timestamp\nu1,U1,10,4,1300000000\n")
    assert read(path, user_col="uid")["user_id"].tolist() == ["u1"]
    assert read(path, user_col="UID")["user_id"].tolist() == ["U1"]


def test_a_repeated_column_that_is_not_used_is_harmless(tmp_path):
    frame = read(write(tmp_path, "r.csv", _header("user_id,item_id,rating,timestamp,tag,tag")))
    pd.testing.assert_frame_equal(frame, read(write(tmp_path, "good.csv", GOOD)))


def test_the_ambiguity_is_resolved_by_naming_the_column(tmp_path):
    path = write(tmp_path, "r.csv", "userId,user_id,item_id,rating,timestamp\nu1,u2,10,4,1300000000\n")
    assert read(path, user_col="userId")["user_id"].tolist() == ["u1"]
    assert read(path, user_col="user_id")["user_id"].tolist() == ["u2"]


def test_mixed_unix_and_iso_timestamps(tmp_path):
    text = (
        "user_id,item_id,rating,timestamp\n1,10,4,1577836800\n1,11,4,2020-01-01T00:00:00Z\n"
        "1,12,4,2020-01-01 01:00:00+01:00\n1,13,4,1577836800.9\n"
    )
    assert read(write(tmp_path, "r.csv", text))["timestamp"].tolist() == [1577836800.0] * 3 + [1577836800.9]


def test_huge_and_odd_ids_stay_verbatim(tmp_path):
    ids = ["18446744073709551616", "-1", "1.0", "1e3", "007"]
    text = "user_id,item_id,rating,timestamp\n" + "".join(f"{u},{u},4,1300000000\n" for u in ids)
    frame = read(write(tmp_path, "r.csv", text))
    assert frame["user_id"].tolist() == ids and frame["item_id"].tolist() == ids


def test_movielens_dat_with_double_colons(tmp_path):
    text = "1::1193::5::978300760\n1::661::3::978302109\n2::3408::4::978300275\n"
    frame = read(write(tmp_path, "ratings.dat", text))
    assert frame.to_dict("list") == {
        "user_id": ["1", "1", "2"],
        "item_id": ["1193", "661", "3408"],
        "rating": [5.0, 3.0, 4.0],
        "timestamp": [978300760.0, 978302109.0, 978300275.0],
    }


def test_value_problems_reach_the_suite_as_nan_or_as_read(tmp_path):
    """Negative, NaN, non-numeric ratings and unparseable timestamps are the suite's to report (by count)."""
    text = "user_id,item_id,rating,timestamp\n1,10,-1,1300000000\n1,11,NaN,1300000000\n1,12,4,yesterday\n"
    frame = read(write(tmp_path, "r.csv", text))
    assert frame["rating"].tolist()[0] == -1.0 and np.isnan(frame["rating"][1])
    assert np.isnan(frame["timestamp"][2])
