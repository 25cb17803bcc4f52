"""What a retrain run writes to MLflow, in the order it happens: parent run, validation, split, one child
run per model (registered as a version when it finished), the decision, the figures, the end.

Every write goes through `mfpipe.tracking`; nothing here decides anything. A store that fails raises
one MfpipeError line (exit 1).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mfpipe import __version__, drift, serving, tracking
from mfpipe.config import Config
from mfpipe.data.interactions import Interactions
from mfpipe.evaluation import METRICS, finite_or_none, metric_key
from mfpipe.figures import all_figures, factor_report
from mfpipe.lineage import SAME_INPUTS, config_hash, environment, git_commit
from mfpipe.prepare import Validated
from mfpipe.promotion import PROFILE_TAG, Decision
from mfpipe.report import ModelResult, split_json
from mfpipe.split import Split
from mfpipe.tracking import Store
from mfpipe.training import Trained

if TYPE_CHECKING:
    from mfpipe.models.search import SearchResult

#: Tag that marks the parent run of a retrain (children carry `mlflow.parentRunId` instead).
PARENT_ROLE = "mfpipe.role"


@dataclass
class RunContext:
    """Where this run records: the store, the dataset's experiment, the parent run, the registry name."""

    store: Store
    experiment_id: str
    parent_run_id: str
    registered_model: str
    lineage: dict[str, Any]
    data_profile: str = ""  # drift.profile of this run's train data, tagged on every version
    drawing: ThreadPoolExecutor | None = field(default=None, repr=False, compare=False)

    @property
    def link(self) -> str:
        return self.store.run_link(self.experiment_id, self.parent_run_id)

    def draw(self, fn: Callable[[], Path | None]) -> Future[Path | None]:
        """`fn` on the run's one drawing thread, started on first use and ended by `close_run`.

        The records of a run come one at a time (the flow's thread), so nothing races to start it.
        """
        if self.drawing is None:
            self.drawing = ThreadPoolExecutor(1, thread_name_prefix="mfpipe-figure")
        return self.drawing.submit(fn)

    def stop_drawing(self) -> None:
        """End the drawing thread: a drawing under way is finished (nobody waits for it), queued ones dropped."""
        if self.drawing is not None:
            self.drawing.shutdown(wait=True, cancel_futures=True)
            self.drawing = None


def open_run(config: Config, data: Interactions, flow_run_id: str | None, flow_run_url: str | None) -> RunContext:
    """The parent run of this flow run, in the dataset's experiment, tagged with the Prefect run.

    Idempotent per flow run (a retried task finds the parent it opened before), and it first ends FAILED
    the runs a killed process of this host left RUNNING.
    """
    store = tracking.open_store(config.tracking_uri)
    with tracking.tracking_errors(store):
        exp_id = tracking.experiment_id(store, data.name)
        tracking.fail_abandoned_runs(store, exp_id)
        lineage = run_lineage(config, data)
        mine = {PARENT_ROLE: "retrain", "prefect.flow_run_id": flow_run_id} if flow_run_id else None
        existing = tracking.find_runs(store, exp_id, mine, "RUNNING") if mine else []
        if existing:
            parent = tracking.resume_run(store, existing[0])
        else:
            parent = _start_parent(store, exp_id, config, data, lineage, flow_run_id, flow_run_url)
    registered = tracking.registered_model_name(data.name, config.split.protocol, config.registered_model)
    return RunContext(store, exp_id, parent, registered, lineage)


def run_lineage(config: Config, data: Interactions) -> dict[str, Any]:
    """What this run's results depend on, as tags of the parent run, every child run and every version."""
    return {
        "dataset": data.name,
        "dataset_digest": data.digest,
        "config_hash": config_hash(config),
        "seed": config.seed,
        "git_commit": git_commit() or "",
        "mfpipe_version": __version__,
    }


def unchanged_since_last_run(config: Config, data: Interactions) -> bool:
    """True when the last finished run of this dataset had the same data, config and code (`skip_unchanged`)."""
    store = tracking.open_store(config.tracking_uri)
    with tracking.tracking_errors(store):
        last = tracking.last_finished_parent_tags(store, data.name)
    now = {key: str(value) for key, value in run_lineage(config, data).items()}
    return bool(last) and all(last.get(key, "") == now[key] for key in SAME_INPUTS)


