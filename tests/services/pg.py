"""A throw-away PostgreSQL cluster from Debian's binaries (`make services-deps`), on 127.0.0.1 and a free port.

Shared by the services fixtures (tests/services/conftest.py) and the compose harness (tests/docker), which
uses it to do what the `postgres` image's entrypoint does: initdb with the superuser and password from
the service's environment, then the scripts of /docker-entrypoint-initdb.d.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mfpipe import services
from tests.conftest import require


def pg_bin(name: str) -> str | None:
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


def _run(command: Sequence[str]) -> None:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr or result.stdout}")


@dataclass
class Cluster:
    """A running cluster: its port, superuser and password; `stop()` removes it."""

    port: int
    superuser: str
    password: str
    root: Path
    _as_owner: list[str]

    host: str = services.LOCALHOST

    def execute(self, statements: Sequence[str], database: str = "postgres") -> None:
        """Run SQL as the superuser, autocommit (CREATE DATABASE cannot run in a transaction)."""
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.superuser, password=self.password,
                                dbname=database)  # fmt: skip
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
        finally:
            conn.close()

    def run_script(self, script: Path, database: str) -> None:
        """`psql -f` as the postgres image runs /docker-entrypoint-initdb.d/*.sql (stop at the first error)."""
        psql = pg_bin("psql")
        require(psql is not None, "psql missing: run `make services-deps`")
        command = [str(psql), "-v", "ON_ERROR_STOP=1", "-h", self.host, "-p", str(self.port), "-U", self.superuser,
                   "-d", database, "-f", str(script)]  # fmt: skip
        result = subprocess.run(command, env={**os.environ, "PGPASSWORD": self.password}, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"psql -f {script} failed ({result.returncode}): {result.stderr}")

    def stop(self) -> None:
        pg_ctl = pg_bin("pg_ctl")
        assert pg_ctl is not None
        _run([*self._as_owner, pg_ctl, "-D", str(self.root / "data"), "-m", "fast", "-w", "stop"])
        shutil.rmtree(self.root, ignore_errors=True)


def start(superuser: str = "postgres", password: str = "postgres", port: int | None = None) -> Cluster:
    """initdb into a temp dir (scram-sha-256, the given superuser), `pg_ctl start` on 127.0.0.1."""
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    require(initdb is not None and pg_ctl is not None, "PostgreSQL binaries missing: run `make services-deps`")
    assert initdb is not None and pg_ctl is not None
    # Under /tmp, not pytest's 0700 tmp dir: user postgres must be able to reach it.
    root = Path(tempfile.mkdtemp(prefix="mfpipe-pg-"))
    data, pwfile = root / "data", root / "pwfile"
    pwfile.write_text(f"{password}\n")
    as_owner = _as_cluster_owner(root)
    port = port or services.free_port()
    _run([*as_owner, initdb, "-D", str(data), "-U", superuser, "-A", "scram-sha-256", f"--pwfile={pwfile}", "-N"])
    pwfile.unlink()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    _run([*as_owner, pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o", options, "start"])
    return Cluster(port, superuser, password, root, as_owner)
