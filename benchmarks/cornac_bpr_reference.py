"""Reference point: Cornac's BPR with the settings of its published ML-100K result, on an `mfpipe split` folder.

Cornac is not a dependency of mfpipe; run this in a separate environment (`uv venv /tmp/cornac && uv pip
install -p /tmp/cornac cornac pandas`). The recommendations it writes are scored by mfpipe's own metrics:

    .venv/bin/mfpipe split ../shared/data/ml-latest-small --out /tmp/mls --protocol random-per-item
    /tmp/cornac/bin/python benchmarks/cornac_bpr_reference.py /tmp/mls /tmp/mls/cornac_recs.csv
    cut -d, -f1,2 /tmp/mls/validation.csv > /tmp/mls/truth.csv
    .venv/bin/mfpipe evaluate --recs /tmp/mls/cornac_recs.csv --truth /tmp/mls/truth.csv

Settings (MS Recommenders' Cornac BPR notebook): k=200, max_iter=100, learning_rate=0.01, lambda_reg=0.001.
"""

from __future__ import annotations

import sys

import cornac
import numpy as np
import pandas as pd
from cornac.data import Dataset

K = 10


def main(folder: str, out: str) -> None:
    """Fit on `folder`/train.csv, write the top-K of every train user (train items excluded) to `out`."""
    train = pd.read_csv(f"{folder}/train.csv", dtype={"user_id": str, "item_id": str})
    data = Dataset.from_uir(train[["user_id", "item_id", "rating"]].itertuples(index=False), seed=42)
    model = cornac.models.BPR(k=200, max_iter=100, learning_rate=0.01, lambda_reg=0.001, seed=42, verbose=False)
    model.fit(data)
    items = np.array(list(data.iid_map))  # raw ids in inner-index order
    scores = model.u_factors @ model.i_factors.T + model.i_biases[None, :]
    seen = data.matrix.tocsr()
    rows = []
    for raw, user in data.uid_map.items():
        row = scores[user].copy()
        row[seen[user].indices] = -np.inf
        top = np.argpartition(-row, K)[:K]
        top = top[np.argsort(-row[top])]
        rows += [(raw, items[i], rank + 1) for rank, i in enumerate(top)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "rank"]).to_csv(out, index=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