def current_champion(config: Config, data: Interactions) -> tuple[str, tracking.VersionInfo | None]:
    """The registered model this run would promote to, and the version its `champion` alias points at."""
    store = tracking.open_store(config.tracking_uri)
    name = tracking.registered_model_name(data.name, config.split.protocol, config.registered_model)
    with tracking.tracking_errors(store):
        return name, tracking.alias_version(store, name, tracking.CHAMPION)


def _start_parent(
    store: Store, exp_id: str, config: Config, data: Interactions, lineage: dict[str, Any],
    flow_run_id: str | None, flow_run_url: str | None,
) -> str:  # fmt: skip
    tags = {PARENT_ROLE: "retrain", "prefect.flow_run_id": flow_run_id, "prefect.flow_run_url": flow_run_url, **lineage}
    parent = tracking.start_run(store, exp_id, f"retrain {data.name}", tags)
    tracking.log_values(
        store,
        parent,
        params={
            "data": config.data,
            "models": ",".join(config.models),
            "k": config.k,
            "seed": config.seed,
            "promotion_rule": config.promotion_rule,
            "split": config.split.model_dump(mode="json"),
            "data_options": config.data_options.model_dump(mode="json"),
        },
    )
    tracking.log_dataset(store, [parent], data.name, data.digest, config.data, len(data), "training")
    tracking.log_json(store, parent, _environment(), "environment.json")
    return parent


def record_validation(ctx: RunContext, validated: Validated) -> None:
    with tracking.tracking_errors(ctx.store):
        if validated.files.exists():
            tracking.log_dir(ctx.store, ctx.parent_run_id, validated.files, "validation")
        tracking.log_values(
            ctx.store,
            ctx.parent_run_id,
            tags={"validation.success": validated.success, "validation.error": validated.error},
        )


def record_split(ctx: RunContext, split: Split) -> None:
    with tracking.tracking_errors(ctx.store):
        tracking.log_json(ctx.store, ctx.parent_run_id, split_json(split), "split/split.json")
        s = split.summary
        tracking.log_values(
            ctx.store,
            ctx.parent_run_id,
            metrics={
                "n_train": s.n_train,
                "n_validation": s.n_validation,
                "n_test": s.n_test,
                "cold_users": s.cold_users,
                "cold_items": s.cold_items,
                "evaluable_users": s.evaluable_users,
            },
            tags={"split_digest": split.digest},
        )
    ctx.data_profile = json.dumps(drift.profile(split.train))
    ctx.lineage.update(
        split_digest=split.digest,
        protocol=s.protocol,
        cutoff=s.cutoff or "",
        train_max_timestamp=int(split.train.timestamps.max()),
    )


def record_model(ctx: RunContext, result: ModelResult, trained: Trained | None, split: Split, config: Config) -> None:
    """The model's child run: params, curves, metrics, pyfunc; a finished model becomes a registry version.

    A failed model gets a FAILED child run with its error; a run interrupted while logging is ended
    FAILED too, so a retry never leaves a dangling RUNNING run behind.
    """
    store = ctx.store
    with tracking.tracking_errors(store):
        tags = {"model": result.model, **ctx.lineage}
        mine = {"mlflow.parentRunId": ctx.parent_run_id, "model": result.model}
        earlier = tracking.find_runs(store, ctx.experiment_id, mine)
        if earlier:  # a retried record task: carry on in the child run it opened before
            run_id = tracking.resume_run(store, earlier[0])
        else:
            run_id = tracking.start_run(store, ctx.experiment_id, result.model, tags, parent_id=ctx.parent_run_id)
        result.run_id = run_id
        result.run_link = store.run_link(ctx.experiment_id, run_id)
        if trained is None or result.evaluation is None:
            params = config.model_params.get(result.model, {})
            tracking.log_values(store, run_id, params=params, tags={"status": "failed", "error": result.error})
            tracking.end_run(store, run_id, ok=False)
            return
        try:
            _record_finished(ctx, run_id, result, trained, split, config)
        except BaseException:
            tracking.end_run(store, run_id, ok=False)
            raise
        tracking.end_run(store, run_id, ok=True)


