"""The web UIs as a person sees them: `mfpipe up`, one small `mfpipe run`, then headless Chromium.

`stack` (once per session): `mfpipe up --prefect-port 4320 --mlflow-port <free>` (4320 unless taken,
then a free port; never Prefect's default 4200, so the UI must find its API on the port it is served
from) over a sqlite store in a temp folder, and `mfpipe run --data synthetic:3000 --models pop,als`
with tiny parameters from a TOML config, recorded on that MLflow server under that Prefect server.
`browser`: Debian's Chromium over the DevTools protocol (tests/ui/browser.py); missing, the tests
skip, and fail under CI=true (`make ui-deps` installs it). Screenshots go to reports/ui/ (git-ignored).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mfpipe import services
from tests.conftest import require
from tests.ui.browser import Browser, find_chromium

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "reports" / "ui"
#: Not Prefect's default 4200: the UI must call the API of the port it is served from.
PREFECT_PORT = 4320
UP_READY = "Ctrl-C stops both"
TINY_CONFIG = """\
data = "synthetic:3000"
models = ["pop", "als"]
threads = 1

[model_params.als]
factors = 8
iterations = 3
"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/ui starts real servers and a browser."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.services)
            item.add_marker(pytest.mark.slow)


@dataclass(frozen=True)
class Stack:
    """What the tests look for: the servers' URLs and what the one run recorded there."""

    prefect_url: str
    mlflow_url: str
    experiment_id: str
    parent_run_id: str
    parent_run_name: str
    #: model name -> its child run id
    child_runs: dict[str, str]
    registered_model: str
    champion_version: str
    versions: list[str]
    flow_run_id: str
    flow_run_name: str


def _wait_for_output(log: Path, needle: str, process: subprocess.Popen[bytes], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while needle not in log.read_text(errors="replace"):
        assert process.poll() is None, f"mfpipe up exited {process.returncode}: {log.read_text(errors='replace')}"
        assert time.monotonic() < deadline, f"no {needle!r} within {timeout} s: {log.read_text(errors='replace')}"
        time.sleep(0.5)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C as a person stops `mfpipe up` (it stops both servers); SIGKILL only if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _flow_run(prefect_api: str) -> dict:
    """The one flow run of `retrain` on the server, read through the Prefect client."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])))
    assert len(runs) == 1, f"expected one flow run of retrain, found {[r.name for r in runs]}"
    return {"id": str(runs[0].id), "name": runs[0].name, "state": runs[0].state_name}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`mfpipe up` on a non-default Prefect port, one real `mfpipe run` against it; stopped at the end."""
    from mlflow import MlflowClient

    home = tmp_path_factory.mktemp("ui-stack")
    prefect_port = PREFECT_PORT if not services.port_in_use(PREFECT_PORT) else services.free_port()
    mlflow_port = services.free_port()
    assert prefect_port != 4200
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlruns' / 'mlflow.db'}",
        "PYTHONPATH": str(ROOT),
        "PREFECT_HOME": str(home / "prefect-home"),
        "MFPIPE_DATA_HOME": str(home / "data-home"),
    }
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"):
        env.pop(name, None)
    log = home / "up.out"
    with log.open("wb") as out:
        command = [sys.executable, "-m", "mfpipe", "up", "--prefect-port", str(prefect_port),
                   "--mlflow-port", str(mlflow_port)]  # fmt: skip
        up = subprocess.Popen(
            command, env=env, cwd=home, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        _wait_for_output(log, UP_READY, up)
        prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
        (home / "tiny.toml").write_text(TINY_CONFIG)
        run_env = {**env, "PREFECT_API_URL": f"{prefect_url}/api", "MLFLOW_TRACKING_URI": mlflow_url}
        run = subprocess.run(
            [sys.executable, "-m", "mfpipe", "run", "--config", "tiny.toml", "--json-report", "report.json"],
            env=run_env, cwd=home, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert run.returncode == 0, f"mfpipe run exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        report = json.loads((home / "report.json").read_text())
        models = {m["model"]: m for m in report["models"]}
        assert set(models) == {"pop", "als"} and all(m["status"] == "ok" for m in models.values()), report["models"]
        client = MlflowClient(mlflow_url, registry_uri=mlflow_url)
        child = client.get_run(models["pop"]["run_id"])
        parent = client.get_run(child.data.tags["mlflow.parentRunId"])
        flow_run = _flow_run(f"{prefect_url}/api")
        assert flow_run["state"] == "Completed", flow_run
        yield Stack(
            prefect_url=prefect_url,
            mlflow_url=mlflow_url,
            experiment_id=parent.info.experiment_id,
            parent_run_id=parent.info.run_id,
            parent_run_name=parent.info.run_name,
            child_runs={name: m["run_id"] for name, m in models.items()},
            registered_model=report["champion"]["registered_model"],
            champion_version=str(report["champion"]["after"]["version"]),
            versions=sorted(str(m["version"]) for m in models.values()),
            flow_run_id=flow_run["id"],
            flow_run_name=flow_run["name"],
        )
    finally:
        _stop(up)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the session (Debian's package; `make ui-deps`)."""
    executable = find_chromium()
    require(executable is not None, "no chromium (Debian package `chromium`; make ui-deps)")
    assert executable is not None
    with Browser(executable) as running:
        yield running


@pytest.fixture
def screenshot(browser: Browser, capsys: pytest.CaptureFixture[str]) -> Callable[..., Path]:
    """`screenshot(name)`: save reports/ui/<name>.png and print its path."""

    def save(name: str) -> Path:
        path = browser.screenshot(SCREENSHOTS / f"{name}.png")
        with capsys.disabled():
            print(f"\nscreenshot: {path}")
        return path

    return save
