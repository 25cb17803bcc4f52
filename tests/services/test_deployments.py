"""`mfpipe deploy` against a real Prefect server, runs recorded on a real MLflow server on PostgreSQL.

Work-pool mode: the deployment and its cron schedule are read back through the API, a process worker
(`prefect worker start`, started with mfpipe.services like every server here) runs it, once on threads
and once on a 2-worker Dask cluster, and `champion` moves on the MLflow server. Serve mode: the
deploying process executes the runs itself, a second run on unchanged data is skipped
(`--skip-unchanged`), and stopping the process keeps the schedule.
Tiny synthetic data (20k interactions, popularity and ALS) keeps each run to seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mfpipe import services
from mfpipe.config import Config

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = "retrain/scheduled"
DATA = "synthetic:20k"
RUN_TIMEOUT = 300

pytestmark = pytest.mark.slow


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test's environment (servers, stores) for child processes, with this checkout importable."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OPENBLAS_NUM_THREADS": "1", **extra}


def _mfpipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "mfpipe", *args]


def _read_deployment() -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(DEPLOYMENT)


def _run_deployment(parameters: dict[str, Any] | None = None) -> Any:
    from prefect.deployments import run_deployment

    return run_deployment(DEPLOYMENT, parameters=parameters, timeout=RUN_TIMEOUT, poll_interval=1, as_subflow=False)


def _client(tracking_uri: str) -> Any:
    """A client of the server for runs and registry alike (never the session's default registry)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


def _mlflow_parent_runs(tracking_uri: str, flow_run_id: str) -> list[Any]:
    client = _client(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")


def _champion(tracking_uri: str, registered_model: str) -> Any:
    return _client(tracking_uri).get_model_version_by_alias(registered_model, "champion")


def _run_parent(tracking_uri: str, run_id: str) -> str | None:
    return _client(tracking_uri).get_run(run_id).data.tags.get("mlflow.parentRunId")


def _flow_run_log_has(flow_run_id: Any, needle: str, timeout: float = 30) -> bool:
    """The run's logs reach the API shortly after its state does: poll for a while."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
            if any(needle in log.message for log in logs):
                return True
            time.sleep(1)
    return False


def _assert_completed(flow_run: Any, log: Path) -> None:
    assert flow_run.state.is_completed(), f"{flow_run.state}: {log.read_text()[-3000:]}"


def test_work_pool_deployment_runs_on_a_process_worker(prefect_api: str, mlflow_tracking: str, tmp_path: Path) -> None:
    from prefect import get_client

    model = "mfpipe-services-pool"
    env = _env(tmp_path)
    deploy = subprocess.run(
        _mfpipe("deploy", "--work-pool", "mfpipe-test", "--cron", "30 2 * * 1-5", "--timezone", "Europe/Berlin",
                "--data", DATA, "--models", "pop,als", "--config", str(_config(tmp_path, model))),
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stderr
    assert "prefect worker start --pool mfpipe-test" in deploy.stdout

    deployment = _read_deployment()
    assert deployment.work_pool_name == "mfpipe-test"
    assert deployment.entrypoint == "flows.retrain.retrain"
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (
        "30 2 * * 1-5",
        "Europe/Berlin",
        True,
    )
    expected = {"data": DATA, "models": ["pop", "als"], "registered_model": model}
    assert {k: deployment.parameters["config"].get(k) for k in expected} == expected
    assert deployment.job_variables["working_dir"] == str(tmp_path.resolve())
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("mfpipe-test").type == "process"

    worker = _start_worker(tmp_path, env, "mfpipe-test")
    try:
        threaded = _run_deployment()
        _assert_completed(threaded, worker.log_path)
        [parent] = _mlflow_parent_runs(mlflow_tracking, str(threaded.id))
        assert parent.info.status == "FINISHED" and parent.data.tags["dataset_digest"]
        # First run of this registered model: its best candidate becomes champion.
        assert _run_parent(mlflow_tracking, _champion(mlflow_tracking, model).run_id) == parent.info.run_id

        config = {**deployment.parameters["config"], "task_runner": "dask"}
        before = len(worker.log_path.read_text(errors="replace"))
        dask = _run_deployment({"config": config})
        _assert_completed(dask, worker.log_path)
        [parent] = _mlflow_parent_runs(mlflow_tracking, str(dask.id))
        assert parent.info.status == "FINISHED"
        # prefect-dask's own console line, streamed by the worker from the run's process.
        assert "Creating a new Dask cluster" in worker.log_path.read_text(errors="replace")[before:]
    finally:
        worker.stop()


def _config(tmp_path: Path, registered_model: str) -> Path:
    path = tmp_path / "mfpipe.toml"
    path.write_text(f'registered_model = "{registered_model}"\n')
    return path


def _start_worker(tmp_path: Path, env: dict[str, str], pool: str) -> services.Service:
    """`prefect worker start` with its health endpoint, so the shared start/wait/stop helper applies."""
    port = services.free_port()
    url = f"http://127.0.0.1:{port}"
    command = [services.executable("prefect"), "worker", "start", "--pool", pool, "--type", "process",
               "--with-healthcheck", "--prefetch-seconds", "5"]  # fmt: skip
    worker_env = {**env, "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1", "PREFECT_WORKER_WEBSERVER_PORT": str(port),
                  "PREFECT_WORKER_QUERY_SECONDS": "1"}  # fmt: skip
    [worker] = services.start_services(
        [lambda: services.spawn("Prefect worker", command, url, f"{url}/health", tmp_path / "worker.log", worker_env)]
    )
    return worker


def test_served_deployment_runs_here_skips_unchanged_data_and_keeps_its_schedule(
    prefect_api: str, mlflow_tracking: str, tmp_path: Path
) -> None:
    model = "mfpipe-services-serve"
    env = _env(tmp_path)
    log = tmp_path / "serve.log"
    # Its own dataset: the skip compares with the last run of the dataset, whatever registered model it fed.
    command = _mfpipe(
        "deploy", "--data", "synthetic:15k", "--models", "pop", "--skip-unchanged",
        "--config", str(_config(tmp_path, model)),
    )  # fmt: skip
    with log.open("wb") as out:
        serving = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        deployment = _wait_for_deployment(
            lambda d: d.parameters.get("config", {}).get("registered_model") == model, log
        )
        assert deployment.work_pool_name is None  # served, not on a pool
        [schedule] = deployment.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * *", "UTC")

        flow_run = _run_deployment()
        _assert_completed(flow_run, log)
        [parent] = _mlflow_parent_runs(mlflow_tracking, str(flow_run.id))
        assert _run_parent(mlflow_tracking, _champion(mlflow_tracking, model).run_id) == parent.info.run_id

        # Same data again: skipped (no new MLflow run); data, config and code of the last run decide.
        again = _run_deployment()
        _assert_completed(again, log)
        assert _mlflow_parent_runs(mlflow_tracking, str(again.id)) == []
        assert _flow_run_log_has(again.id, "unchanged since the last run: nothing trained")
    finally:
        serving.send_signal(signal.SIGTERM)
        serving.wait(60)
    deployment = _read_deployment()
    assert not deployment.paused and all(s.active for s in deployment.schedules)


def _wait_for_deployment(ready: Any, log: Path, timeout: float = 180) -> Any:
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            deployment = _read_deployment()
            if ready(deployment):
                return deployment
        except ObjectNotFound:
            pass
        time.sleep(1)
    raise AssertionError(f"deployment not served within {timeout} s: {log.read_text()[-3000:]}")


def test_prefect_yaml_deploys_the_same_deployment_with_prefects_cli(prefect_api: str, tmp_path: Path) -> None:
    from flows import deploy

    deploy.ensure_work_pool(deploy.DEFAULT_WORK_POOL)
    result = subprocess.run(
        [services.executable("prefect"), "--no-prompt", "deploy", "--all"],
        env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    deployment = _read_deployment()
    assert (deployment.entrypoint, deployment.work_pool_name) == ("flows.retrain.retrain", deploy.DEFAULT_WORK_POOL)
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (deploy.DEFAULT_CRON, deploy.DEFAULT_TIMEZONE)
    assert deployment.parameters == deploy.parameters(Config())
