"""mfpipe.auth: the credentials file (created once, mode 600, clients' variable names) and what servers get.

The servers themselves enforcing it: tests/services/test_up.py (`mfpipe up --auth`) and tests/docker.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from mfpipe import auth
from mfpipe.errors import MfpipeError


def test_first_use_creates_random_secrets_in_a_private_file_then_reuses_them(tmp_path: Path) -> None:
    path = tmp_path / ".mfpipe" / "auth.env"
    first, created = auth.load_or_create(path)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = auth.load_or_create(path)
    assert again == first and not created_again
    other, _ = auth.load_or_create(tmp_path / "elsewhere.env")
    assert other.mlflow_password != first.mlflow_password  # random, not a default
    assert len(first.mlflow_password) >= 12  # MLflow's password policy


def test_the_file_holds_the_clients_own_variable_names(tmp_path: Path) -> None:
    path = tmp_path / "auth.env"
    credentials, _ = auth.load_or_create(path)
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert [line.split("=", 1)[0] for line in lines] == list(auth.KEYS)
    user, password = credentials.prefect_auth_string.split(":", 1)
    assert user == credentials.mlflow_username and password
    assert credentials.client_env() == {
        "MLFLOW_TRACKING_USERNAME": credentials.mlflow_username,
        "MLFLOW_TRACKING_PASSWORD": credentials.mlflow_password,
        "PREFECT_API_AUTH_STRING": credentials.prefect_auth_string,
    }


def test_secrets_never_show_in_repr(tmp_path: Path) -> None:
    credentials, _ = auth.load_or_create(tmp_path / "auth.env")
    text = repr(credentials) + str(credentials)
    for secret in (credentials.mlflow_password, credentials.prefect_auth_string, credentials.flask_secret_key):
        assert secret not in text


def test_servers_get_the_admin_the_csrf_key_and_the_auth_string(tmp_path: Path) -> None:
    credentials = auth.Credentials.generate()
    ini = auth.write_mlflow_auth_config(tmp_path / "mlflow-auth.ini", "sqlite:////x/auth.db")
    env = credentials.mlflow_server_env(ini)
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(ini)
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == credentials.mlflow_password != "password1234"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == credentials.flask_secret_key
    assert credentials.prefect_server_env() == {"PREFECT_SERVER_API_AUTH_STRING": credentials.prefect_auth_string}
    text = ini.read_text()
    assert "database_uri = sqlite:////x/auth.db" in text and credentials.mlflow_password not in text


def test_a_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "auth.env"
    auth.load_or_create(path)
    path.chmod(0o644)
    with pytest.raises(MfpipeError, match=r"readable by others \(mode 644\); run: chmod 600"):
        auth.load_or_create(path)


def test_a_file_missing_a_variable_names_it_and_not_the_values(tmp_path: Path) -> None:
    path = tmp_path / "auth.env"
    credentials, _ = auth.load_or_create(path)
    kept = [line for line in path.read_text().splitlines() if not line.startswith("PREFECT_API_AUTH_STRING=")]
    path.write_text("\n".join(kept) + "\n")
    with pytest.raises(MfpipeError, match="missing PREFECT_API_AUTH_STRING") as caught:
        auth.load_or_create(path)
    assert credentials.mlflow_password not in str(caught.value)
