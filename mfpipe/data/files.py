"""Any CSV/TSV/Parquet interactions table (plain or .gz) -> the canonical frame.

Canonical frame: `user_id`, `item_id` (str, verbatim), `rating` (float64, NaN where missing or not a
number; absent for implicit data), `timestamp` (float64 Unix seconds, NaN where unparseable), in file
order. Structural problems (nothing we could even hand to the validation suite) raise `MfpipeError`
naming the file; value-level problems become NaN/values the GX suite flags, so `mfpipe validate` can
still report them.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

import pandas as pd

from mfpipe.config import DataOptions
from mfpipe.errors import MfpipeError

CANONICAL = ("user_id", "item_id", "rating", "timestamp")
ALIASES = {  # normalised names (lower case, no _ - or space)
    "user_id": ("userid", "user"),
    "item_id": ("itemid", "movieid", "item"),
    "rating": ("rating",),
    "timestamp": ("timestamp",),
}
FLAGS = {"user_id": "--user-col", "item_id": "--item-col", "rating": "--rating-col", "timestamp": "--timestamp-col"}
SNIFF_DELIMITERS = ("::", ",", "\t", ";", "|")
NO_RATINGS = "none"
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
PARQUET_MAGIC = b"PAR1"
HEAD_BYTES = 64 * 1024
#: What reading a damaged compressed stream raises (gzip, or a zip member: a bad CRC is a BadZipFile)
CORRUPT = (OSError, EOFError, zlib.error, zipfile.BadZipFile)
_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


@dataclass(frozen=True)
class TableSource:
    """Where a table's bytes come from: a path, or a member of a zip (`open` yields decompressed bytes)."""

    label: str  # what error messages name
    open: Callable[[], IO[bytes]]
    parquet: bool = False


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", str(name).strip().lstrip("\ufeff").lower())


def _fail(label: str, problem: str) -> MfpipeError:
    return MfpipeError(f"{label}: {problem}")