def _record_finished(
    ctx: RunContext, run_id: str, result: ModelResult, trained: Trained, split: Split, config: Config
) -> None:
    """Log a finished model's pyfunc, values and details into its child run, then register it.

    The pyfunc goes first: logged into a run that has metrics already, MLflow links them to the model
    by reading back the history of every metric key (a request each, ~90 per model); logged after
    it, the metrics carry the model's id and are linked by the same batch that logs them. The factor
    report is drawn meanwhile on a thread of its own: drawing is CPU, the other records wait on the store.
    """
    assert result.evaluation is not None
    catalog = serving.Catalog.of(split.train)
    with _scratch() as folder:
        drawn = _draw_factors(ctx, trained, catalog, folder / "plots")
        model_path = trained.model.save(folder / f"{result.model}.npz")
        uri = serving.log_to_run(run_id, model_path, catalog.save(folder / "catalog.npz"))
        metrics = result.evaluation.mlflow_metrics()
        tracking.log_values(
            ctx.store,
            run_id,
            metrics={**metrics, **result.rating_metrics, "train_seconds": trained.train_seconds},
            params={**trained.params, "threads": trained.threads},
            tags={"status": "ok"},
            model_id=tracking.logged_model_id(uri),
        )
        _record_details(ctx, run_id, result, trained, split, config)
        if drawn.result() is not None:
            tracking.log_dir(ctx.store, run_id, folder / "plots", "plots")
    keys = [metric_key(m, config.k, v) for m in METRICS for v in ("", "all", "cold")]
    tags = {
        **ctx.lineage,
        "model": result.model,
        "train_seconds": round(trained.train_seconds, 3),
        PROFILE_TAG: ctx.data_profile or None,
        **{key: finite_or_none(metrics.get(key)) for key in keys},
    }
    result.version = tracking.register(ctx.store, ctx.registered_model, uri, run_id, tags)
    result.registered_model = ctx.registered_model
    tracking.describe_version(ctx.store, ctx.registered_model, result.version, version_description(result, split))


def _record_details(
    ctx: RunContext, run_id: str, result: ModelResult, trained: Trained, split: Split, config: Config
) -> None:  # fmt: skip
    """Curves, search trials, dataset inputs and the per-user table of a finished model."""
    assert result.evaluation is not None
    store = ctx.store
    tracking.log_curves(store, run_id, epoch_curves(trained.model.history))
    if trained.search is not None:
        record_search(ctx, run_id, trained.search)
    for part, context in ((split.train, "training"), (split.validation, "validation")):
        tracking.log_dataset(store, [run_id], f"{part.name} {context}", part.digest, config.data, len(part), context)
    store.client().log_table(run_id, result.evaluation.per_user, "tables/per_user_metrics.json")


def _draw_factors(ctx: RunContext, trained: Trained, catalog: serving.Catalog, folder: Path) -> Future[Path | None]:
    """What the strongest latent dimensions mean, by the items at their two ends, drawn into
    `folder/factors.png` on the run's drawing thread (None for a model without item factors)."""

    def draw() -> Path | None:
        factors = getattr(trained.model, "item_factors", None)
        if factors is None:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        factor_report(factors, catalog.item_ids, catalog.titles).savefig(folder / "factors.png")
        return folder / "factors.png"

    return ctx.draw(draw)


def record_search(ctx: RunContext, model_run_id: str, searched: SearchResult) -> None:
    """Every trial of the model's search as a run nested under the model's child run, and search.json."""
    store, key = ctx.store, metric_key("ndcg", searched.k)
    mine = {"mlflow.parentRunId": model_run_id}
    earlier = tracking.find_runs(store, ctx.experiment_id, mine)
    done = {store.client().get_run(r).data.tags.get("trial") for r in earlier}
    for trial in searched.trials:
        if str(trial.number) in done:  # a retried record task: logged before
            continue
        tags = {"trial": trial.number, "state": trial.state, "error": trial.error, "model": searched.model}
        run = tracking.start_run(store, ctx.experiment_id, f"{searched.model} trial {trial.number}", tags, model_run_id)
        metrics = {f"inner_{key}": trial.value, "seconds": trial.seconds} if trial.value is not None else {}
        tracking.log_values(store, run, metrics=metrics, params=trial.params)
        epochs = sorted(trial.curve)
        curve = {"epoch_ndcg_at_10": [trial.curve[e] for e in epochs], "eval_epoch": [float(e) for e in epochs]}
        tracking.log_curves(store, run, epoch_curves(curve))
        tracking.end_run(store, run, ok=trial.state != "failed")
    tracking.log_json(store, model_run_id, searched.to_json(), "search/search.json")


