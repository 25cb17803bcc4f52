"""Great Expectations validation of the canonical interactions frame.

The suites live as JSON in `expectations/` (versioned with the code, package data in the wheel):
`interactions.json` always, `ratings.json` when the frame has a rating column. Each expectation carries
GX's own `severity`: `critical` fails a run, `warning` and `info` are reported. Thresholds that depend on
the run (rating scale, "now + 1 day", minimum sizes) are GX suite parameters, filled in per validation.

GX takes ~6 s to import, so it is imported lazily; one ephemeral context per process is built on first
use and reused, and a validation is one batch over the in-memory frame (~0.5 s at 1M rows).
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from mfpipe.config import DataOptions
from mfpipe.data.loader import without_attrs
from mfpipe.errors import MfpipeError
from mfpipe.split import MIN_INTERACTIONS, MIN_ITEMS, MIN_USERS

if TYPE_CHECKING:
    import rich.table


def _expectations_dir() -> Path:
    """The suites' folder: `mfpipe/expectations/` in an installed wheel (package data that pyproject.toml
    maps from the repository's top-level `expectations/`), that top-level folder itself in a source
    checkout or an editable install, which import mfpipe from the tree."""
    here = Path(__file__).resolve().parent
    packaged = here / "expectations"
    return packaged if packaged.is_dir() else here.parent / "expectations"


EXPECTATIONS_DIR = _expectations_dir()
CORE_SUITE = "interactions"
RATINGS_SUITE = "ratings"
FUTURE_SLACK_SECONDS = 86_400  # timestamps later than now + 1 day are errors (Contracts)
SEVERITIES = ("critical", "warning", "info")
_LOCK = threading.RLock()
_FAIL_STYLE = {"critical": "[red]FAIL[/]", "warning": "[yellow]warn[/]", "info": "[blue]info[/]"}
_PLURAL = {"rating": "ratings", "timestamp": "timestamps", "user_id": "user ids", "item_id": "item ids"}


def load_suite_json(name: str, directory: Path = EXPECTATIONS_DIR) -> dict:
    """The suite's JSON as stored (a missing or broken file is a packaging error, not a user error)."""
    return json.loads((directory / f"{name}.json").read_text())


def load_suite(name: str, directory: Path = EXPECTATIONS_DIR) -> Any:
    """`ExpectationSuite` from JSON, refusing silent drops (GX 1.x skips unknown expectation types)."""
    import great_expectations as gx

    raw = load_suite_json(name, directory)
    suite = gx.ExpectationSuite(**raw)
    if len(suite.expectations) != len(raw["expectations"]):
        loaded = {e.expectation_type for e in suite.expectations}
        lost = sorted({e["type"] for e in raw["expectations"]} - loaded) or ["(duplicate entries)"]
        raise RuntimeError(
            f"{directory / name}.json: GX loaded {len(suite.expectations)} of {len(raw['expectations'])} "
            f"expectations; dropped: {', '.join(lost)}"
        )
    for expectation in suite.expectations:
        if str(expectation.severity.value) not in SEVERITIES:
            raise RuntimeError(f"{directory / name}.json: unknown severity {expectation.severity}")
    return suite


@dataclass
class _Gx:
    """The per-process GX context with one validation definition per suite combination."""

    context: Any
    batch_definition: Any
    definitions: dict[tuple[str, ...], Any] = field(default_factory=dict)

    def definition(self, suites: tuple[str, ...]) -> Any:
        """Validation definition for the union of `suites` (built once, then reused)."""
        if suites not in self.definitions:
            import great_expectations as gx

            expectations = [e for name in suites for e in load_suite(name).expectations]
            suite = self.context.suites.add(gx.ExpectationSuite(name="+".join(suites), expectations=expectations))
            self.definitions[suites] = self.context.validation_definitions.add(
                gx.ValidationDefinition(name="+".join(suites), data=self.batch_definition, suite=suite)
            )
        return self.definitions[suites]


@cache
def _gx() -> _Gx:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no tqdm noise on the CLI's stderr
    asset = context.data_sources.add_pandas("mfpipe").add_dataframe_asset("interactions")
    return _Gx(context, asset.add_batch_definition_whole_dataframe("frame"))


