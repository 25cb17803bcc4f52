"""The `retrain` flow: load -> validate -> split -> train every model in parallel -> evaluate -> register -> promote.

Each task is a few lines around one `mfpipe.pipeline` function. Load, validate and split are cached
(key: the data spec and files, the config sections they read, the mfpipe version); training never is.
Training fans out on the configured task runner: threads by default (each model gets a share of the
cores, see `pipeline.thread_budget`), or a Dask cluster (`task_runner="dask"`, which needs a Prefect
server so that workers can report their task runs).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # implicit and numba bring their own threads
os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")  # thread-safe layer: several models train at once
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines log a failure per start

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from mfpipe import pipeline
from mfpipe.config import Config
from mfpipe.data.interactions import Interactions
from mfpipe.errors import MfpipeError
from mfpipe.evaluation import EvaluationReport
from mfpipe.split import Split


class _ThreadTimeoutNotice(logging.Filter):
    """Drop Prefect's per-task notice that a timeout in a worker thread cannot interrupt blocking code.

    That is known and accepted here: a fit that overruns `train_timeout_seconds` is reported failed
    when it returns, and the other models are unaffected. The notice would repeat for every model.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout of %s seconds configured for this task")


logging.getLogger("prefect.task_runs").addFilter(_ThreadTimeoutNotice())


class _UserErrorOnce(logging.Filter):
    """Keep a user error (MfpipeError) off the console: the CLI prints it once, as one line, no traceback.

    Prefect would log it with a traceback for the task and again for the flow. The records still reach
    the Prefect API (this filter sits on the console handlers only), so the UI keeps the whole story.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, MfpipeError) and "MfpipeError" not in record.getMessage()


def _console_logs_to_stdout() -> None:
    """Prefect's console logs go to stdout beside the leaderboard; stderr is left to errors of mfpipe."""
    import sys

    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()
    loggers = [
        logging.getLogger(),
        *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)),
    ]
    for handler in {h for logger in loggers for h in logger.handlers if isinstance(h, PrefectConsoleHandler)}:
        handler.setStream(sys.stdout)
        handler.console.file = sys.stdout  # the rich console it prints through keeps its own stream
        handler.addFilter(_UserErrorOnce())


