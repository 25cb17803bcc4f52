"""From a data spec to the canonical frame and to `Interactions` (validation sits between them, in `prepare`).

Spec resolution (Contracts): an existing path wins (a table file, a MovieLens zip, or an extracted
MovieLens folder); else a MovieLens source name; else `synthetic[:N]`; else a clear error.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mfpipe.config import DataOptions
from mfpipe.data import movielens, synthetic
from mfpipe.data.files import file_source, read_table
from mfpipe.data.interactions import Interactions
from mfpipe.errors import MfpipeError

DEFAULT_SYNTHETIC = 100_000
_SYNTHETIC = re.compile(r"^synthetic(?::(?P<n>\d+(?:\.\d+)?)(?P<unit>[kKmM]?))?$")
ACCEPTED = (
    "an existing file (CSV/TSV/Parquet, plain or .gz), a MovieLens zip or folder, "
    f"a source name ({', '.join(movielens.PINNED_MD5)}), or synthetic[:N] (N like 100000, 100k, 1M)"
)


def synthetic_size(spec: str) -> int | None:
    """`synthetic` -> 100000, `synthetic:1M` -> 1000000; None when `spec` is not a synthetic spec."""
    match = _SYNTHETIC.match(spec.strip())
    if match is None:
        return None
    if match["n"] is None:
        return DEFAULT_SYNTHETIC
    n = round(float(match["n"]) * {"": 1, "k": 1_000, "m": 1_000_000}[match["unit"].lower()])
    if n < 100:
        raise MfpipeError(f"{spec}: synthetic data needs at least 100 interactions")
    return n


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".csv", ".tsv", ".txt", ".dat", ".data", ".parquet", ".pq"):
        name = name.removesuffix(suffix)
    return name or path.name


def _read_path(path: Path, options: DataOptions) -> pd.DataFrame:
    if path.is_dir():
        return movielens.read_folder(path, options)
    if path.suffix.lower() == ".zip" or movielens.is_movielens_zip(path):
        return movielens.read_zip(path, options)
    frame = read_table(file_source(path), options)
    frame.attrs["name"] = _stem(path)
    return frame


class _SyntheticFrame(pd.DataFrame):
    """The canonical frame of `synthetic:N` (seed S), which pickles as that recipe, not as its rows.

    The flow persists the load task's result (Prefect pickles it, base64-encodes it and wraps it in
    JSON: ~4x the frame in transient memory, 0.57 GB on disk at 10M rows). Generated data is
    deterministic (digests pinned by tests), so the recipe rebuilds exactly the same frame. Frames derived
    from it (copies, slices) are plain DataFrames; a column replaced in place falls back to pickling rows.
    """

    _recipe: tuple[int, int] | None = None
    _arrays: tuple[int, ...] = ()

    @property
    def _constructor(self) -> type[pd.DataFrame]:
        return pd.DataFrame

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self._recipe is not None and self._arrays == _array_ids(self):
            return (synthetic_frame_of, self._recipe)
        return (_as_is, (self.copy(deep=False),))  # its rows as a plain DataFrame, attrs included


def _as_is(frame: pd.DataFrame) -> pd.DataFrame:
    """Unpickle a synthetic frame that no longer matched its recipe: the plain DataFrame of its rows."""
    return frame


def _array_ids(frame: pd.DataFrame) -> tuple[int, ...]:
    """Identity of the frame's columns and their arrays: changes when a column is assigned or replaced."""
    return (*map(id, frame._mgr.arrays), id(frame.columns), len(frame))


def synthetic_frame_of(n: int, seed: int) -> pd.DataFrame:
    """The canonical frame of `synthetic:n` with `seed` (what a pickled synthetic frame unpickles to)."""
    return synthetic_frame(synthetic.generate(n, seed), recipe=(n, seed))


