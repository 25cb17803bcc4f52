"""MLflow: the store, runs and what they log, the registry, and compare-and-promote.

Store: `config.tracking_uri` wins, then `MLFLOW_TRACKING_URI`, else `sqlite:///mlruns/mlflow.db` under
the current directory. For a `sqlite:///DIR/mlflow.db` store the artifacts go to `DIR/artifacts` (each
experiment is created with that artifact location), so one folder holds the whole local store.

Layout: one experiment per dataset; per flow run a parent run (Prefect flow-run id and URL as tags) with
the validation result, Data Docs, split summary, plots and environment; per model a child run with
params, per-epoch curves, final metrics and the pyfunc. One registered model per dataset
(`mfpipe-<dataset>`); every candidate becomes a version with lineage tags.

Promotion is serialised by an exclusive `fcntl.flock` on a lock file beside a local store (sqlite or
file), which also covers several processes on one host. For a remote store (HTTP server, database) the
lock file lives in the local state folder, which serialises the runs of this host; across hosts the
alias move is compare-and-set: just before moving `champion` we re-read it, and if another run moved it
meanwhile the decision is taken again against the new champion.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import platformdirs

from mfpipe import __version__
from mfpipe.errors import MfpipeError

# Quiet by default: no telemetry, no per-artifact progress bars, no per-log_model warnings (CloudPickle,
# "pip version" in uv venvs) drowning the leaderboard; MLflow errors still show.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

logging.getLogger("mlflow").setLevel(logging.ERROR)

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
CHAMPION = "champion"
CHALLENGER = "challenger"
PROMOTION_METRIC = "ndcg_at_10"
MLFLOW_UI_URL = "http://127.0.0.1:5000"
_SQLITE = re.compile(r"^sqlite:///(?P<path>.+)$")


# -- store ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Store:
    """A resolved tracking store: URI, where local artifacts go, and where the promotion lock lives."""

    uri: str
    artifact_root: Path | None
    lock_dir: Path

    @property
    def local(self) -> bool:
        return self.artifact_root is not None

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def ui_url(self) -> str:
        """Base URL of the MLflow UI for links (a local store is shown by `mlflow ui`)."""
        return self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else MLFLOW_UI_URL

    def run_link(self, experiment_id: str, run_id: str) -> str:
        return f"{self.ui_url()}/#/experiments/{experiment_id}/runs/{run_id}"

    def ui_command(self) -> str:
        return f"mlflow ui --backend-store-uri {self.uri}" if self.local else f"open {self.ui_url()}"


def resolve_uri(config_uri: str | None = None, environ: dict[str, str] | None = None) -> str:
    """config.tracking_uri > MLFLOW_TRACKING_URI > the default local store."""
    env = os.environ if environ is None else environ
    return config_uri or env.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def open_store(config_uri: str | None = None) -> Store:
    """Resolve the store, make a local one absolute (workers may run elsewhere) and point MLflow at it."""
    uri = resolve_uri(config_uri)
    match = _SQLITE.match(uri)
    if match:
        db = Path(match["path"]).expanduser().resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
        store = Store(uri=uri, artifact_root=db.parent / "artifacts", lock_dir=db.parent)
    elif uri.startswith("file:") or "://" not in uri:
        root = Path(uri.removeprefix("file://").removeprefix("file:")).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        uri = root.as_uri()
        store = Store(uri=uri, artifact_root=root, lock_dir=root)
    else:
        state = Path(platformdirs.user_state_dir("mfpipe"))
        state.mkdir(parents=True, exist_ok=True)
        store = Store(uri=uri, artifact_root=None, lock_dir=state)
    mlflow.set_tracking_uri(store.uri)
    mlflow.set_registry_uri(store.uri)
    if match:
        _create_schema_once(store)
    return store


_SCHEMA_READY: set[str] = set()
_SCHEMA_LOCK = threading.Lock()


def _create_schema_once(store: Store) -> None:
    """The first client of a new sqlite store creates its tables: one thread at a time, once per process."""
    with _SCHEMA_LOCK:
        if store.uri not in _SCHEMA_READY:
            with tracking_errors(store):
                store.client().search_experiments(max_results=1)
            _SCHEMA_READY.add(store.uri)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextmanager
def tracking_errors(store: Store) -> Iterator[None]:
    """An unreachable or broken tracking store becomes one MfpipeError line (exit 1: the run failed)."""
    try:
        yield
    except MlflowException as exc:
        raise MfpipeError(f"MLflow store {store.uri}: {_first_line(exc)}", exit_code=1) from exc


def dataset_slug(name: str) -> str:
    """A dataset name as it appears in experiment and registered-model names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "data"