def version_description(result: ModelResult, split: Split) -> str:
    """What the registry page says at a glance: model, NDCG@k with its interval, data, protocol."""
    assert result.evaluation is not None
    ndcg = result.evaluation.warm["ndcg"]
    lo, hi = ndcg.ci95
    s = split.summary
    cutoff = f", cutoff {s.cutoff}" if s.cutoff else ""
    return (
        f"**{result.model}**: NDCG@{result.evaluation.k} {ndcg.mean:.4f} (95% interval {lo:.4f}-{hi:.4f}, "
        f"{result.evaluation.warm.n_users} warm users)\n\n"
        f"Data `{split.train.name}`: {s.n_train:,} train / {s.n_validation:,} validation interactions; "
        f"protocol {s.protocol}{cutoff}."
    )


@contextmanager
def _scratch() -> Iterator[Path]:
    """A temporary folder for files on their way into MLflow, removed once they are logged."""
    folder = Path(tempfile.mkdtemp(prefix="mfpipe-run-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def epoch_curves(history: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per-epoch series for MLflow; NDCG measured every few epochs is re-indexed by its epochs."""
    out = {key: values for key, values in history.items() if key not in ("eval_epoch", "epoch_ndcg_at_10")}
    ndcg = history.get("epoch_ndcg_at_10") or []
    epochs = history.get("eval_epoch") or range(1, len(ndcg) + 1)
    if ndcg:
        dense = [math.nan] * int(max(epochs))
        for epoch, value in zip(epochs, ndcg, strict=False):
            dense[int(epoch) - 1] = value
        out["epoch_ndcg_at_10"] = dense  # NaN epochs are skipped by log_curves
    return out


def record_decision(ctx: RunContext, decision: Decision) -> None:
    with tracking.tracking_errors(ctx.store):
        tracking.log_values(ctx.store, ctx.parent_run_id, tags=decision.tags())
        if decision.drift is not None:
            tracking.log_json(ctx.store, ctx.parent_run_id, decision.drift, "drift/drift.json")
            tracking.log_values(ctx.store, ctx.parent_run_id, metrics={
                f"drift_{key}": value for key, value in decision.drift.items() if isinstance(value, int | float)
            })  # fmt: skip


def record_test_score(ctx: RunContext, version: str, value: float, k: int) -> None:
    """The champion's one score on the test slice, on the parent run and on the version."""
    key = f"test_{metric_key('ndcg', k)}"
    with tracking.tracking_errors(ctx.store):
        tracking.log_values(ctx.store, ctx.parent_run_id, metrics={key: value}, tags={"test.champion_version": version})
        if math.isfinite(value):
            ctx.store.client().set_model_version_tag(ctx.registered_model, version, key, f"{value:.6f}")


def record_figures(ctx: RunContext, results: list[ModelResult], split: Split, config: Config) -> None:
    with tracking.tracking_errors(ctx.store):
        for path, fig in all_figures(results, split, config.k).items():
            tracking.log_figure(ctx.store, ctx.parent_run_id, fig, path)


def close_run(ctx: RunContext, ok: bool, error: str | None, metrics: dict[str, float] | None = None) -> None:
    """End the parent run FINISHED (at least one model finished) or FAILED with the reason as a tag, and
    the run's drawing thread."""
    ctx.stop_drawing()
    with tracking.tracking_errors(ctx.store):
        try:
            tracking.log_values(ctx.store, ctx.parent_run_id, metrics=metrics, tags={"error": error})
        finally:  # the run ends even when its last values cannot be written (the next run then sees it gone)
            tracking.end_run(ctx.store, ctx.parent_run_id, ok=ok)


@functools.cache
def _environment() -> dict[str, Any]:
    """`lineage.environment()` once per process: reading every installed package's metadata takes a quarter second."""
    return environment()


def warm_up(config: Config) -> None:
    """Ahead of use: import matplotlib's figure and PNG backend, read the environment, open the store (a new
    sqlite store creates its tables)."""
    import matplotlib.backends.backend_agg
    import matplotlib.figure  # noqa: F401

    _environment()

    with contextlib.suppress(Exception):  # a broken store is reported where it is used, not here
        tracking.open_store(config.tracking_uri)
