"""MLflow primitives: the store, runs and what they log, the registry and its aliases. No decisions here.

Store: `config.tracking_uri` wins, then `MLFLOW_TRACKING_URI`, else `sqlite:///mlruns/mlflow.db` under
the current directory. For a `sqlite:///DIR/mlflow.db` store the artifacts go to `DIR/artifacts` (each
experiment is created with that artifact location), so one folder holds the whole local store.

Layout (written by `mfpipe.recording`): one experiment per dataset; per flow run a parent run, per model
a child run; one registered model per dataset and protocol. `mfpipe.promotion` decides where the
aliases point; `Store.lock_dir` is where its lock file lives.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import platformdirs
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import SecretStr

from mfpipe.auth import mask_uri
from mfpipe.errors import MfpipeError, TransientError, is_transient, one_line

# No per-log_model warnings (CloudPickle, "pip version" in uv venvs) drowning the leaderboard; errors still show.
logging.getLogger("mlflow").setLevel(logging.ERROR)

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
CHAMPION = "champion"
CHALLENGER = "challenger"
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
        """Base URL of the MLflow UI for links (a local store is shown by `mlflow ui`), never with a password."""
        return mask_uri(self.uri.rstrip("/")) if self.uri.startswith(("http://", "https://")) else MLFLOW_UI_URL

    def run_link(self, experiment_id: str, run_id: str) -> str:
        """A run's page; the query opens the training view (MLflow 3 defaults a new browser to its GenAI view)."""
        return f"{self.ui_url()}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"

    def ui_command(self) -> str:
        return f"mlflow ui --backend-store-uri {mask_uri(self.uri)}" if self.local else f"open {self.ui_url()}"


def resolve_uri(config_uri: str | SecretStr | None = None, environ: dict[str, str] | None = None) -> str:
    """config.tracking_uri > MLFLOW_TRACKING_URI > the default local store."""
    env = os.environ if environ is None else environ
    given = config_uri.get_secret_value() if isinstance(config_uri, SecretStr) else config_uri
    return given or env.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def open_store(config_uri: str | SecretStr | None = None) -> Store:
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


@contextmanager
def tracking_errors(store: Store) -> Iterator[None]:
    """An unreachable or broken tracking store becomes one MfpipeError line (exit 1: the run failed).

    A connection failure is a TransientError, which the flow's tasks retry; anything else is not.
    """
    try:
        yield
    except (MlflowException, OSError) as exc:
        kind = TransientError if is_transient(exc) or _unreachable(exc) else MfpipeError
        # from None: the chained MLflow error spells out the URL, password included, in every traceback.
        raise kind(f"MLflow store {mask_uri(store.uri)}: {mask_uri(one_line(exc))}", exit_code=1) from None


def _unreachable(exc: BaseException) -> bool:
    """MLflow's REST client reports a refused or timed-out connection only in its message."""
    text = str(exc)
    return "Max retries exceeded" in text or "Connection refused" in text or "timed out" in text


def probe(store: Store, attempts: int = 4, first_delay: float = 2.0) -> None:
    """Fail fast when the store cannot be reached: a few tries with doubling waits (about 30 s in all)."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            with tracking_errors(store):
                store.client().search_experiments(max_results=1)
            return
        except TransientError:
            if attempt == attempts:
                raise
            time.sleep(delay)
            delay *= 2


def dataset_slug(name: str) -> str:
    """A dataset name as it appears in experiment and registered-model names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "data"


def registered_model_name(dataset: str, protocol: str = "temporal", override: str | None = None) -> str:
    """`mfpipe-<dataset>` for the production (temporal) protocol, `mfpipe-<dataset>-<protocol>` otherwise.

    Protocols never compete: a random split's validation pairs sit inside a temporal champion's training data.
    """
    if override:
        return override
    suffix = "" if protocol == "temporal" else f"-{protocol}"
    return f"mfpipe-{dataset_slug(dataset)}{suffix}"


#: Experiment tag that makes the MLflow UI open the training-runs view, not its GenAI (traces) view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(store: Store, dataset: str) -> str:
    """The dataset's experiment, created on first use (artifacts beside a local store), tagged as model training."""
    client = store.client()
    name = f"mfpipe-{dataset_slug(dataset)}"
    found = client.get_experiment_by_name(name)
    if found is None:
        location = (store.artifact_root / name).as_uri() if store.artifact_root is not None else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException:  # created by a concurrent run in the meantime
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    for key, value in EXPERIMENT_KIND.items():
        if found.tags.get(key) != value:  # made by an older mfpipe
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


# -- runs -------------------------------------------------------------------------------------------
#: The runs this process has started and not ended yet.
_OPEN: set[str] = set()


def start_run(store: Store, exp_id: str, name: str, tags: dict[str, Any], parent_id: str | None = None) -> str:
    tags = {**owner_tags(), **{k: str(v) for k, v in tags.items() if v is not None}}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    run_id = store.client().create_run(exp_id, run_name=name, tags=tags).info.run_id
    _OPEN.add(run_id)
    return run_id


