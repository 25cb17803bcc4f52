"""docker/: the Dockerfile passes hadolint, compose.yaml the compose schema, and both keep the house rules.

No Docker daemon runs here, so the images are not built; the commands the containers run are the ones
mfpipe.services starts natively in the services tests, which is checked here flag by flag, and
tests/docker runs the whole file natively (its interpolation is unit-tested here).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from mfpipe import services
from tests.conftest import require
from tests.docker import harness

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
BIN = ROOT / ".venv" / "bin"


def _tool(name: str) -> str:
    path = BIN / name
    require(path.exists(), f"{path} missing (dev extra: make setup)")
    return str(path)


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("hadolint"), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def _check_compose(path: Path) -> subprocess.CompletedProcess:
    command = [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


ENV = {
    "MFPIPE_POSTGRES_PASSWORD": "pg-secret",
    "MLFLOW_TRACKING_USERNAME": "mfpipe",
    "MLFLOW_TRACKING_PASSWORD": "ml-secret",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret",
    "PREFECT_API_AUTH_STRING": "mfpipe:pf-secret",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    """compose.yaml as `docker compose` sees it with the secrets set and every other setting at its default."""
    return harness.load_compose(ENV)


_instructions = harness.dockerfile_instructions


def test_dockerfile_passes_hadolint() -> None:
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install uv\nUSER root\n")
    result = _hadolint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_dockerfile_is_multi_stage_from_the_runtime_lock_and_runs_as_non_root() -> None:
    steps = _instructions(DOCKERFILE.read_text())
    stages = [args.split()[-1] for op, args in steps if op == "FROM"]
    assert stages == ["builder", "runtime"]
    runtime = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    builder = steps[: len(steps) - len(runtime)]
    assert any(op == "RUN" and "-r requirements.lock" in args for op, args in builder)
    assert any(op == "COPY" and "--from=builder /opt/venv" in args for op, args in runtime)
    users = [args.split(":")[0] for op, args in runtime if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(op == "HEALTHCHECK" for op, _ in runtime)
    assert ("ENTRYPOINT", '["mfpipe"]') in runtime


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    for op, args in _instructions(DOCKERFILE.read_text()):
        if op != "COPY" or args.startswith("--from"):
            continue
        for source in args.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/") not in ignored, f"COPY {source}: excluded by .dockerignore"


def test_compose_file_is_valid_against_the_compose_schema() -> None:
    result = _check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_catches_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("condition: service_healthy", "condition: when_ready", 1))
    assert _check_compose(bad).returncode != 0


def test_compose_has_the_stack_with_healthchecks_and_ordered_start(compose: dict) -> None:
    svc = compose["services"]
    assert set(svc) == {"postgres", "prefect-server", "mlflow-server", "worker"}
    for name, spec in svc.items():
        assert "test" in spec["healthcheck"], name
        for dependency, condition in spec.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
    assert "pg_isready" in svc["postgres"]["healthcheck"]["test"][1]
    assert set(svc["worker"]["depends_on"]) == {"prefect-server", "mlflow-server"}
    assert "postgresql+asyncpg://" in svc["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert svc["mlflow-server"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert any(v.endswith(":/mlartifacts") for v in svc["mlflow-server"]["volumes"])


def test_published_ports_are_loopback_only(compose: dict) -> None:
    published = [(name, port) for name, spec in compose["services"].items() for port in spec.get("ports", [])]
    assert {name for name, _ in published} == {"prefect-server", "mlflow-server"}
    for name, port in published:
        if isinstance(port, dict):
            assert port.get("host_ip") == "127.0.0.1", name
        else:
            host, published_port, container_port = str(port).split(":")
            assert host == "127.0.0.1" and published_port.isdigit() and container_port.isdigit(), (name, port)


def test_server_containers_run_the_commands_the_fixtures_run(compose: dict) -> None:
    """Same programs and flags as mfpipe.services (used by `mfpipe up` and tests/services), on 0.0.0.0."""
    svc = compose["services"]
    prefect = svc["prefect-server"]["entrypoint"] + svc["prefect-server"]["command"]
    assert prefect == ["prefect", *services.prefect_server_command(4200, "0.0.0.0")[1:]]
    mlflow = svc["mlflow-server"]["entrypoint"] + svc["mlflow-server"]["command"]
    backend = "postgresql://mlops:pg-secret@postgres:5432/mlflow"
    expected = services.mlflow_server_command(5000, backend, "/mlartifacts", "0.0.0.0", auth=True)
    assert mlflow == ["mlflow", *expected[1:]]


def test_worker_registers_the_deployment_then_polls_its_pool(compose: dict) -> None:
    worker = compose["services"]["worker"]
    script = worker["command"][0]
    deploy, start = (shlex.split(part) for part in script.split("&&"))
    assert deploy[:4] == ["mfpipe", "deploy", "--work-pool", "mfpipe"]
    assert start[:5] == ["exec", "prefect", "worker", "start", "--pool"] and start[5] == "mfpipe"
    env = worker["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow-server:5000"
    assert worker["working_dir"] == harness.image_home()  # writable for the runs, unlike the image's /app


def test_auth_is_on_in_both_servers_and_the_worker_logs_in(compose: dict) -> None:
    svc = compose["services"]
    assert svc["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == ENV["PREFECT_API_AUTH_STRING"]
    mlflow = svc["mlflow-server"]
    assert mlflow["command"][:3] == ["server", "--app-name", "basic-auth"]
    [config] = mlflow["configs"]
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == config["target"]
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == ENV["MLFLOW_TRACKING_PASSWORD"]
    ini = compose["configs"][config["source"]]["content"]
    assert "database_uri = postgresql://mlops:pg-secret@postgres:5432/mlflow_auth" in ini
    assert "mlflow_auth" in (ROOT / "docker" / "postgres-init.sql").read_text()
    worker = svc["worker"]["environment"]
    for key in ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert worker[key] == ENV[key], key


def test_no_secret_has_a_default_and_a_missing_one_stops_compose() -> None:
    text = COMPOSE.read_text()
    used = re.findall(r"\$\{([A-Z_]+)(:?[-?]?)", text)
    secrets = {(name, operator) for name, operator in used if harness.is_secret(name)}
    assert {name for name, _ in secrets} == {"MFPIPE_POSTGRES_PASSWORD", "MLFLOW_TRACKING_PASSWORD",
                                              "MLFLOW_FLASK_SERVER_SECRET_KEY", "PREFECT_API_AUTH_STRING"}  # fmt: skip
    assert {operator for _, operator in secrets} == {":?"}
    message = r"MFPIPE_POSTGRES_PASSWORD is missing a value: set MFPIPE_POSTGRES_PASSWORD in docker/\.env"
    with pytest.raises(harness.InterpolationError, match=message):
        harness.load_compose(harness.read_env_file(harness.ENV_EXAMPLE) | {"MFPIPE_POSTGRES_PASSWORD": ""})


def test_env_example_documents_every_variable_compose_reads_and_holds_no_secret() -> None:
    example = harness.read_env_file(harness.ENV_EXAMPLE)
    assert set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text())) == set(example)
    assert all(not value for key, value in example.items() if harness.is_secret(key))


def test_the_stacks_secrets_stay_out_of_git_and_of_the_image() -> None:
    for path in ("docker/.env", ".mfpipe/auth.env"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, timeout=30).returncode == 0, path
    assert "docker/.env" in (ROOT / ".dockerignore").read_text().splitlines()
    assert "requirements-dev.lock" not in DOCKERFILE.read_text()  # the image holds the runtime deps only


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${A}", "a"),
        ("${UNSET:-x}/${EMPTY:-y}/${EMPTY-z}", "x/y/"),
        ("${UNSET:-${A}}", "a"),
        ("$$A and $${A}", "$A and ${A}"),
        ("pre-$A-post", "pre-a-post"),
        ("${A:?need A}", "a"),
    ],
)
def test_compose_interpolation(text: str, expected: str) -> None:
    assert harness.interpolate(text, {"A": "a", "EMPTY": ""}) == expected


def test_compose_interpolation_refuses_a_missing_required_value() -> None:
    with pytest.raises(harness.InterpolationError, match="B is missing a value: give B"):
        harness.interpolate("${B:?give B}", {"B": ""})
    assert harness.interpolate("${B?unset only}", {"B": ""}) == ""
