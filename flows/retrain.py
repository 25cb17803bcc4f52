"""The `retrain` flow: load -> validate -> split -> train every model in parallel -> evaluate -> record -> promote.

Each task is a few lines around one library function. Load, validate and split are cached (key: the data
spec and files, the config sections they read, the mfpipe version); training never is. The split runs
beside validation (both are single-threaded: at synthetic:10M the two took 6.0-9.0 s together against
12.9-13.7 s one after the other) and is used only once the data has passed. Models train on the
configured task runner: threads by default, sharing the cores, or a Dask cluster (which needs a Prefect
server). The MLflow run opens while they train; each model is evaluated and recorded once trained.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run

from flows import _plumbing
from mfpipe import prepare, promotion, recording, report, services, tracking, training
from mfpipe.config import Config
from mfpipe.data.interactions import Interactions
from mfpipe.drift import drift_markdown
from mfpipe.errors import MfpipeError, one_line
from mfpipe.evaluation import EvaluationReport, evaluate_model
from mfpipe.lineage import source_key
from mfpipe.promotion import Decision
from mfpipe.recording import RunContext
from mfpipe.report import ModelResult, RunOutcome, Stages
from mfpipe.split import Split


@task(name="load data", retries=2, retry_delay_seconds=5, retry_condition_fn=_plumbing.retry_on_io,
      cache_key_fn=_plumbing.cache_key("load"), persist_result=True)  # fmt: skip
def load_data(config: Config, key: str) -> pd.DataFrame:
    return prepare.load(config)


@task(name="validate", cache_key_fn=_plumbing.cache_key("validate", "data_home"), persist_result=True)
def validate_data(frame: pd.DataFrame, config: Config, key: str) -> prepare.Validated:
    validated = prepare.validate(frame, config, Path(config.data_home) / "validation" / key)
    create_markdown_artifact(report.validation_markdown(validated), key="validation-summary")
    return validated


@task(name="split", cache_key_fn=_plumbing.cache_key("split", "split"), persist_result=True)
def split(frame: pd.DataFrame, config: Config, key: str) -> tuple[Interactions, Split] | MfpipeError:
    """Runs while validation does, so a problem of the data is returned, not raised: bad data reports
    validation's message, never this task's failure (the flow raises it once validation has passed)."""
    try:
        return prepare.split(frame, config)
    except MfpipeError as exc:
        return exc


def report_split(parts: Split) -> None:
    """The split's sizes and warnings, once the data has passed validation."""
    s, logger = parts.summary, get_run_logger()
    logger.info(f"Split {s.protocol}: {s.n_train:,} train / {s.n_validation:,} validation rows, "
                f"{s.evaluable_users} evaluable users, {s.cold_users} cold users")  # fmt: skip
    for warning in s.warnings:
        logger.warning(warning)


@task(name="check the tracking store", **_plumbing.STORE_TASK)
def probe_store(config: Config) -> None:
    tracking.probe(tracking.open_store(config.tracking_uri))


@task(name="check for new data", **_plumbing.STORE_TASK)
def unchanged(config: Config, data: Interactions) -> bool:
    return recording.unchanged_since_last_run(config, data)


@task(name="train", task_run_name="train {name}", cache_policy=NO_CACHE)
def train(name: str, split: Split, config: Config, budget: training.CoreBudget) -> training.Trained:
    trained = training.train_model(name, split, config, budget)
    get_run_logger().info(f"{name} trained in {trained.train_seconds:.1f} s (started with {trained.threads} thread(s))")
    return trained


@task(name="evaluate", task_run_name="evaluate {trained.name}", cache_policy=NO_CACHE)
def evaluate(trained: training.Trained, split: Split, config: Config) -> EvaluationReport:
    return evaluate_model(trained.model, split, config.k, seed=config.seed)


@task(name="open MLflow run", **_plumbing.STORE_TASK)
def open_run(config: Config, data: Interactions, split: Split, validated: prepare.Validated) -> RunContext:
    ui_url = flow_run.ui_url if _plumbing.shared_api() else None  # an ephemeral API has no UI to link to
    ctx = recording.open_run(config, data, flow_run.id, ui_url)
    recording.record_validation(ctx, validated)
    recording.record_split(ctx, split)
    return ctx


@task(name="score the champion", cache_policy=NO_CACHE)
def score_champion(ctx: RunContext, split: Split, config: Config) -> promotion.ScoredChampion | None:
    """The current champion scored on this split while the last model is recorded (every core is free)."""
    return promotion.score_current_champion(ctx.store, ctx.registered_model, split, config)