def registered_model_name(dataset: str, override: str | None = None) -> str:
    return override or f"mfpipe-{dataset_slug(dataset)}"


def experiment_id(store: Store, dataset: str) -> str:
    """The dataset's experiment, created on first use (artifacts beside a local store)."""
    client = store.client()
    name = f"mfpipe-{dataset_slug(dataset)}"
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = (store.artifact_root / name).as_uri() if store.artifact_root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created by a concurrent run in the meantime
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


# -- runs -------------------------------------------------------------------------------------------
def start_run(store: Store, exp_id: str, name: str, tags: dict[str, Any], parent_id: str | None = None) -> str:
    tags = {k: str(v) for k, v in tags.items() if v is not None}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    return store.client().create_run(exp_id, run_name=name, tags=tags).info.run_id


def last_run_digest(store: Store, dataset: str) -> str | None:
    """`dataset_digest` of the newest finished parent run of the dataset (for `skip_unchanged`), or None."""
    client = store.client()
    experiment = client.get_experiment_by_name(f"mfpipe-{dataset_slug(dataset)}")
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="attributes.status = 'FINISHED' AND tags.dataset_digest LIKE '%'",
        order_by=["attributes.start_time DESC"], max_results=50,
    )  # fmt: skip
    parents = (run for run in runs if "mlflow.parentRunId" not in run.data.tags)
    return next((run.data.tags["dataset_digest"] for run in parents), None)


def end_run(store: Store, run_id: str, ok: bool) -> None:
    store.client().set_terminated(run_id, "FINISHED" if ok else "FAILED")


def log_values(
    store: Store,
    run_id: str,
    metrics: dict[str, float] | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
) -> None:
    """One batch call: metrics (finite only; MLflow rejects NaN in some stores), params, tags."""
    now = int(time.time() * 1000)
    batch_metrics = [
        Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if v is not None and _finite(float(v))
    ]
    batch_params = [Param(k, _param_text(v)) for k, v in (params or {}).items()]
    batch_tags = [RunTag(k, str(v)) for k, v in (tags or {}).items() if v is not None]
    store.client().log_batch(run_id, metrics=batch_metrics, params=batch_params, tags=batch_tags)


def log_curves(store: Store, run_id: str, history: dict[str, list[float]]) -> None:
    """Per-epoch curves (`epoch_loss`, `epoch_ndcg_at_10`, ...) as metrics with step = epoch."""
    now = int(time.time() * 1000)
    metrics = [
        Metric(key if key.startswith("epoch_") else f"epoch_{key}", float(v), now, step)
        for key, values in history.items()
        for step, v in enumerate(values, start=1)
        if _finite(float(v))
    ]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        store.client().log_batch(run_id, metrics=metrics[start : start + 1000])


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]


def log_dataset(store: Store, run_ids: list[str], name: str, digest: str, source: str, rows: int, context: str) -> None:
    """The dataset as an MLflow dataset input carrying our content digest (no copy of the data)."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types.schema import ColSpec, Schema

    schema = Schema(
        [
            ColSpec("string", "user_id"),
            ColSpec("string", "item_id"),
            ColSpec("double", "rating"),
            ColSpec("long", "timestamp"),
        ]
    )
    origin = source if "://" in source else Path(source).resolve().as_uri() if Path(source).exists() else source
    dataset = MetaDataset(HTTPDatasetSource(url=origin), name=name, digest=digest, schema=schema)
    entity = dataset._to_mlflow_entity()
    tags = [InputTag("mlflow.data.context", context), InputTag("rows", str(rows))]
    for run_id in run_ids:
        store.client().log_inputs(run_id, datasets=[DatasetInput(entity, tags=tags)])


def log_dir(store: Store, run_id: str, local_dir: Path, artifact_path: str) -> None:
    store.client().log_artifacts(run_id, str(local_dir), artifact_path)


def log_json(store: Store, run_id: str, value: Any, artifact_file: str) -> None:
    store.client().log_dict(run_id, value, artifact_file)


def log_figure(store: Store, run_id: str, figure: Any, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    store.client().log_figure(run_id, figure, artifact_file)
    plt.close(figure)


def environment() -> dict[str, Any]:
    """What ran: Python, platform and every installed distribution with its version."""
    packages = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]})
    return {"python": sys.version.split()[0], "platform": sys.platform, "mfpipe": __version__, "packages": packages}


def git_commit() -> str | None:
    """The commit of the mfpipe source tree, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def log_candidate_model(store: Store, run_id: str, model_path: Path, catalog_path: Path, example: Any) -> str:
    """Log the pyfunc into the child run; returns its model URI."""
    from mfpipe import serving

    with mlflow.start_run(run_id=run_id, nested=True, log_system_metrics=False):
        info = serving.log_pyfunc(model_path, catalog_path, example)
    return info.model_uri