def synthetic_frame(data: Interactions, recipe: tuple[int, int] | None = None) -> pd.DataFrame:
    """The canonical frame of generated data (ids via Arrow `take`: no per-row Python strings).

    `recipe` (n, seed): how `data` was generated; the frame then pickles as that (see `_SyntheticFrame`).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    frame = _SyntheticFrame(
        {
            "user_id": pd.Series(pc.take(pa.array(data.user_ids), pa.array(data.users)), dtype="str"),
            "item_id": pd.Series(pc.take(pa.array(data.item_ids), pa.array(data.items)), dtype="str"),
            "rating": data.ratings.astype(np.float64),
            "timestamp": data.timestamps.astype(np.float64),
        },
        copy=False,  # the fresh float64 columns as they are: consolidating them into one block copied both
    )
    frame.attrs.update(name=data.name, source=data.source, titles=data.titles)
    if recipe is not None:
        object.__setattr__(frame, "_recipe", recipe)  # instance attributes, not columns
        object.__setattr__(frame, "_arrays", _array_ids(frame))
    return frame


def read_frame(spec: str, options: DataOptions, data_home: Path, seed: int = 42) -> pd.DataFrame:
    """The canonical frame of `spec` (see `mfpipe.data.files`); structural problems raise MfpipeError."""
    path = Path(spec).expanduser()
    if path.exists():
        return _read_path(path, options)
    if spec in movielens.PINNED_MD5:
        folder = movielens.fetch(spec, Path(data_home), options.movielens_url)
        frame = movielens.read_folder(folder, options)
        frame.attrs["name"] = spec
        return frame
    n = synthetic_size(spec)
    if n is not None:
        return synthetic_frame_of(n, seed)
    if any(sep in spec for sep in ("/", "\\")) or Path(spec).suffix:
        raise MfpipeError(f"{spec}: file not found")
    raise MfpipeError(f"{spec}: not a file, a source name or synthetic[:N]; --data accepts {ACCEPTED}")


def without_attrs(frame: pd.DataFrame) -> pd.DataFrame:
    """A shallow view with empty `attrs`: pandas deep-copies attrs (e.g. item titles) on every operation,
    which made GX ~4x slower at 1M rows and cost `to_interactions` ~0.2 s at synthetic:10M."""
    view = frame.copy(deep=False)
    view.attrs = {}
    return view


def _codes(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Factorize ids in order of first appearance -> (int32 codes, external ids as a str array)."""
    codes, uniques = pd.factorize(values)
    return codes.astype(np.int32), np.asarray(uniques, dtype=str)


def _latest_per_pair(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, n_items: int) -> np.ndarray:
    """Row mask keeping one row per (user, item): the latest timestamp, ties -> the last row in the file."""
    key = pd.Series(users.astype(np.int64) * n_items + items)
    dup = key.duplicated(keep=False).to_numpy()
    keep = ~dup
    if dup.any():
        rows = np.flatnonzero(dup)
        order = np.lexsort((rows, timestamps[rows], key.to_numpy()[rows]))  # last of each key group wins
        ordered = key.to_numpy()[rows][order]
        last = np.append(ordered[1:] != ordered[:-1], True)
        keep[rows[order][last]] = True
    return keep


def to_interactions(frame: pd.DataFrame) -> Interactions:
    """Canonical frame (validated: no NaN ids or timestamps) -> Interactions, duplicates resolved."""
    columns = without_attrs(frame)
    for column in ("user_id", "item_id", "timestamp"):
        if columns[column].isna().any():
            source = frame.attrs.get("source", "data")
            raise MfpipeError(f"{source}: missing values in '{column}' (run `mfpipe validate` for details)")
    users, user_ids = _codes(columns["user_id"])
    items, item_ids = _codes(columns["item_id"])
    timestamps = np.floor(columns["timestamp"].to_numpy(np.float64)).astype(np.int64)
    keep = _latest_per_pair(users, items, timestamps, len(item_ids))
    ratings = columns["rating"].to_numpy(np.float32)[keep] if "rating" in columns.columns else None
    data = Interactions(
        user_ids=user_ids,
        item_ids=item_ids,
        users=users[keep],
        items=items[keep],
        ratings=ratings,
        timestamps=timestamps[keep],
        name=str(frame.attrs.get("name", "data")),
        titles=frame.attrs.get("titles"),
        duplicates_removed=int(len(keep) - keep.sum()),
        source=str(frame.attrs.get("source", "")),
    )
    recipe = frame._recipe if isinstance(frame, _SyntheticFrame) and frame._arrays == _array_ids(frame) else None
    return data if recipe is None else data.with_recipe(synthetic_interactions, recipe)


def synthetic_interactions(n: int, seed: int) -> Interactions:
    """`to_interactions(synthetic_frame_of(n, seed))` without the frame: the generated value is the same
    (tests pin the digest) but for `meta`, which a parsed frame does not carry, and the width of the id
    strings, which `_codes` makes as narrow as the longest id."""
    data = synthetic.generate(n, seed)
    narrow = {name: np.asarray(getattr(data, name).tolist(), dtype=str) for name in ("user_ids", "item_ids")}
    return replace(data, meta={}, **narrow)


def dataset_name(spec: str) -> str:
    """The name `read_frame` gives `spec`'s data, without reading it (for `--dataset` defaults)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        ratings = movielens.find_ratings(path)
        return (ratings.parent if ratings is not None else path).name
    if path.exists():
        return path.name.removesuffix(".zip") if path.suffix.lower() == ".zip" else _stem(path)
    size = synthetic_size(spec)
    return f"synthetic-{synthetic.size_label(size)}" if size is not None else spec
