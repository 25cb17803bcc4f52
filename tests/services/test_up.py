"""`mfpipe up`: both servers answer on 127.0.0.1, the MLflow UI shows the project's store, Ctrl-C stops both.

On any port the Prefect UI calls the API of that port (its `/ui-settings`), and `--auth` makes both
servers refuse anonymous requests and accept the credentials it keeps in `.mfpipe/auth.env`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
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


def _ui_settings(prefect_port: int) -> dict:
    """What the Prefect UI asks first: where its API is and whether it must ask for a login."""
    with urllib.request.urlopen(f"http://127.0.0.1:{prefect_port}/ui-settings", timeout=10) as response:
        return json.load(response)


def _start_up(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, Path, int, int]:
    """`mfpipe up` on free ports over a sqlite store in tmp_path, with no credentials inherited."""
    prefect_port, mlflow_port = services.free_port(), services.free_port()
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "ph")}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"):
        env.pop(name, None)
    command = [sys.executable, "-m", "mfpipe", "up", "--prefect-port", str(prefect_port),
               "--mlflow-port", str(mlflow_port), *flags]  # fmt: skip
    log = tmp_path / "up.out"
    with log.open("wb") as out:
        up = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    return up, log, prefect_port, mlflow_port


def _stop_up(up: subprocess.Popen, log: Path, prefect_port: int, mlflow_port: int) -> None:
    up.send_signal(signal.SIGINT)
    returncode = up.wait(90)
    assert returncode == 0, log.read_text()
    assert "Stopped the Prefect server and the MLflow UI." in log.read_text()
    assert not services.port_in_use(prefect_port) and not services.port_in_use(mlflow_port)


def _status(request: urllib.request.Request | str) -> int:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_up_serves_the_project_store_and_stops_both_on_ctrl_c(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    (tmp_path / "mlruns").mkdir()
    experiment = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").create_experiment("made-before-up")
    up, log, prefect_port, mlflow_port = _start_up(tmp_path)
    try:
        text = _wait_for_output(log, "Ctrl-C stops both", up)
        assert f"export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api" in text
        assert services.healthy(f"http://127.0.0.1:{prefect_port}/api/health")
        assert services.healthy(f"http://127.0.0.1:{mlflow_port}/health")
        settings = _ui_settings(prefect_port)
        assert settings["api_url"] == f"http://127.0.0.1:{prefect_port}/api" and settings["auth"] is None
        search = urllib.request.Request(
            f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search",
            data=json.dumps({"max_results": 100}).encode(), headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(search, timeout=10) as response:
            ids = {e["experiment_id"] for e in json.load(response)["experiments"]}
        assert experiment in ids
        assert (tmp_path / ".mfpipe" / "logs" / "prefect-server.log").exists()
        assert not (tmp_path / ".mfpipe" / "auth.env").exists()  # no auth unless asked
    finally:
        _stop_up(up, log, prefect_port, mlflow_port)


def _prefect_work_pools(api_url: str, auth_string: str) -> list:
    """A Prefect client call with PREFECT_API_AUTH_STRING, the client's own setting."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    settings = {PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth_string}
    with temporary_settings(settings), get_client(sync_client=True) as client:
        return client.read_work_pools()


def test_up_with_auth_refuses_anonymous_requests_and_accepts_its_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    up, log, prefect_port, mlflow_port = _start_up(tmp_path, "--auth")
    prefect_api, mlflow_url = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
    try:
        text = _wait_for_output(log, "Ctrl-C stops both", up)
        auth_env = tmp_path / ".mfpipe" / "auth.env"
        assert (auth_env.stat().st_mode & 0o777) == 0o600
        secrets = dict(line.split("=", 1) for line in auth_env.read_text().splitlines() if line[:1].isalpha())
        assert set(secrets) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING",
                                "MLFLOW_FLASK_SERVER_SECRET_KEY"}  # fmt: skip
        for name in ("MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
            assert secrets[name] not in text, f"{name} printed"
        settings = _ui_settings(prefect_port)
        assert (settings["api_url"], settings["auth"]) == (prefect_api, "BASIC")  # the UI asks for the login

        # Anonymous: 401 from both (their health endpoints stay open for probes).
        filter_flows = urllib.request.Request(
            f"{prefect_api}/flows/filter", data=b"{}", headers={"Content-Type": "application/json"}
        )
        assert _status(filter_flows) == 401
        assert _status(f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1") == 401
        assert services.healthy(f"{prefect_api}/health") and services.healthy(f"{mlflow_url}/health")

        # The clients with the file's variables: MLflow creates and registers, Prefect reads its API.
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(name, secrets[name])
        client = MlflowClient(mlflow_url, registry_uri=mlflow_url)
        run = client.create_run(client.create_experiment("made-with-auth"))
        client.set_terminated(run.info.run_id)
        client.create_registered_model("auth-model")
        version = client.create_model_version("auth-model", f"runs:/{run.info.run_id}/m", run.info.run_id)
        client.set_registered_model_alias("auth-model", "champion", version.version)
        assert client.get_model_version_by_alias("auth-model", "champion").run_id == run.info.run_id
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
        with pytest.raises(MlflowException, match="401"):
            client.search_experiments()

        assert _prefect_work_pools(prefect_api, secrets["PREFECT_API_AUTH_STRING"]) == []
        with pytest.raises(httpx.HTTPStatusError, match="401"):
            _prefect_work_pools(prefect_api, "mfpipe:not-the-password")
    finally:
        _stop_up(up, log, prefect_port, mlflow_port)
