"""The session's servers answer and keep what clients send them (MLflow on PostgreSQL over HTTP)."""

from __future__ import annotations

import urllib.request
from pathlib import Path


def test_mlflow_server_on_postgres_keeps_runs_and_aliases(mlflow_tracking: str, postgres, tmp_path) -> None:
    import psycopg2
    from mlflow import MlflowClient

    # The client only: no fluent global state (active experiment) leaks into later tests.
    client = MlflowClient(mlflow_tracking, registry_uri=mlflow_tracking)
    experiment = client.create_experiment("services-smoke")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "ndcg_at_10", 0.25)
    client.log_text(run.info.run_id, "hello", "notes/hello.txt")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("services-smoke-model")
    version = client.create_model_version("services-smoke-model", f"runs:/{run.info.run_id}/notes", run.info.run_id)
    client.set_registered_model_alias("services-smoke-model", "champion", version.version)

    assert client.get_model_version_by_alias("services-smoke-model", "champion").run_id == run.info.run_id
    # Artifacts go through the server (proxied) and come back.
    local = client.download_artifacts(run.info.run_id, "notes/hello.txt", str(tmp_path))
    assert Path(local).read_text() == "hello"
    # The rows are in PostgreSQL, not in a file store the server made up.
    with psycopg2.connect(postgres.url("mlflow")) as conn, conn.cursor() as cur:
        cur.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = 'ndcg_at_10'", (run.info.run_id,))
        assert cur.fetchone() == (0.25,)


def test_prefect_server_answers_health_and_keeps_its_state_in_postgres(prefect_api: str, postgres) -> None:
    import psycopg2
    from prefect import get_client

    with urllib.request.urlopen(f"{prefect_api}/health", timeout=5) as response:
        assert response.read() == b"true"
    with get_client(sync_client=True) as client:
        client.create_flow_from_name("services-smoke-flow")
    with psycopg2.connect(postgres.url("prefect")) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM flow WHERE name = 'services-smoke-flow'")
        assert cur.fetchone() == (1,)
