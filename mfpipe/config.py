"""One typed config. Precedence: defaults < `--config` TOML < `MFPIPE_*` environment < CLI flags.

This is the only module that reads the environment for mfpipe settings. Nested fields are addressed
in the environment with a double underscore: `MFPIPE_SPLIT__PROTOCOL=random-per-user`.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mfpipe.errors import MfpipeError

ENV_PREFIX = "MFPIPE_"
MODEL_NAMES = ("svd", "als", "bpr", "pop")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataOptions(_Section):
    """How to read an interactions file; None means auto-detect."""

    user_col: str | None = None
    item_col: str | None = None
    rating_col: str | None = None
    timestamp_col: str | None = None
    sep: str | None = None
    rating_min: float = 0.5
    rating_max: float = 5.0
    #: Where MovieLens archives are downloaded from (a mirror, or a local server in tests).
    movielens_url: str = "https://files.grouplens.org/datasets/movielens/"


class SplitOptions(_Section):
    """Train/validation(/test) split; definitions in DESIGN.md."""

    protocol: Literal["temporal", "random-per-user", "random-per-item"] = "temporal"
    cutoff_quantile: float = Field(0.8, gt=0.0, lt=1.0)
    cutoff: str | None = None
    test_quantile: float | None = Field(None, gt=0.0, lt=1.0)
    relevance_threshold: float | None = None
    seed: int = 42


class Config(_Section):
    """Everything a pipeline run needs; a Prefect flow parameter (so the UI renders it as a form)."""

    data: str = "synthetic:100k"
    data_options: DataOptions = DataOptions()
    data_home: Path = Field(default_factory=lambda: Path(platformdirs.user_cache_dir("mfpipe")) / "data")
    split: SplitOptions = SplitOptions()
    models: list[str] = list(MODEL_NAMES)
    model_params: dict[str, dict[str, Any]] = {}
    k: int = Field(10, ge=1)
    seed: int = 42
    task_runner: Literal["thread", "dask"] = "thread"
    dask_address: str | None = None
    tracking_uri: str | None = None
    registered_model: str | None = None
    promotion_rule: Literal["significant", "strict"] = "significant"
    #: End early when the data digest equals the last finished run's (`mfpipe deploy --skip-unchanged`).
    skip_unchanged: bool = False
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    train_timeout_seconds: float = Field(3600.0, gt=0)  # per model; a model over it is reported failed

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        unknown = sorted(set(value) - set(MODEL_NAMES))
        if unknown:
            raise ValueError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODEL_NAMES)}")
        return value


def _deep_merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _from_env(environ: Mapping[str, str]) -> dict:
    """`MFPIPE_K=20` -> {"k": "20"}; `MFPIPE_SPLIT__PROTOCOL=x` -> {"split": {"protocol": "x"}}."""
    out: dict = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MfpipeError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MfpipeError(f"{path}: not a readable TOML config ({exc})") from None


def load_config(
    file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the config from its four layers; a bad value is one MfpipeError naming the field."""
    merged: dict = {}
    if file is not None:
        merged = _deep_merge(merged, _read_toml(Path(file)))
    merged = _deep_merge(merged, _from_env(os.environ if environ is None else environ))
    merged = _deep_merge(merged, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        source = f"{file}: " if file else ""
        raise MfpipeError(f"{source}invalid config value for '{where}': {err['msg']}") from None
