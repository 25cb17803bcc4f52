"""Local servers as child processes: start a command, wait for its health URL, stop it cleanly.

One helper for `mfpipe up` and the services test fixtures, so both start the Prefect server and the
MLflow server with the same commands and environment as `docker/compose.yaml` (which runs them on
0.0.0.0 inside its network). Children get their own session so a Ctrl-C in the terminal reaches only
the parent, which then stops them in order (SIGTERM, wait, SIGKILL only after a timeout). The one
exception is the ephemeral Prefect API of `mfpipe run`, which shares the run's process group.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mfpipe.auth import Credentials, write_mlflow_auth_config
from mfpipe.errors import MfpipeError

LOCALHOST = "127.0.0.1"
#: Where `mfpipe up` keeps its state (git-ignored): server output in logs/, auth.env, the MLflow auth database.
UP_STATE_DIR = Path(".mfpipe")
UP_LOG_DIR = UP_STATE_DIR / "logs"
#: `mlflow server --app-name basic-auth`: MLflow's login (HTTP Basic) and per-resource permissions.
MLFLOW_AUTH_APP = "basic-auth"
#: Environment every server child gets: no telemetry, and no MLflow job workers eating the CPU after start-up.
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "DO_NOT_TRACK": "1",
}


@dataclass
class Service:
    """A running server: its base URL, health URL, child process and log file.

    `own_group`: the child leads a process group of its own (else it shares ours, and a SIGKILL goes to
    it alone). `scratch_log`: its log is deleted on `stop` unless the server had failed (exited non-zero).
    """

    name: str
    url: str
    health_url: str
    process: subprocess.Popen
    log_path: Path
    own_group: bool = True
    scratch_log: bool = False

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        """Last log lines, joined on one line, for error messages (the CLI prints errors as one line)."""
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:] if line.strip())

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server (it stops its own children), wait; after `timeout` SIGKILL its process group,
        or the process alone if it shares our group (a killpg would kill us too). A scratch log goes unless
        the server had failed."""
        failed = self.process.poll() not in (None, 0)
        if self.running():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                if self.own_group:
                    os.killpg(self.process.pid, signal.SIGKILL)
                else:
                    self.process.kill()
                self.process.wait()
        if self.scratch_log and not failed:
            self.log_path.unlink(missing_ok=True)
        return self.process.returncode


def free_port(host: str = LOCALHOST) -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = LOCALHOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def executable(name: str) -> str:
    """A console script of this environment (beside the running Python), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise MfpipeError(f"'{name}' not found beside {sys.executable} or on PATH; install mfpipe's dependencies")
    return found


#: Health checks go straight to 127.0.0.1, never through an HTTP proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def healthy(url: str, timeout: float = 2.0) -> bool:
    """True when GET `url` answers 2xx."""
    try:
        with _DIRECT.open(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(services: Sequence[Service], timeout: float) -> None:
    """Poll every service's health URL until all answer; a child that exits or a timeout is an error."""
    pending = list(services)
    deadline = time.monotonic() + timeout
    while pending:
        for service in list(pending):
            if not service.running():
                raise MfpipeError(
                    f"{service.name} exited with code {service.process.returncode} before answering "
                    f"{service.health_url}; log {service.log_path}: {service.log_tail()}"
                )
            if healthy(service.health_url):
                pending.remove(service)
        if pending and time.monotonic() > deadline:
            names = ", ".join(f"{s.name} ({s.health_url})" for s in pending)
            raise MfpipeError(f"not healthy after {timeout:.0f} s: {names}; logs in {pending[0].log_path.parent}")
        if pending:
            time.sleep(0.25)


def spawn(
    name: str,
    command: Sequence[str],
    url: str,
    health_url: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
) -> Service:
    """Start `command` in its own session with output to `log_path`; does not wait for health."""
    return _start(name, command, url, health_url, log_path, {**os.environ, **QUIET_ENV, **(env or {})})


