"""`mfpipe up`: both servers answer on 127.0.0.1, the MLflow UI shows the project's store, Ctrl-C stops both."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mfpipe import services

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _wait_for_output(log: Path, needle: str, process: subprocess.Popen, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if needle in text:
            return text
        assert process.poll() is None, f"mfpipe up exited {process.returncode}: {text}"
        time.sleep(0.5)
    raise AssertionError(f"no {needle!r} within {timeout} s: {log.read_text()}")


def test_up_serves_the_project_store_and_stops_both_on_ctrl_c(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    experiment = MlflowClient(store).create_experiment("made-before-up")
    prefect_port, mlflow_port = services.free_port(), services.free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "ph")}
    log = tmp_path / "up.out"
    command = [
        sys.executable,
        "-m",
        "mfpipe",
        "up",
        "--prefect-port",
        str(prefect_port),
        "--mlflow-port",
        str(mlflow_port),
    ]
    with log.open("wb") as out:
        up = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        text = _wait_for_output(log, "Ctrl-C stops both", up)
        assert f"export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api" in text
        assert services.healthy(f"http://127.0.0.1:{prefect_port}/api/health")
        assert services.healthy(f"http://127.0.0.1:{mlflow_port}/health")
        search = urllib.request.Request(
            f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search",
            data=json.dumps({"max_results": 100}).encode(), headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(search, timeout=10) as response:
            ids = {e["experiment_id"] for e in json.load(response)["experiments"]}
        assert experiment in ids
        assert (tmp_path / ".mfpipe" / "logs" / "prefect-server.log").exists()
    finally:
        up.send_signal(signal.SIGINT)
        returncode = up.wait(90)
    assert returncode == 0, log.read_text()
    assert "Stopped the Prefect server and the MLflow UI." in log.read_text()
    assert not services.port_in_use(prefect_port) and not services.port_in_use(mlflow_port)