@dataclass(frozen=True)
class ExpectationRow:
    """One expectation's outcome, in the order of the suite JSON."""

    name: str
    column: str | None
    severity: str
    success: bool
    unexpected_count: int | None
    unexpected_percent: float | None
    observed: str
    kwargs: dict

    def describe(self) -> str:
        """The failure in plain words, e.g. '3 ratings outside [0.5, 5]'."""
        col = self.column or ""
        what = _PLURAL.get(col, f"{col} values")
        count = self.unexpected_count
        kw = self.kwargs
        if self.name == "expect_table_columns_to_match_set":
            return f"missing column(s) {', '.join(kw.get('missing', []))} (found: {self.observed})"
        if self.name == "expect_column_values_to_be_of_type":
            return f"column {col} has type {self.observed}, expected {kw.get('type_')}"
        if self.name == "expect_column_values_to_not_be_null":
            return f"{count} {what} missing" + (" or not numeric" if col in ("rating", "timestamp") else "")
        if self.name == "expect_column_values_to_be_between":
            return f"{count} {what} outside [{_num(kw.get('min_value'))}, {_num(kw.get('max_value'))}]"
        if self.name == "expect_table_row_count_to_be_between":
            return f"only {self.observed} interactions (need at least {_num(kw.get('min_value'))})"
        if self.name == "expect_column_unique_value_count_to_be_between":
            return f"only {self.observed} distinct {what} (need at least {_num(kw.get('min_value'))})"
        if self.name == "expect_compound_columns_to_be_unique":
            return f"{count} rows repeat a ({', '.join(kw.get('column_list', []))}) pair"
        return f"{self.name} failed on {col or 'the table'} (observed {self.observed})"


def _detail(row: ExpectationRow) -> str:
    """The table's last cell: the problem in words, else what was observed."""
    if not row.success:
        return row.describe()
    if row.unexpected_count is not None:
        return f"{row.unexpected_count} unexpected"
    return row.observed


def _num(value: Any) -> str:
    """Bounds as people write them: 5 not 5.0; timestamps beyond 1e9 as ISO dates."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value > 1e9:
            return pd.Timestamp(value, unit="s", tz="UTC").isoformat(timespec="seconds")
        return f"{value:g}"
    return str(value)


def _short(value: Any, limit: int = 60) -> str:
    if value is None:
        return ""
    text = json.dumps(value, default=str) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _row(result: Any) -> ExpectationRow:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    res = result.result or {}
    observed = res.get("observed_value")
    if config.type == "expect_table_columns_to_match_set" and isinstance(observed, list):
        kwargs["missing"] = sorted(set(kwargs.get("column_set", [])) - set(observed))
    if result.exception_info and result.exception_info.get("raised_exception"):
        observed = f"error: {result.exception_info.get('exception_message', '')}"
    pct = res.get("unexpected_percent")
    return ExpectationRow(
        name=config.type,
        column=kwargs.get("column") or (",".join(kwargs["column_list"]) if "column_list" in kwargs else None),
        severity=str(config.severity.value),
        success=bool(result.success),
        unexpected_count=res.get("unexpected_count"),
        unexpected_percent=None if pct is None or (isinstance(pct, float) and math.isnan(pct)) else float(pct),
        observed=_short(observed),
        kwargs=kwargs,
    )


@dataclass(frozen=True, eq=False)
class ValidationReport:
    """Typed outcome of one validation: a row per expectation plus the raw GX result (for `write`)."""

    source: str
    suite: str
    rows: list[ExpectationRow]
    parameters: dict[str, float]
    seconds: float
    gx_result: Any = field(repr=False)
    gx_key: Any = field(repr=False)

    @property
    def success_critical(self) -> bool:
        return all(r.success for r in self.rows if r.severity == "critical")

    def failed(self, severity: str | None = None) -> list[ExpectationRow]:
        return [r for r in self.rows if not r.success and severity in (None, r.severity)]

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "suite": self.suite,
            "success_critical": self.success_critical,
            "parameters": self.parameters,
            "seconds": round(self.seconds, 3),
            "expectations": [{k: v for k, v in asdict(r).items() if k != "kwargs"} for r in self.rows],
        }

    def table(self) -> rich.table.Table:
        """Readable table of every expectation and its outcome (fits an 80-column terminal)."""
        from rich.table import Table

        table = Table(title=f"{self.source}: suite {self.suite}", title_justify="left")
        table.add_column("expectation", no_wrap=True)
        for header in ("column", "severity", "result"):
            table.add_column(header)
        table.add_column("detail", overflow="fold", min_width=16)
        for r in self.rows:
            status = "[green]pass[/]" if r.success else _FAIL_STYLE.get(r.severity, "[yellow]warn[/]")
            table.add_row(r.name.removeprefix("expect_"), r.column or "", r.severity, status, _detail(r))
        return table

    def raise_for_critical(self, source: str | None = None) -> None:
        """One-line MfpipeError naming the file and the first failed critical expectation."""
        failed = self.failed("critical")
        if failed:
            first = failed[0]
            more = f"; {len(failed) - 1} more critical failure(s)" if len(failed) > 1 else ""
            raise MfpipeError(f"{source or self.source}: {first.describe()} ({first.name}, critical){more}")

    def write(self, out_dir: Path) -> dict[str, Path]:
        """Write the GX result JSON (`gx_result.json`), our report (`validation.json`) and Data Docs."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"gx_result": out_dir / "gx_result.json", "report": out_dir / "validation.json"}
        paths["gx_result"].write_text(json.dumps(self.gx_result.to_json_dict(), indent=2, default=str))
        paths["report"].write_text(json.dumps(self.to_json(), indent=2))
        paths["data_docs"] = _build_docs(self, out_dir / "data_docs")
        return paths


