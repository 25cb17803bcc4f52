"""Real servers for the services tests, one of each per test session, all on 127.0.0.1 and free ports.

`postgres`: a throw-away PostgreSQL cluster (Debian binaries, `make services-deps`); `mlflow_server`:
`mlflow server` on that PostgreSQL; `prefect_server`: `prefect server start` with its own PREFECT_HOME,
on that PostgreSQL too (asyncpg), as docker/compose.yaml runs it.
The two servers start together, with the same helper as `mfpipe up` (mfpipe.services), and stop at the
end of the session. Tests opt in to a server for their client side with the `prefect_api` / `mlflow_tracking`
fixtures, which point this process (and child processes) at it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mfpipe import services
from tests.services import pg

PG_USER, PG_PASSWORD = "mlops", "mlops"
PG_DATABASES = ("mlflow", "prefect")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/services starts real servers."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.services)


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throw-away cluster (tests/services/pg.py) with the role and databases the servers use."""
    cluster = pg.start()
    try:
        cluster.execute(
            [f"CREATE ROLE {PG_USER} LOGIN PASSWORD '{PG_PASSWORD}'"]
            + [f"CREATE DATABASE {database} OWNER {PG_USER}" for database in PG_DATABASES]
        )
        yield Postgres(cluster.host, cluster.port, PG_USER, PG_PASSWORD)
    finally:
        cluster.stop()


def _drain_prefect_clients() -> None:
    """Flush this process's queued Prefect logs/events while the server still answers (else exit hangs ~1 min)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


@dataclass(frozen=True)
class Servers:
    prefect_api_url: str
    mlflow_url: str


@pytest.fixture(scope="session")
def _servers(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Both servers, started at once (their 10-20 s start-ups overlap) and stopped at the session's end.

    Both on PostgreSQL as in docker/compose.yaml: Prefect through asyncpg (its own PREFECT_HOME for
    settings), MLflow through psycopg2 with artifacts in a temp dir.
    """
    home = tmp_path_factory.mktemp("prefect-home")
    root = tmp_path_factory.mktemp("mlflow-server")
    backend = postgres.url("mlflow")
    prefect_port, mlflow_port = services.free_port(), services.free_port()
    prefect, mlflow = services.start_services(
        [
            lambda: services.prefect_server(
                prefect_port, home / "server.log", home=home, database_url=postgres.url("prefect", "postgresql+asyncpg")
            ),
            lambda: services.mlflow_server(mlflow_port, backend, root / "artifacts", root / "server.log"),
        ]
    )
    try:
        yield Servers(services.prefect_api_url(prefect), mlflow.url)
    finally:
        _drain_prefect_clients()
        services.stop_all([prefect, mlflow])


@pytest.fixture(scope="session")
def prefect_server(_servers: Servers) -> str:
    """`prefect server start` on 127.0.0.1; its API URL."""
    return _servers.prefect_api_url


@pytest.fixture(scope="session")
def mlflow_server(_servers: Servers) -> str:
    """`mlflow server` on PostgreSQL on 127.0.0.1; its tracking URI."""
    return _servers.mlflow_url


@pytest.fixture
def prefect_api(prefect_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point this test's Prefect client (and its child processes) at the session's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server


@pytest.fixture
def mlflow_tracking(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point this test's MLflow client (and its child processes) at the session's server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server
