"""Train/validation(/test) splits: global temporal cutoff (default) and random per-user/per-item.

Index spaces: `train` has compact maps (train users and items only, so models never see a cold id);
`validation` and `test` extend them, i.e. `validation.user_ids[:train.n_users] == train.user_ids` (same
for items), so an index below `train.n_users` is a warm user and below `train.n_items` a warm item.
Each held-out part appends only its own cold ids, in the order of their index in the full data.

Definitions (DESIGN.md): temporal train has timestamp < cutoff <= validation (< test cutoff <= test);
the cutoff is `np.quantile` (linear) of the timestamps or an explicit date. The random protocols hold
out 25% of each user's (or item's) interactions, seeded, only to compare with published benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from mfpipe.config import SplitOptions
from mfpipe.data.interactions import Interactions
from mfpipe.errors import MfpipeError

if TYPE_CHECKING:
    import rich.table

MIN_EVALUABLE_USERS = 100
MIN_INTERACTIONS = 10  # below these a split cannot leave both sides non-empty with warm users
MIN_USERS = 2
MIN_ITEMS = 2
DEFAULT_TEMPORAL_THRESHOLD = 4.0
HOLDOUT_FRACTION = 0.25  # random protocols: 75/25 per user or per item
SPLIT_FILES = ("train.csv", "validation.csv", "test.csv", "split.json")


@dataclass(frozen=True)
class SplitSummary:
    """What `split.json` holds: the Contracts keys first (in order), then extra detail and warnings."""

    protocol: str
    seed: int
    cutoff: str | None
    relevance_threshold: float | None
    n_train: int
    n_validation: int
    n_test: int
    cold_users: int
    cold_items: int
    evaluable_users: int
    test_cutoff: str | None = None
    train_users: int = 0
    train_items: int = 0
    n_relevant: int = 0
    relevant_cold_items: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> rich.table.Table:
        """Readable two-column table (the warnings are printed apart, see `warnings`)."""
        from rich.table import Table

        table = Table(title=f"split ({self.protocol})", title_justify="left", show_header=False)
        for key, value in self.to_json().items():
            if key != "warnings" and value is not None:
                table.add_row(key, str(value))
        return table


@dataclass(frozen=True, eq=False)
class Split:
    train: Interactions
    validation: Interactions
    relevant: np.ndarray  # bool per validation row
    summary: SplitSummary
    test: Interactions | None = None
    test_relevant: np.ndarray | None = None

    def truth(self, part: str = "validation") -> sp.csr_matrix:
        """Relevant items per user of `part` (bool CSR in that part's extended index space)."""
        data, mask = (self.validation, self.relevant) if part == "validation" else (self.test, self.test_relevant)
        if data is None or mask is None:
            raise ValueError(f"this split has no {part} slice")
        m = sp.csr_matrix(
            (np.ones(int(mask.sum()), bool), (data.users[mask], data.items[mask])), shape=(data.n_users, data.n_items)
        )
        m.sum_duplicates()
        m.sort_indices()
        return m

    def __reduce__(self) -> Any:
        """A split of data with a recipe (generated data) pickles as (recipe, options): the flow persists
        its split result, and rebuilding is exact; any other split pickles its arrays."""
        recipe = self.__dict__.get("_recipe")
        if recipe is not None:
            return (_rebuild_split, recipe)
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        return (_split_from_fields, (state,))

    def to_json(self) -> dict:
        """Exactly what split.json holds: the summary plus the split digest."""
        return {**self.summary.to_json(), "digest": self.digest}

    @cached_property
    def digest(self) -> str:
        """Content hash of the parts, relevance and protocol settings (lineage tag of a model version)."""
        h = hashlib.sha256(json.dumps(self.summary.to_json(), sort_keys=True).encode())
        for part in (self.train, self.validation, self.test):
            h.update(b"-" if part is None else part.digest.encode())
        for mask in (self.relevant, self.test_relevant):
            if mask is not None:
                h.update(np.packbits(mask).tobytes())
        return h.hexdigest()[:16]


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat()


def parse_cutoff(value: str) -> float:
    """ISO-8601 date/time -> Unix seconds (UTC when no zone is given)."""
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError):
        raise MfpipeError(
            f"--cutoff {value!r}: not an ISO-8601 date (e.g. 2018-01-01 or 2018-01-01T12:00:00Z)"
        ) from None
    if pd.isna(stamp):
        raise MfpipeError(f"--cutoff {value!r}: not an ISO-8601 date")
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.timestamp()


