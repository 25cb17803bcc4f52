"""The single value that flows through every stage: index maps + COO arrays + timestamps."""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp


class Titles(Mapping[str, str]):
    """External item id -> title, read-only: a mapping that is not a dict, so Prefect leaves it alone.

    Prefect walks every dict, list and dataclass in a task's arguments looking for futures. The
    MovieLens titles (9,742 in ml-latest-small, 87k in ml-32m) ride along in every `Interactions` and
    `Split` a task receives: walked twice per task call, they took ~2 s of each ml-latest-small run.
    """

    def __init__(self, titles: Mapping[str, str]) -> None:
        self._titles = dict(titles)

    def __getitem__(self, item_id: str) -> str:
        return self._titles[item_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._titles)

    def __len__(self) -> int:
        return len(self._titles)

    def __repr__(self) -> str:
        return f"Titles({len(self)} items)"


@dataclass(frozen=True, eq=False)
class Interactions:
    """User-item interactions with external string ids mapped to int32 indices.

    `user_ids[i]` is the external id of user index i (likewise items). Ratings are float32 (NaN-free;
    None when the data has no ratings), timestamps int64 Unix seconds. `titles` maps external item id
    to a title when the source knows it.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray | None
    timestamps: np.ndarray
    name: str = "data"
    titles: Mapping[str, str] | None = None  # kept as `Titles` (see there)
    duplicates_removed: int = 0
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.users)
        if not (len(self.items) == len(self.timestamps) == n and (self.ratings is None or len(self.ratings) == n)):
            raise ValueError("Interactions arrays must have equal length")
        if self.titles is not None and not isinstance(self.titles, Titles):
            object.__setattr__(self, "titles", Titles(self.titles))

    def with_recipe(self, build: Callable[..., Interactions], args: tuple[Any, ...]) -> Interactions:
        """This value, marked as `build(*args)` (deterministic): it then pickles as that call, not as its
        arrays. The flow persists its split result (Prefect: pickle, base64, JSON; ~4x the arrays in
        transient memory); generated data rebuilds exactly instead."""
        object.__setattr__(self, "_recipe", (build, args))
        return self

    @property
    def recipe(self) -> tuple[Callable[..., Interactions], tuple[Any, ...]] | None:
        """(build, args) when this value is `build(*args)`, else None (see `with_recipe`)."""
        return self.__dict__.get("_recipe")

    def __reduce__(self) -> Any:
        recipe = self.recipe
        if recipe is not None:
            return (rebuild, recipe)
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        return (_from_fields, (state,))

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.users)

    @property
    def has_ratings(self) -> bool:
        return self.ratings is not None

    def csr(self, values: np.ndarray | None = None, shape: tuple[int, int] | None = None) -> sp.csr_matrix:
        """User x item CSR (float32); values default to ratings, or ones without ratings."""
        if values is None:
            values = self.ratings if self.ratings is not None else np.ones(len(self), np.float32)
        shape = shape or (self.n_users, self.n_items)
        m = sp.csr_matrix((values.astype(np.float32), (self.users, self.items)), shape=shape)
        m.sort_indices()
        return m

    @cached_property
    def matrix(self) -> sp.csr_matrix:
        """The ratings (or ones) CSR, built once and shared by every model."""
        return self.csr()

    @cached_property
    def digest(self) -> str:
        """Content hash (ids, pairs, ratings, timestamps): identifies the dataset in lineage tags."""
        h = hashlib.sha256()
        for ids in (self.user_ids, self.item_ids):
            h.update("\x1f".join(map(str, ids)).encode())
        for arr in (self.users, self.items, self.timestamps, self.ratings):
            if arr is not None:
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def to_frame(self) -> pd.DataFrame:
        """External view: user_id, item_id (strings), rating (if any), timestamp (int seconds)."""
        frame = pd.DataFrame(
            {
                "user_id": self.user_ids[self.users].astype(str),
                "item_id": self.item_ids[self.items].astype(str),
            }
        )
        if self.ratings is not None:
            frame["rating"] = self.ratings
        frame["timestamp"] = self.timestamps
        return frame


_REBUILT: weakref.WeakValueDictionary[tuple[Any, ...], Interactions] = weakref.WeakValueDictionary()
_REBUILD_LOCK = threading.Lock()


def rebuild(build: Callable[..., Interactions], args: tuple[Any, ...]) -> Interactions:
    """`build(*args)` once per live result: a pickled (data, split) pair rebuilds the data once, not per part."""
    key = (build, *args)
    with _REBUILD_LOCK:
        data = _REBUILT.get(key)
        if data is None:
            data = build(*args).with_recipe(build, args)
            _REBUILT[key] = data
        return data


def _from_fields(state: dict[str, Any]) -> Interactions:
    """Unpickle an `Interactions` without a recipe (cached properties are not pickled: rebuilt on use)."""
    return Interactions(**state)