def _build_docs(report: ValidationReport, docs_dir: Path) -> Path:
    """Render this report's result alone into `docs_dir` (a site added for this write, then removed)."""
    with _LOCK:
        return _build_docs_locked(report, docs_dir)


def _build_docs_locked(report: ValidationReport, docs_dir: Path) -> Path:
    ctx = _gx().context
    store = ctx.validation_results_store
    for key in store.list_keys():  # results of earlier validations in this process stay out of the docs
        store.remove_key(key)
    store.set(report.gx_key, report.gx_result)
    site = f"mfpipe-{time.monotonic_ns()}"
    ctx.add_data_docs_site(
        site_name=site,
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    try:
        ctx.build_data_docs(site_names=[site])
    finally:
        ctx.delete_data_docs_site(site)
        store.remove_key(report.gx_key)
    return docs_dir / "index.html"


def suite_parameters(options: DataOptions) -> dict[str, float]:
    """Run-time values of the `$PARAMETER`s in the suites (minimum sizes: what a split needs)."""
    return {
        "rating_min": options.rating_min,
        "rating_max": options.rating_max,
        "timestamp_max": time.time() + FUTURE_SLACK_SECONDS,
        "min_rows": MIN_INTERACTIONS,
        "min_users": MIN_USERS,
        "min_items": MIN_ITEMS,
    }


def validate_frame(frame: pd.DataFrame, options: DataOptions) -> ValidationReport:
    """Run the suite(s) on the canonical frame; never raises on bad values (see `raise_for_critical`)."""
    suites = (CORE_SUITE, RATINGS_SUITE) if "rating" in frame.columns else (CORE_SUITE,)
    params = suite_parameters(options)
    with _LOCK:  # one shared context and result store per process (flows may validate from threads)
        gx = _gx()
        definition = gx.definition(suites)
        store = gx.context.validation_results_store
        before = set(store.list_keys())
        started = time.perf_counter()  # the validation itself, not the one-off GX import and context
        result = definition.run(
            batch_parameters={"dataframe": without_attrs(frame)},
            expectation_parameters=params,
            result_format="SUMMARY",
        )
        seconds = time.perf_counter() - started
        (key,) = set(store.list_keys()) - before
        store.remove_key(key)  # keep the in-memory store from growing; `write` puts it back
    order = {e.id: i for i, e in enumerate(definition.suite.expectations)}
    results = sorted(result.results, key=lambda r: order.get(r.expectation_config.id, len(order)))
    return ValidationReport(
        source=str(frame.attrs.get("source") or frame.attrs.get("name") or "data"),
        suite=definition.suite.name,
        rows=[_row(r) for r in results],
        parameters=params,
        seconds=seconds,
        gx_result=result,
        gx_key=key,
    )
