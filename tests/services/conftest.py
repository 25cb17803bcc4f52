"""Real servers for the services tests, one of each per test session, all on 127.0.0.1 and free ports.

`postgres`: a throw-away PostgreSQL cluster (Debian binaries, `make services-deps`); `mlflow_server`:
`mlflow server` on that PostgreSQL; `prefect_server`: `prefect server start` with its own PREFECT_HOME,
on that PostgreSQL too (asyncpg), as docker/compose.yaml runs it.
The two servers start together, with the same helper as `mfpipe up` (mfpipe.services), and stop at the
end of the session. Tests opt in to a server for their client side with the `prefect_api` / `mlflow_tracking`
fixtures, which point this process (and child processes) at it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mfpipe import services
from tests.conftest import require

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


def _pg_bin(name: str) -> str | None:
    """Newest Debian PostgreSQL major version's binary."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[4]))
    return found[-1] if found else None


def _as_cluster_owner(directory: Path) -> list[str]:
    """PostgreSQL refuses to run as root: as root, hand `directory` to user postgres and run as it."""
    if os.geteuid() != 0:
        return []
    try:
        owner = pwd.getpwnam("postgres")
    except KeyError:
        require(False, "running as root and no 'postgres' user to own the cluster (make services-deps)")
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return ["runuser", "-u", "postgres", "--"]


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr or result.stdout}")


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throw-away cluster: initdb into a temp dir, `pg_ctl start` on a free port, role + databases."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    require(initdb is not None and pg_ctl is not None, "PostgreSQL binaries missing: run `make services-deps`")
    # Under /tmp, not pytest's 0700 tmp dir: user postgres must be able to reach it.
    root = Path(tempfile.mkdtemp(prefix="mfpipe-pg-"))
    data, pwfile = root / "data", root / "pwfile"
    pwfile.write_text("postgres\n")
    as_owner = _as_cluster_owner(root)
    port = services.free_port()
    _run([*as_owner, initdb, "-D", str(data), "-U", "postgres", "-A", "scram-sha-256", f"--pwfile={pwfile}", "-N"])
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    _run([*as_owner, pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o", options, "start"])
    try:
        _create_role_and_databases(port)
        yield Postgres("127.0.0.1", port, PG_USER, PG_PASSWORD)
    finally:
        _run([*as_owner, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)


def _create_role_and_databases(port: int) -> None:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password="postgres", dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE ROLE {PG_USER} LOGIN PASSWORD %s", (PG_PASSWORD,))
            for database in PG_DATABASES:
                cur.execute(f"CREATE DATABASE {database} OWNER {PG_USER}")
    finally:
        conn.close()


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
