"""The MLflow pyfunc every candidate is logged as: top-k items for external user ids.

A registered version holds two artifacts: the model's own `.npz` (learned arrays + train-seen items +
popularity, no pickle) and `catalog.npz` (the external ids of the train index space, and titles when the
data has them). Input: a DataFrame with `user_id` (strings) and optionally `k`. Output: one row per
recommendation — `user_id, rank, item_id, score, title` — best first, train-seen items excluded, and the
popularity fallback for users the model has never seen (so serving never fails on a new user).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from mfpipe.errors import MfpipeError
from mfpipe.models import load as load_model
from mfpipe.models.base import Recommender

DEFAULT_K = 10
INPUT_SCHEMA = Schema([ColSpec("string", "user_id"), ColSpec("long", "k", required=False)])
OUTPUT_SCHEMA = Schema(
    [
        ColSpec("string", "user_id"),
        ColSpec("long", "rank"),
        ColSpec("string", "item_id"),
        ColSpec("double", "score"),
        ColSpec("string", "title", required=False),
    ]
)
SIGNATURE = ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA)
# What a serving environment needs besides mfpipe itself (only used by non-local env managers).
REQUIREMENTS = ("mlflow", "numpy", "scipy", "pandas", "pydantic")


@dataclass(frozen=True, eq=False)
class Catalog:
    """External ids of a model's index space (train users/items) and item titles when known."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    titles: dict[str, str]

    def save(self, path: Path) -> Path:
        keys = np.array(list(self.titles), dtype=str)
        np.savez(
            path,
            user_ids=self.user_ids.astype(str),
            item_ids=self.item_ids.astype(str),
            title_keys=keys,
            title_values=np.array([self.titles[k] for k in keys], dtype=str),
        )
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> Catalog:
        with np.load(Path(path), allow_pickle=False) as data:
            titles = dict(zip(data["title_keys"].tolist(), data["title_values"].tolist(), strict=True))
            return cls(user_ids=data["user_ids"], item_ids=data["item_ids"], titles=titles)

    @classmethod
    def of(cls, train: Any) -> Catalog:
        """The catalogue of a train `Interactions`: only titles of items the model can recommend."""
        item_ids = np.asarray(train.item_ids).astype(str)
        known = train.titles or {}
        titles = {i: known[i] for i in item_ids.tolist() if i in known}
        return cls(user_ids=np.asarray(train.user_ids).astype(str), item_ids=item_ids, titles=titles)

    def user_index(self, user_ids: np.ndarray) -> np.ndarray:
        """External user ids -> model indices; unknown users -> -1 (the popularity fallback)."""
        return lookup_ids(self.user_ids, user_ids)

    def item_index(self, item_ids: np.ndarray) -> np.ndarray:
        return lookup_ids(self.item_ids, item_ids)


def lookup_ids(known: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Vectorised id -> index (int64, -1 when absent) without building a Python dict per call."""
    wanted = np.asarray(wanted).astype(str)
    if len(known) == 0:
        return np.full(len(wanted), -1, np.int64)
    order = np.argsort(known)
    pos = np.searchsorted(known[order], wanted)
    pos = np.clip(pos, 0, len(known) - 1)
    hit = known[order][pos] == wanted
    return np.where(hit, order[pos], -1).astype(np.int64)


def recommend_frame(model: Recommender, catalog: Catalog, user_ids: list[str], k: int | list[int]) -> pd.DataFrame:
    """Ranked recommendations as rows `user_id, rank, item_id, score, title` (seen items excluded)."""
    users = np.asarray([str(u) for u in user_ids])
    ks = np.broadcast_to(np.asarray(k, dtype=np.int64), users.shape)
    if (ks < 1).any():
        raise MfpipeError("k must be at least 1")
    if len(users) == 0:
        return pd.DataFrame({c.name: pd.Series(dtype=object) for c in OUTPUT_SCHEMA.inputs})
    items, scores = model.recommend(catalog.user_index(users), int(ks.max()), exclude_seen=True)
    rank = np.broadcast_to(np.arange(1, items.shape[1] + 1), items.shape)
    keep = (items >= 0) & (rank <= ks[:, None])
    rows, cols = np.nonzero(keep)
    item_ids = catalog.item_ids[items[rows, cols]]
    return pd.DataFrame(
        {
            "user_id": users[rows],
            "rank": rank[rows, cols].astype(np.int64),
            "item_id": item_ids,
            "score": scores[rows, cols].astype(np.float64),
            "title": pd.Series([catalog.titles.get(i) for i in item_ids.tolist()], dtype=object),  # None: no title
        }
    )


class RecommenderModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper: loads our `.npz` model and catalogue, answers `recommend_frame`."""

    def load_context(self, context: Any) -> None:
        self.model = load_model(Path(context.artifacts["model"]))
        self.catalog = Catalog.load(Path(context.artifacts["catalog"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        if "user_id" not in frame.columns:
            raise MfpipeError("input needs a 'user_id' column")
        if "k" in frame.columns:
            k = frame["k"].fillna(DEFAULT_K).astype(np.int64).to_numpy()
        else:
            k = int((params or {}).get("k", DEFAULT_K))
        return recommend_frame(self.model, self.catalog, frame["user_id"].astype(str).tolist(), k)


def pip_requirements() -> list[str]:
    """Pinned requirements of the serving environment, from what is installed here."""
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def input_example(catalog: Catalog) -> pd.DataFrame:
    return pd.DataFrame({"user_id": catalog.user_ids[:2].astype(str).tolist(), "k": [DEFAULT_K] * 2})


def log_pyfunc(model_path: Path, catalog_path: Path, example: pd.DataFrame) -> Any:
    """Log the candidate as a pyfunc in the active run (fast: pip requirements given, no inference)."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=RecommenderModel(),
        artifacts={"model": str(model_path), "catalog": str(catalog_path)},
        signature=SIGNATURE,
        input_example=example,
        pip_requirements=pip_requirements(),
    )


def log_to_run(run_id: str, model_path: Path, catalog_path: Path, example: pd.DataFrame) -> str:
    """Log the candidate's pyfunc into an existing run of the current store; returns its model URI."""
    with mlflow.start_run(run_id=run_id, nested=True, log_system_metrics=False):
        return log_pyfunc(model_path, catalog_path, example).model_uri


def load_pyfunc(model_uri: str) -> RecommenderModel:
    """Load a registered candidate (e.g. `models:/mfpipe-x@champion`) and return our wrapper."""
    try:
        return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    except mlflow.exceptions.MlflowException as exc:
        raise MfpipeError(f"{model_uri}: cannot load the model ({str(exc).splitlines()[0]})") from None


def champion_uri(name: str) -> str:
    return f"models:/{name}@champion"


def recommend_for(model_uri: str, user: str, k: int) -> pd.DataFrame:
    """Top-k for one user from a registered model (what `mfpipe recommend` prints)."""
    if k < 1:
        raise MfpipeError(f"--k {k}: must be at least 1")
    return load_pyfunc(model_uri).predict(None, pd.DataFrame({"user_id": [str(user)], "k": [k]}))


def serve_env(tracking_uri: str) -> dict[str, str]:
    """Environment of `mlflow models serve`: our store, and this venv's scripts (uvicorn) first on PATH."""
    import os
    import sys

    scripts = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def serve_command(model_uri: str, port: int) -> list[str]:
    """`mlflow models serve` for the model in this environment, bound to 127.0.0.1."""
    import sys

    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
