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
    except (OSError, EOFError, zlib.error) as exc:
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
    return "\n".join(line for line in lines if line.strip())


def _split_line(line: str, sep: str) -> list[str]:
    if sep == "whitespace":
        return line.split()
    if len(sep) > 1:
        return line.split(sep)
    return next(csv.reader([line], delimiter=sep), [])


def _sniff(lines: list[str]) -> str | None:
    """The first candidate delimiter that splits the sample into a consistent number (> 1) of fields."""
    for sep in SNIFF_DELIMITERS:
        if sep not in lines[0]:
            continue
        counts = [len(_split_line(line, sep)) for line in lines[:50]]
        body = counts[:-1] if len(counts) > 1 else counts  # the last line may be cut: judged later
        if counts[0] > 1 and sum(c == counts[0] for c in body) >= 0.8 * len(body):
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
    frame = _parse(source, sep, names if header else None, picked)
    if header and len(frame) == 0:
        raise _fail(source.label, "has a header line but no data rows")
    _check_last_line(source, sep, len(names))
    return frame, picked


def _parse(source: TableSource, sep: str, header: list[str] | None, picked: dict[str, str | None]) -> pd.DataFrame:
    """pandas' C parser: ids as str (verbatim), numbers as float64 (falling back to str if one is not).

    Columns come back under their header names, or under the canonical names for headerless files.
    """
    names = header or [*CANONICAL]
    stride = 2 if sep == "::" else 1  # 'a::b' is read with ':' as a, <empty>, b
    position = {name: stride * i for i, name in enumerate(names)}
    label = (lambda name: name) if header else (lambda name: position[name])
    wanted = [name for name in picked.values() if name is not None]
    numeric = [picked[c] for c in ("rating", "timestamp") if picked[c] is not None]
    kwargs: dict = {
        "keep_default_na": False,
        "na_values": [""],
        "header": 0 if header else None,
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
    ids = dict.fromkeys(map(label, wanted), str)
    try:
        frame = _read_csv(source, kwargs, {**ids, **{label(name): "float64" for name in numeric}})
    except ValueError:  # a value that is not a number (or an ISO date): read as text, converted per value later
        frame = _read_csv(source, kwargs, ids)
    if sep == "::":
        frame = _drop_colon_gaps(source.label, frame)
    if not header:
        frame = frame.rename(columns={position[name]: name for name in names})
    return frame


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
        except (OSError, EOFError, zlib.error) as exc:
            raise _fail(source.label, f"corrupt or truncated compressed data ({exc})") from None
    raise _fail(source.label, "cannot be decoded as text")


def _drop_colon_gaps(label: str, frame: pd.DataFrame) -> pd.DataFrame:
    """'a::b' read with ':' gives a, <empty>, b: keep every other column (the gaps must be empty)."""
    gaps = frame.iloc[:, 1::2]
    if gaps.notna().to_numpy().any():
        raise _fail(label, "uses '::' as delimiter but also contains single ':' inside fields")
    return frame.iloc[:, 0::2]


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
def _pick(label: str, columns: list[str], canonical: str, given: str | None) -> str | None:
    """The raw column for a canonical one: the given name (exact, then case-insensitive) or an alias."""
    if given is not None:
        if canonical == "rating" and given.lower() == NO_RATINGS:
            return None
        for wanted in (lambda c: c == given, lambda c: _norm(c) == _norm(given)):
            match = [c for c in columns if wanted(c)]
            if match:
                return match[0]
        raise _fail(label, f"column '{given}' ({FLAGS[canonical]}) not found; columns: {', '.join(columns)}")
    for column in columns:
        if _norm(column) in ALIASES[canonical]:
            return column
    hint = f"name it with {FLAGS[canonical]}"
    if canonical == "rating":
        hint += f", or use {FLAGS[canonical]} none for data without ratings"
    raise _fail(
        label,
        f"no {canonical.split('_')[0]} column (looked for {', '.join(ALIASES[canonical])}); "
        f"columns: {', '.join(map(str, columns))}; {hint}",
    )


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
    """canonical name -> raw column name (rating -> None for data without ratings)."""
    return {c: _pick(label, columns, c, getattr(options, c.split("_")[0] + "_col")) for c in CANONICAL}


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
    if source.parquet:
        raw = _read_parquet(source)
        raw.columns = [str(c) for c in raw.columns]
        picked = pick_columns(source.label, list(raw.columns), options)
    else:
        raw, picked = _read_text(source, options)
    frame = canonical_frame(raw, picked)
    frame.attrs["source"] = source.label
    return frame


def _read_parquet(source: TableSource) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with source.open() as f:
            table = pq.read_table(f)
    except (pa.ArrowException, OSError) as exc:
        raise _fail(source.label, f"is not a readable Parquet file ({exc})") from None
    if table.num_rows == 0:
        raise _fail(source.label, "has columns but no data rows")
    return table.to_pandas()
