"""What several commands share, declared once: option groups and types, the console, the registered model."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer


class Protocol(StrEnum):
    temporal = "temporal"
    random_per_user = "random-per-user"
    random_per_item = "random-per-item"


class TaskRunner(StrEnum):
    thread = "thread"
    dask = "dask"


# -- options several commands share, each declared once -------------------------------------------------
@dataclass(frozen=True)
class OptionGroup:
    """Options that several commands take, declared once; a command receives them as one dict `name`.

    Only the flags a user gave are in the dict, so the config's lower layers (file, environment) keep
    the rest.
    """

    name: str
    options: dict[str, Any]  # parameter name -> Annotated[type | None, typer.Option(...)], default None

    def __call__(self, command: Callable[..., Any]) -> Callable[..., Any]:
        resolved = inspect.signature(command, eval_str=True)
        own = [p for p in resolved.parameters.values() if p.name != self.name]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=hint)
                 for n, hint in self.options.items()]  # fmt: skip

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = {n: v.value if isinstance(v, Enum) else v for n, v in ((n, kwargs.pop(n)) for n in self.options)}
            return command(**kwargs, **{self.name: {n: v for n, v in given.items() if v is not None}})

        params = sorted([*own, *added], key=lambda p: p.kind)
        wrapper.__signature__ = resolved.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper


def _option(flag: str, kind: Any, text: str) -> Any:
    return Annotated[kind | None, typer.Option(flag, help=text)]


data_options = OptionGroup("data_options", {
    "user_col": _option("--user-col", str, "User id column (default: auto-detect)."),
    "item_col": _option("--item-col", str, "Item id column (default: auto-detect)."),
    "rating_col": _option("--rating-col", str, "Rating column (default: auto-detect; 'none': implicit feedback)."),
    "timestamp_col": _option("--timestamp-col", str, "Timestamp column (default: auto-detect)."),
    "sep": _option("--sep", str, "Field delimiter (default: auto-detect)."),
    "rating_min": _option("--rating-min", float, "Lowest valid rating (default 0.5)."),
    "rating_max": _option("--rating-max", float, "Highest valid rating (default 5)."),
})  # fmt: skip
split_options = OptionGroup("split", {
    "protocol": _option("--protocol", Protocol, "Evaluation protocol (default temporal)."),
    "cutoff_quantile": _option("--cutoff-quantile", float, "Timestamp quantile of the cutoff (default 0.8)."),
    "cutoff": _option("--cutoff", str, "Explicit cutoff date (ISO-8601, UTC if naive)."),
    "test_quantile": _option("--test-quantile", float, "Second cutoff: a test slice after it."),
    "relevance_threshold": _option("--relevance-threshold", float, "Rating >= R is relevant (default 4)."),
})  # fmt: skip
ConfigFile = Annotated[Path | None, typer.Option("--config", help="TOML config file.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed of the split and the models (default 42).")]
DataArg = Annotated[
    str, typer.Argument(metavar="DATA", help="A file or folder, a source name (ml-100k, ...) or synthetic[:N].")
]
DatasetOpt = Annotated[
    str | None, typer.Option("--dataset", help="Dataset name of the registered model (default: the default data's).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout only.")]
HowMany = Annotated[int, typer.Option("--k", help="How many items.")]


def terminal() -> Any:
    """A rich console on stdout. Off a terminal (pipes, logs, CI) rich would assume 80 columns and squeeze
    the wider tables; there it is 200 wide, and plain lines are not wrapped, so each stays greppable."""
    from rich.console import Console

    terminal = sys.stdout.isatty()
    return Console(width=None if terminal else 200, soft_wrap=not terminal)


def registered_model(dataset: str | None, config: Path | None) -> tuple[Any, str]:
    """The store and the registered model name for `--dataset` (default: the default data's name)."""
    from mfpipe import tracking
    from mfpipe.config import load_config

    cfg = load_config(config)
    store = tracking.open_store(cfg.tracking_uri)
    if dataset is None:
        from mfpipe.data import dataset_name

        dataset = dataset_name(cfg.data)
    return store, tracking.registered_model_name(dataset, cfg.split.protocol, cfg.registered_model)
