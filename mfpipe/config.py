"""One typed config. Precedence: defaults < `--config` TOML < `MFPIPE_*` environment < CLI flags.

This is the only module that reads the environment for mfpipe settings. Only declared fields are read
(pydantic-settings' environment source over `Config`), nested ones with a double underscore
(`MFPIPE_SPLIT__PROTOCOL=random-per-user`), and values arrive typed (`MFPIPE_K=20` is the int 20,
`MFPIPE_MODELS=als,pop` a list). Any other `MFPIPE_*` variable (`MFPIPE_CRON` of the compose worker,
`MFPIPE_PREFECT_PORT` of the stack) is not config and is left alone. `Config` itself stays a plain
pydantic model: it is a Prefect flow parameter, and constructing it must never read the environment.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict, SettingsError

from mfpipe.auth import mask_uri
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
    #: The random protocols' seed; unset, it is the run's `seed` (one `--seed` sets both).
    seed: int = 42


class Config(_Section):
    """Everything a pipeline run needs; a Prefect flow parameter (so the UI renders it as a form)."""

    data: str = "synthetic:100k"
    data_options: DataOptions = DataOptions()
    data_home: Path = Field(default_factory=lambda: Path(platformdirs.user_cache_dir("mfpipe")) / "data")
    split: SplitOptions = SplitOptions()
    #: NoDecode: the environment gives `svd,als` (as the `--models` flag does), not JSON; split below.
    models: Annotated[list[str], NoDecode] = list(MODEL_NAMES)
    model_params: dict[str, dict[str, Any]] = {}
    k: int = Field(10, ge=1)
    seed: int = 42
    task_runner: Literal["thread", "dask"] = "thread"
    dask_address: str | None = None
    #: Secret, since a URI may carry a password: shown and serialised (flow parameters, reports) masked.
    tracking_uri: SecretStr | None = None
    registered_model: str | None = None
    promotion_rule: Literal["significant", "strict"] = "significant"
    #: End early when the data digest equals the last finished run's (`mfpipe deploy --skip-unchanged`).
    skip_unchanged: bool = False
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    train_timeout_seconds: float = Field(3600.0, gt=0)  # per model; a model over it is reported failed
    #: Optuna trials per model on an inner temporal split of the train part (`mfpipe run --search N`); 0: the
    #: tuned defaults. The best setting is refit on the whole train part; validation never chooses it.
    search_trials: int = Field(0, ge=0)
    #: Largest population-stability index (ratings, activity) between the champion's training data and this
    #: run's at which a new champion may still be promoted; None: drift is reported, never blocks.
    drift_threshold: float | None = Field(None, gt=0)
    #: Where `mfpipe deploy` points the alerts of scheduled runs (a run that failed or did not promote):
    #: a URL that takes a JSON POST (Slack/Teams incoming webhook, a chat bot, an on-call hook). Secret,
    #: since such URLs carry their token: never dumped, so it reaches no flow parameter, config hash or
    #: report; the Prefect server keeps it in a Webhook block. None: no alerts (redeploying removes them).
    alert_webhook_url: SecretStr | None = Field(None, exclude=True)

    @field_serializer("tracking_uri", when_used="json")
    def _masked_uri(self, uri: SecretStr | None) -> str | None:
        return None if uri is None else mask_uri(uri.get_secret_value())

    @model_validator(mode="after")
    def _one_seed(self) -> Config:
        if "seed" not in self.split.model_fields_set and self.split.seed != self.seed:
            self.split = self.split.model_copy(update={"seed": self.seed})
        return self

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


class _EnvLayer(Config, BaseSettings):
    """`Config`'s fields as pydantic-settings sees them; only the environment source uses it, never instantiated."""

    # An empty variable is unset: compose's `${VAR}` of an unset VAR gives "", which is no value.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False, env_ignore_empty=True
    )


class _EnvSource(EnvSettingsSource):
    """The environment source over a given mapping (`load_config(environ=...)`) instead of `os.environ`."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(_EnvLayer)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._environ.items() if value or not self.env_ignore_empty}


def _json_leaves(value: Any) -> Any:
    """Free-form values (`model_params`, typed `Any`): `MFPIPE_MODEL_PARAMS__ALS__FACTORS=32` is 32, not "32"."""
    if isinstance(value, Mapping):
        return {key: _json_leaves(item) for key, item in value.items()}
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value  # a plain word: a string
    return value


def _declared_only(model: type[BaseModel], values: Mapping[str, Any]) -> dict[str, Any]:
    """Drop keys `model` does not declare (`MFPIPE_SPLIT__TYPO`), recursing into sections.

    pydantic-settings matches top-level names exactly but keeps any key under a nested prefix; an
    undeclared one is not config either, so it is left alone rather than failing `extra="forbid"`.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel) and isinstance(value, Mapping):
            value = _declared_only(section, value)
            if not value:
                continue  # nothing declared in it: the section stays unset
        elif typing.get_origin(section) is dict:
            value = _json_leaves(value)
        out[key] = value
    return out


def _from_env(environ: Mapping[str, str]) -> dict:
    """Declared `MFPIPE_*` values: `MFPIPE_K=20` -> {"k": "20"}, `MFPIPE_SPLIT__SEED=1` -> {"split": {"seed": "1"}}.

    Declared scalars stay strings here and get their types from `Config`'s validation (as flag values do);
    dicts are decoded from JSON, `models` from a comma-separated list, free-form leaves by `_json_leaves`.
    """
    try:
        values = _EnvSource(environ)()
    except SettingsError as exc:  # a JSON value that does not parse, e.g. MFPIPE_MODEL_PARAMS='{'
        found = re.search(r'field "(\w+)"', str(exc))
        name = found.group(1) if found else "config"
        raise MfpipeError(f"{ENV_PREFIX}{name.upper()}: invalid config value for '{name}': not valid JSON") from None
    return _declared_only(Config, values)


def _has_path(values: Mapping[str, Any], path: tuple[Any, ...]) -> bool:
    node: Any = values
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


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
    """Build the config from its four layers; a bad value is one MfpipeError naming the field and its source.

    Only what a layer sets counts as set (`model_dump(exclude_unset=True)` is what a deployment stores).
    """
    from_file = _read_toml(Path(file)) if file is not None else {}
    from_env = _from_env(os.environ if environ is None else environ)
    from_flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    merged = _deep_merge(_deep_merge(from_file, from_env), from_flags)
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "config"
        if _has_path(from_flags, loc[:1]):
            source = ""
        elif _has_path(from_env, loc[:2] if len(loc) > 1 and isinstance(loc[1], str) else loc[:1]):
            source = f"{ENV_PREFIX}{'__'.join(str(p) for p in loc[:2]).upper()}: "
        else:
            source = f"{file}: " if file else ""
        raise MfpipeError(f"{source}invalid config value for '{where}': {err['msg']}") from None