def _retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Retry network and file-system hiccups, never a user error (bad file, bad config)."""
    exc = state.result(raise_on_failure=False)
    while exc is not None:
        if isinstance(exc, OSError | ConnectionError | TimeoutError):
            return True
        exc = exc.__cause__
    return False


def _cache_key(stage: str, *sections: str) -> Any:
    """Cache key from the source key and the config sections the stage reads."""

    def key(context: Any, parameters: dict[str, Any]) -> str:
        config: Config = parameters["config"]
        parts = {name: getattr(config, name) for name in sections}
        return f"{stage}-{parameters['key']}-{pipeline.stable_hash({k: str(v) for k, v in parts.items()})}"

    return key


# -- tasks --------------------------------------------------------------------------------------------
@task(
    name="load data",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_on_io,
    cache_key_fn=_cache_key("load"),
    persist_result=True,
)
def load_data(config: Config, key: str) -> pd.DataFrame:
    return pipeline.read_data(config)


@task(name="validate", cache_key_fn=_cache_key("validate", "data_home"), persist_result=True)
def validate(frame: pd.DataFrame, config: Config, key: str) -> pipeline.Validated:
    return pipeline.validate_data(frame, config, Path(config.data_home) / "validation" / key)


@task(name="split", cache_key_fn=_cache_key("split", "split"), persist_result=True)
def split_data(frame: pd.DataFrame, config: Config, key: str) -> tuple[Interactions, Split]:
    data = pipeline.to_interactions(frame)
    return data, pipeline.split_data(data, config)


@task(name="open MLflow run", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def open_run(config: Config, data: Interactions, split: Split, validated: pipeline.Validated) -> pipeline.RunContext:
    ctx = pipeline.open_run(config, data, flow_run.id, flow_run.ui_url)
    pipeline.record_validation(ctx, validated)
    pipeline.record_split(ctx, split)
    return ctx


@task(name="train", task_run_name="train {name}", cache_policy=NO_CACHE)
def train(name: str, split: Split, config: Config, threads: int) -> pipeline.Trained:
    trained = pipeline.train_model(name, split, config, threads)
    get_run_logger().info(f"{name} trained in {trained.train_seconds:.1f} s with {threads} thread(s)")
    return trained


@task(name="evaluate", task_run_name="evaluate {trained.name}", cache_policy=NO_CACHE)
def evaluate(trained: pipeline.Trained, split: Split, config: Config) -> EvaluationReport:
    return pipeline.evaluate(trained.model, split, config)


@task(name="record model", task_run_name="record {result.model}", retries=1, cache_policy=NO_CACHE)
def record_model(
    ctx: pipeline.RunContext,
    result: pipeline.ModelResult,
    trained: pipeline.Trained | None,
    split: Split,
    config: Config,
) -> pipeline.ModelResult:
    pipeline.record_model(ctx, result, trained, split, config)
    return result


@task(name="promote", cache_policy=NO_CACHE)
def promote(ctx: pipeline.RunContext, results: list[pipeline.ModelResult], split: Split, config: Config) -> Any:
    return pipeline.promote_best(ctx, results, split, config)


@task(name="score champion on test", cache_policy=NO_CACHE)
def score_test(
    ctx: pipeline.RunContext,
    decision: Any,
    results: list[pipeline.ModelResult],
    models: dict[str, Any],
    split: Split,
    config: Config,
) -> float | None:
    return pipeline.score_on_test(ctx, decision, results, models, split, config)


@task(name="plots", retries=1, cache_policy=NO_CACHE)
def plots(ctx: pipeline.RunContext, results: list[pipeline.ModelResult], split: Split, config: Config) -> None:
    pipeline.record_figures(ctx, results, split, config)


# -- the flow ------------------------------------------------------------------------------------------
@dataclass
class RunOutcome:
    """What the flow returns: the `--json-report` document and the figures the CLI prints."""

    report: dict[str, Any]
    train_wall_seconds: float
    train_sum_seconds: float
    test_ndcg: float | None
    parent_run_link: str
    ui_command: str
    stage_seconds: dict[str, float]

    @property
    def failed(self) -> bool:
        return not any(m["status"] == "ok" for m in self.report["models"])


def task_runner(config: Config, n_tasks: int) -> Any:
    """Threads by default; Dask on request, which needs a Prefect server (PREFECT_API_URL)."""
    if config.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=max(1, n_tasks))
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise MfpipeError("--task-runner dask needs a Prefect server: set PREFECT_API_URL (e.g. start `mfpipe up`)")
    from prefect_dask import DaskTaskRunner

    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": min(n_tasks, config.threads), "threads_per_worker": 1})


def train_all(split: Split, config: Config) -> tuple[dict[str, pipeline.Trained], dict[str, str], float]:
    """Submit one training task per model at once; a failure is recorded, never fatal for the others."""
    logger = get_run_logger()
    threads = pipeline.thread_budget(config.models, config.threads)
    logger.info(
        f"Training {', '.join(config.models)} in parallel ({threads} thread(s) each, {config.task_runner} runner)"
    )
    task_ = train.with_options(timeout_seconds=config.train_timeout_seconds)
    started = time.perf_counter()
    trained: dict[str, pipeline.Trained] = {}
    errors: dict[str, str] = {}
    with task_runner(config, len(config.models)) as runner:
        futures = {
            name: runner.submit(task_, {"name": name, "split": split, "config": config, "threads": threads})
            for name in config.models
        }
        for name, future in futures.items():
            try:
                trained[name] = future.result()
            except Exception as exc:  # a failing model must not stop the others
                errors[name] = _one_line(exc)
                logger.warning(f"{name} failed and is left out of promotion: {errors[name]}")
    return trained, errors, time.perf_counter() - started


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, MfpipeError) else f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Stages:
    """Wall time per stage, to tell compute (load ... evaluate) from orchestration and tracking."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


@flow(name="retrain", description="Load, validate, split, train all models in parallel, evaluate, register, promote.")
def retrain(config: Config) -> RunOutcome:
    """One retraining run for `config` (a typed form in the Prefect UI)."""
    logger = get_run_logger()
    task_runner(config, 1)  # fail fast on a Dask runner without a Prefect server
    stage = Stages()
    key = pipeline.source_key(config)
    with stage("load"):
        frame = load_data(config, key)
    with stage("validate"):
        validated = validate(frame, config, key)
    create_markdown_artifact(
        pipeline.validation_markdown(validated),
        key="validation-summary",
        description=f"Great Expectations summary of {config.data}",
    )
    if not validated.success:
        raise MfpipeError(f"validation failed, nothing was trained: {validated.error}")
    logger.info(f"Data passed validation ({config.data}, {len(frame):,} rows)")
    with stage("split"):
        data, split = split_data(frame, config, key)
    s = split.summary
    logger.info(
        f"Split {s.protocol}: {s.n_train:,} train / {s.n_validation:,} validation rows, "
        f"{s.evaluable_users} evaluable users, {s.cold_users} cold users"
    )
    for warning in s.warnings:
        logger.warning(warning)
    if config.skip_unchanged and unchanged(config, data):
        logger.info(f"{data.name} is unchanged since the last finished run (digest {data.digest}): nothing to do")
        return RunOutcome(pipeline.unchanged_report(data, split, config), 0.0, 0.0, None, "", "", stage.seconds)
    trained = _train_and_evaluate(split, config, stage)
    with stage("tracking"):  # after training: MLflow's import overlaps it (see `run`)
        ctx = open_run(config, data, split, validated)
    try:
        outcome = _record_and_promote(ctx, data, split, config, stage, trained)
    except BaseException as exc:
        pipeline.close_run(ctx, ok=False, error=_one_line(exc))
        raise
    timing = {f"stage_{name}_seconds": value for name, value in stage.seconds.items()}
    timing |= {"train_wall_seconds": outcome.train_wall_seconds, "train_sum_seconds": outcome.train_sum_seconds}
    pipeline.close_run(ctx, ok=not outcome.failed, error=None, metrics=timing)
    if outcome.failed:
        failures = "; ".join(f"{m['model']}: {m['error']}" for m in outcome.report["models"])
        raise MfpipeError(f"every model failed ({failures})", exit_code=1)
    return outcome


