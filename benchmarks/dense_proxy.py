"""A denser MovieLens-like proxy cut from ml-latest-small, for judging goals stated on ML-100K / ML-1M.

ml-latest-small (610 users, 9.7k items, density 1.7%) is much sparser than ML-100K (943 users x 1682
items, 100k ratings, density 6.3%, every user >= 20 ratings) or ML-1M (6040 x 3706, density 4.5%). This
keeps the `--items` most-rated items (ties: the lower movieId), then the users with >= `--min-user`
ratings among them, and writes them in the MovieLens ratings.csv layout (userId,movieId,rating,timestamp;
the original rows, in file order) so `mfpipe` and benchmarks/tune_defaults.py load the folder as they
load ml-latest-small. Nothing is committed: the output goes to a folder given on the command line.

    .venv/bin/python benchmarks/dense_proxy.py /tmp/ml-dense             # ML-100K-like: 1700 items, >= 20
    .venv/bin/python benchmarks/dense_proxy.py /tmp/ml-dense-1m --items 3000 --min-user 20

The shape (users, items, ratings, density, min ratings per user) is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "ml-latest-small"


def derive(ratings: pd.DataFrame, items: int, min_user: int) -> pd.DataFrame:
    """The rows of the `items` most-rated items, then only users with >= min_user of them (one pass)."""
    counts = ratings.groupby("movieId").size()
    ranked = counts.reset_index(name="n").sort_values(["n", "movieId"], ascending=[False, True])
    kept = ratings[ratings["movieId"].isin(ranked["movieId"].head(items))]
    per_user = kept.groupby("userId").size()
    return kept[kept["userId"].isin(per_user.index[per_user >= min_user])]


def shape(frame: pd.DataFrame) -> dict[str, float | int]:
    users, items = frame["userId"].nunique(), frame["movieId"].nunique()
    per_user = frame.groupby("userId").size()
    return {
        "users": int(users), "items": int(items), "ratings": len(frame),
        "density": round(len(frame) / (users * items), 4),
        "min_per_user": int(per_user.min()), "median_per_user": float(per_user.median()),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write ratings.csv into (created)")
    parser.add_argument("--source", type=Path, default=SOURCE, help="an ml-latest-small folder")
    parser.add_argument("--items", type=int, default=1700, help="keep this many most-rated items")
    parser.add_argument("--min-user", type=int, default=20, help="then users with at least this many of them")
    args = parser.parse_args()
    ratings = pd.read_csv(args.source / "ratings.csv")
    proxy = derive(ratings, args.items, args.min_user)
    args.out.mkdir(parents=True, exist_ok=True)
    proxy.to_csv(args.out / "ratings.csv", index=False)
    print(json.dumps({"source": str(args.source), "items_cut": args.items, "min_user": args.min_user} | shape(proxy)))


if __name__ == "__main__":
    main()
