"""What a registered version is and how mfpipe logs, loads and serves it.

A version holds the model's own `.npz` (learned arrays + train-seen items + popularity, no pickle),
`catalog.npz` (external ids of the train index space, titles when the data has them) and, as its code,
`mfpipe/pyfunc_model.py` (MLflow models-from-code). That file needs only mlflow-skinny, numpy and
pandas, so `mlflow.pyfunc.load_model` / `mlflow models serve` work on a host without mfpipe.

mfpipe itself never executes or unpickles what the registry holds: `load_pyfunc` (champion re-scoring),
`mfpipe recommend`, `similar` and `serve` (whose HTTP side is `http_server`) download the version's
artifacts and read the two `.npz` files with `allow_pickle=False`, answering with the installed copy of
the same code. So whoever can write to the registry can change which arrays are served, never run code here.

Input: a DataFrame with `user_id` (strings), optionally `k` per row and `items` (a list of item-id
strings per row: interactions since training, folded into the user's vector and excluded from the
answer); `params={"k": …}` sets k for rows without one. Output: one row per recommendation —
`user_id, rank, item_id, score, title, source` — best first, `source` one of `model`, `fold-in`,
`popularity` (a user the model never saw, with no known item to fold in).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

from mfpipe import pyfunc_model
from mfpipe.auth import mask_uri
from mfpipe.data.interactions import Titles
from mfpipe.errors import MfpipeError, one_line
from mfpipe.models import load as load_model
from mfpipe.models.base import FactorModel, Recommender

if TYPE_CHECKING:
    from mfpipe.tracking import Store

T = TypeVar("T")
DEFAULT_K = pyfunc_model.DEFAULT_K
INPUT_SCHEMA = Schema(
    [
        ColSpec("string", "user_id"),
        ColSpec("long", "k", required=False),
        ColSpec(Array(DataType.string), "items", required=False),
    ]
)
OUTPUT_SCHEMA = Schema(
    [
        ColSpec("string", "user_id"),
        ColSpec("long", "rank"),
        ColSpec("string", "item_id"),
        ColSpec("double", "score"),
        ColSpec("string", "title", required=False),
        ColSpec("string", "source"),
    ]
)
SIGNATURE = ModelSignature(
    inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA, params=ParamSchema([ParamSpec("k", "long", DEFAULT_K)])
)
# Everything `pyfunc_model.py` imports (mlflow-skinny carries the pyfunc loader and the scoring server).
REQUIREMENTS = ("mlflow-skinny", "numpy", "pandas")
MODEL_CODE = Path(pyfunc_model.__file__)


@dataclass(frozen=True, eq=False)
class Catalog:
    """External ids of a model's index space (train users/items) and item titles when known (`Titles`:
    a read-only mapping that Prefect does not walk when a loaded version is passed to a task)."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    titles: Mapping[str, str]

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
            titles = Titles(dict(zip(data["title_keys"].tolist(), data["title_values"].tolist(), strict=True)))
            return cls(user_ids=data["user_ids"], item_ids=data["item_ids"], titles=titles)

    @classmethod
    def of(cls, train: Any) -> Catalog:
        """The catalogue of a train `Interactions`: only titles of items the model can recommend."""
        item_ids = np.asarray(train.item_ids).astype(str)
        known = train.titles or {}
        titles = Titles({i: known[i] for i in item_ids.tolist() if i in known})
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


# -- logging ---------------------------------------------------------------------------------------------
def pip_requirements() -> list[str]:
    """Pinned requirements of the serving environment, from what is installed here."""
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def log_pyfunc(model_path: Path, catalog_path: Path) -> Any:
    """Log the candidate as a models-from-code pyfunc in the active run.

    Fast on purpose: pip requirements are given (no inference) and there is no input example, whose
    validation loads and calls the model again (~3.6 s per model); the signature documents the input.
    """
    with warnings.catch_warnings():  # it would advise an input example on stderr for every candidate
        warnings.filterwarnings("ignore", message=".*An input example was not provided")  # after colour codes
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={"model": str(model_path), "catalog": str(catalog_path)},
            signature=SIGNATURE,
            pip_requirements=pip_requirements(),
        )


def log_to_run(run_id: str, model_path: Path, catalog_path: Path) -> str:
    """Log the candidate's pyfunc into an existing run of the current store; returns its model URI."""
    with mlflow.start_run(run_id=run_id, nested=True, log_system_metrics=False):
        return log_pyfunc(model_path, catalog_path).model_uri