def _start(
    name: str, command: Sequence[str], url: str, health_url: str, log_path: Path, env: Mapping[str, str],
    own_group: bool = True, scratch_log: bool = False,
) -> Service:  # fmt: skip
    """`command` with output to `log_path`, in a session of its own unless `own_group` is False."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env), start_new_session=own_group,
        )  # fmt: skip
    return Service(name, url, health_url, process, log_path, own_group, scratch_log)


def start_services(starters: Sequence[Callable[[], Service]], timeout: float = 300.0) -> list[Service]:
    """Start every service at once (their start-ups overlap), wait for all; on failure stop those started."""
    services: list[Service] = []
    try:
        for start in starters:
            services.append(start())
        wait_healthy(services, timeout)
    except BaseException:
        stop_all(services)
        raise
    return services


def stop_all(services: Sequence[Service], timeout: float = 30.0) -> None:
    """Stop in reverse start order."""
    for service in reversed(services):
        service.stop(timeout)


def _check_port(port: int, host: str, flag: str) -> None:
    if port_in_use(port, LOCALHOST if host == "0.0.0.0" else host):
        raise MfpipeError(f"port {port} on {host} is already in use; stop what listens there or pass {flag}")


def prefect_server_command(port: int, host: str = LOCALHOST) -> list[str]:
    """The Prefect server command line (docker/compose.yaml runs the same with host 0.0.0.0)."""
    return [executable("prefect"), "server", "start", "--host", host, "--port", str(port)]


def mlflow_server_command(
    port: int, backend_store_uri: str, artifacts_destination: Path | str, host: str = LOCALHOST, auth: bool = False
) -> list[str]:
    """`mlflow server` proxying artifacts (clients need no access to the artifact store), one worker.

    `auth` adds `--app-name basic-auth`; its settings come from the environment (`auth.Credentials`).
    """
    return [
        executable("mlflow"), "server", *(["--app-name", MLFLOW_AUTH_APP] if auth else []),
        "--backend-store-uri", backend_store_uri, "--artifacts-destination", str(artifacts_destination),
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def _base_url(host: str, port: int) -> str:
    """The URL a client on this machine uses (0.0.0.0 is where a server listens, not an address to call)."""
    return f"http://{LOCALHOST if host == '0.0.0.0' else host}:{port}"


def prefect_server(
    port: int,
    log_path: Path,
    home: Path | None = None,
    database_url: str | None = None,
    host: str = LOCALHOST,
    auth_env: Mapping[str, str] | None = None,
) -> Service:
    """`prefect server start`; `home` isolates its settings and sqlite DB, `database_url` selects PostgreSQL.

    The UI is told its API is on this port (PREFECT_UI_API_URL): by default it would call :4200, and
    on any other port it shows "Can't connect to Server API". `auth_env`: `Credentials.prefect_server_env()`.
    """
    _check_port(port, host, "--prefect-port")
    url = _base_url(host, port)
    env: dict[str, str] = {"PREFECT_UI_API_URL": f"{url}/api", **(auth_env or {})}
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    if database_url is not None:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    return spawn("Prefect server", prefect_server_command(port, host), url, f"{url}/api/health", log_path, env)


def mlflow_server(
    port: int,
    backend_store_uri: str,
    artifacts_destination: Path | str,
    log_path: Path,
    host: str = LOCALHOST,
    auth_env: Mapping[str, str] | None = None,
) -> Service:
    """Start `mlflow server` over `backend_store_uri` (sqlite or PostgreSQL).

    `auth_env` (`Credentials.mlflow_server_env(...)`) turns on the `basic-auth` app; `/health` stays open.
    """
    _check_port(port, host, "--mlflow-port")
    url = _base_url(host, port)
    command = mlflow_server_command(port, backend_store_uri, artifacts_destination, host, auth=auth_env is not None)
    return spawn("MLflow server", command, url, f"{url}/health", log_path, auth_env)


def start_ephemeral_prefect_api() -> Service:
    """An ephemeral Prefect API for this process alone, as Prefect starts its own; does not wait for health.

    The same server as Prefect's `SubprocessASGIServer` (`uvicorn` over `prefect.server.api.server:create_app`,
    no UI), located without importing Prefect, so that `mfpipe run` can start it before its imports and
    they overlap. Same process group as this one, like Prefect's: a Ctrl-C reaches both. Its log is a
    temporary file, kept only if the server fails. Stop it as Prefect does: `stop(timeout=10)`.
    """
    spec = importlib.util.find_spec("prefect")  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations
    port = free_port()
    url = f"http://{LOCALHOST}:{port}"
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.submodule_search_locations[0]).parent),
               "--factory", "prefect.server.api.server:create_app", "--host", LOCALHOST, "--port", str(port),
               "--log-level", "error", "--lifespan", "on"]  # fmt: skip
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    handle, name = tempfile.mkstemp(prefix="mfpipe-prefect-api-", suffix=".log")
    os.close(handle)  # `_start` opens the log itself
    log_path = Path(name)
    return _start("Prefect API", command, url, f"{url}/api/health", log_path, env, own_group=False, scratch_log=True)


def prefect_api_url(service: Service) -> str:
    """What clients put in PREFECT_API_URL."""
    return f"{service.url}/api"


def watch(services: Sequence[Service], poll: float = 0.5) -> None:
    """Block until a server dies (MfpipeError, exit code 1); Ctrl-C ends the wait as KeyboardInterrupt."""
    while True:
        for service in services:
            if not service.running():
                raise MfpipeError(
                    f"{service.name} exited with code {service.process.returncode}; "
                    f"log {service.log_path}: {service.log_tail()}",
                    exit_code=1,
                )
        time.sleep(poll)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


@dataclass
class UpResult:
    services: list[Service]
    seconds_to_healthy: float


def up(
    prefect_port: int,
    mlflow_port: int,
    tracking_uri: str,
    artifacts: Path,
    log_dir: Path,
    on_ready: Callable[[UpResult], None],
    host: str = LOCALHOST,
    timeout: float = 300.0,
    auth: Credentials | None = None,
    state_dir: Path = UP_STATE_DIR,
) -> None:
    """Start a Prefect server and an MLflow server over the project's store, report, run until Ctrl-C.

    Both start at once; `on_ready` gets the services and the seconds from start to both health URLs
    answering. SIGINT and SIGTERM (also during start-up) stop both children (SIGTERM, wait), then return.
    With `auth`, both require its credentials; MLflow's users live in `state_dir/mlflow-auth.db`.
    """
    if not tracking_uri.startswith(("sqlite:", "file:", "postgresql", "mysql", "mssql")):
        raise MfpipeError(
            f"tracking URI {tracking_uri!r} is not a database store; `mfpipe up` serves a local store "
            "(set MLFLOW_TRACKING_URI to sqlite:///..., file:///... or postgresql://..., or open that server's UI)"
        )
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    prefect_auth: dict[str, str] | None = None
    mlflow_auth: dict[str, str] | None = None
    if auth is not None:
        database = f"sqlite:///{(state_dir / 'mlflow-auth.db').resolve()}"
        prefect_auth = auth.prefect_server_env()
        mlflow_auth = auth.mlflow_server_env(write_mlflow_auth_config(state_dir / "mlflow-auth.ini", database))
    # Explicit for SIGINT too: a shell script's background job starts with SIGINT ignored.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        started = time.monotonic()
        services = start_services(
            [
                lambda: prefect_server(prefect_port, log_dir / "prefect-server.log", host=host, auth_env=prefect_auth),
                lambda: mlflow_server(
                    mlflow_port, tracking_uri, artifacts.resolve(), log_dir / "mlflow-server.log", host, mlflow_auth
                ),
            ],
            timeout,
        )
        try:
            on_ready(UpResult(services, time.monotonic() - started))
            watch(services)
        finally:
            stop_all(services)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