@task(name="record model", task_run_name="record {result.model}", **_plumbing.STORE_TASK)
def record(ctx: RunContext, result: ModelResult, trained: training.Trained | None, split: Split, config: Config
           ) -> ModelResult:  # fmt: skip
    recording.record_model(ctx, result, trained, split, config)
    if result.version is not None:
        get_run_logger().info(f"{result.model}: NDCG@{config.k} {result.score:.4f} (warm users), registered as "
                              f"{result.registered_model} v{result.version}")  # fmt: skip
    return result


@task(name="promote", cache_policy=NO_CACHE)
def promote_best(ctx: RunContext, results: list[ModelResult], split: Split, config: Config,
                 ahead: promotion.ScoredChampion | None) -> Decision:  # fmt: skip
    with _plumbing.promotion_slot(ctx.registered_model):
        decision = promotion.promote_best(ctx.store, ctx.registered_model, results, split, config, ahead)
    recording.record_decision(ctx, decision)
    if not decision.promoted:
        _plumbing.emit_not_promoted(decision)  # the trigger of the deployment's not-promoted alert
    if decision.drift is not None:
        create_markdown_artifact(drift_markdown(decision.drift), key="drift")
    get_run_logger().info(f"Promotion: {decision.reason}")
    return decision


@task(name="score champion on test", cache_policy=NO_CACHE)
def score_test(ctx: RunContext, decision: Decision, trained: dict[str, training.Trained], results: list[ModelResult],
               split: Split, config: Config, ahead: promotion.ScoredChampion | None) -> float | None:  # fmt: skip
    fitted = {name: t.model for name, t in trained.items()}
    value = promotion.champion_test_score(ctx.registered_model, decision, fitted, results, split, config, ahead)
    if value is not None and decision.after_version is not None:
        recording.record_test_score(ctx, decision.after_version, value, config.k)
    return value


@task(name="publish", **_plumbing.STORE_TASK)
def publish(ctx: RunContext, results: list[ModelResult], split: Split, config: Config) -> None:
    recording.record_figures(ctx, results, split, config)
    create_markdown_artifact(report.leaderboard_markdown(results, config.k), key="leaderboard")


def train_and_record(
    opened: PrefectFuture[RunContext], split: Split, config: Config, stages: Stages
) -> tuple[dict[str, training.Trained], list[ModelResult], PrefectFuture[promotion.ScoredChampion | None]]:
    """One training task per model, all at once, sharing the cores; each model is evaluated and recorded (on
    the flow's thread) as soon as it is trained, while the others train. Once the last is evaluated, the
    current champion is re-scored on this split while that model is recorded (started with the models,
    the re-scoring took their cores: a 10M rerun trained 110 s against 74). The stages are the critical
    path: what runs while a model still trains counts as training. A failed model never stops the others.
    """
    budget, logger = training.CoreBudget(config.threads, config.models), get_run_logger()
    logger.info(f"Training {', '.join(config.models)} in parallel on {config.threads} core(s), {config.task_runner}")
    progress = training.watch(budget, lambda now: logger.info("; ".join(f"{n}: {p}" for n, p in now.items())))
    trained: dict[str, training.Trained] = {}
    results: dict[str, ModelResult] = {}

    def evaluated(future: PrefectFuture[training.Trained]) -> ModelResult:
        name, evaluation, error = names[future], None, ""
        try:
            with budget.evaluation(name):  # its cores, until it is evaluated
                trained[name] = future.result()
                evaluation = evaluate(trained[name], split, config)
        except Exception as exc:  # a failing model must not stop the others
            error = one_line(exc)
            logger.warning(f"{name} failed and is left out of promotion: {error}")
        return report.model_result(name, trained.get(name), evaluation, error, split)

    def recorded(result: ModelResult) -> None:
        results[result.model] = record(opened.result(), result, trained.get(result.model), split, config)

    try:
        with _plumbing.task_runner(config, len(config.models)) as runner:
            names = {runner.submit(train, {"name": name, "split": split, "config": config, "budget": budget}): name
                     for name in config.models}  # fmt: skip
            finished = as_completed(list(names))  # yields each future once it is done
            with stages("train"):
                for future in itertools.islice(finished, len(names) - 1):
                    recorded(evaluated(future))
                last = next(finished)
            with stages("evaluate"):
                result = evaluated(last)
            champion = score_champion.submit(opened, split, config)  # every model is evaluated: the cores are free
            with stages("tracking"):
                recorded(result)
    finally:
        progress.set()
    return trained, [results[name] for name in config.models], champion


