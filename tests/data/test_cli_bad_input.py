"""`mfpipe split BAD --out DIR`: exit 2, one line on stderr naming the file, no traceback, nothing written.

Every case runs through the real entry point (`mfpipe.cli.main`) in-process; one of them also runs as
a separate process, as a user would start it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mfpipe.cli import main
from tests.data.test_files import BAD_INPUTS

ROOT = Path(__file__).resolve().parents[2]


def _split_argv(path: Path, out: Path, options: dict) -> list[str]:
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    return ["split", str(path), "--out", str(out), *flags]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_split_command_rejects_bad_input(tmp_path, monkeypatch, capsys, case):
    make, options, problem = BAD_INPUTS[case]
    path = make(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["mfpipe", *_split_argv(path, out, options)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and problem in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("case", ["truncated last line"])
def test_split_command_in_a_subprocess(tmp_path, case):
    make, options, problem = BAD_INPUTS[case]
    path = make(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "mfpipe", *_split_argv(path, out, options)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mfpipe: error: ") and str(path) in lines[0], proc.stderr
    assert problem in lines[0]
    assert not out.exists()


# -- bad values: the file parses, the suite's critical expectations refuse it --------------------------------
def _table(bad_row: str = "", n: int = 40) -> str:
    """A valid table (enough rows, users and items to pass the suite) plus one more row."""
    rows = "".join(f"u{i % 6},i{i % 9},{1 + i % 5},{1300000000 + 3600 * i}\n" for i in range(n))
    return "user_id,item_id,rating,timestamp\n" + rows + bad_row


BAD_VALUES = {
    "non-numeric rating": (_table("u1,i1,good,1300000000\n"), "1 ratings missing or not numeric"),
    "NaN rating": (_table("u1,i1,NaN,1300000000\n"), "1 ratings missing or not numeric"),
    "negative rating": (_table("u1,i1,-1,1300000000\n"), "1 ratings outside [0.5, 5]"),
    "non-numeric timestamp": (_table("u1,i1,4,yesterday\n"), "1 timestamps missing or not numeric"),
    "timestamp in the future": (_table("u1,i1,4,4102444800\n"), "1 timestamps outside"),
    "a single data row": (_table(n=1), "only 1 interactions (need at least 10)"),
}


@pytest.mark.parametrize("case", BAD_VALUES, ids=list(BAD_VALUES))
def test_split_command_rejects_bad_values(tmp_path, monkeypatch, capsys, case):
    text, problem = BAD_VALUES[case]
    path = tmp_path / "r.csv"
    path.write_text(text)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["mfpipe", *_split_argv(path, out, {})])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and problem in lines[0], err
    assert not out.exists()


# -- the installed console script, as a user starts it ---------------------------------------------------------
MFPIPE = Path(sys.executable).parent / "mfpipe"


def _validate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    assert MFPIPE.is_file(), f"{MFPIPE}: the console script is not installed (pip install -e .)"
    return subprocess.run(
        [str(MFPIPE), "validate", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        cwd=tmp_path,
        timeout=120,
    )


@pytest.mark.parametrize(
    "case",
    [
        "only blank lines",
        "empty",
        "a column named twice",
        "two aliases of one column",
        "given column absent",
        ".gz that is not gzip",
        "not Parquet",
        "directory",
    ],
)
def test_validate_command_rejects_unparseable_input(tmp_path, case):
    """One line on stderr naming the file and the problem, exit 2, and `--out` is not even created."""
    make, options, problem = BAD_INPUTS[case]
    path = make(tmp_path)
    out = tmp_path / "out"
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    proc = _validate(tmp_path, str(path), *flags, "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mfpipe: error: {path}") and problem in lines[0], proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_validate_command_reports_bad_values_and_exits_2(tmp_path):
    """A file that parses gets the suite's report (stdout), naming the failed expectation; no traceback."""
    path = tmp_path / "r.csv"
    path.write_text(BAD_VALUES["non-numeric rating"][0])
    proc = _validate(tmp_path, str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert str(path) in proc.stdout and "1 ratings missing or not numeric" in proc.stdout
    assert "NOT OK" in proc.stdout


def test_validate_command_accepts_the_quirks_of_a_legitimate_file(tmp_path):
    """BOM, CRLF, quoted fields, a trailing delimiter, mixed Unix/ISO timestamps, aliases in any case."""
    rows = [
        f'"{i % 6}","{i % 9}",{1 + i % 5},'
        + (f"{1300000000 + 3600 * i}" if i % 2 else f"2011-03-13T{i % 24:02d}:00:00Z")
        + ","
        for i in range(60)
    ]
    path = tmp_path / "ratings.csv"
    path.write_bytes(("\ufeffUserId,MovieID,Rating,TimeStamp\r\n" + "\r\n".join(rows) + "\r\n").encode())
    proc = _validate(tmp_path, str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: mfpipe run would accept this data" in proc.stdout and proc.stderr == ""
