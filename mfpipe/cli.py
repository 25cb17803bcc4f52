"""The `mfpipe` command. Thin: parse flags, build the config, call one library function, print.

Prefect and `flows` are imported lazily, only by the commands that orchestrate, so `--help` and the
library commands stay fast. Every user error is one line on stderr and exit code 2 (1: a failed run).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from mfpipe import __version__
from mfpipe.auth import mask_uri
from mfpipe.errors import MfpipeError, one_line


class Protocol(StrEnum):
    temporal = "temporal"
    random_per_user = "random-per-user"
    random_per_item = "random-per-item"


class TaskRunner(StrEnum):
    thread = "thread"
    dask = "dask"


# Help is plain text (rich_markup_mode=None): help strings are never parsed as rich markup, which would
# swallow words in square brackets such as "[synthetic:100k]". Typer's completion options stay on.
app = typer.Typer(
    name="mfpipe",
    help="Retraining pipeline for matrix-factorization recommenders.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


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


def _console() -> Any:
    """A rich console on stdout. Off a terminal (pipes, logs, CI) rich would assume 80 columns and squeeze
    the wider tables; there it is 200 wide, and plain lines are not wrapped, so each stays greppable."""
    from rich.console import Console

    terminal = sys.stdout.isatty()
    return Console(width=None if terminal else 200, soft_wrap=not terminal)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mfpipe {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Retraining pipeline for matrix-factorization recommenders."""
    if ctx.invoked_subcommand is None:  # bare `mfpipe`: a usage error whose useful answer is the help
        typer.echo(ctx.get_help(), err=True)
        raise typer.Exit(2)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every user error is one line `mfpipe: error: ...` on stderr, never a traceback.

    Click runs outside its standalone mode so that its usage errors come back as exceptions (standalone,
    it prints them as a multi-line block) and are said like a MfpipeError. Exit 2: bad input or usage;
    1: a run that failed, or an I/O error (OSError); 130: interrupted.
    """
    try:
        code = app(args=argv, prog_name="mfpipe", standalone_mode=False)
    except typer.TyperException as exc:  # Click's errors: usage (exit 2), files and the like (exit 1)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _fail(f"{exc.format_message()}{hint}", exc.exit_code)
    except typer.Abort:
        _fail("aborted", 1)
    except MfpipeError as exc:
        _fail(str(exc), exc.exit_code)
    except OSError as exc:  # a path that cannot be written, a full disk: the command failed, said in a line
        _fail(one_line(exc), 1)
    except KeyboardInterrupt:  # raised outside a command (Click turns one inside into exit code 130)
        code = 130
    if code == 130:
        typer.echo("mfpipe: interrupted", err=True)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, exit_code: int) -> NoReturn:
    typer.echo(f"mfpipe: error: {' '.join(message.split())}", err=True)
    sys.exit(exit_code)


# -- evaluate --
@app.command()
def evaluate(
    recs: Annotated[Path, typer.Option("--recs", help="Recommendations CSV: user_id,item_id,rank.")],
    truth: Annotated[Path, typer.Option("--truth", help="Relevant items CSV: user_id,item_id.")],
    k: Annotated[int, typer.Option("--k", help="Cutoff: ranks > k are ignored.")] = 10,
) -> None:
    """Ranking metrics of a recommendations file against a relevance file; prints JSON only."""
    from mfpipe.evaluation import evaluate_files_json

    typer.echo(evaluate_files_json(recs, truth, k))


# -- validate --
@app.command()
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

    console = _console()
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
@app.command("split")
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
    console = _console()
    _print_split(parts.summary, console)
    console.print(f"wrote {out}", markup=False)


# -- deploy --
@app.command()
def deploy(
    cron: Annotated[str, typer.Option("--cron", help="When to retrain (cron, in --timezone).")] = "0 3 * * *",
    timezone: Annotated[str, typer.Option("--timezone", help="IANA time zone of --cron.")] = "UTC",
    work_pool: Annotated[
        str | None,
        typer.Option("--work-pool", help="Register to this process work pool (e.g. mfpipe) instead of serving here."),
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Data of the scheduled runs (default synthetic:100k).")
    ] = None,
    models: Annotated[str | None, typer.Option("--models", help="Comma-separated: svd,als,bpr,pop.")] = None,
    skip_unchanged: Annotated[
        bool, typer.Option("--skip-unchanged", help="Skip a run when the data digest equals the last run's.")
    ] = False,
    alert_webhook_url: Annotated[
        str | None,
        typer.Option(
            "--alert-webhook-url",
            help="POST a JSON alert here when a run fails or does not promote (or MFPIPE_ALERT_WEBHOOK_URL).",
        ),
    ] = None,
    config: ConfigFile = None,
) -> None:
    """Deployment retrain/scheduled: serve it here (Ctrl-C stops), or register it for `prefect worker start`."""
    from flows import deploy as deployment
    from mfpipe.config import load_config

    overrides = {"data": data, "models": models, "skip_unchanged": skip_unchanged or None,
                 "alert_webhook_url": alert_webhook_url}  # fmt: skip
    cfg = load_config(config, overrides=overrides)

    def alerts(deployed: deployment.Deployed) -> None:
        # Never the URL itself: it carries the webhook's token.
        state = "on failed / not promoted runs" if deployed.alerts else "off (no alert_webhook_url)"
        typer.echo(f"Alerts: {state}" + (f" ({', '.join(deployed.alerts)})" if deployed.alerts else ""))

    if work_pool is None:
        typer.echo(f"Serving retrain/scheduled (cron {cron!r}, {timezone}); Ctrl-C stops serving, the schedule stays.")
        deployment.serve(cfg, cron, timezone, on_ready=alerts)
        return
    deployed = deployment.register(cfg, cron, timezone, work_pool)
    typer.echo(f"Deployment {deployed.name} ({deployed.deployment_id}): cron {cron!r} {timezone}, pool {work_pool!r}")
    alerts(deployed)
    typer.echo(f"Run it with a worker: prefect worker start --pool {work_pool}")


# -- up --
@app.command()
def up(
    prefect_port: Annotated[int, typer.Option("--prefect-port", help="Port of the Prefect server.")] = 4200,
    mlflow_port: Annotated[int, typer.Option("--mlflow-port", help="Port of the MLflow UI.")] = 5000,
    config: ConfigFile = None,
    auth: Annotated[
        bool,
        typer.Option("--auth", help="Require logins (MLflow basic-auth, Prefect auth string); see .mfpipe/auth.env."),
    ] = False,
) -> None:
    """Start a local Prefect server and the MLflow UI on 127.0.0.1 (project's store); Ctrl-C stops both."""
    from mfpipe import auth as credentials_file
    from mfpipe import services, tracking
    from mfpipe.config import load_config

    store = tracking.open_store(load_config(config).tracking_uri)
    artifacts = store.artifact_root or Path("mlruns/artifacts")
    credentials = None
    if auth:
        credentials, created = credentials_file.load_or_create(services.UP_STATE_DIR / "auth.env")
        state = "created with new random secrets" if created else "existing"
        typer.echo(f"Auth on: credentials in {services.UP_STATE_DIR / 'auth.env'} ({state}, mode 600).")

    def ready(result: services.UpResult) -> None:
        prefect, mlflow = result.services
        typer.echo(f"Prefect UI  {prefect.url}    (API {services.prefect_api_url(prefect)})")
        typer.echo(f"MLflow UI   {mlflow.url}    (store {mask_uri(store.uri)})")
        typer.echo(f"Both answered in {result.seconds_to_healthy:.1f} s. In another shell:")
        typer.echo(f"  export PREFECT_API_URL={services.prefect_api_url(prefect)}")
        if credentials is not None:  # the file's path, never its secrets
            typer.echo(f"  set -a; . {services.UP_STATE_DIR / 'auth.env'}; set +a   # log in (UIs: the same user)")
        typer.echo("Ctrl-C stops both.")

    typer.echo(f"Starting the Prefect server and the MLflow UI (logs in {services.UP_LOG_DIR}) ...")
    services.up(prefect_port, mlflow_port, store.uri, artifacts, services.UP_LOG_DIR, ready, auth=credentials)
    typer.echo("Stopped the Prefect server and the MLflow UI.")


# -- bench --
@app.command()
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
    console = _console()
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


# -- run --
ModelsOpt = Annotated[str | None, typer.Option("--models", help="Comma-separated: svd,als,bpr,pop (default: all).")]


@app.command()
@split_options
@data_options
def run(
    data_options: dict[str, Any],
    split: dict[str, Any],
    data: Annotated[str | None, typer.Option("--data", help="File/folder, source name or synthetic[:N].")] = None,
    config: ConfigFile = None,
    models: ModelsOpt = None,
    k: Annotated[int | None, typer.Option("--k", help="Cutoff of the ranking metrics (default 10).")] = None,
    seed: Seed = None,
    task_runner: Annotated[TaskRunner | None, typer.Option("--task-runner", help="Where models train.")] = None,
    dask_address: Annotated[str | None, typer.Option("--dask-address", help="Dask scheduler, tcp://host:port.")] = None,
    search: Annotated[
        int | None, typer.Option("--search", help="Optuna trials per model on an inner split of train (default 0).")
    ] = None,
    json_report: Annotated[Path | None, typer.Option("--json-report", help="Write the run report (JSON) here.")] = None,
    json_: Annotated[
        bool, typer.Option("--json", help="Print the run report (JSON) on stdout only; the run's logs go to stderr.")
    ] = False,
) -> None:
    """Run the retraining flow: validate, split, train all models in parallel, register, promote `champion`."""
    import contextlib
    import json

    from mfpipe.config import load_config

    cfg = load_config(
        config,
        overrides={
            "data": data, "models": models, "k": k, "seed": seed, "dask_address": dask_address, "search_trials": search,
            "task_runner": task_runner.value if task_runner else None, "data_options": data_options, "split": split,
        },
    )  # fmt: skip
    _check_data_source(cfg)
    if json_report is not None:  # an unusable report path fails now, not after the run
        json_report.parent.mkdir(parents=True, exist_ok=True)
    from flows.retrain import run as run_flow

    # With --json, stdout is the report alone: whatever the run prints (Prefect's console logs are bound
    # to sys.stdout as it is when the flow starts) goes to stderr meanwhile.
    with contextlib.redirect_stdout(sys.stderr) if json_ else contextlib.nullcontext():
        outcome = run_flow(cfg)
    if json_report is not None:
        json_report.write_text(json.dumps(outcome.report, indent=2))
    if json_:
        typer.echo(json.dumps(outcome.report))
        return
    _print_outcome(outcome, cfg.k, json_report)


def _check_data_source(cfg: Any) -> None:
    """Fail on a data spec that names nothing before the flow starts Prefect's API (that takes seconds).

    An existing path, a MovieLens source name and `synthetic[:N]` pass unread (the flow reads them once).
    Any other spec goes to the data layer's own reader, which reads nothing for a spec it cannot resolve
    and raises its one-line error (`missing.csv: file not found`), so its rules and words stay in one place.
    """
    from mfpipe.data import read_frame, synthetic_size
    from mfpipe.data.movielens import PINNED_MD5

    spec = cfg.data
    if Path(spec).expanduser().exists() or spec in PINNED_MD5 or synthetic_size(spec) is not None:
        return
    read_frame(spec, cfg.data_options, cfg.data_home, cfg.seed)


def _print_outcome(outcome: Any, k: int, json_report: Path | None) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    report = outcome.report
    champion = report["champion"]
    metrics = [f"ndcg@{k}", f"precision@{k}", f"recall@{k}", f"map@{k}"]
    headers = [f"NDCG@{k}", f"P@{k}", f"R@{k}", f"MAP@{k}"]
    title = f"{report['dataset']['name']}: validation, warm users"
    table = Table("model", *headers, "train s", "version", "status", title=title)
    for m in sorted(report["models"], key=lambda m: -(m["metrics"].get(f"ndcg@{k}") or -1.0)):
        values = [f"{m['metrics'][name]:.4f}" if m["metrics"].get(name) is not None else "-" for name in metrics]
        status = "[green]ok[/]" if m["status"] == "ok" else f"[red]failed[/]: {escape(m['error'])}"
        seconds = "-" if m["train_seconds"] is None else f"{m['train_seconds']:.1f}"
        marker = " *" if m["version"] is not None and m["version"] == champion["after"]["version"] else ""
        table.add_row(m["model"] + marker, *values, seconds, m["version"] or "-", status)
    console.print(table)
    verdict = "[green]promoted[/]" if champion["promoted"] else "kept"
    console.print(f"champion of {champion['registered_model']}: v{champion['after']['version']} ({verdict})")
    console.print(f"  {champion['reason']}", markup=False)
    console.print(
        f"training: {outcome.train_wall_seconds:.1f} s wall for {outcome.train_sum_seconds:.1f} s of model fitting"
    )
    stages = report["timing"]["stages"]
    console.print("stages (s): " + ", ".join(f"{name} {sec:.1f}" for name, sec in stages.items()))
    if outcome.test_ndcg is not None:
        console.print(f"champion on the test slice: ndcg@{k} {outcome.test_ndcg:.4f}")
    if json_report is not None:
        console.print(f"report: {json_report}", markup=False)
    console.print(f"MLflow run: {outcome.parent_run_link}  (UI: {outcome.ui_command})", markup=False)


# -- prune --
@app.command()
def prune(
    keep: Annotated[int, typer.Option("--keep", help="How many of the newest versions stay (at least 1).")],
    yes: Annotated[bool, typer.Option("--yes", help="Delete; without it, only list what would be deleted.")] = False,
    dataset: DatasetOpt = None,
    json_: JsonOpt = False,
    config: ConfigFile = None,
) -> None:
    """Delete registered versions beyond the N newest, with their model files; never one an alias points at."""
    import json

    from mfpipe import retention

    store, name = _registered_model(dataset, config)
    result = retention.prune(store, name, keep, apply=yes)
    if json_:
        typer.echo(json.dumps(result.to_json()))
        return
    typer.echo(f"{name}: keeping the {keep} newest: {', '.join(f'v{v}' for v in result.kept) or 'none'}")
    for version, why in result.spared.items():
        typer.echo(f"  kept v{version}: {why}")
    verb = "deleted" if yes else "would delete"
    for v in result.versions:
        files = v.artifacts or "its files stay (a version that stays shares them)"
        typer.echo(f"  {verb} v{v.version} ({v.model or 'model ?'}, run {v.run_id}): {files}")
    if not result.versions:
        typer.echo("nothing to delete")
    elif yes:
        typer.echo(f"deleted {len(result.versions)} version(s) and their model files")
    else:
        typer.echo(f"dry run, nothing deleted: add --yes to delete these {len(result.versions)} version(s)")


# -- recommend --
def _registered_model(dataset: str | None, config: Path | None) -> tuple[Any, str]:
    """The store and the registered model name for `--dataset` (default: the default data's name)."""
    from mfpipe import tracking
    from mfpipe.config import load_config

    cfg = load_config(config)
    store = tracking.open_store(cfg.tracking_uri)
    if dataset is None:
        from mfpipe.data import dataset_name

        dataset = dataset_name(cfg.data)
    return store, tracking.registered_model_name(dataset, cfg.split.protocol, cfg.registered_model)


@app.command()
def recommend(
    user: Annotated[str, typer.Option("--user", help="External user id.")],
    items: Annotated[
        str | None, typer.Option("--items", help="Item ids since training (a,b,c): folded in and excluded.")
    ] = None,
    k: Annotated[int, typer.Option("--k", help="How many items.")] = 10,
    dataset: DatasetOpt = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    config: ConfigFile = None,
) -> None:
    """Top-k items for a user from the `champion` (`--items` folded in; popularity for a user it never saw)."""
    import json

    from mfpipe import serving

    store, name = _registered_model(dataset, config)
    new = None if items is None else [i.strip() for i in items.split(",") if i.strip()]
    frame, source = serving.recommend_for(serving.champion_version_uri(store, name), user, k, new)
    if json_:
        rows = frame.drop(columns="user_id").to_dict(orient="records")
        document = {"user_id": user, "registered_model": name, "k": k, "source": source, "items": rows}
        typer.echo(json.dumps(document))
        return
    if source == "popularity":
        typer.echo(f"popularity fallback: {name} has never seen user {user!r} (and no known --items)")
    elif source == "fold-in":
        typer.echo(f"fold-in: user {user!r} with {len(new or [])} new item(s)")
    for row in frame.itertuples():
        title = f"  {row.title}" if row.title else ""
        typer.echo(f"{row.rank:>3}. {row.item_id}  {row.score:.4f}{title}")


@app.command()
def similar(
    item: Annotated[str, typer.Option("--item", help="External item id.")],
    k: Annotated[int, typer.Option("--k", help="How many items.")] = 10,
    dataset: DatasetOpt = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    config: ConfigFile = None,
) -> None:
    """Nearest items to an item by cosine in the `champion`'s item factors (the item itself excluded)."""
    import json

    from mfpipe import serving

    store, name = _registered_model(dataset, config)
    uri = serving.champion_version_uri(store, name)
    frame = serving.similar_items(serving.load_pyfunc(uri), uri, item, k)
    if json_:
        rows = frame.to_dict(orient="records")
        typer.echo(json.dumps({"item_id": item, "registered_model": name, "k": k, "items": rows}))
        return
    for row in frame.itertuples():
        title = f"  {row.title}" if row.title else ""
        typer.echo(f"{row.rank:>3}. {row.item_id}  {row.score:.4f}{title}")


# -- champion --
@app.command()
def champion(dataset: DatasetOpt = None, json_: JsonOpt = False, config: ConfigFile = None) -> None:
    """Show the `champion` (and `challenger`) of a dataset's registered model with their lineage."""
    import json

    from mfpipe import tracking

    store, name = _registered_model(dataset, config)
    with tracking.tracking_errors(store):
        shown = {a: tracking.alias_version(store, name, a) for a in (tracking.CHAMPION, tracking.CHALLENGER)}
    if shown[tracking.CHAMPION] is None:
        raise MfpipeError(f"{name}: no champion yet in {mask_uri(store.uri)} (run `mfpipe run` first)")
    if json_:
        typer.echo(json.dumps({"registered_model": name, **{a: _version_json(v) for a, v in shown.items()}}))
        return
    for alias, version in shown.items():
        if version is not None:
            typer.echo(f"{alias}: {name} v{version.version} (run {version.run_id})")
            for key, value in sorted(version.tags.items()):
                typer.echo(f"  {key}: {value}")


def _version_json(version: Any) -> dict[str, Any] | None:
    """A registered version for `champion --json`: its ids, model, warm-user metrics and every tag.

    Versions carry their metrics as tags under MLflow keys (`ndcg_at_10`, variants `_all`/`_cold`);
    `metrics` holds the warm-user ones (the promotion's) as numbers under the names the run report uses
    (`ndcg@10`); `tags` keeps every tag verbatim (strings), variants and lineage included.
    """
    import re

    from mfpipe.evaluation import METRICS, display_name

    if version is None:
        return None
    warm = re.compile(rf"^(?P<name>{'|'.join(METRICS)})_at_(?P<k>\d+)$")
    metrics = {display_name(m["name"], int(m["k"])): float(value)
               for key, value in sorted(version.tags.items()) if (m := warm.match(key))}  # fmt: skip
    return {"version": version.version, "run_id": version.run_id, "model": version.tags.get("model"),
            "metrics": metrics, "tags": dict(sorted(version.tags.items()))}  # fmt: skip


# -- promote --
@app.command()
def promote(
    version: Annotated[str | None, typer.Option("--version", help="Make this version the champion.")] = None,
    rollback: Annotated[bool, typer.Option("--rollback", help="Back to the previous champion.")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded on the version).")] = "",
    dataset: DatasetOpt = None,
    json_: JsonOpt = False,
    config: ConfigFile = None,
) -> None:
    """Move `champion` by hand (`--version N` or `--rollback`); the reason is recorded."""
    import json

    from mfpipe.promotion import set_champion_by_hand

    if (version is None) == (not rollback):
        raise MfpipeError("give exactly one of --version N or --rollback")
    store, name = _registered_model(dataset, config)
    decision = set_champion_by_hand(store, name, version, reason, rollback=rollback)
    if json_:
        moved = {"before": {"version": decision.before_version}, "after": {"version": decision.after_version}}
        typer.echo(json.dumps({"registered_model": name, **moved, "reason": decision.reason}))
        return
    typer.echo(f"champion of {name}: v{decision.before_version} -> v{decision.after_version} ({decision.reason})")


# -- serve --
@app.command()
def serve(
    dataset: DatasetOpt = None,
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1.")] = 5001,
    config: ConfigFile = None,
) -> None:
    """Serve the champion over HTTP on 127.0.0.1 (POST /invocations, MLflow's request and answer format).

    The version is read from its `.npz` artifacts and answered by the installed code, never by running
    what the registry holds; on a host without mfpipe, `mlflow models serve -m models:/NAME@champion` works.
    """
    from mfpipe import serving

    store, name = _registered_model(dataset, config)
    uri = serving.champion_version_uri(store, name)
    server = serving.make_server(serving.load_recommendations(uri), port)
    typer.echo(f"Serving {uri} on http://127.0.0.1:{port}/invocations (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
