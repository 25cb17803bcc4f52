"""Train/validation(/test) splits: global temporal cutoff (default) and random per-user/per-item.

Index spaces: `train` has compact maps (train users and items only, so models never see a cold id);
`validation` and `test` extend them, i.e. `validation.user_ids[:train.n_users] == train.user_ids` (same
for items), so an index below `train.n_users` is a warm user and below `train.n_items` a warm item.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp

from mfpipe.data.interactions import Interactions

MIN_EVALUABLE_USERS = 100


@dataclass(frozen=True)
class SplitSummary:
    """What `split.json` holds (Contracts), plus human-facing warnings."""

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
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


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
