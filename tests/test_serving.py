"""The pyfunc: string ids in, ranked string ids out, seen items excluded, popularity for unknown users."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest

from mfpipe import serving, tracking
from mfpipe.data.interactions import Interactions
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


def test_recommend_frame_excludes_seen_and_falls_back_to_popularity():
    data = tiny()
    model = create("pop").fit(data)
    catalog = serving.Catalog.of(data)
    out = serving.recommend_frame(model, catalog, ["u1", "nobody"], [2, 3])
    mine = out[out.user_id == "u1"]
    assert mine.item_id.tolist() == ["i3", "i4"]  # i1, i2 seen
    assert mine["rank"].tolist() == [1, 2]
    new = out[out.user_id == "nobody"]
    assert new.item_id.tolist() == ["i1", "i2", "i3"]  # popularity, nothing excluded
    assert new.title.tolist() == ["One", None, "Three"]
    assert all(isinstance(v, str) for v in out.item_id)


def test_catalog_round_trip(tmp_path):
    catalog = serving.Catalog.of(tiny())
    loaded = serving.Catalog.load(catalog.save(tmp_path / "c.npz"))
    assert loaded.user_ids.tolist() == ["u1", "u2", "u3"]
    assert loaded.titles == {"i1": "One", "i3": "Three"}
    assert loaded.user_index(np.array(["u3", "zz", "u1"])).tolist() == [2, -1, 0]


def register_tiny(tmp_path, name: str = "mfpipe-tiny") -> tuple[tracking.Store, str]:
    """Log and register the popularity model of `tiny()` as a real pyfunc; returns (store, version)."""
    data = tiny()
    store = tracking.open_store(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    exp = tracking.experiment_id(store, data.name)
    run = tracking.start_run(store, exp, "pop", {})
    catalog = serving.Catalog.of(data)
    model_path = create("pop").fit(data).save(tmp_path / "pop.npz")
    uri = serving.log_to_run(run, model_path, catalog.save(tmp_path / "catalog.npz"), serving.input_example(catalog))
    return store, tracking.register(store, name, uri, run, {"model": "pop"})


def test_pyfunc_from_registry_serves_strings(tmp_path):
    _, version = register_tiny(tmp_path)
    assert (tmp_path / "store" / "artifacts").is_dir()  # artifacts beside the sqlite store
    model = mlflow.pyfunc.load_model(f"models:/mfpipe-tiny/{version}")
    out = model.predict(pd.DataFrame({"user_id": ["u1", "stranger"], "k": [1, 2]}))
    assert out[out.user_id == "u1"].item_id.tolist() == ["i3"]
    assert out[out.user_id == "stranger"].item_id.tolist() == ["i1", "i2"]
    assert out["score"].dtype == np.float64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.services
def test_mfpipe_serve_answers_http(tmp_path):
    store, version = register_tiny(tmp_path)
    tracking.move_alias(store, "mfpipe-tiny", tracking.CHAMPION, version, {"reason": "test"})
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri}
    cmd = [sys.executable, "-m", "mfpipe", "serve", "--dataset", "tiny", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        body = json.dumps({"dataframe_records": [{"user_id": "u1", "k": 2}]}).encode()
        deadline = time.monotonic() + 120
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=5) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(proc.stdout.read().decode()[-2000:]) from None
                time.sleep(1)
        rows = answer["predictions"]
        assert [r["item_id"] for r in rows] == ["i3", "i4"]
        assert rows[0]["title"] == "Three"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
