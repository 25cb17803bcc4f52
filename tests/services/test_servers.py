"""The session's servers answer and keep what clients send them (MLflow on PostgreSQL over HTTP)."""

from __future__ import annotations

import urllib.request


def test_mlflow_server_on_postgres_keeps_runs_and_aliases(mlflow_tracking: str, postgres) -> None:
    import mlflow
    import psycopg2
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(mlflow_tracking)
    mlflow.set_experiment("services-smoke")
    with mlflow.start_run() as run:
        mlflow.log_metric("ndcg_at_10", 0.25)
        mlflow.log_text("hello", "notes/hello.txt")
    client = MlflowClient(mlflow_tracking)
    client.create_registered_model("services-smoke-model")
    version = client.create_model_version("services-smoke-model", f"runs:/{run.info.run_id}/notes", run.info.run_id)
    client.set_registered_model_alias("services-smoke-model", "champion", version.version)

    assert client.get_model_version_by_alias("services-smoke-model", "champion").run_id == run.info.run_id
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/notes/hello.txt") == "hello"
    # The rows are in PostgreSQL, not in a file store the server made up.
    with psycopg2.connect(postgres.url("mlflow")) as conn, conn.cursor() as cur:
        cur.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = 'ndcg_at_10'", (run.info.run_id,))
        assert cur.fetchone() == (0.25,)


def test_prefect_server_answers_health(prefect_api: str) -> None:
    with urllib.request.urlopen(f"{prefect_api}/health", timeout=5) as response:
        assert response.read() == b"true"
