"""The `mfpipe` command. Thin: parse flags, build the config, call one library function, print.

Prefect and `flows` are imported lazily, only by the commands that orchestrate, so `--help` and the
library commands stay fast. Every user error is one line on stderr and exit code 2 (1: a failed run).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mfpipe import __version__
from mfpipe.errors import MfpipeError

app = typer.Typer(
    name="mfpipe",
    help="Retraining pipeline for matrix-factorization recommenders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# -- shared option types ---------------------------------------------------------------------------
UserCol = Annotated[str | None, typer.Option("--user-col", help="User id column (default: auto-detect).")]
ItemCol = Annotated[str | None, typer.Option("--item-col", help="Item id column (default: auto-detect).")]
RatingCol = Annotated[str | None, typer.Option("--rating-col", help="Rating column (default: auto-detect).")]
TimestampCol = Annotated[str | None, typer.Option("--timestamp-col", help="Timestamp column (default: auto-detect).")]
Sep = Annotated[str | None, typer.Option("--sep", help="Field delimiter (default: auto-detect).")]
RatingMin = Annotated[float | None, typer.Option("--rating-min", help="Lowest valid rating [0.5].")]
RatingMax = Annotated[float | None, typer.Option("--rating-max", help="Highest valid rating [5].")]
Protocol = Annotated[
    str | None, typer.Option("--protocol", help="temporal | random-per-user | random-per-item [temporal].")
]
CutoffQuantile = Annotated[float | None, typer.Option("--cutoff-quantile", help="Timestamp quantile of the cutoff.")]
Cutoff = Annotated[str | None, typer.Option("--cutoff", help="Explicit cutoff date (ISO-8601, UTC if naive).")]
TestQuantile = Annotated[float | None, typer.Option("--test-quantile", help="Second cutoff: a test slice after it.")]
RelevanceThreshold = Annotated[float | None, typer.Option("--relevance-threshold", help="Rating >= R is relevant.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="TOML config file.")]


def data_overrides(
    user_col: str | None = None,
    item_col: str | None = None,
    rating_col: str | None = None,
    timestamp_col: str | None = None,
    sep: str | None = None,
    rating_min: float | None = None,
    rating_max: float | None = None,
) -> dict[str, Any]:
    """CLI data flags -> the `data_options` section of the config (unset flags are left out)."""
    values = dict(
        user_col=user_col, item_col=item_col, rating_col=rating_col, timestamp_col=timestamp_col,
        sep=sep, rating_min=rating_min, rating_max=rating_max,
    )  # fmt: skip
    return {k: v for k, v in values.items() if v is not None}


def split_overrides(
    protocol: str | None = None,
    cutoff_quantile: float | None = None,
    cutoff: str | None = None,
    test_quantile: float | None = None,
    relevance_threshold: float | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """CLI split flags -> the `split` section of the config (unset flags are left out)."""
    values = dict(
        protocol=protocol, cutoff_quantile=cutoff_quantile, cutoff=cutoff,
        test_quantile=test_quantile, relevance_threshold=relevance_threshold, seed=seed,
    )  # fmt: skip
    return {k: v for k, v in values.items() if v is not None}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mfpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Retraining pipeline for matrix-factorization recommenders."""


def main() -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit."""
    try:
        app()
    except MfpipeError as exc:
        typer.echo(f"mfpipe: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("mfpipe: interrupted", err=True)
        sys.exit(130)
