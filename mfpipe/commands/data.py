"""The commands on data and models that need no orchestration: `evaluate`, `validate`, `split`, `bench`.

Each is a plain function; `mfpipe.cli` registers it on the app. Heavy imports stay inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mfpipe.commands.options import (
    ConfigFile,
    DataArg,
    JsonOpt,
    Seed,
    data_options,
    split_options,
    terminal,
)
from mfpipe.errors import MfpipeError


# -- evaluate --
def evaluate(
    recs: Annotated[Path, typer.Option("--recs", help="Recommendations CSV: user_id,item_id,rank.")],
    truth: Annotated[Path, typer.Option("--truth", help="Relevant items CSV: user_id,item_id.")],
    k: Annotated[int, typer.Option("--k", help="Cutoff: ranks > k are ignored.")] = 10,
) -> None:
    """Ranking metrics of a recommendations file against a relevance file; prints JSON only."""
    from mfpipe.file_evaluation import evaluate_files_json

    typer.echo(evaluate_files_json(recs, truth, k))


# -- validate --
@split_options
@data_options
def validate(
    data: DataArg,
    data_options: dict[str, Any],
    split: dict[str, Any],
    out: Annotated[Path | None, typer.Option("--out", help="Write the GX result JSON and Data Docs here.")] = None,
    json_: JsonOpt = False,
    config: ConfigFile = None,
) -> None:
    """Would `mfpipe run` accept DATA? Parse, the GX suite, split feasibility; exit 0 yes, 2 no."""
    import json

    from mfpipe.config import load_config
    from mfpipe.prepare import check

    cfg = load_config(config, overrides={"data": data, "data_options": data_options, "split": split})
    result = check(cfg)
    written = result.report.write(out) if out is not None else {}
    if json_:
        typer.echo(json.dumps({**result.to_json(), "written": {k: str(v) for k, v in written.items()}}))
    else:
        _print_check(result, written)
    raise typer.Exit(0 if result.ok else 2)


def _print_check(check: Any, written: dict[str, Path]) -> None:
    """The GX table, the split, what was written and the verdict (messages escaped: never read as markup)."""
    from rich.markup import escape

    console = terminal()
    console.print(check.report.table())
    if check.split is not None:
        _print_split(check.split, console)
    else:
        console.print(f"[red]split not feasible:[/] {escape(str(check.split_error))}")
    for name, path in written.items():
        console.print(f"wrote {name}: {path}", markup=False)
    console.print("[green]OK: mfpipe run would accept this data[/]" if check.ok else "[red]NOT OK[/]")


def _print_split(summary: Any, console: Any) -> None:
    from rich.markup import escape

    console.print(summary.table())
    for warning in summary.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")


# -- split --
@split_options
@data_options
def split_command(
    data: DataArg,
    data_options: dict[str, Any],
    split: dict[str, Any],
    out: Annotated[Path, typer.Option("--out", help="Folder for train.csv, validation.csv, test.csv, split.json.")],
    seed: Seed = None,
    config: ConfigFile = None,
) -> None:
    """Split DATA (default: global temporal cutoff) and write the parts and split.json into --out."""

    from mfpipe.config import load_config
    from mfpipe.prepare import prepare
    from mfpipe.split import write_split

    cfg = load_config(config, overrides={"data": data, "data_options": data_options, "split": split, "seed": seed})
    _, parts = prepare(cfg)
    write_split(parts, out)
    console = terminal()
    _print_split(parts.summary, console)
    console.print(f"wrote {out}", markup=False)


# -- bench --
def bench(
    only: Annotated[str | None, typer.Option("--only", help="Run only this benchmark (bpr, evaluation, ...).")] = None,
    json_report: Annotated[Path | None, typer.Option("--json-report", help="Write the results as JSON here.")] = None,
) -> None:
    """Benchmarks against the peer libraries: ratio per case (ours vs peer, same run), target and pass."""
    from rich.markup import escape
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from mfpipe.bench import runner

    benchmarks = runner.select(only)
    console = terminal()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        tasks = {name: bar.add_task(f"{name}: waiting", total=None) for name in benchmarks}
        result = runner.run(benchmarks, lambda name, message: bar.update(tasks[name], description=f"{name}: {message}"))
    table = Table("benchmark", "case", "ours", "peer", "unit", "ratio", "target", "pass", title="mfpipe bench")
    for r in result.results:
        passed = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[r.passed]
        target = "-" if r.target is None else f">= {r.target:g}x"
        table.add_row(r.benchmark, r.case, f"{r.ours:.4g}", f"{r.peer:.4g}", r.unit, f"{r.ratio:.2f}x", target, passed)
    console.print(table)
    for name, error in result.errors.items():
        console.print(f"[red]{name} failed:[/] {escape(error)}")
    if json_report is not None:
        runner.write_report(result, json_report)
        console.print(f"wrote {json_report}", markup=False)
    if result.errors:
        raise MfpipeError(f"benchmark(s) failed: {', '.join(result.errors)}", exit_code=1)