# -- loading (never by unpickling or running the version's code) ------------------------------------------
@dataclass(frozen=True, eq=False)
class RecommenderModel:
    """A registered version read from its `.npz` artifacts: the model and its catalogue."""

    model: Recommender
    catalog: Catalog


@contextmanager
def _artifacts(model_uri: str) -> Iterator[tuple[Path, Path]]:
    """The version's model and catalog `.npz`, downloaded into a folder removed afterwards.

    Their paths come from the pyfunc flavour of the version's MLmodel (YAML, read safely) and must
    stay inside the download.
    """
    folder = Path(tempfile.mkdtemp(prefix="mfpipe-model-"))
    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(folder))).resolve()
        flavor = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
        paths = []
        for key in ("model", "catalog"):
            path = (root / flavor["artifacts"][key]["path"]).resolve()
            if not path.is_relative_to(root) or not path.is_file():
                raise ValueError(f"artifact '{key}' missing")
            paths.append(path)
        yield paths[0], paths[1]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _load(model_uri: str, read: Callable[[Path, Path], T]) -> T:
    """`read(model_path, catalog_path)` on the version's artifacts; any failure is one MfpipeError line."""
    try:
        with _artifacts(model_uri) as (model_path, catalog_path):
            return read(model_path, catalog_path)
    except MfpipeError as exc:
        raise MfpipeError(f"{model_uri}: cannot load the model ({exc})") from None
    except (mlflow.exceptions.MlflowException, OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile,
            yaml.YAMLError, json.JSONDecodeError) as exc:  # fmt: skip
        raise MfpipeError(f"{model_uri}: cannot load the model ({one_line(exc)})") from None


def load_pyfunc(model_uri: str) -> RecommenderModel:
    """A registered version (e.g. `models:/mfpipe-x/3`) as our model and catalogue, from its `.npz` files."""
    return _load(model_uri, lambda model, catalog: RecommenderModel(load_model(model), Catalog.load(catalog)))


def load_recommendations(model_uri: str) -> pyfunc_model.Recommendations:
    """A registered version as the logged pyfunc answers it, built from its `.npz` files by the installed code."""
    return _load(model_uri, pyfunc_model.Recommendations.load)


def champion_version_uri(store: Store, name: str) -> str:
    """`models:/NAME/N` of the current champion: a pinned version names itself in every error."""
    from mfpipe import tracking

    with tracking.tracking_errors(store):
        champion = tracking.alias_version(store, name, tracking.CHAMPION)
    if champion is None:
        raise MfpipeError(f"{name}: no champion yet in {mask_uri(store.uri)} (run `mfpipe run` first)")
    return f"models:/{name}/{champion.version}"


def recommend_for(model_uri: str, user: str, k: int, items: list[str] | None = None) -> tuple[pd.DataFrame, str]:
    """Top-k for one user with `items` folded in, and its `source` (what `mfpipe recommend` prints)."""
    if k < 1:
        raise MfpipeError(f"--k {k}: must be at least 1")
    frame = pd.DataFrame({"user_id": [str(user)], "k": [k]})
    if items is not None:
        frame["items"] = [items]
    recommendations = load_recommendations(model_uri)
    return recommendations.frame(frame), recommendations.source(user, items)


def similar_items(loaded: RecommenderModel, model_uri: str, item_id: str, k: int) -> pd.DataFrame:
    """The k nearest items by cosine of the item factors, the item itself excluded: rank, item_id, score, title."""
    if k < 1:
        raise MfpipeError(f"--k {k}: must be at least 1")
    model, catalog = loaded.model, loaded.catalog
    if not isinstance(model, FactorModel):
        raise MfpipeError(f"{model_uri}: a '{model.name}' model has no item factors to compare (svd, als, bpr have)")
    index = int(catalog.item_index(np.array([item_id]))[0])
    if index < 0:
        raise MfpipeError(f"item '{item_id}' is not in the catalogue of {model_uri}")
    factors = np.asarray(model.item_factors, np.float64)
    norms = np.linalg.norm(factors, axis=1)
    cosine = (factors @ factors[index]) / np.maximum(norms * norms[index], np.finfo(np.float64).tiny)
    cosine[index] = -np.inf
    top, scores = pyfunc_model.top_k(cosine[None, :].astype(np.float32), k, np.arange(min(k + 1, len(cosine))))
    keep = top[0] >= 0
    ids = catalog.item_ids[top[0][keep]].astype(str)
    return pd.DataFrame({
        "rank": np.arange(1, keep.sum() + 1), "item_id": ids, "score": scores[0][keep].astype(np.float64),
        "title": [catalog.titles.get(i) for i in ids.tolist()],
    })  # fmt: skip
