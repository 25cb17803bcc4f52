"""The one chain from a data spec to a split: load -> validate (Great Expectations) -> convert -> split.

`mfpipe validate`, `mfpipe split` and the retrain flow all go through these functions, so they accept
and refuse the same data. The flow calls the stages one by one (each is a cached task); the commands
call `check` and `prepare`, which chain them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mfpipe.config import Config
from mfpipe.data import Interactions, read_frame, to_interactions
from mfpipe.errors import MfpipeError
from mfpipe.split import Split, SplitSummary, split_interactions
from mfpipe.validation import ValidationReport, validate_frame


def load(config: Config) -> pd.DataFrame:
    """The canonical interactions frame of `config.data` (download / generate / parse)."""
    return read_frame(config.data, config.data_options, config.data_home, config.seed)


@dataclass(frozen=True)
class Validated:
    """A validation outcome that survives caching: the summary JSON and the folder with the GX files."""

    summary: dict[str, Any]
    success: bool
    error: str | None
    files: Path

    def raise_if_failed(self) -> None:
        """A critical expectation failed: nothing may be trained on this data."""
        if not self.success:
            raise MfpipeError(f"validation failed, nothing was trained: {self.error}")


def validate(frame: pd.DataFrame, config: Config, out_dir: Path) -> Validated:
    """Run the GX suites and write the GX result and Data Docs to `out_dir` (kept for the MLflow run)."""
    report = validate_frame(frame, config.data_options)
    report.write(out_dir)
    error = None
    try:
        report.raise_for_critical(config.data)
    except MfpipeError as exc:
        error = str(exc)
    return Validated(summary=report.to_json(), success=report.success_critical, error=error, files=out_dir)


def split(frame: pd.DataFrame, config: Config) -> tuple[Interactions, Split]:
    """The validated frame as `Interactions` (built once, shared by every model) and its split."""
    data = to_interactions(frame)
    return data, split_interactions(data, config.split)


def prepare(config: Config) -> tuple[Interactions, Split]:
    """load -> validate (a critical failure raises) -> split: what `mfpipe split` writes."""
    frame = load(config)
    validate_frame(frame, config.data_options).raise_for_critical(str(frame.attrs.get("source", config.data)))
    return split(frame, config)


@dataclass(frozen=True, eq=False)
class DataCheck:
    """`mfpipe validate`: would `mfpipe run` accept this data? (the suite, then split feasibility)."""

    report: ValidationReport
    split: SplitSummary | None
    split_error: str | None

    @property
    def ok(self) -> bool:
        return self.report.success_critical and self.split is not None

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "validation": self.report.to_json(),
            "split": None if self.split is None else self.split.to_json(),
            "split_error": self.split_error,
        }


def check(config: Config) -> DataCheck:
    """Parse `config.data` (structural errors raise), run the suite, then try the configured split.

    Value-level failures are reported, not raised, so the caller can still write the GX result.
    """
    frame = load(config)
    report = validate_frame(frame, config.data_options)
    if not report.success_critical:
        return DataCheck(report, None, "not attempted: a critical expectation failed")
    try:
        summary = split(frame, config)[1].summary
    except MfpipeError as exc:
        return DataCheck(report, None, str(exc))
    return DataCheck(report, summary, None)