# -- registry ---------------------------------------------------------------------------------------
def register(store: Store, name: str, model_uri: str, run_id: str, tags: dict[str, Any]) -> str:
    """A new version of `name` (created on first use) with lineage tags; returns the version."""
    client = store.client()
    try:
        client.create_registered_model(name, description="mfpipe candidates; `champion` is served.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    clean = {k: str(v) for k, v in tags.items() if v is not None}
    version = client.create_model_version(
        name, source=model_uri, run_id=run_id, tags=clean, model_id=_model_id(model_uri)
    )
    return str(version.version)


def _model_id(model_uri: str) -> str | None:
    return model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]
    aliases: list[str]


def _version_info(mv: Any) -> VersionInfo:
    return VersionInfo(mv.name, str(mv.version), mv.run_id, dict(mv.tags or {}), list(mv.aliases or []))


def alias_version(store: Store, name: str, alias: str = CHAMPION) -> VersionInfo | None:
    """The version an alias points at, or None (no registered model or no alias yet)."""
    try:
        return _version_info(store.client().get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def get_version(store: Store, name: str, version: str) -> VersionInfo:
    try:
        return _version_info(store.client().get_model_version(name, str(version)))
    except MlflowException as exc:
        raise MfpipeError(f"{name}: no version {version} ({_first_line(exc)})") from None


def list_versions(store: Store, name: str) -> list[VersionInfo]:
    found = store.client().search_model_versions(f"name='{name}'")
    return sorted((_version_info(v) for v in found), key=lambda v: int(v.version))


def move_alias(store: Store, name: str, alias: str, version: str, tags: dict[str, Any]) -> None:
    """Point `alias` at `version` and record why on the version (tags prefixed with the alias)."""
    client = store.client()
    client.set_registered_model_alias(name, alias, str(version))
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(name, str(version), f"{alias}.{key}", str(value))


# -- promotion --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    model: str
    version: str
    score: float  # validation NDCG@10 (warm users)


@dataclass(frozen=True)
class Rescore:
    """The champion re-scored on this run's validation split, and the paired comparison with it."""

    score: float
    diff: float  # candidate - champion
    ci95: tuple[float, float]


@dataclass
class Decision:
    registered_model: str
    promoted: bool
    reason: str
    rule: str
    candidate: Candidate | None
    before_version: str | None = None
    before_score: float | None = None
    after_version: str | None = None
    after_score: float | None = None
    diff: float | None = None
    ci95: tuple[float, float] | None = None
    challenger: str | None = None

    def tags(self) -> dict[str, Any]:
        """The decision as tags (parent run and the versions involved)."""
        return {
            "promotion.promoted": self.promoted,
            "promotion.rule": self.rule,
            "promotion.reason": self.reason,
            "promotion.candidate_version": self.candidate.version if self.candidate else None,
            "promotion.candidate_ndcg_at_10": self.candidate.score if self.candidate else None,
            "promotion.champion_before": self.before_version,
            "promotion.champion_before_ndcg_at_10": self.before_score,
            "promotion.champion_after": self.after_version,
            "promotion.diff": self.diff,
            "promotion.ci95": None if self.ci95 is None else f"[{self.ci95[0]:.5f}, {self.ci95[1]:.5f}]",
        }


def decide(
    name: str, candidate: Candidate, champion: VersionInfo | None, rescore: Rescore | None, rule: str
) -> Decision:
    """The promotion rule (DESIGN "Promotion"): no champion -> promote; else `significant` or `strict`."""
    if champion is None or rescore is None:
        return Decision(
            name,
            True,
            f"no champion yet: {candidate.model} v{candidate.version} (NDCG@10 {candidate.score:.4f}) becomes champion",
            rule,
            candidate,
            after_version=candidate.version,
            after_score=candidate.score,
        )
    lo, hi = rescore.ci95
    head = (
        f"{candidate.model} v{candidate.version} NDCG@10 {candidate.score:.4f} vs champion v{champion.version} "
        f"{rescore.score:.4f} on this validation split: difference {rescore.diff:+.4f}, 95% interval "
        f"[{lo:+.4f}, {hi:+.4f}]"
    )
    if rule == "strict":
        promoted = rescore.diff > 0
        why = "higher (rule strict)" if promoted else "not higher (rule strict)"
    else:
        promoted = lo > 0
        why = "interval above zero (rule significant)" if promoted else "interval not above zero (rule significant)"
    after = (candidate.version, candidate.score) if promoted else (champion.version, rescore.score)
    verdict = "promoted" if promoted else "champion kept"
    return Decision(
        name,
        promoted,
        f"{head}: {why}; {verdict}",
        rule,
        candidate,
        before_version=champion.version,
        before_score=rescore.score,
        after_version=after[0],
        after_score=after[1],
        diff=rescore.diff,
        ci95=(lo, hi),
        challenger=None if promoted else candidate.version,
    )


@contextmanager
def promotion_lock(store: Store, name: str) -> Iterator[None]:
    """Exclusive lock per registered model: one promotion at a time (see the module docstring)."""
    path = store.lock_dir / f".mfpipe-promote-{dataset_slug(name)}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def promote(
    store: Store,
    name: str,
    candidate: Candidate,
    rescore: Callable[[VersionInfo], Rescore],
    rule: str = "significant",
    attempts: int = 3,
) -> Decision:
    """Compare the candidate with the current champion (re-scored by `rescore`) and move the aliases.

    Under the lock; the alias is re-read before it moves, and the decision retaken if it changed.
    """
    with promotion_lock(store, name):
        for _ in range(attempts):
            champion = alias_version(store, name, CHAMPION)
            if champion is not None and champion.version == candidate.version:
                return Decision(
                    name,
                    False,
                    f"v{candidate.version} is already champion",
                    rule,
                    candidate,
                    before_version=champion.version,
                    before_score=candidate.score,
                    after_version=champion.version,
                    after_score=candidate.score,
                )
            scored = rescore(champion) if champion is not None else None
            decision = decide(name, candidate, champion, scored, rule)
            now = alias_version(store, name, CHAMPION)
            if (now and now.version) != (champion and champion.version):
                continue  # another host moved the champion meanwhile: decide again against it
            _apply(store, decision)
            return decision
    raise MfpipeError(f"{name}: the champion kept moving during promotion; try again", exit_code=1)


