"""The registered pyfunc and how mfpipe loads and serves it: string ids in, ranked string ids out, seen items
excluded, fold-in, popularity for unknown users; nothing unpickled or executed from the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from mfpipe import pyfunc_model, serving, tracking
from mfpipe.cli import main
from mfpipe.data.interactions import Interactions
from mfpipe.errors import MfpipeError
from mfpipe.models import create


def tiny() -> Interactions:
    """3 users x 4 items with titles; user u1 saw i1, i2; items by popularity: i1 > i2 > i3 > i4."""
    users = np.array([0, 0, 1, 1, 1, 2], np.int32)
    items = np.array([0, 1, 0, 1, 2, 0], np.int32)
    return Interactions(
        user_ids=np.array(["u1", "u2", "u3"]),
        item_ids=np.array(["i1", "i2", "i3", "i4"]),
        users=users,
        items=items,
        ratings=np.full(6, 4.0, np.float32),
        timestamps=np.arange(6, dtype=np.int64),
        name="tiny",
        titles={"i1": "One", "i3": "Three"},
    )


def register_tiny(
    tmp_path: Path, name: str = "mfpipe-tiny", model: str = "pop", data: Interactions | None = None
) -> tuple[tracking.Store, str]:
    """Log and register a model of `data` (default `tiny()`) as a real pyfunc; returns (store, version)."""
    data = data or tiny()
    store = tracking.open_store(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    exp = tracking.experiment_id(store, data.name)
    run = tracking.start_run(store, exp, model, {})
    catalog = serving.Catalog.of(data)
    params = {"factors": 2, "iterations": 3} if model == "als" else None
    model_path = create(model, params, threads=1).fit(data).save(tmp_path / f"{model}.npz")
    uri = serving.log_to_run(run, model_path, catalog.save(tmp_path / "catalog.npz"))
    return store, tracking.register(store, name, uri, run, {"model": model})


def _champion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str = "pop") -> str:
    store, version = register_tiny(tmp_path, model=model)
    tracking.move_alias(store, "mfpipe-tiny", tracking.CHAMPION, version, {"reason": "test"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    return version


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def _files(tmp_path: Path, name: str) -> list[Path]:
    return sorted((tmp_path / "store" / "artifacts").rglob(name))


def test_recommendations_exclude_seen_and_fall_back_to_popularity(tmp_path):
    data = tiny()
    model_path = create("pop").fit(data).save(tmp_path / "pop.npz")
    recs = pyfunc_model.Recommendations.load(model_path, serving.Catalog.of(data).save(tmp_path / "c.npz"))
    out = recs.frame(pd.DataFrame({"user_id": ["u1", "nobody"], "k": [2, 3]}))
    mine = out[out.user_id == "u1"]
    assert mine.item_id.tolist() == ["i3", "i4"]  # i1, i2 seen
    assert mine["rank"].tolist() == [1, 2]
    assert mine.source.unique().tolist() == ["model"]
    new = out[out.user_id == "nobody"]
    assert new.item_id.tolist() == ["i1", "i2", "i3"]  # popularity, nothing excluded
    assert new.title.tolist() == ["One", None, "Three"]
    assert new.source.unique().tolist() == ["popularity"]
    assert all(isinstance(v, str) for v in out.item_id)


def test_catalog_round_trip(tmp_path):
    catalog = serving.Catalog.of(tiny())
    loaded = serving.Catalog.load(catalog.save(tmp_path / "c.npz"))
    assert loaded.user_ids.tolist() == ["u1", "u2", "u3"]
    assert loaded.titles == {"i1": "One", "i3": "Three"}
    assert loaded.user_index(np.array(["u3", "zz", "u1"])).tolist() == [2, -1, 0]


def test_pyfunc_from_registry_serves_strings_params_and_items(tmp_path):
    _, version = register_tiny(tmp_path)
    assert (tmp_path / "store" / "artifacts").is_dir()  # artifacts beside the sqlite store
    assert not _files(tmp_path, "*.pkl")  # models-from-code: no pickled model anywhere
    model = mlflow.pyfunc.load_model(f"models:/mfpipe-tiny/{version}")
    out = model.predict(pd.DataFrame({"user_id": ["u1", "stranger"], "k": [1, 2]}))
    assert out[out.user_id == "u1"].item_id.tolist() == ["i3"]
    assert out[out.user_id == "stranger"].item_id.tolist() == ["i1", "i2"]
    assert out["score"].dtype == np.float64
    by_param = model.predict(pd.DataFrame({"user_id": ["stranger"]}), params={"k": 3})
    assert by_param.item_id.tolist() == ["i1", "i2", "i3"]
    folded = model.predict(pd.DataFrame({"user_id": ["u1", "stranger"], "items": [["i3"], ["i1", "nope"]]}))
    assert folded[folded.user_id == "u1"].item_id.tolist() == ["i4"]  # u1 saw i1, i2, and now i3
    assert folded[folded.user_id == "stranger"].item_id.tolist() == ["i2", "i3", "i4"]
    assert folded.source.unique().tolist() == ["fold-in", "popularity"]


def test_load_pyfunc_reads_npz_and_never_runs_the_registered_code(tmp_path):
    _, version = register_tiny(tmp_path)
    (code,) = _files(tmp_path, "pyfunc_model.py")
    code.write_text("raise SystemExit('the registry ran code')\n")
    loaded = serving.load_pyfunc(f"models:/mfpipe-tiny/{version}")
    assert loaded.model.name == "pop"
    assert loaded.catalog.item_ids.tolist() == ["i1", "i2", "i3", "i4"]
    recs = serving.load_recommendations(f"models:/mfpipe-tiny/{version}")
    assert recs.columns(["u1"], 1)["item_id"].tolist() == ["i3"]


@pytest.mark.parametrize("damage", ["missing", "corrupt", "pickled"])
def test_a_version_with_broken_artifacts_is_one_line_naming_it(tmp_path, damage):
    _, version = register_tiny(tmp_path)
    (artifact,) = _files(tmp_path, "pop.npz")
    if damage == "missing":
        artifact.unlink()
    elif damage == "corrupt":
        artifact.write_bytes(b"not a zip")
    else:  # an object array can only be read by unpickling: refused
        np.savez(artifact, meta=np.array([{"name": "pop"}], dtype=object))
    with pytest.raises(MfpipeError) as err:
        serving.load_pyfunc(f"models:/mfpipe-tiny/{version}")
    assert f"models:/mfpipe-tiny/{version}: cannot load the model" in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_recommend_items_and_popularity_fallback(tmp_path, monkeypatch, capsys):
    _champion(tmp_path, monkeypatch)
    code, out, _ = _cli(capsys, "recommend", "--user", "stranger", "--dataset", "tiny", "--k", "2")
    assert code in (0, None)
    assert "popularity fallback" in out and "i1" in out
    code, out, _ = _cli(capsys, "recommend", "--user", "u2", "--items", "i4", "--dataset", "tiny", "--json")
    document = json.loads(out)
    assert document["source"] == "fold-in" and document["items"] == []  # u2 saw i1-i3, and now i4
    code, out, _ = _cli(capsys, "recommend", "--user", "stranger", "--items", "i1,i2", "--dataset", "tiny", "--json")
    document = json.loads(out)
    assert [row["item_id"] for row in document["items"]] == ["i3", "i4"]


def test_cli_similar(tmp_path, monkeypatch, capsys):
    _champion(tmp_path, monkeypatch, model="als")
    code, out, _ = _cli(capsys, "similar", "--item", "i1", "--k", "2", "--dataset", "tiny", "--json")
    document = json.loads(out)
    assert document["item_id"] == "i1" and document["registered_model"] == "mfpipe-tiny" and document["k"] == 2
    assert [row["rank"] for row in document["items"]] == [1, 2]
    assert "i1" not in [row["item_id"] for row in document["items"]]
    assert all(-1 <= row["score"] <= 1 for row in document["items"])
    code, _, err = _cli(capsys, "similar", "--item", "nope", "--dataset", "tiny")
    assert code == 2 and "item 'nope' is not in the catalogue" in err


def test_cli_similar_without_item_factors(tmp_path, monkeypatch, capsys):
    _champion(tmp_path, monkeypatch, model="pop")
    code, _, err = _cli(capsys, "similar", "--item", "i1", "--dataset", "tiny")
    assert code == 2
    assert "has no item factors" in err and len(err.strip().splitlines()) == 1


PREDICT_IN_CLEAN_ENV = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"user_id": ["u1", "stranger"], "items": [None, ["i1"]]}), params={"k": 2})
print(json.dumps(out.to_dict(orient="records")))
"""


@pytest.mark.slow
def test_registered_model_loads_and_answers_in_a_venv_of_its_own_requirements(tmp_path):
    """No mfpipe there: only the version's requirements.txt, so `mlflow models serve` works on another host."""
    _, version = register_tiny(tmp_path)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/mfpipe-tiny/{version}", dst_path=str(tmp_path / "m")))
    venv = tmp_path / "venv"
    uv = [sys.executable, "-m", "uv"] if _has_module("uv") else ["uv"]
    subprocess.run([*uv, "venv", "-q", "--python", "3.11", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*uv, "pip", "install", "-q", "--python", str(python), "-r", str(local / "requirements.txt")],
                   check=True, timeout=900)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    check = subprocess.run([str(python), "-c", "import mfpipe"], env=env, capture_output=True, cwd=tmp_path)
    assert check.returncode != 0  # the model's environment really has no mfpipe
    done = subprocess.run([str(python), "-c", PREDICT_IN_CLEAN_ENV, str(local)], env=env, capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(r["user_id"], r["item_id"], r["source"]) for r in rows] == [
        ("u1", "i3", "model"), ("u1", "i4", "model"), ("stranger", "i2", "popularity"), ("stranger", "i3", "popularity")
    ]  # fmt: skip


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
