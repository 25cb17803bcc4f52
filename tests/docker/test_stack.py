"""docker/compose.yaml, run natively by tests/docker/harness.py: the whole stack with auth on, end to end.

PostgreSQL (the image's entrypoint emulated), the Prefect server on it through asyncpg, the MLflow server
on it with the basic-auth app, and the worker's real command (`mfpipe deploy --work-pool mfpipe ...`, then
`prefect worker start --pool mfpipe`), each with the environment compose gives it. A triggered run of
`retrain/scheduled` goes through the worker into both servers: COMPLETED, recorded on MLflow, `champion` set.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from mfpipe import services
from tests.docker import harness

pytestmark = [pytest.mark.services, pytest.mark.slow]

RUN_TIMEOUT = 600


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Stack]:
    """The stack from a `.env` made from docker/.env.example: random secrets, free host ports, small data."""
    workdir = tmp_path_factory.mktemp("compose")
    env_file = harness.write_env_file(
        workdir,
        MFPIPE_PREFECT_PORT=str(services.free_port()),
        MFPIPE_MLFLOW_PORT=str(services.free_port()),
        MFPIPE_DATA="synthetic:20k",
        MFPIPE_MODELS="pop,als",
    )
    started = time.monotonic()
    yield from harness.running(env_file, workdir)
    print(f"compose stack: up, tested and stopped in {time.monotonic() - started:.0f} s")


def _status(request: urllib.request.Request | str) -> int:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _prefect(stack: harness.Stack) -> dict[Any, str]:
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    return {PREFECT_API_URL: f"{stack.url('prefect-server', 4200)}/api",
            PREFECT_API_AUTH_STRING: stack.env["PREFECT_API_AUTH_STRING"]}  # fmt: skip


def _mlflow(stack: harness.Stack, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An MLflow client of the stack's server, logged in with the user of the .env (the clients' variables)."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", stack.env["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.env["MLFLOW_TRACKING_PASSWORD"])
    url = stack.url("mlflow-server", 5000)
    return MlflowClient(url, registry_uri=url)


def test_both_servers_refuse_anonymous_requests(stack: harness.Stack) -> None:
    prefect, mlflow = stack.url("prefect-server", 4200), stack.url("mlflow-server", 5000)
    flows = urllib.request.Request(f"{prefect}/api/flows/filter", data=b"{}",
                                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert _status(flows) == 401
    assert _status(f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert _status(f"{mlflow}/api/2.0/mlflow/registered-models/search") == 401
    # The UI on the host is told the published port and to ask for the login.
    with urllib.request.urlopen(f"{prefect}/ui-settings", timeout=10) as response:
        settings = json.load(response)
    assert (settings["api_url"], settings["auth"]) == (f"{prefect}/api", "BASIC")


def test_a_triggered_run_goes_through_the_worker_into_both_servers(
    stack: harness.Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    with temporary_settings(_prefect(stack)):
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("retrain/scheduled")
        assert deployment.work_pool_name == "mfpipe"
        assert deployment.parameters["config"]["models"] == ["pop", "als"]  # MFPIPE_MODELS, typed
        [schedule] = deployment.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * *", "UTC")
        flow_run = run_deployment("retrain/scheduled", timeout=RUN_TIMEOUT, poll_interval=2, as_subflow=False)
        _drain_prefect_clients()
    worker = stack.services["worker"]
    assert flow_run.state.is_completed(), f"{flow_run.state}: {stack.log_tail(worker)}"

    client = _mlflow(stack, monkeypatch)
    experiments = [e.experiment_id for e in client.search_experiments()]
    [parent] = client.search_runs(experiments, filter_string=f"tags.`prefect.flow_run_id` = '{flow_run.id}'")
    assert parent.info.status == "FINISHED"
    [model] = [m for m in client.search_registered_models() if "champion" in m.aliases]
    champion = client.get_model_version_by_alias(model.name, "champion")
    assert client.get_run(champion.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id

    # Everything landed in the stack's PostgreSQL: Prefect's flow run, MLflow's run and its user.
    rows = _postgres_rows(stack, {
        "prefect": f"SELECT state_type FROM flow_run WHERE id = '{flow_run.id}'",
        "mlflow": f"SELECT status FROM runs WHERE run_uuid = '{parent.info.run_id}'",
        "mlflow_auth": f"SELECT is_admin FROM users WHERE username = '{stack.env['MLFLOW_TRACKING_USERNAME']}'",
    })  # fmt: skip
    assert rows == {"prefect": ("COMPLETED",), "mlflow": ("FINISHED",), "mlflow_auth": (True,)}


def _postgres_rows(stack: harness.Stack, queries: dict[str, str]) -> dict[str, tuple]:
    import psycopg2

    cluster = stack.services["postgres"].cluster
    assert cluster is not None
    out = {}
    for database, query in queries.items():
        with psycopg2.connect(host=cluster.host, port=cluster.port, user=cluster.superuser,
                              password=cluster.password, dbname=database) as conn, conn.cursor() as cur:  # fmt: skip
            cur.execute(query)
            out[database] = cur.fetchone()
    return out


def _drain_prefect_clients() -> None:
    """Flush this process's queued Prefect logs/events while the server still answers (else exit hangs)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


def test_no_secret_reaches_a_log_or_the_deployment(stack: harness.Stack) -> None:
    """After the run: the servers' and the worker's output, and what the deployment stores, hold no secret."""
    from prefect import get_client
    from prefect.settings import temporary_settings

    secrets = [value for key, value in stack.env.items() if harness.is_secret(key)]
    assert len(secrets) == 4
    with temporary_settings(_prefect(stack)), get_client(sync_client=True) as client:
        stored = json.dumps(client.read_deployment_by_name("retrain/scheduled").model_dump(mode="json"))
    outputs = {path.name: path.read_text(errors="replace") for path in (stack.workdir / "logs").glob("*.log")}
    assert set(outputs) == {"prefect-server.log", "mlflow-server.log", "worker.log"}
    for secret in secrets:
        assert secret not in stored
        for name, text in outputs.items():
            assert secret.split(":")[-1] not in text, f"a secret in {name}"