def _apply(store: Store, decision: Decision) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = {"reason": decision.reason, "at": stamp, "rule": decision.rule}
    if decision.promoted and decision.after_version:
        record["previous"] = decision.before_version
        move_alias(store, decision.registered_model, CHAMPION, decision.after_version, record)
    elif decision.challenger:
        move_alias(store, decision.registered_model, CHALLENGER, decision.challenger, record)


def set_champion_by_hand(store: Store, name: str, version: str | None, reason: str, rollback: bool = False) -> Decision:
    """`mfpipe promote`: move `champion` to `version`, or back to the previous champion (`rollback`)."""
    with tracking_errors(store), promotion_lock(store, name):
        current = alias_version(store, name, CHAMPION)
        if rollback:
            previous = (current.tags.get(f"{CHAMPION}.previous") if current else None) or None
            if current is None or previous in (None, "None"):
                raise MfpipeError(f"{name}: no earlier champion recorded to roll back to")
            version = previous
        target = get_version(store, name, str(version))
        action = "rollback" if rollback else "manual promotion"
        text = f"{action} by hand: {reason}" if reason else f"{action} by hand"
        record = {"reason": text, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rule": "manual"}
        # A rollback must not be undone by the next rollback: keep the older lineage on the target.
        if not rollback:
            record["previous"] = current.version if current else None
        move_alias(store, name, CHAMPION, target.version, record)
        return Decision(
            name,
            True,
            text,
            "manual",
            None,
            before_version=current.version if current else None,
            after_version=target.version,
        )