@flow(name="retrain", description="Load, validate, split, train all models in parallel, evaluate, register, promote.")
def retrain(config: Config) -> RunOutcome:
    """One retraining run for `config` (a typed form in the Prefect UI)."""
    stages = Stages()
    _plumbing.task_runner(config, 1)  # fail fast on a Dask runner without a Prefect server
    probed = probe_store.submit(config)  # while the data loads; an unreachable store fails the run before training
    key = source_key(config)
    with stages("load"):
        frame = load_data(config, key)
    validated, data, parts = validate_and_split(frame, config, key, stages)
    del frame  # its rows live on in `data`: free the string frame (~1.4 GB at 32M) before training
    probed.result()
    if config.skip_unchanged and unchanged(config, data):
        return skipped(data, parts, config, stages)
    opened = open_run.submit(config, data, parts, validated)  # while the models train
    try:
        trained, results, champion = train_and_record(opened, parts, config, stages)
        return promote_and_publish(opened.result(), data, parts, trained, results, champion, config, stages)
    except BaseException as exc:
        if opened.state.is_completed():  # a store that went away cannot close the run: the next run will
            with contextlib.suppress(MfpipeError):
                recording.close_run(opened.result(), ok=False, error=one_line(exc))
        raise


def validate_and_split(frame: pd.DataFrame, config: Config, key: str, stages: Stages
                       ) -> tuple[prepare.Validated, Interactions, Split]:  # fmt: skip
    """Validation, with the split on the other core meanwhile; a critical failure raises validation's
    message once the split has ended (quietly: a data problem is its value), else a split problem raises."""
    splitting = split.submit(frame, config, key)
    with stages("validate"):
        validated = validate_data(frame, config, key)
    if not validated.success:
        splitting.wait()
    validated.raise_if_failed()
    with stages("split"):
        outcome = splitting.result()
    if isinstance(outcome, MfpipeError):
        raise outcome
    data, parts = outcome
    report_split(parts)
    return validated, data, parts


def promote_and_publish(ctx: RunContext, data: Interactions, parts: Split, trained: dict[str, training.Trained],
                        results: list[ModelResult], champion: PrefectFuture[promotion.ScoredChampion | None],
                        config: Config, stages: Stages) -> RunOutcome:  # fmt: skip
    """Move `champion` if the best recorded candidate earned it (`champion`: the current one as scored while
    the last model was recorded), publish, close the run."""
    report.raise_if_all_failed(results)
    published = publish.submit(ctx, results, parts, config)  # the run's figures, drawn while promotion re-scores
    with stages("promote"):
        ahead = champion.result()
        decision = promote_best(ctx, results, parts, config, ahead)
        test_ndcg = score_test(ctx, decision, trained, results, parts, config, ahead)
    with stages("tracking"):
        published.result()
        train_sum = sum(t.train_seconds for t in trained.values())
        timing = {f"stage_{name}_seconds": value for name, value in stages.seconds.items()}
        recording.close_run(ctx, ok=True, error=None, metrics={**timing, "train_sum_seconds": train_sum})
    document = report.build_report(data, parts, results, decision.to_json(), stages, decision.drift)
    return RunOutcome(document, stages.seconds["train"], train_sum, test_ndcg, ctx.link, ctx.store.ui_command())


def skipped(data: Interactions, parts: Split, config: Config, stages: Stages) -> RunOutcome:
    """Data, config and code are those of the last finished run: nothing trained, the champion untouched."""
    name, champion = recording.current_champion(config, data)
    decision = Decision.unchanged(name, "unchanged since the last run: nothing trained", config.promotion_rule,
                                  champion, config.k)  # fmt: skip
    get_run_logger().info(f"{data.name}: {decision.reason}")
    return RunOutcome(report.build_report(data, parts, [], decision.to_json(), stages))


def run(config: Config, api: services.Service | None = None) -> RunOutcome:
    """Run the flow in this process, on `api` (the ephemeral Prefect API `mfpipe run` started) unless
    PREFECT_API_URL names a server; `_plumbing.in_this_process` prepares the process."""
    with _plumbing.in_this_process(config, api):
        return retrain(config)
