"""The `mfpipe` command: the app, its entry point and the list of its commands.

The commands live in `mfpipe.commands` (data and runs, servers, the registry), each thin: parse flags,
build the config, call one library function, print. Prefect and `flows` are imported lazily, only by the
commands that orchestrate, so `--help` and the library commands stay fast. Every user error is one line
on stderr and exit code 2 (1: a failed run).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from mfpipe import __version__
from mfpipe.commands import data, registry, servers
from mfpipe.commands.options import ConfigFile, Seed, TaskRunner, data_options, split_options, terminal
from mfpipe.errors import MfpipeError, one_line

# Help is plain text (rich_markup_mode=None): help strings are never parsed as rich markup, which would
# swallow words in square brackets such as "[synthetic:100k]". Typer's completion options stay on.
app = typer.Typer(
    name="mfpipe",
    help="Retraining pipeline for matrix-factorization recommenders.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


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
    gc.freeze()  # else the interpreter's last collection walks every object of the run once more (seconds)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, exit_code: int) -> NoReturn:
    typer.echo(f"mfpipe: error: {' '.join(message.split())}", err=True)
    sys.exit(exit_code)


# -- run --
ModelsOpt = Annotated[str | None, typer.Option("--models", help="Comma-separated: svd,als,bpr,pop (default: all).")]


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
    from mfpipe import services

    # This run's own Prefect API, started before the imports below so that its start-up overlaps them.
    api = None if _prefect_has_api() else services.start_ephemeral_prefect_api()
    try:
        from flows.retrain import run as run_flow

        # With --json, stdout is the report alone: whatever the run prints (Prefect's console logs are bound
        # to sys.stdout as it is when the flow starts) goes to stderr meanwhile.
        with contextlib.redirect_stdout(sys.stderr) if json_ else contextlib.nullcontext():
            outcome = run_flow(cfg, api)
    finally:
        if api is not None:
            api.stop(timeout=10)
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


def _prefect_has_api() -> bool:
    """Whether Prefect already has an API, so that `mfpipe run` need not start its own ephemeral one.

    Without PREFECT_API_URL, Prefect itself would start the same server only when the flow begins, after
    the seconds of importing mfpipe and Prefect, and after importing Prefect's whole server stack into this
    process too. True when PREFECT_API_URL is in the environment, or in the settings of a Prefect this
    process imported before (a test harness). A server named only in a Prefect profile is seen once Prefect
    is imported; `flows.retrain.run` then stops the early one unused.
    """
    import os

    if "prefect" in sys.modules:
        from prefect.settings import PREFECT_API_URL

        return bool(PREFECT_API_URL.value())
    return bool(os.environ.get("PREFECT_API_URL"))


def _print_outcome(outcome: Any, k: int, json_report: Path | None) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = terminal()
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


# -- deploy --
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


# -- every command: the orchestrating ones above, the others in mfpipe.commands --------------------------
COMMANDS = {
    "evaluate": data.evaluate,
    "validate": data.validate,
    "split": data.split_command,
    "run": run,
    "bench": data.bench,
    "up": servers.up,
    "deploy": deploy,
    "recommend": registry.recommend,
    "similar": registry.similar,
    "champion": registry.champion,
    "promote": registry.promote,
    "prune": registry.prune,
    "serve": registry.serve,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)