@task(name="check for new data", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def unchanged(config: Config, data: Interactions) -> bool:
    """True when the last finished run of this dataset saw the same digest (`skip_unchanged`)."""
    from mfpipe import tracking

    store = tracking.open_store(config.tracking_uri)
    with tracking.tracking_errors(store):
        return tracking.last_run_digest(store, data.name) == data.digest


@dataclass
class Fitted:
    """What training and evaluation left: fitted models, their reports, the failures, the wall time."""

    models: dict[str, pipeline.Trained]
    reports: dict[str, EvaluationReport]
    failures: dict[str, str]
    train_wall: float

    @property
    def train_sum(self) -> float:
        return sum(t.train_seconds for t in self.models.values())


def _train_and_evaluate(split: Split, config: Config, stage: Stages) -> Fitted:
    logger = get_run_logger()
    with stage("train"):
        trained, errors, train_wall = train_all(split, config)
    fitted = Fitted(trained, {}, dict(errors), train_wall)
    logger.info(f"Training took {train_wall:.1f} s of wall time for {fitted.train_sum:.1f} s of model fitting")
    with stage("evaluate"):
        evaluations = {name: evaluate.submit(t, split, config) for name, t in trained.items()}
        for name, future in evaluations.items():
            try:
                fitted.reports[name] = future.result()
            except Exception as exc:
                fitted.failures[name] = _one_line(exc)
                logger.warning(f"{name} could not be evaluated: {fitted.failures[name]}")
    return fitted


def _record_and_promote(
    ctx: pipeline.RunContext, data: Interactions, split: Split, config: Config, stage: Stages, fitted: Fitted
) -> RunOutcome:
    logger = get_run_logger()
    trained, reports, failures = fitted.models, fitted.reports, fitted.failures
    results = []
    with stage("tracking"):
        for name in config.models:
            if name in reports:
                t = trained[name]
                result = pipeline.ModelResult(
                    name, "ok", train_seconds=t.train_seconds, evaluation=reports[name], history=t.model.history,
                    rating_metrics=pipeline.rating_metrics(t.model, split),
                )  # fmt: skip
            else:
                result = pipeline.ModelResult(name, "failed", error=failures.get(name))
            results.append(record_model(ctx, result, trained.get(name) if name in reports else None, split, config))
    for r in results:
        if r.status == "ok":
            logger.info(
                f"{r.model}: NDCG@{config.k} {r.score:.4f} (warm users), registered as "
                f"{r.registered_model} v{r.version}"
            )
    with stage("promote"):
        decision = promote(ctx, results, split, config)
        logger.info(f"Promotion: {decision.reason}")
        test_ndcg = score_test(ctx, decision, results, {n: t.model for n, t in trained.items()}, split, config)
    if test_ndcg is not None and math.isfinite(test_ndcg):
        logger.info(f"Champion v{decision.after_version} on the test slice: NDCG@{config.k} {test_ndcg:.4f}")
    with stage("tracking"):
        plots(ctx, results, split, config)
        create_markdown_artifact(
            pipeline.leaderboard_markdown(results, config.k),
            key="leaderboard",
            description=f"{data.name}: validation metrics of warm users",
        )
    report = pipeline.build_report(
        data, split, results, pipeline.champion_json(ctx.registered_model, decision, config.k)
    )
    return RunOutcome(
        report,
        fitted.train_wall,
        fitted.train_sum,
        test_ndcg,
        ctx.store.run_link(ctx.experiment_id, ctx.parent_run_id),
        ctx.store.ui_command(),
        stage.seconds,
    )


def run(config: Config) -> RunOutcome:
    """Run the flow in this process (ephemeral Prefect API unless PREFECT_API_URL is set).

    MLflow and matplotlib take seconds to import and the store seconds to open; a background thread
    does that while Prefect starts its API (a separate process), so the two waits overlap.
    """
    _console_logs_to_stdout()
    threading.Thread(target=pipeline.warm_up, args=(config,), name="mfpipe-warm-up", daemon=True).start()
    return retrain(config)
