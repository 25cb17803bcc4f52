"""mfpipe.services with a tiny real HTTP server as the child (the real servers: tests/services)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mfpipe import services
from mfpipe.auth import mask_uri
from mfpipe.errors import MfpipeError


def _http_server(tmp_path: Path, port: int, name: str = "web") -> services.Service:
    """`python -m http.server` on 127.0.0.1; health is its directory listing."""
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(tmp_path)]
    return services.spawn(name, command, url, f"{url}/", tmp_path / f"{name}.log")


def test_start_wait_and_stop_a_server(tmp_path: Path) -> None:
    port = services.free_port()
    [web] = services.start_services([lambda: _http_server(tmp_path, port)], timeout=60)
    assert services.healthy(web.health_url) and services.port_in_use(port)
    assert web.stop(timeout=10) is not None
    assert not web.running() and not services.port_in_use(port)


def test_a_child_that_exits_early_is_one_error_with_its_log(tmp_path: Path) -> None:
    def crashing() -> services.Service:
        command = [sys.executable, "-c", "import sys; print('cannot bind: boom'); sys.exit(3)"]
        return services.spawn("crasher", command, "http://127.0.0.1:9", "http://127.0.0.1:9/", tmp_path / "c.log")

    with pytest.raises(MfpipeError, match=r"crasher exited with code 3 .*cannot bind: boom"):
        services.start_services([crashing], timeout=30)


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path: Path) -> None:
    started: list[services.Service] = []

    def silent() -> services.Service:
        command = [sys.executable, "-c", "import time; time.sleep(600)"]
        started.append(services.spawn("silent", command, "http://127.0.0.1:9", "http://127.0.0.1:9/", tmp_path / "s"))
        return started[-1]

    with pytest.raises(MfpipeError, match="not healthy after 1 s: silent"):
        services.start_services([silent], timeout=1)
    assert not started[0].running()


def test_a_busy_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    port = services.free_port()
    [web] = services.start_services([lambda: _http_server(tmp_path, port)], timeout=60)
    try:
        with pytest.raises(MfpipeError, match=f"port {port} on 127.0.0.1 is already in use; .* --prefect-port"):
            services.prefect_server(port, tmp_path / "p.log")
        with pytest.raises(MfpipeError, match="--mlflow-port"):
            services.mlflow_server(port, "sqlite:///x.db", tmp_path, tmp_path / "m.log")
    finally:
        web.stop()


def test_one_failing_start_stops_the_ones_already_running(tmp_path: Path) -> None:
    port = services.free_port()
    first: list[services.Service] = []

    def web() -> services.Service:
        first.append(_http_server(tmp_path, port))
        return first[-1]

    def broken() -> services.Service:
        raise MfpipeError("second server cannot start")

    with pytest.raises(MfpipeError, match="second server"):
        services.start_services([web, broken], timeout=30)
    assert not first[0].running()


def test_server_commands_bind_where_asked() -> None:
    prefect = services.prefect_server_command(4200)
    assert prefect[1:] == ["server", "start", "--host", "127.0.0.1", "--port", "4200"]
    mlflow = services.mlflow_server_command(5000, "sqlite:///db", "/art", host="0.0.0.0")
    assert mlflow[mlflow.index("--host") + 1] == "0.0.0.0" and mlflow[mlflow.index("--workers") + 1] == "1"
    assert Path(prefect[0]).name == "prefect" and Path(mlflow[0]).name == "mlflow"


def test_up_refuses_a_tracking_server_uri_before_starting_anything(tmp_path: Path) -> None:
    with pytest.raises(MfpipeError, match=r"'http://127\.0\.0\.1:5000' is not a database store"):
        services.up(4200, 5000, "http://127.0.0.1:5000", tmp_path / "a", tmp_path / "logs", lambda _: None)
    assert not (tmp_path / "logs").exists()


def test_mlflow_auth_adds_the_basic_auth_app() -> None:
    command = services.mlflow_server_command(5000, "sqlite:///db", "/art", auth=True)
    assert command[1:4] == ["server", "--app-name", "basic-auth"]
    assert "--app-name" not in services.mlflow_server_command(5000, "sqlite:///db", "/art")


def test_a_printed_store_uri_hides_its_password() -> None:
    assert mask_uri("postgresql://mlops:s3cr:et@db:5432/mlflow") == "postgresql://mlops:***@db:5432/mlflow"
    assert mask_uri("sqlite:///mlruns/mlflow.db") == "sqlite:///mlruns/mlflow.db"
