"""`mfpipe prune`: the N newest versions stay, aliased and in-progress ones are spared, files go with the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.utils.file_utils import local_file_uri_to_path

from mfpipe import retention, serving, tracking
from mfpipe.cli import main
from mfpipe.errors import MfpipeError
from tests.test_serving import register_tiny

NAME = "mfpipe-tiny"  # the registered model of dataset "tiny"


def registered(tmp_path: Path, n: int) -> tracking.Store:
    """`n` real versions of NAME (their runs end FINISHED when the model is logged, as a retrain's do)."""
    for _ in range(n):
        store, _ = register_tiny(tmp_path)
    return store


def folder(store: tracking.Store, version: str) -> Path:
    """The version's logged-model folder on disk (`<experiment>/models/<model id>`)."""
    uri = store.client().get_model_version_download_uri(NAME, version)
    return Path(local_file_uri_to_path(uri)).parent


def versions(store: tracking.Store) -> list[str]:
    return [v.version for v in tracking.list_versions(store, NAME)]


def test_dry_run_lists_then_apply_deletes_old_versions_with_their_files(tmp_path):
    store = registered(tmp_path, 4)
    old = [folder(store, v) for v in ("1", "2")]
    result = retention.prune(store, NAME, keep=2, apply=False)
    assert [v.version for v in result.versions] == ["1", "2"]
    assert result.kept == ["3", "4"] and result.spared == {} and not result.applied
    assert versions(store) == ["1", "2", "3", "4"]
    assert all((path / "artifacts" / "MLmodel").is_file() for path in old)

    result = retention.prune(store, NAME, keep=2, apply=True)
    assert [v.version for v in result.versions] == ["1", "2"] and result.applied
    assert versions(store) == ["3", "4"]
    assert not any(path.exists() for path in old)
    assert all(path.parent.name == "models" for path in old)  # only the model folders went
    assert serving.load_pyfunc(f"models:/{NAME}/3").model.name == "pop"  # the kept ones still load
    assert retention.prune(store, NAME, keep=2, apply=True).versions == []


def test_aliased_versions_are_never_deleted_however_old(tmp_path):
    store = registered(tmp_path, 4)
    tracking.move_alias(store, NAME, tracking.CHAMPION, "1", {"reason": "test"})
    tracking.move_alias(store, NAME, tracking.CHALLENGER, "2", {"reason": "test"})
    result = retention.prune(store, NAME, keep=1, apply=True)
    assert [v.version for v in result.versions] == ["3"]
    assert result.spared == {"1": "alias champion", "2": "alias challenger"}
    assert versions(store) == ["1", "2", "4"]
    assert serving.load_pyfunc(f"models:/{NAME}@champion").model.name == "pop"


def test_versions_of_a_retrain_still_running_are_spared(tmp_path):
    store = registered(tmp_path, 2)
    _, own = register_tiny(tmp_path)
    _, child = register_tiny(tmp_path)
    registered(tmp_path, 1)
    client = store.client()
    client.update_run(tracking.get_version(store, NAME, own).run_id, status="RUNNING")  # its own run
    child_run = tracking.get_version(store, NAME, child).run_id  # finished; its parent (the retrain) is not
    parent = tracking.start_run(store, client.get_run(child_run).info.experiment_id, "retrain", {})
    client.set_tag(child_run, "mlflow.parentRunId", parent)
    result = retention.prune(store, NAME, keep=1, apply=False)
    assert [v.version for v in result.versions] == ["1", "2"]
    assert set(result.spared) == {own, child}
    assert parent in result.spared[child] and "still running" in result.spared[own]


def test_files_shared_with_a_kept_version_stay(tmp_path):
    store = registered(tmp_path, 1)
    first = store.client().get_model_version(NAME, "1")
    store.client().create_model_version(NAME, first.source, first.run_id)  # v2: the same model registered again
    result = retention.prune(store, NAME, keep=1, apply=True)
    assert [(v.version, v.artifacts) for v in result.versions] == [("1", None)]
    assert versions(store) == ["2"]
    assert serving.load_pyfunc(f"models:/{NAME}/2").model.name == "pop"


def test_keep_below_one_and_an_unknown_model_are_user_errors(tmp_path):
    store = tracking.open_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(MfpipeError, match="--keep 0: must be at least 1") as error:
        retention.prune(store, NAME, keep=0, apply=True)
    assert error.value.exit_code == 2
    with pytest.raises(MfpipeError, match="mfpipe-nothing: no such registered model"):
        retention.prune(store, "mfpipe-nothing", keep=1, apply=False)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_cli_lists_without_yes_and_deletes_with_it(tmp_path, monkeypatch, capsys):
    store = registered(tmp_path, 3)
    tracking.move_alias(store, NAME, tracking.CHAMPION, "1", {"reason": "test"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)

    code, out, _ = _cli(capsys, "prune", "--dataset", "tiny", "--keep", "1")
    assert code == 0
    assert "would delete v2" in out and "kept v1: alias champion" in out and "dry run" in out
    assert versions(store) == ["1", "2", "3"]

    code, out, _ = _cli(capsys, "prune", "--dataset", "tiny", "--keep", "1", "--yes", "--json")
    assert code == 0
    document = json.loads(out)
    assert document["registered_model"] == NAME and document["applied"] is True and document["keep"] == 1
    assert [v["version"] for v in document["versions"]] == ["2"] and document["versions"][0]["model"] == "pop"
    assert document["kept"] == ["3"] and document["spared"] == [{"version": "1", "reason": "alias champion"}]
    assert versions(store) == ["1", "3"]

    code, out, _ = _cli(capsys, "prune", "--dataset", "tiny", "--keep", "1", "--yes")
    assert code == 0 and "nothing to delete" in out

    code, out, err = _cli(capsys, "prune", "--dataset", "tiny", "--keep", "0")
    assert code == 2 and out == ""
    assert err.strip() == "mfpipe: error: --keep 0: must be at least 1 (the newest version always stays)"
