"""Metrics of a recommendations file against a relevance file: `mfpipe evaluate`.

The files are CSV: recommendations `user_id,item_id,rank`, relevance `user_id,item_id`. Ids are read and
compared as stripped strings, never parsed as numbers; ranks are checked (integers >= 1, each rank and
item once per user) and every malformed input is one line naming the file and the line. The metrics are
those of `evaluation`, with the same definitions, summaries and JSON layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from mfpipe.errors import MfpipeError
from mfpipe.evaluation import per_user_metrics, summarize_group

_INTEGER = re.compile(r"^\+?\d+(\.0*)?$")  # "3", "+3", "3.0": integers; "3.5", "-1", "" are not
_HUGE_RANK = 2**62  # ranks beyond any k are only compared with k: cap them to fit int64


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """The named columns of a CSV as stripped strings (ids are never parsed as numbers)."""
    path = Path(path)
    if not path.exists():
        raise MfpipeError(f"{path}: no such file")
    if not path.is_file():
        raise MfpipeError(f"{path}: not a file")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise MfpipeError(f"{path}: file is empty (expected a header {','.join(columns)})") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MfpipeError(f"{path}: not a readable CSV file ({first})") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MfpipeError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(frame.columns)})")
    frame = frame[list(columns)].fillna("").apply(lambda col: col.str.strip())
    for column in ("user_id", "item_id"):
        empty = np.flatnonzero((frame[column] == "").to_numpy())
        if empty.size:
            raise MfpipeError(f"{path}: empty {column} on line {empty[0] + 2}")
    return frame


def _ranks(path: Path, recs: pd.DataFrame) -> np.ndarray:
    """Ranks as int64, and `recs["rank"]` rewritten canonically ("03", "3.0" -> "3") for duplicate checks.

    Anything but an integer >= 1 is an error naming the line.
    """
    text = recs["rank"]
    ok = text.str.fullmatch(_INTEGER.pattern).to_numpy(dtype=bool)
    canonical = text.where(~ok, text[ok].map(lambda s: str(int(s.split(".")[0]))))
    ranks = np.zeros(len(text), np.int64)
    ranks[ok] = canonical[ok].map(lambda s: min(int(s), _HUGE_RANK)).to_numpy(np.int64)
    bad = np.flatnonzero(~ok | (ranks < 1))
    if bad.size:
        raise MfpipeError(f"{path}: rank {text.iloc[bad[0]]!r} on line {bad[0] + 2} is not an integer >= 1")
    recs["rank"] = canonical
    return ranks


def _no_duplicates(path: Path, recs: pd.DataFrame, column: str, what: str) -> None:
    """A user's list may hold each rank and each item once; name the first offending pair of lines."""
    keys = (recs["user_id"] + "\x1f" + recs[column]).to_numpy()
    dup = np.flatnonzero(pd.Series(keys).duplicated(keep=False).to_numpy())
    if dup.size:
        first, second = dup[keys[dup] == keys[dup[0]]][:2]
        user, value = recs["user_id"].iloc[first], recs[column].iloc[first]
        raise MfpipeError(f"{path}: user {user!r} has {what} {value!r} twice (lines {first + 2} and {second + 2})")


def evaluate_files(recs_path: Path, truth_path: Path, k: int = 10, seed: int = 42) -> dict[str, Any]:
    """Metrics of a recommendations file against a relevance file, in the Contracts' JSON layout.

    recs: `user_id,item_id,rank`; truth: `user_id,item_id`. Ids are compared as (stripped) strings; rank
    is the position used for the discount (gaps leave empty positions), ranks > k are ignored; repeated
    truth rows count once; the evaluated users are the users of truth (a user without recs scores 0).
    """
    if k < 1:
        raise MfpipeError(f"--k must be >= 1, got {k}")
    recs = _read_csv(recs_path, ("user_id", "item_id", "rank"))
    truth = _read_csv(truth_path, ("user_id", "item_id")).drop_duplicates()
    if truth.empty:
        raise MfpipeError(f"{truth_path}: no rows (the evaluated users are the users of this file)")
    ranks = _ranks(recs_path, recs)
    _no_duplicates(recs_path, recs, "rank", "rank")
    _no_duplicates(recs_path, recs, "item_id", "item")

    user_codes, user_ids = pd.factorize(truth["user_id"])
    item_codes, item_ids = pd.factorize(pd.concat([truth["item_id"], recs["item_id"]], ignore_index=True))
    truth_matrix = sp.csr_matrix(
        (np.ones(len(truth), bool), (user_codes, item_codes[: len(truth)])), shape=(len(user_ids), len(item_ids))
    )
    rec_users = pd.Index(user_ids).get_indexer(recs["user_id"])
    keep = (rec_users >= 0) & (ranks <= k)
    recommended = np.full((len(user_ids), k), -1, np.int64)
    recommended[rec_users[keep], ranks[keep] - 1] = item_codes[len(truth) :][keep]
    summary = summarize_group(per_user_metrics(recommended, truth_matrix, k), seed)
    return {"k": k, **summary.to_json(k)}


def evaluate_files_json(recs_path: Path, truth_path: Path, k: int = 10) -> str:
    """`evaluate_files` as strict JSON text (what `mfpipe evaluate` prints)."""
    return json.dumps(evaluate_files(recs_path, truth_path, k), allow_nan=False)