def resume_run(store: Store, run_id: str) -> str:
    """Carry on writing a run this process opened before (a retried task): RUNNING again, and ours."""
    store.client().update_run(run_id, status="RUNNING")
    _OPEN.add(run_id)
    return run_id


def last_finished_parent_tags(store: Store, dataset: str) -> dict[str, str]:
    """Tags of the newest finished parent run of the dataset ({} when there is none)."""
    client = store.client()
    experiment = client.get_experiment_by_name(f"mfpipe-{dataset_slug(dataset)}")
    if experiment is None:
        return {}
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="attributes.status = 'FINISHED' AND tags.dataset_digest LIKE '%'",
        order_by=["attributes.start_time DESC"], max_results=50,
    )  # fmt: skip
    parents = (run for run in runs if "mlflow.parentRunId" not in run.data.tags)
    return next((dict(run.data.tags) for run in parents), {})


def find_runs(store: Store, exp_id: str, tags: dict[str, str], status: str | None = None) -> list[str]:
    """Ids of the experiment's runs carrying all `tags` (and in `status`), newest first."""
    clauses = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    runs = store.client().search_runs(
        [exp_id], filter_string=" AND ".join(clauses), order_by=["attributes.start_time DESC"], max_results=100
    )
    return [run.info.run_id for run in runs]


def owner_tags() -> dict[str, str]:
    """Who is writing a run: this host and process, so a later run can tell a run whose writer died."""
    return {"mfpipe.host": socket.gethostname(), "mfpipe.pid": str(os.getpid())}


def fail_abandoned_runs(store: Store, exp_id: str) -> list[str]:
    """End FAILED the RUNNING runs of this host whose writer is gone; returns their ids.

    Gone: its process ended (killed mid-run), or it is this process and no longer writing the run (a run
    that failed while the store was away could not close its runs).
    """
    client = store.client()
    host = socket.gethostname()
    ended = []
    for run in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=500):
        tags = run.data.tags
        pid = int(tags.get("mfpipe.pid", "0") or 0)
        if tags.get("mfpipe.host") != host or (_alive(pid) and (pid != os.getpid() or run.info.run_id in _OPEN)):
            continue
        client.set_tag(run.info.run_id, "error", f"abandoned: process {tags.get('mfpipe.pid')} ended mid-run")
        client.set_terminated(run.info.run_id, "FAILED")
        ended.append(run.info.run_id)
    return ended


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def end_run(store: Store, run_id: str, ok: bool) -> None:
    _OPEN.discard(run_id)  # first: whether or not the store hears of it, this process stops writing the run
    store.client().set_terminated(run_id, "FINISHED" if ok else "FAILED")


def log_values(
    store: Store,
    run_id: str,
    metrics: dict[str, float] | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    model_id: str | None = None,
) -> None:
    """One batch call: metrics (finite only; MLflow rejects NaN in some stores), params, tags.

    With `model_id` (a model logged into the run) the metrics are the logged model's too.
    """
    now = int(time.time() * 1000)
    batch_metrics = [
        Metric(k, float(v), now, 0, model_id=model_id)
        for k, v in (metrics or {}).items()
        if v is not None and math.isfinite(float(v))
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
        if math.isfinite(float(v))
    ]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        store.client().log_batch(run_id, metrics=metrics[start : start + 1000])


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
    """A matplotlib figure made outside pyplot (nothing to close: it goes with its last reference)."""
    store.client().log_figure(run_id, figure, artifact_file)


# -- registry ---------------------------------------------------------------------------------------
def register(store: Store, name: str, model_uri: str, run_id: str, tags: dict[str, Any]) -> str:
    """A new version of `name` (created on first use) with lineage tags; returns the version.

    Idempotent per run: a retried registration of the same run returns the version it made before.
    """
    client = store.client()
    for existing in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        return str(existing.version)
    try:
        client.create_registered_model(name, description="mfpipe candidates; `champion` is served.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    clean = {k: str(v) for k, v in tags.items() if v is not None}
    version = client.create_model_version(
        name, source=model_uri, run_id=run_id, tags=clean, model_id=logged_model_id(model_uri)
    )
    return str(version.version)


def logged_model_id(model_uri: str) -> str | None:
    """The id of the logged model a `models:/m-...` URI names (None for any other URI)."""
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


def describe_version(store: Store, name: str, version: str, text: str) -> None:
    """The markdown the registry page shows for the version."""
    store.client().update_model_version(name, str(version), description=text)


def get_version(store: Store, name: str, version: str) -> VersionInfo:
    try:
        return _version_info(store.client().get_model_version(name, str(version)))
    except MlflowException as exc:
        raise MfpipeError(f"{name}: no version {version} ({one_line(exc)})") from None


def list_versions(store: Store, name: str) -> list[VersionInfo]:
    found = store.client().search_model_versions(f"name='{name}'")
    return sorted((_version_info(v) for v in found), key=lambda v: int(v.version))


def move_alias(store: Store, name: str, alias: str, version: str, tags: dict[str, Any]) -> None:
    """Record why on the version (tags prefixed with the alias), then point `alias` at it."""
    client = store.client()
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(name, str(version), f"{alias}.{key}", str(value))
    client.set_registered_model_alias(name, alias, str(version))  # last: a reader never sees it without its record
