"""Name -> model class registry; `create` builds a model from config values with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mfpipe.errors import MfpipeError
from mfpipe.models.als import ALS
from mfpipe.models.base import FactorModel, ModelParams, Recommender
from mfpipe.models.bpr import BPR
from mfpipe.models.popularity import Popularity
from mfpipe.models.svd import SVD

MODELS: dict[str, type[Recommender]] = {cls.name: cls for cls in (SVD, ALS, BPR, Popularity)}


def create(name: str, params: dict[str, Any] | None = None, threads: int | None = None, seed: int = 42) -> Recommender:
    """A fresh model `name` ("svd", "als", "bpr", "pop") with `params` over its tuned defaults."""
    if name not in MODELS:
        raise MfpipeError(f"unknown model '{name}'; choose from {', '.join(MODELS)}")
    return MODELS[name](threads=threads, seed=seed, **(params or {}))


def load(path: Path) -> Recommender:
    """Load a model saved by `Recommender.save`, whatever its class."""
    name = Recommender.saved_name(path)
    if name not in MODELS:
        raise MfpipeError(f"{path}: holds an unknown model '{name}'")
    return MODELS[name].load(path)


__all__ = ["MODELS", "FactorModel", "ModelParams", "Recommender", "create", "load"]