def _extend(base: np.ndarray, idx: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Map full-data indices `idx` into `base` (full-data indices in order) extended by the unseen ones.

    Returns the extended order (full-data index of each new index) and `idx` in the new space.
    """
    # int32 lookups and a presence mask instead of np.unique: O(rows) without sorting the part's rows
    # (the new ids come out in the same ascending order np.unique gives)
    lookup = np.full(size, -1, np.int32)
    lookup[base] = np.arange(len(base), dtype=np.int32)
    present = np.zeros(size, bool)
    present[idx[lookup[idx] < 0]] = True
    new = np.flatnonzero(present)
    lookup[new] = len(base) + np.arange(len(new), dtype=np.int32)
    return np.concatenate([base, new]), lookup[idx]


def _part(
    data: Interactions, mask: np.ndarray, base_users: np.ndarray, base_items: np.ndarray
) -> tuple[Interactions, np.ndarray, np.ndarray]:
    """Rows `mask` of `data` in base's index space extended by their own cold users/items."""
    user_order, users = _extend(base_users, data.users[mask], data.n_users)
    item_order, items = _extend(base_items, data.items[mask], data.n_items)
    part = Interactions(
        user_ids=data.user_ids[user_order],
        item_ids=data.item_ids[item_order],
        users=users,
        items=items,
        ratings=None if data.ratings is None else data.ratings[mask],
        timestamps=data.timestamps[mask],
        name=data.name,
        titles=data.titles,
        source=data.source,
    )
    return part, user_order, item_order


def _random_holdout(groups: np.ndarray, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    """Hold out 25% of each group's rows, chosen at random (vectorized; group sizes rounded half up)."""
    order = np.lexsort((rng.random(len(groups)), groups))
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.cumsum(counts) - counts
    rank = np.empty(len(groups), np.int64)
    rank[order] = np.arange(len(groups)) - starts[groups[order]]
    keep = np.floor(counts * (1 - HOLDOUT_FRACTION) + 0.5).astype(np.int64)
    return rank >= keep[groups]


def _label(data: Interactions) -> str:
    return data.source or data.name


def _check_size(data: Interactions) -> None:
    n_users = int(np.count_nonzero(np.bincount(data.users, minlength=data.n_users)))
    n_items = int(np.count_nonzero(np.bincount(data.items, minlength=data.n_items)))
    if len(data) < MIN_INTERACTIONS or n_users < MIN_USERS or n_items < MIN_ITEMS:
        raise MfpipeError(
            f"{_label(data)}: too few interactions to split ({len(data)} interactions, {n_users} users, "
            f"{n_items} items; need at least {MIN_INTERACTIONS}, {MIN_USERS}, {MIN_ITEMS})"
        )


def _assign(data: Interactions, options: SplitOptions) -> tuple[np.ndarray, float | None, float | None]:
    """Part of each row (0 train, 1 validation, 2 test) and the cutoff(s) in Unix seconds."""
    if options.protocol != "temporal":
        if options.cutoff is not None or options.test_quantile is not None:
            raise MfpipeError(f"--cutoff and --test-quantile apply to the temporal protocol, not {options.protocol}")
        rng = np.random.default_rng(options.seed)
        groups, n = (data.users, data.n_users) if options.protocol == "random-per-user" else (data.items, data.n_items)
        return _random_holdout(groups, n, rng).astype(np.int8), None, None
    ts = data.timestamps
    if options.cutoff is not None:
        cutoff = parse_cutoff(options.cutoff)
    else:
        cutoff = float(np.quantile(ts, options.cutoff_quantile))
    test_cutoff = None if options.test_quantile is None else float(np.quantile(ts, options.test_quantile))
    if test_cutoff is not None and test_cutoff <= cutoff:
        raise MfpipeError(
            f"{_label(data)}: the test cutoff ({_iso(test_cutoff)}, --test-quantile {options.test_quantile}) must be "
            f"later than the validation cutoff ({_iso(cutoff)}); raise --test-quantile"
        )
    part = (ts >= cutoff).astype(np.int8)
    if test_cutoff is not None:
        part[ts >= test_cutoff] = 2
    return part, cutoff, test_cutoff


def _relevance(data: Interactions, options: SplitOptions) -> float | None:
    """The threshold in force: the flag, else 4.0 for temporal with ratings, else None (all held-out rows)."""
    if options.relevance_threshold is not None:
        if data.ratings is None:
            raise MfpipeError(f"{_label(data)}: --relevance-threshold needs ratings, and this data has none")
        return options.relevance_threshold
    if options.protocol == "temporal" and data.ratings is not None:
        return DEFAULT_TEMPORAL_THRESHOLD
    return None


def _relevant(part: Interactions, threshold: float | None) -> np.ndarray:
    if threshold is None or part.ratings is None:
        return np.ones(len(part), bool)
    return part.ratings >= threshold


def _advice(protocol: str) -> str:
    if protocol == "temporal":
        return (
            "for more, try another cutoff (e.g. --cutoff-quantile 0.9: later leaves more train history, earlier more "
            "validation users; which wins depends on the data) or data with a longer history per user (e.g. ml-1m); "
            "or --protocol random-per-user for comparison with published benchmarks (not a temporal evaluation)"
        )
    return "for more, use data with more users"


def split_interactions(data: Interactions, options: SplitOptions) -> Split:
    """Split `data` under `options` (DESIGN.md "Definitions"); an unusable split is an MfpipeError."""
    _check_size(data)
    threshold = _relevance(data, options)
    assignment, cutoff, test_cutoff = _assign(data, options)
    sizes = np.bincount(assignment, minlength=3)
    where = f"cutoff {_iso(cutoff)}" if cutoff is not None else f"seed {options.seed}"
    hint = (
        "choose another --cutoff-quantile/--cutoff or --test-quantile"
        if options.protocol == "temporal"
        else "every group has too few interactions to hold out 25%"
    )
    sides = ["train", "validation"] + (["test"] if test_cutoff is not None else [])
    for side, n in zip(sides, sizes, strict=False):
        if n == 0:
            raise MfpipeError(f"{_label(data)}: the {options.protocol} split ({where}) leaves {side} empty; {hint}")
    empty = np.empty(0, np.int64)
    train, train_users, train_items = _part(data, assignment == 0, empty, empty)
    validation, _, _ = _part(data, assignment == 1, train_users, train_items)
    relevant = _relevant(validation, threshold)
    test = test_relevant = None
    if test_cutoff is not None:
        test, _, _ = _part(data, assignment == 2, train_users, train_items)
        test_relevant = _relevant(test, threshold)
    warm = validation.users < train.n_users
    evaluable = int(np.count_nonzero(np.bincount(validation.users[relevant & warm], minlength=1)))
    if evaluable == 0:
        raise MfpipeError(
            f"{_label(data)}: the {options.protocol} split ({where}) leaves no evaluable user (no train user has a "
            f"relevant validation item); {_advice(options.protocol)}"
        )
    warnings = []
    if evaluable < MIN_EVALUABLE_USERS:
        warnings.append(
            f"only {evaluable} evaluable users (< {MIN_EVALUABLE_USERS}): metrics will have wide intervals; "
            + _advice(options.protocol)
        )
    summary = SplitSummary(
        protocol=options.protocol,
        seed=options.seed,
        cutoff=_iso(cutoff),
        relevance_threshold=threshold,
        n_train=len(train),
        n_validation=len(validation),
        n_test=0 if test is None else len(test),
        cold_users=validation.n_users - train.n_users,
        cold_items=validation.n_items - train.n_items,
        evaluable_users=evaluable,
        test_cutoff=_iso(test_cutoff),
        train_users=train.n_users,
        train_items=train.n_items,
        n_relevant=int(relevant.sum()),
        relevant_cold_items=int(np.count_nonzero(relevant & (validation.items >= train.n_items))),
        warnings=warnings,
    )
    result = Split(train, validation, relevant, summary, test, test_relevant)
    if data.recipe is not None:
        object.__setattr__(result, "_recipe", (data.recipe, options))
    return result


def _rebuild_split(data_recipe: tuple[Any, tuple[Any, ...]], options: SplitOptions) -> Split:
    """Unpickle a split of generated data: the data from its recipe (shared with a data value unpickled
    beside it), split again under the same options."""
    from mfpipe.data.interactions import rebuild

    return split_interactions(rebuild(*data_recipe), options)


def _split_from_fields(state: dict[str, Any]) -> Split:
    return Split(**state)


def write_split(split: Split, out_dir: Path) -> dict[str, Path]:
    """Write train.csv, validation.csv (+ `relevant`), test.csv (with a test slice) and split.json.

    Files are written into a temporary folder beside `out_dir` and moved into place at the end, so an
    error leaves nothing half-written. A stale test.csv from an earlier split with a test slice is removed.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        split.train.to_frame().to_csv(tmp / "train.csv", index=False)
        split.validation.to_frame().assign(relevant=split.relevant.astype(np.int8)).to_csv(
            tmp / "validation.csv", index=False
        )
        if split.test is not None:
            split.test.to_frame().to_csv(tmp / "test.csv", index=False)
        (tmp / "split.json").write_text(json.dumps(split.to_json(), indent=2))
        written = sorted(p.name for p in tmp.iterdir())
        if out_dir.exists():
            for name in SPLIT_FILES:
                if name in written:
                    os.replace(tmp / name, out_dir / name)
                else:
                    (out_dir / name).unlink(missing_ok=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {Path(name).stem: out_dir / name for name in written}
