"""The stages of a retraining run as plain functions: the Prefect flow calls each one from a thin task.

Nothing here imports Prefect, so every stage runs (and is tested) without a server. The flow file reads
as the diagram in DESIGN.md; this module holds what each box does: read and validate the data, split
it, train one model under a thread budget, evaluate it, record it in MLflow, re-score the champion on
this run's validation split, and build the report (the `--json-report` layout of the Contracts).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mfpipe import __version__
from mfpipe.config import Config
from mfpipe.data.interactions import Interactions
from mfpipe.errors import MfpipeError
from mfpipe.evaluation import METRICS, EvaluationReport, display_name, evaluate_model, paired_comparison
from mfpipe.models import create
from mfpipe.models.base import Recommender
from mfpipe.split import Split, split_interactions

ACTIVITY_BUCKETS = (1, 20, 50, 100, 200)  # train interactions per user: 1-19, 20-49, ..., 200+
LEADERBOARD_METRICS = ("ndcg", "precision", "recall", "map")
RUNTIME_FIELDS = {
    "tracking_uri",
    "task_runner",
    "dask_address",
    "threads",
    "data_home",
    "registered_model",
    "train_timeout_seconds",
}


# -- identity ---------------------------------------------------------------------------------------
def stable_hash(value: Any) -> str:
    """Short sha256 of a JSON-able value (config sections, cache keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(config: Config) -> str:
    """What a result depends on (data, options, models, params, k, seed), not where or how it ran."""
    return stable_hash(config.model_dump(mode="json", exclude=RUNTIME_FIELDS))


def source_key(config: Config) -> str:
    """Cache key of the loaded data: the spec, the read options, the file's size and mtime, the version.

    A file that changes on disk gets a new key; a named source is checksum-verified by the loader.
    """
    path = Path(config.data).expanduser()
    stat = path.stat() if path.exists() else None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if stat else []
    stamps = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return stable_hash(
        {
            "data": config.data,
            "options": config.data_options.model_dump(mode="json"),
            "seed": config.seed,
            "files": stamps,
            "version": __version__,
        }
    )


# -- load, validate, split --------------------------------------------------------------------------
def read_data(config: Config) -> pd.DataFrame:
    """The canonical interactions frame of `config.data` (download / generate / parse)."""
    from mfpipe.data import read_frame

    return read_frame(config.data, config.data_options, config.data_home, config.seed)


@dataclass(frozen=True)
class Validated:
    """A validation outcome that survives caching: the summary JSON and the folder with GX files."""

    summary: dict[str, Any]
    success: bool
    error: str | None
    files: Path


def validate_data(frame: pd.DataFrame, config: Config, out_dir: Path) -> Validated:
    """Run the GX suites and write the GX result and Data Docs to `out_dir` (kept for the MLflow run)."""
    from mfpipe.validation import validate_frame

    report = validate_frame(frame, config.data_options)
    report.write(out_dir)
    error = None
    try:
        report.raise_for_critical(config.data)
    except MfpipeError as exc:
        error = str(exc)
    return Validated(summary=report.to_json(), success=report.success_critical, error=error, files=out_dir)


def to_interactions(frame: pd.DataFrame) -> Interactions:
    from mfpipe.data import to_interactions as convert

    return convert(frame)


def split_data(data: Interactions, config: Config) -> Split:
    return split_interactions(data, config.split)


def split_json(split: Split) -> dict[str, Any]:
    """Exactly what `mfpipe split` writes to split.json (the report embeds it)."""
    return {**split.summary.to_json(), "digest": split.digest}


# -- training ---------------------------------------------------------------------------------------
def thread_budget(models: list[str], threads: int) -> int:
    """Threads per training task so the parallel tasks together fit the machine.

    The popularity baseline is a bincount and needs no share; the others split the cores evenly.
    """
    heavy = max(1, sum(1 for m in models if m != "pop"))
    return max(1, threads // heavy)


@dataclass
class Trained:
    """A fitted model and what it took to fit it."""

    name: str
    model: Recommender
    train_seconds: float
    threads: int
    params: dict[str, Any]


def train_model(name: str, split: Split, config: Config, threads: int) -> Trained:
    """Fit one model on the train slice with `threads` threads for BLAS, numba and implicit.

    The validation truth is passed for models that record learning curves or stop early. A model whose
    scores come out non-finite (diverged) is an error, so it is reported failed, never promoted.
    """
    from threadpoolctl import threadpool_limits

    model = create(name, config.model_params.get(name), threads=threads, seed=config.seed)
    started = time.perf_counter()
    with threadpool_limits(limits=threads, user_api="blas"):
        model.fit(split.train, split.truth("validation"))
    seconds = time.perf_counter() - started
    probe = np.arange(min(split.train.n_users, 256))
    _, scores = model.recommend(probe, 10, exclude_seen=False)
    if np.isnan(scores).any() or np.isposinf(scores).any():
        raise MfpipeError(f"{name}: training diverged (non-finite scores); check its parameters", exit_code=1)
    return Trained(name, model, seconds, threads, model.params.model_dump(mode="json"))


# -- evaluation -------------------------------------------------------------------------------------
def evaluate(model: Any, split: Split, config: Config, part: str = "validation") -> EvaluationReport:
    return evaluate_model(model, split, config.k, part=part, seed=config.seed)


class Remapped:
    """A model from another run seen through this split's index space (ids matched as strings).

    Users this model never saw get its popularity fallback; items it recommends that this split does
    not know become empty slots (never a hit). So a champion trained on other data is scored fairly.
    """

    def __init__(self, model: Recommender, catalog: Any, data: Interactions) -> None:
        from mfpipe.serving import lookup_ids

        self.model = model
        self.user_map = catalog.user_index(data.user_ids)
        self.item_map = lookup_ids(np.asarray(data.item_ids).astype(str), catalog.item_ids)

    def recommend(self, users: np.ndarray, k: int = 10, exclude_seen: bool = True) -> tuple[np.ndarray, np.ndarray]:
        users = np.asarray(users, np.int64)
        inside = (users >= 0) & (users < len(self.user_map))
        mapped = np.where(inside, self.user_map[np.clip(users, 0, max(len(self.user_map) - 1, 0))], -1)
        items, scores = self.model.recommend(mapped, k, exclude_seen)
        return np.where(items >= 0, self.item_map[np.clip(items, 0, None)], -1).astype(np.int32), scores


def rating_metrics(model: Recommender, split: Split) -> dict[str, float]:
    """RMSE and MAE on the validation ratings for models that predict ratings (SVD); {} for the others."""
    if not hasattr(model, "rating_metrics") or not split.validation.has_ratings:
        return {}
    values = model.rating_metrics(split.validation)
    return {name: values[name] for name in ("rmse", "mae") if math.isfinite(values[name])}


def rescore(pyfunc: Any, split: Split, config: Config, part: str = "validation") -> EvaluationReport:
    """Evaluate a registered model (our pyfunc wrapper) on this run's split."""
    data = split.validation if part == "validation" else split.test
    return evaluate(Remapped(pyfunc.model, pyfunc.catalog, data), split, config, part)


def compare(candidate: EvaluationReport, champion: EvaluationReport, seed: int) -> tuple[float, tuple[float, float]]:
    """Paired bootstrap of per-user NDCG@k on the warm users both were scored on."""
    a = candidate.per_user.set_index("user_id")
    b = champion.per_user.set_index("user_id")
    users = a.index[a["warm"]].intersection(b.index)
    result = paired_comparison(a.loc[users, "ndcg"].to_numpy(), b.loc[users, "ndcg"].to_numpy(), seed)
    return result.mean_diff, result.ci95


def display_metrics(report: EvaluationReport) -> dict[str, Any]:
    """The warm-user metrics under their display names (`ndcg@10`, `..._se`, `..._ci95`)."""
    return report.warm.to_json(report.k)


# -- the run's outcome ------------------------------------------------------------------------------
@dataclass
class ModelResult:
    """One line of the leaderboard (ok or failed)."""

    model: str
    status: str
    error: str | None = None
    train_seconds: float | None = None
    evaluation: EvaluationReport | None = None
    run_id: str | None = None
    run_link: str | None = None
    registered_model: str | None = None
    version: str | None = None
    history: dict[str, list[float]] = field(default_factory=dict)
    rating_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """Validation NDCG@k of warm users (NaN when the model failed or had no warm user)."""
        return self.evaluation.warm["ndcg"].mean if self.evaluation is not None else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "status": self.status,
            "error": self.error,
            "metrics": {**display_metrics(self.evaluation), **self.rating_metrics} if self.evaluation else {},
            "train_seconds": None if self.train_seconds is None else round(self.train_seconds, 3),
            "run_id": self.run_id,
            "registered_model": self.registered_model,
            "version": self.version,
        }


def best(results: list[ModelResult]) -> ModelResult | None:
    """The finished model with the highest validation NDCG@k (ties: the order of `--models`)."""
    finished = [r for r in results if r.status == "ok" and math.isfinite(r.score)]
    return max(finished, key=lambda r: r.score, default=None)


def _finite(value: float | None) -> float | None:
    """JSON and tags have no NaN: an undefined figure is None."""
    return None if value is None or not math.isfinite(value) else float(value)


def champion_json(name: str, decision: Any, k: int) -> dict[str, Any]:
    """The `champion` block of the report from a tracking.Decision."""
    key = display_name("ndcg", k)
    return {
        "registered_model": name,
        "before": {"version": decision.before_version, key: _finite(decision.before_score)},
        "after": {"version": decision.after_version, key: _finite(decision.after_score)},
        "promoted": bool(decision.promoted),
        "reason": decision.reason,
    }


def build_report(data: Interactions, split: Split, results: list[ModelResult], champion: dict[str, Any]) -> dict:
    """The `--json-report` document, exactly the Contracts layout."""
    return {
        "dataset": {"name": data.name, "digest": data.digest, "rows": len(data)},
        "protocol": split.summary.protocol,
        "split": split_json(split),
        "models": [r.to_json() for r in results],
        "champion": champion,
    }


def leaderboard_markdown(results: list[ModelResult], k: int) -> str:
    """Markdown leaderboard (Prefect artifact): model, NDCG/P/R/MAP@k, train time, MLflow link."""
    short = {"ndcg": "NDCG", "precision": "P", "recall": "R", "map": "MAP"}
    head = ["model", *[f"{short[m]}@{k}" for m in LEADERBOARD_METRICS], "train s", "status", "MLflow"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ordered = sorted(results, key=lambda r: -r.score if math.isfinite(r.score) else math.inf)
    for r in ordered:
        cells = [f"{r.evaluation.warm[m].mean:.4f}" if r.evaluation else "-" for m in LEADERBOARD_METRICS]
        link = f"[run]({r.run_link})" if r.run_link else "-"
        status = r.status if r.status == "ok" else f"failed: {r.error}"
        seconds = f"{r.train_seconds:.1f}" if r.train_seconds is not None else "-"
        lines.append("| " + " | ".join([r.model, *cells, seconds, status, link]) + " |")
    return "\n".join(lines)


def validation_markdown(validated: Validated) -> str:
    rows = validated.summary.get("expectations", [])
    lines = [
        f"**{validated.summary.get('source')}**: {'passed' if validated.success else 'FAILED'} "
        f"({sum(1 for r in rows if r.get('success'))}/{len(rows)} expectations met)",
        "",
        "| expectation | column | severity | result |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('name')} | {r.get('column') or ''} | {r.get('severity')} | "
            f"{'pass' if r.get('success') else 'FAIL'} |"
        )
    return "\n".join(lines)


# -- figures ----------------------------------------------------------------------------------------
def _figure(width: float = 7.0, height: float = 4.0, ncols: int = 1) -> tuple[Any, Any]:
    """A figure on the Agg backend (no display; safe in worker threads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height))


def learning_curves(results: list[ModelResult]) -> Any | None:
    """Loss and validation NDCG@10 per epoch for the models that record them."""
    curves = [r for r in results if r.history.get("epoch_loss")]
    if not curves:
        return None
    fig, (loss_ax, ndcg_ax) = _figure(10, 4, ncols=2)
    for r in curves:
        loss = r.history["epoch_loss"]
        loss_ax.plot(range(1, len(loss) + 1), loss, label=r.model)
        ndcg = r.history.get("epoch_ndcg_at_10", [])
        steps = r.history.get("eval_epoch") or list(range(1, len(ndcg) + 1))
        if ndcg:
            ndcg_ax.plot(steps[: len(ndcg)], ndcg, marker="o", label=r.model)
    loss_ax.set(title="training loss", xlabel="epoch")
    ndcg_ax.set(title="validation NDCG@10 (sample)", xlabel="epoch")
    loss_ax.legend()
    ndcg_ax.legend()
    fig.tight_layout()
    return fig


def metric_comparison(results: list[ModelResult], k: int) -> Any | None:
    """Bars of each metric per model with 95% intervals (warm users)."""
    done = [r for r in results if r.evaluation is not None]
    if not done:
        return None
    fig, ax = _figure(9, 4)
    width = 0.8 / len(done)
    x = np.arange(len(METRICS))
    for i, r in enumerate(done):
        means = np.array([r.evaluation.warm[m].mean for m in METRICS])
        ci = np.array([r.evaluation.warm[m].ci95 for m in METRICS], dtype=float)
        err = np.abs(np.vstack([means - ci[:, 0], ci[:, 1] - means]))
        ax.bar(x + i * width, means, width, yerr=np.nan_to_num(err), capsize=2, label=r.model)
    ax.set_xticks(x + width * (len(done) - 1) / 2, [display_name(m, k) for m in METRICS])
    ax.set(title="validation metrics, warm users (95% bootstrap interval)")
    ax.legend()
    fig.tight_layout()
    return fig


def activity_buckets(split: Split) -> pd.Series:
    """Label per train user: how many train interactions it has (bucketed)."""
    counts = np.bincount(split.train.users, minlength=split.train.n_users)
    edges = [*ACTIVITY_BUCKETS, np.inf]
    labels = [f"{lo}-{hi - 1}" if np.isfinite(hi) else f"{lo}+" for lo, hi in itertools.pairwise(edges)]
    return pd.Series(pd.cut(counts, edges, right=False, labels=labels))


def ndcg_by_activity(results: list[ModelResult], split: Split) -> Any | None:
    """Mean NDCG@k of warm users grouped by how active they were in train."""
    done = [r for r in results if r.evaluation is not None]
    if not done:
        return None
    buckets = activity_buckets(split)
    fig, ax = _figure(8, 4)
    labels = list(buckets.cat.categories)
    width = 0.8 / len(done)
    for i, r in enumerate(done):
        per_user = r.evaluation.per_user
        warm = per_user[per_user["warm"]]
        means = warm.groupby(buckets.iloc[warm["user"].to_numpy()].to_numpy(), observed=False)["ndcg"].mean()
        ax.bar(np.arange(len(labels)) + i * width, [means.get(b, np.nan) for b in labels], width, label=r.model)
    ax.set_xticks(np.arange(len(labels)) + width * (len(done) - 1) / 2, labels)
    ax.set(title="NDCG by user activity (train interactions per user)", xlabel="train interactions", ylabel="NDCG")
    ax.legend()
    fig.tight_layout()
    return fig


# -- scratch space ----------------------------------------------------------------------------------
class Scratch:
    """A temporary folder for files on their way into MLflow, removed when the run is recorded."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="mfpipe-run-"))

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# -- recording in MLflow ----------------------------------------------------------------------------
@dataclass
class RunContext:
    """Where this run records: the store, the dataset's experiment, the parent run, the registry name."""

    store: Any  # tracking.Store
    experiment_id: str
    parent_run_id: str
    registered_model: str
    lineage: dict[str, Any]


def open_run(config: Config, data: Interactions, flow_run_id: str | None, flow_run_url: str | None) -> RunContext:
    """The parent run of this flow run, in the dataset's experiment, tagged with the Prefect run."""
    from mfpipe import tracking

    store = tracking.open_store(config.tracking_uri)
    with tracking.tracking_errors(store):
        exp_id = tracking.experiment_id(store, data.name)
        lineage = {
            "dataset": data.name,
            "dataset_digest": data.digest,
            "config_hash": config_hash(config),
            "seed": config.seed,
            "git_commit": tracking.git_commit(),
            "mfpipe_version": __version__,
        }
        tags = {"prefect.flow_run_id": flow_run_id, "prefect.flow_run_url": flow_run_url, **lineage}
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
        tracking.log_json(store, parent, tracking.environment(), "environment.json")
    registered = tracking.registered_model_name(data.name, config.registered_model)
    return RunContext(store, exp_id, parent, registered, lineage)


def record_validation(ctx: RunContext, validated: Validated) -> None:
    from mfpipe import tracking

    with tracking.tracking_errors(ctx.store):
        if validated.files.exists():
            tracking.log_dir(ctx.store, ctx.parent_run_id, validated.files, "validation")
        tracking.log_values(
            ctx.store,
            ctx.parent_run_id,
            tags={"validation.success": validated.success, "validation.error": validated.error},
        )


def record_split(ctx: RunContext, split: Split) -> None:
    from mfpipe import tracking

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
    ctx.lineage["split_digest"] = split.digest


def record_model(ctx: RunContext, result: ModelResult, trained: Trained | None, split: Split, config: Config) -> None:
    """The model's child run: params, curves, metrics, pyfunc; a finished model becomes a registry version.

    A failed model gets a FAILED child run with its error; a run interrupted while logging is ended
    FAILED too, so a retry never leaves a dangling RUNNING run behind.
    """
    from mfpipe import tracking

    store = ctx.store
    with tracking.tracking_errors(store):
        run_id = tracking.start_run(
            store, ctx.experiment_id, result.model, {"model": result.model, **ctx.lineage}, parent_id=ctx.parent_run_id
        )
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
    from mfpipe import serving, tracking

    store = ctx.store
    metrics = result.evaluation.mlflow_metrics()
    tracking.log_values(
        store,
        run_id,
        metrics={**metrics, **result.rating_metrics, "train_seconds": trained.train_seconds},
        params={**trained.params, "threads": trained.threads},
        tags={"status": "ok"},
    )
    tracking.log_curves(store, run_id, _curves(trained.model.history))
    tracking.log_dataset(
        store, [run_id], split.train.name, split.train.digest, config.data, len(split.train), "training"
    )
    scratch = Scratch()
    try:
        catalog = serving.Catalog.of(split.train)
        model_path = trained.model.save(scratch.path / f"{result.model}.npz")
        catalog_path = catalog.save(scratch.path / "catalog.npz")
        uri = tracking.log_candidate_model(store, run_id, model_path, catalog_path, serving.input_example(catalog))
    finally:
        scratch.close()
    tags = {
        **ctx.lineage,
        "model": result.model,
        "train_seconds": round(trained.train_seconds, 3),
        **{key: _finite(metrics.get(key)) for key in _version_metric_keys(config.k)},
    }
    result.version = tracking.register(store, ctx.registered_model, uri, run_id, tags)
    result.registered_model = ctx.registered_model


def _version_metric_keys(k: int) -> list[str]:
    from mfpipe.evaluation import metric_key

    return [metric_key(m, k, v) for m in METRICS for v in ("", "all", "cold")]


def _curves(history: dict[str, list[float]]) -> dict[str, list[float]]:
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


# -- promotion --------------------------------------------------------------------------------------
def promote_best(ctx: RunContext, results: list[ModelResult], split: Split, config: Config) -> Any:
    """Compare this run's best candidate with the champion re-scored on this split; move the aliases.

    Returns the tracking.Decision; with no finished model nothing moves.
    """
    from mfpipe import serving, tracking

    top = best(results)
    store, name = ctx.store, ctx.registered_model
    with tracking.tracking_errors(store):
        if top is None or top.version is None:
            current = tracking.alias_version(store, name, tracking.CHAMPION)
            version = current.version if current else None
            decision = tracking.Decision(
                name,
                False,
                "no model finished: the champion stays where it was",
                config.promotion_rule,
                None,
                before_version=version,
                after_version=version,
            )
        else:

            def rescore_champion(champion: Any) -> Any:
                pyfunc = serving.load_pyfunc(f"models:/{name}/{champion.version}")
                report = rescore(pyfunc, split, config)
                diff, ci95 = compare(top.evaluation, report, config.seed)
                return tracking.Rescore(report.warm["ndcg"].mean, diff, ci95)

            candidate = tracking.Candidate(top.model, top.version, top.score)
            decision = tracking.promote(store, name, candidate, rescore_champion, config.promotion_rule)
        tracking.log_values(store, ctx.parent_run_id, tags=decision.tags())
    return decision


def score_on_test(
    ctx: RunContext, decision: Any, results: list[ModelResult], models: dict[str, Any], split: Split, config: Config
) -> float | None:
    """The honest final figure: the champion scored once on the test slice, logged apart."""
    from mfpipe import serving, tracking

    if split.test is None or decision.after_version is None:
        return None
    mine = {r.version: r.model for r in results if r.version is not None}
    if decision.after_version in mine:
        report = evaluate(models[mine[decision.after_version]], split, config, part="test")
    else:
        pyfunc = serving.load_pyfunc(f"models:/{ctx.registered_model}/{decision.after_version}")
        report = rescore(pyfunc, split, config, part="test")
    value = report.warm["ndcg"].mean
    key = f"test_ndcg_at_{config.k}"
    with tracking.tracking_errors(ctx.store):
        tracking.log_values(
            ctx.store, ctx.parent_run_id, metrics={key: value}, tags={"test.champion_version": decision.after_version}
        )
        if math.isfinite(value):
            ctx.store.client().set_model_version_tag(ctx.registered_model, decision.after_version, key, f"{value:.6f}")
    return value


def record_figures(ctx: RunContext, results: list[ModelResult], split: Split, config: Config) -> None:
    from mfpipe import tracking

    figures = {
        "plots/learning_curves.png": learning_curves(results),
        "plots/metric_comparison.png": metric_comparison(results, config.k),
        "plots/ndcg_by_activity.png": ndcg_by_activity(results, split),
    }
    with tracking.tracking_errors(ctx.store):
        for path, fig in figures.items():
            if fig is not None:
                tracking.log_figure(ctx.store, ctx.parent_run_id, fig, path)


def close_run(ctx: RunContext, ok: bool, error: str | None, metrics: dict[str, float] | None = None) -> None:
    """End the parent run FINISHED (at least one model finished) or FAILED with the reason as a tag."""
    from mfpipe import tracking

    with tracking.tracking_errors(ctx.store):
        tracking.log_values(ctx.store, ctx.parent_run_id, metrics=metrics, tags={"error": error})
        tracking.end_run(ctx.store, ctx.parent_run_id, ok=ok)


def dataset_name(spec: str) -> str:
    """The name the loader gives `spec`'s data, without reading it (for `--dataset` defaults)."""
    from mfpipe.data import loader, movielens, synthetic

    path = Path(spec).expanduser()
    if path.is_dir():
        ratings = movielens.find_ratings(path)
        return (ratings.parent if ratings is not None else path).name
    if path.exists():
        return path.name.removesuffix(".zip") if path.suffix.lower() == ".zip" else loader._stem(path)
    size = loader.synthetic_size(spec)
    return f"synthetic-{synthetic.size_label(size)}" if size is not None else spec


def unchanged_report(data: Interactions, split: Split, config: Config) -> dict:
    """The report of a run skipped because the data did not change: no models, the champion untouched."""
    from mfpipe import tracking

    store = tracking.open_store(config.tracking_uri)
    name = tracking.registered_model_name(data.name, config.registered_model)
    with tracking.tracking_errors(store):
        current = tracking.alias_version(store, name, tracking.CHAMPION)
    version = current.version if current else None
    decision = tracking.Decision(
        name, False, f"data unchanged (digest {data.digest}): nothing trained", config.promotion_rule, None,
        before_version=version, after_version=version,
    )  # fmt: skip
    return build_report(data, split, [], champion_json(name, decision, config.k))


def warm_up(config: Config) -> None:
    """Import MLflow and matplotlib and open the store (a new sqlite store creates its tables) ahead of use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    from mfpipe import tracking

    with contextlib.suppress(Exception):  # a broken store is reported where it is used, not here
        tracking.open_store(config.tracking_uri)