def file_source(path: Path) -> TableSource:
    """Check that `path` is a readable, non-empty table file and say how to open it."""
    label = str(path)
    if not path.exists():
        raise _fail(label, "file not found")
    if path.is_dir():
        raise _fail(label, "is a directory, not a data file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except PermissionError:
        raise _fail(label, "permission denied (cannot read the file)") from None
    except OSError as exc:
        raise _fail(label, f"cannot be read ({exc.strerror or exc})") from None
    if not magic:
        raise _fail(label, "is empty (0 bytes)")
    suffixes = [s.lower() for s in path.suffixes]
    gz = suffixes[-1:] == [".gz"]
    if magic.startswith(GZIP_MAGIC) and not gz:
        raise _fail(label, f"is gzip-compressed but not named .gz: rename it to {path.name}.gz")
    if gz and not magic.startswith(GZIP_MAGIC):
        raise _fail(label, "is named .gz but is not gzip-compressed")
    if magic.startswith(ZIP_MAGIC):
        raise _fail(label, "is a zip archive but not a MovieLens one: extract the interactions file and pass it")
    parquet = magic == PARQUET_MAGIC or ".parquet" in suffixes or ".pq" in suffixes
    opener = partial(gzip.open, path, "rb") if gz else partial(path.open, "rb")
    return TableSource(label, opener, parquet=parquet)


# -- reading text tables -----------------------------------------------------------------------------
def _head(source: TableSource) -> str:
    """The first lines as text; binary content and corrupt gzip are structural errors."""
    try:
        with source.open() as f:
            raw = f.read(HEAD_BYTES)
    except CORRUPT as exc:
        raise _fail(source.label, f"is not readable as a table: corrupt or truncated compressed data ({exc})") from None
    if not raw:
        raise _fail(source.label, "is empty (no data after decompression)")
    text = raw.decode("utf-8", errors="replace")
    bad = sum(1 for c in text if c == "\ufffd" or (ord(c) < 32 and c not in "\t\r\n"))
    if "\x00" in text or bad > 0.02 * len(text):
        raise _fail(source.label, "is binary, not a text table (CSV/TSV) or Parquet file")
    lines = text.lstrip("\ufeff").splitlines()
    if len(raw) == HEAD_BYTES and len(lines) > 1:
        lines = lines[:-1]  # the last line of the sample may be cut
    head = "\n".join(line for line in lines if line.strip())
    if not head:
        raise _fail(source.label, "has only blank lines (no header, no data)")
    return head


def _split_line(line: str, sep: str) -> list[str]:
    if sep == "whitespace":
        return line.split()
    if len(sep) > 1:
        return line.split(sep)
    return next(csv.reader([line], delimiter=sep), [])


def _n_fields(line: str, sep: str) -> int:
    """Fields of a line, not counting the empty one a trailing delimiter leaves (`1,10,4,99,`)."""
    fields = _split_line(line, sep)
    return len(fields) - 1 if len(fields) > 1 and not fields[-1].strip() else len(fields)


def _consistent(lines: list[str], sep: str) -> bool:
    """`sep` splits the lines into the same number (> 1) of fields as the first one, mostly."""
    counts = [_n_fields(line, sep) for line in lines[:50]]
    body = counts[:-1] if len(counts) > 1 else counts  # the last line may be cut: judged later
    return counts[0] > 1 and sum(c == counts[0] for c in body) >= 0.8 * len(body)


def _sniff(lines: list[str]) -> str | None:
    """The first candidate delimiter that splits the sample into a consistent number (> 1) of fields.

    A trailing delimiter on the data rows but not on the header is legitimate, so it does not count.
    Failing that, a delimiter on which only the header disagrees with the rows: then the row-width check
    names the real problem instead of blaming the delimiter.
    """
    candidates = [sep for sep in SNIFF_DELIMITERS if sep in lines[0]]
    for sep in candidates:
        if _consistent(lines, sep):
            return sep
    for sep in candidates:
        if len(lines) > 1 and _consistent(lines[1:], sep):
            return sep
    return None


def _describe(sep: str) -> str:
    return {"\t": "tab", "whitespace": "whitespace"}.get(sep, repr(sep))


def _is_number(value: str) -> bool:
    return bool(_NUMBER.match(value.strip().strip('"')))


def _read_text(source: TableSource, options: DataOptions) -> tuple[pd.DataFrame, dict[str, str | None]]:
    """Raw columns of a delimited text table and the canonical -> raw column mapping.

    The header is detected (a first line that is not all numbers); headerless files must be in the
    MovieLens layout (user, item, rating, timestamp, ...).
    """
    lines = _head(source).splitlines()
    if options.sep:
        sep = {"\\t": "\t", "tab": "\t", "\\s+": "whitespace", " ": "whitespace"}.get(options.sep, options.sep)
        tried = f"one column when split on {_describe(sep)} (given with --sep); check --sep"
    else:
        sep = _sniff(lines)
        tried = (
            f"a single column with the delimiters tried ({', '.join(map(_describe, SNIFF_DELIMITERS))}); "
            "give the delimiter with --sep"
        )
    first = _split_line(lines[0], sep) if sep else [lines[0]]
    if len(first) < 2:
        raise _fail(source.label, f"wrong delimiter? {tried}")
    header = not all(_is_number(v) for v in first)
    if header:
        names = [name.strip() if sep == "whitespace" else name.lstrip() for name in first]
    elif len(first) >= 4:
        names = [*CANONICAL, *(f"column_{i + 5}" for i in range(len(first) - 4))]
    else:
        raise _fail(
            source.label,
            f"has no header line and {len(first)} columns; a headerless file must be in the MovieLens layout "
            "(user, item, rating, timestamp): add a header line with column names",
        )
    picked = pick_columns(source.label, names, options)
    if header:
        _check_row_width(source.label, lines[1:], sep, len(names))
    width = max(len(_split_line(line, sep)) for line in lines)
    frame = _parse(source, sep, names, header, max(width, len(names)), picked)
    if header and len(frame) == 0:
        raise _fail(source.label, "has a header line but no data rows")
    _check_last_line(source, sep, len(names))
    return frame, picked


def _check_row_width(label: str, rows: list[str], sep: str, n_names: int) -> None:
    """Rows with more values than the header names are an error, not a shift of every column.

    Left to itself, pandas takes the first column of such a file as the index and moves every value one
    column to the left (user ids silently read as item ids). Checked on the sample, so the message can
    count fields; wide rows further down are caught by `_parse`.
    """
    for number, row in enumerate(rows, start=1):
        width = _n_fields(row, sep)
        if width > n_names:
            raise _fail(label, f"data row {number} has {width} fields but the header names {n_names}: malformed row")


def _parse(
    source: TableSource, sep: str, names: list[str], header: bool, width: int, picked: dict[str, str | None]
) -> pd.DataFrame:
    """pandas' C parser: ids as str (verbatim), numbers as float64 (falling back to str if one is not).

    Columns are read by position, never by the header's names: pandas would rename a repeated name
    (`rating.1`) and take the first column as the index when the rows are wider than the header. `width`
    is the widest row of the sample, so a trailing delimiter becomes an extra column that must stay
    empty. Returns the picked columns under their names (header names, or canonical for headerless).
    """
    stride = 2 if sep == "::" else 1  # 'a::b' is read with ':' as a, <empty>, b
    index = {name: names.index(name) for name in picked.values() if name is not None}  # unique: pick_columns
    numeric = [stride * index[picked[c]] for c in ("rating", "timestamp") if picked[c] is not None]
    kwargs: dict = {
        "keep_default_na": False,
        "na_values": [""],
        "header": 0 if header else None,
        "names": range(stride * width - (stride - 1)),
        "index_col": False,
        "skipinitialspace": True,
    }  # no usecols: pandas would then silently accept rows with extra fields
    if sep == "::":
        kwargs.update(sep=":", quoting=csv.QUOTE_NONE)
    elif sep == "whitespace":
        kwargs.update(sep=r"\s+")
    elif len(sep) > 1:
        kwargs.update(sep=re.escape(sep), engine="python")
    else:
        kwargs.update(sep=sep)
    ids = dict.fromkeys((stride * i for i in index.values()), str)
    try:
        frame = _read_csv(source, kwargs, {**ids, **dict.fromkeys(numeric, "float64")})
    except ValueError:  # a value that is not a number (or an ISO date): read as text, converted per value later
        frame = _read_csv(source, kwargs, ids)
    if sep == "::":
        frame = _drop_colon_gaps(source.label, frame)
    beyond = frame.iloc[:, len(names) :].notna().to_numpy().any(axis=1)
    if beyond.any():
        raise _fail(
            source.label,
            f"data row {int(beyond.argmax()) + 1} has more fields than the {len(names)} columns of the header: "
            "malformed row",
        )
    return pd.DataFrame({name: frame[i] for name, i in index.items()})


def _read_csv(source: TableSource, kwargs: dict, dtype: dict) -> pd.DataFrame:
    for encoding in ("utf-8-sig", "latin-1"):
        try:
            with source.open() as f:
                return pd.read_csv(f, encoding=encoding, dtype=dtype, **kwargs)
        except UnicodeDecodeError:
            continue
        except pd.errors.EmptyDataError:
            raise _fail(source.label, "has no data") from None
        except pd.errors.ParserError as exc:
            detail = str(exc).strip().splitlines()[-1].removeprefix("Error tokenizing data. C error: ")
            raise _fail(source.label, f"malformed row ({detail})") from None
        except CORRUPT as exc:
            raise _fail(source.label, f"corrupt or truncated compressed data ({exc})") from None
    raise _fail(source.label, "cannot be decoded as text")


def _drop_colon_gaps(label: str, frame: pd.DataFrame) -> pd.DataFrame:
    """'a::b' read with ':' gives a, <empty>, b: keep every other column (the gaps must be empty)."""
    gaps = frame.iloc[:, 1::2]
    if gaps.notna().to_numpy().any():
        raise _fail(label, "uses '::' as delimiter but also contains single ':' inside fields")
    kept = frame.iloc[:, 0::2]
    kept.columns = range(kept.shape[1])
    return kept


def _tail_line(source: TableSource) -> str:
    """The last non-empty line (streams compressed data; seeks in plain files)."""
    with source.open() as f:
        if f.seekable() and not isinstance(f, gzip.GzipFile):
            f.seek(0, io.SEEK_END)
            f.seek(max(0, f.tell() - HEAD_BYTES))
            tail = f.read()
        else:
            tail = b""
            while chunk := f.read(1 << 20):
                tail = (tail + chunk)[-HEAD_BYTES:]
    lines = [line for line in tail.decode("utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _check_last_line(source: TableSource, sep: str, n_fields: int) -> None:
    """A last line with fewer fields than the header means the file was cut (pandas would pad with NaN)."""
    fields = _split_line(_tail_line(source), sep)
    if len(fields) < n_fields:
        raise _fail(
            source.label, f"the last line is truncated ({len(fields)} of {n_fields} fields): the file is incomplete"
        )


# -- columns and values ------------------------------------------------------------------------------
def _role(canonical: str) -> str:
    return canonical.split("_")[0]


def _ambiguous(label: str, canonical: str, matches: list[str], given: str | None) -> MfpipeError:
    """Several header columns could be the one asked for: name them all and say how to choose."""
    if len(set(matches)) == 1:
        return _fail(label, f"column '{matches[0]}' appears {len(matches)} times in the header: rename the duplicates")
    quoted = ", ".join(f"'{m}'" for m in matches)
    if given is not None:
        return _fail(label, f"{FLAGS[canonical]} '{given}' matches several columns ({quoted}): give the exact name")
    role, flag = _role(canonical), FLAGS[canonical]
    return _fail(label, f"{len(matches)} columns could be the {role} column ({quoted}): choose one with {flag}")


def _pick(label: str, columns: list[str], canonical: str, given: str | None) -> str | None:
    """The raw column for a canonical one: the given name (exact, then case-insensitive) or an alias.

    Exactly one column must match: taking the first of several would silently read the wrong values
    (pandas renames a repeated `rating` to `rating.1`, and `Rating` beside `rating` is anyone's guess).
    """
    if given is not None:
        if canonical == "rating" and given.lower() == NO_RATINGS:
            return None
        matches = [c for c in columns if c == given] or [c for c in columns if _norm(c) == _norm(given)]
        if not matches:
            raise _fail(label, f"column '{given}' ({FLAGS[canonical]}) not found; columns: {', '.join(columns)}")
    else:
        matches = [c for c in columns if _norm(c) in ALIASES[canonical]]
        if not matches:
            hint = f"name it with {FLAGS[canonical]}"
            if canonical == "rating":
                hint += f", or use {FLAGS[canonical]} none for data without ratings"
            raise _fail(
                label,
                f"no {_role(canonical)} column (looked for {', '.join(ALIASES[canonical])}); "
                f"columns: {', '.join(map(str, columns))}; {hint}",
            )
    if len(matches) > 1:
        raise _ambiguous(label, canonical, matches, given)
    return matches[0]


def _ids(values: pd.Series) -> pd.Series:
    """Ids as str, verbatim (text as read; integer columns of Parquet print as integers, never via float)."""
    return values if values.dtype == "str" else values.astype("str")


def to_seconds(values: pd.Series) -> pd.Series:
    """Unix seconds or ISO-8601 (UTC if naive) -> float64 seconds; NaN where neither parses."""
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        stamps = values.dt.tz_localize("UTC") if values.dt.tz is None else values.dt.tz_convert("UTC")
        return (stamps - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    numbers = pd.to_numeric(values, errors="coerce").astype("float64")
    rest = numbers.isna() & values.notna()
    if rest.any():
        dates = pd.to_datetime(values[rest], utc=True, errors="coerce", format="ISO8601")
        numbers[rest] = (dates - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    return numbers


def pick_columns(label: str, columns: list[str], options: DataOptions) -> dict[str, str | None]:
    """canonical name -> raw column name (rating -> None for data without ratings).

    One column cannot play two roles (`--user-col item_id` would otherwise read items as users).
    """
    picked = {c: _pick(label, columns, c, getattr(options, _role(c) + "_col")) for c in CANONICAL}
    roles: dict[str, str] = {}
    for canonical, column in picked.items():
        if column is None:
            continue
        if column in roles:
            first = roles[column]
            raise _fail(
                label,
                f"column '{column}' would be both the {_role(first)} and the {_role(canonical)} column: "
                f"name them with {FLAGS[first]} and {FLAGS[canonical]}",
            )
        roles[column] = canonical
    return picked


def canonical_frame(raw: pd.DataFrame, picked: dict[str, str | None]) -> pd.DataFrame:
    """Rename and convert the picked columns (value problems become NaN)."""
    out = {"user_id": _ids(raw[picked["user_id"]]), "item_id": _ids(raw[picked["item_id"]])}
    if picked["rating"] is not None:
        out["rating"] = pd.to_numeric(raw[picked["rating"]], errors="coerce").astype("float64")
    out["timestamp"] = to_seconds(raw[picked["timestamp"]])
    frame = pd.DataFrame(out)
    frame.index = pd.RangeIndex(len(frame))
    return frame


def read_table(source: TableSource, options: DataOptions) -> pd.DataFrame:
    """A table file (CSV/TSV/Parquet, plain or gz) -> canonical frame with attrs name/source."""
    raw, picked = _read_parquet(source, options) if source.parquet else _read_text(source, options)
    frame = canonical_frame(raw, picked)
    frame.attrs["source"] = source.label
    return frame


def _read_parquet(source: TableSource, options: DataOptions) -> tuple[pd.DataFrame, dict[str, str | None]]:
    """Columns are picked from the schema and only those are read (a repeated name elsewhere is harmless)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with source.open() as f:
            parquet = pq.ParquetFile(f)
            columns = [str(name) for name in parquet.schema_arrow.names]
            picked = pick_columns(source.label, columns, options)
            table = parquet.read(columns=[name for name in picked.values() if name is not None])
    except (pa.ArrowException, *CORRUPT) as exc:
        raise _fail(source.label, f"is not a readable Parquet file ({exc})") from None
    if table.num_rows == 0:
        raise _fail(source.label, "has columns but no data rows")
    return table.to_pandas(), picked
