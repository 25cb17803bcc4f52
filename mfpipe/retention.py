"""How many registered versions a dataset keeps: `mfpipe prune` deletes the old ones and their artifacts.

Every retrain registers every candidate, so a nightly schedule adds a few versions a day, each with its
model files. `prune` keeps the `keep` newest versions (by version number) and deletes the older ones,
except a version an alias points at (`champion`, `challenger`: served, or next in line, however old)
and a version whose retrain run is still running (its promotion may be about to pick it).

Deleting a version removes, in this order, its model files, its logged model (MLflow 3 keeps a model's
files under the logged model, not under the run) and the registry version itself; so a prune that fails
midway leaves at worst a version without files, which the next prune deletes. For a local store
(sqlite or file) the files are the logged model's folder under the store's artifact root, removed from
disk, never anything outside that root; for a remote store they are deleted through MLflow's artifact
repository of the version (the tracking server's proxy, or the bucket). MLflow only marks a logged
model deleted; its record stays until `mlflow gc`. Runs, their metrics and other artifacts are kept:
they are the history of what was tried.

The prune holds the promotion lock of the registered model (`mfpipe.promotion.promotion_lock`), so no
alias moves onto a version while it is being deleted.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.utils.file_utils import local_file_uri_to_path

from mfpipe import tracking
from mfpipe.errors import MfpipeError
from mfpipe.promotion import promotion_lock
from mfpipe.tracking import Store


@dataclass(frozen=True)
class PrunedVersion:
    """A version deleted by a prune (or that would be, in a dry run): what identifies it, and where its
    model files are (None when they stay because a version that stays shares them)."""

    version: str
    model: str | None
    run_id: str | None
    artifacts: str | None

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "model": self.model, "run_id": self.run_id, "artifacts": self.artifacts}


@dataclass(frozen=True)
class PruneResult:
    """What a prune deleted (`applied`) or would delete, what it kept as the newest, and what it spared."""

    registered_model: str
    keep: int
    applied: bool
    versions: list[PrunedVersion] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    spared: dict[str, str] = field(default_factory=dict)  # version beyond `keep` -> why it stays

    def to_json(self) -> dict[str, Any]:
        """`mfpipe prune --json`: `versions` are the deleted ones when `applied`, else the ones it would delete."""
        return {
            "registered_model": self.registered_model,
            "keep": self.keep,
            "applied": self.applied,
            "versions": [v.to_json() for v in self.versions],
            "kept": self.kept,
            "spared": [{"version": v, "reason": why} for v, why in self.spared.items()],
        }


def prune(store: Store, name: str, keep: int, apply: bool) -> PruneResult:
    """Delete (`apply`) or list the versions of `name` beyond the `keep` newest, sparing aliased versions
    and versions of a retrain still running (module docstring)."""
    if keep < 1:
        raise MfpipeError(f"--keep {keep}: must be at least 1 (the newest version always stays)")
    client = store.client()
    with tracking.tracking_errors(store), promotion_lock(store, name):
        try:
            registered = client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise MfpipeError(f"{name}: no such registered model") from None
        # Aliases from the registered model: version searches come back without them (sqlite store).
        aliases: dict[str, list[str]] = {}
        for alias, version in sorted((registered.aliases or {}).items()):
            aliases.setdefault(str(version), []).append(alias)
        versions = sorted(_all_versions(store, name), key=lambda mv: int(mv.version))
        newest, older = versions[-keep:], versions[:-keep]
        spared: dict[str, str] = {}
        doomed: list[ModelVersion] = []
        for mv in older:
            why = _why_spared(store, mv, aliases.get(str(mv.version), []))
            if why:
                spared[str(mv.version)] = why
            else:
                doomed.append(mv)
        # Files shared with a version that stays (registered twice from one model) must stay too.
        leaving = {str(mv.version) for mv in doomed}
        staying = {mv.source for mv in versions if str(mv.version) not in leaving}
        pruned = []
        for mv in doomed:
            shared = mv.source in staying
            location = None if shared else client.get_model_version_download_uri(name, str(mv.version))
            if apply:
                _delete(store, mv, location)
            model = (mv.tags or {}).get("model")
            pruned.append(PrunedVersion(str(mv.version), model, mv.run_id, location))
    return PruneResult(name, keep, apply, pruned, [str(mv.version) for mv in newest], spared)


def _all_versions(store: Store, name: str) -> list[ModelVersion]:
    """Every version of `name`, page by page (a registry worth pruning may hold more than one page)."""
    client = store.client()
    found: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(f"name='{name}'", page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def _why_spared(store: Store, mv: ModelVersion, aliases: list[str]) -> str | None:
    """Why a version beyond `keep` stays: an alias points at it, or its retrain run is still running."""
    if aliases:
        return f"alias {', '.join(aliases)}"
    if not mv.run_id:
        return None
    client = store.client()
    try:
        run = client.get_run(mv.run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # its run was deleted: nothing can still promote it
            return None
        raise
    parent_id = run.data.tags.get("mlflow.parentRunId")
    runs = [run, client.get_run(parent_id)] if parent_id else [run]
    if any(r.info.status == "RUNNING" for r in runs):
        return f"its retrain run {runs[-1].info.run_id} is still running"
    return None


def _delete(store: Store, mv: ModelVersion, location: str | None) -> None:
    """Files (unless shared: `location` None), then the logged model, then the version (module docstring:
    why this order)."""
    client = store.client()
    if location is not None:
        _delete_files(store, location)
        model_id = mv.model_id or _logged_model_id(mv.source)
        if model_id:
            client.delete_logged_model(model_id)
    client.delete_model_version(mv.name, str(mv.version))


def _delete_files(store: Store, location: str) -> None:
    """A version's model files: from disk inside a local store's artifact root, else through MLflow."""
    if store.artifact_root is None:
        get_artifact_repository(location).delete_artifacts()
        return
    root = store.artifact_root.resolve()
    path = Path(local_file_uri_to_path(location)).resolve()
    if not path.is_relative_to(root) or path == root:
        raise MfpipeError(f"{location}: outside the store's artifacts ({root}); not deleted", exit_code=1)
    if path.exists():  # absent when an earlier prune stopped after deleting the files
        shutil.rmtree(path)
    # A logged model's files sit in `<experiment>/models/<model id>/artifacts`: drop the emptied model folder.
    if path.parent != root and path.parent.is_dir() and not any(path.parent.iterdir()):
        path.parent.rmdir()


def _logged_model_id(source: str) -> str | None:
    """`models:/m-…` (how MLflow 3 names a logged model) -> its id; other sources have none."""
    return source.split("/", 1)[1] if source and source.startswith("models:/m-") else None
