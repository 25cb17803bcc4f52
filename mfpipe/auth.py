"""Credentials for the servers' auth: MLflow's `basic-auth` app and Prefect's API auth string.

`mfpipe up --auth` keeps them in `.mfpipe/auth.env` (mode 600, git-ignored), created with random secrets
on first use, in the clients' own variable names, so `set -a; . .mfpipe/auth.env; set +a` is all a shell
needs: MLflow's client reads MLFLOW_TRACKING_USERNAME/PASSWORD, Prefect's reads PREFECT_API_AUTH_STRING,
and MLFLOW_FLASK_SERVER_SECRET_KEY is the server's CSRF key. `docker/.env` holds the same names for the
compose stack. No secret is ever printed or logged: `Credentials` hides them from its repr, and errors
about the file name keys, never values.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mfpipe.errors import MfpipeError

AUTH_ENV = Path(".mfpipe/auth.env")
#: Who mfpipe creates: MLflow's admin user and the user part of Prefect's `user:password`.
USERNAME = "mfpipe"
KEYS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "PREFECT_API_AUTH_STRING",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)
_PASSWORD_IN_URI = re.compile(r"(://[^:/@\s]+:)[^@/\s]*@")


def mask_uri(uri: str) -> str:
    """A URI fit for logs, errors, tags and reports: a password in it becomes ***
    (`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`)."""
    return _PASSWORD_IN_URI.sub(r"\1***@", uri)


#: MLflow's own HTTP Basic check (the `basic-auth` app's default, written out so the INI is complete).
MLFLOW_AUTHORIZATION_FUNCTION = "mlflow.server.auth:authenticate_request_basic_auth"


@dataclass(frozen=True)
class Credentials:
    """One user for both servers; the secrets stay out of repr so a log line or traceback cannot show them."""

    mlflow_username: str
    mlflow_password: str = field(repr=False)
    prefect_auth_string: str = field(repr=False)
    flask_secret_key: str = field(repr=False)

    @classmethod
    def generate(cls) -> Credentials:
        """Fresh random secrets (MLflow wants >= 12 characters; 32 bytes of entropy each)."""
        return cls(
            mlflow_username=USERNAME,
            mlflow_password=secrets.token_urlsafe(32),
            prefect_auth_string=f"{USERNAME}:{secrets.token_urlsafe(32)}",
            flask_secret_key=secrets.token_hex(32),
        )

    @classmethod
    def from_env(cls, values: Mapping[str, str], where: str) -> Credentials:
        """From the four variables (a file or a process environment); a missing or empty one is an error."""
        missing = [key for key in KEYS if not values.get(key)]
        if missing:
            raise MfpipeError(f"{where}: missing {', '.join(missing)} (delete the file to create new credentials)")
        return cls(*(values[key] for key in KEYS))

    def as_env(self) -> dict[str, str]:
        """The four variables, in the clients' names (what the file holds)."""
        return dict(zip(KEYS, (self.mlflow_username, self.mlflow_password, self.prefect_auth_string,
                               self.flask_secret_key), strict=True))  # fmt: skip

    def client_env(self) -> dict[str, str]:
        """What a client process (mfpipe run, a worker, a flow run) needs to talk to both servers."""
        env = self.as_env()
        del env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
        return env

    def mlflow_server_env(self, auth_config: Path | str) -> dict[str, str]:
        """`mlflow server --app-name basic-auth`: its config file, the admin it creates, the CSRF key."""
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
            "MLFLOW_AUTH_ADMIN_USERNAME": self.mlflow_username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.mlflow_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.flask_secret_key,
        }

    def prefect_server_env(self) -> dict[str, str]:
        """`prefect server start` with `server.api.auth_string`: every API call but health needs it."""
        return {"PREFECT_SERVER_API_AUTH_STRING": self.prefect_auth_string}


def _parse(text: str) -> dict[str, str]:
    """`KEY=VALUE` lines (comments and blank lines skipped), as a shell would source them."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip().strip("'\"")
    return values


def _write_new(path: Path, credentials: Credentials) -> None:
    """Create `path` with mode 600 from the start (never a moment world-readable); fails if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# mfpipe up --auth: credentials of the local Prefect and MLflow servers. Keep private.",
             "# Use in a shell: set -a; . .mfpipe/auth.env; set +a"]  # fmt: skip
    lines += [f"{key}={value}" for key, value in credentials.as_env().items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write("\n".join(lines) + "\n")


def load_or_create(path: Path = AUTH_ENV) -> tuple[Credentials, bool]:
    """The credentials in `path`, created with random secrets if it is absent; True when just created.

    A file that others can read is refused (as ssh refuses a private key): its secrets may have leaked.
    """
    created = False
    if not path.exists():
        try:
            _write_new(path, Credentials.generate())
            created = True
        except FileExistsError:  # another process created it meanwhile: use theirs
            pass
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise MfpipeError(f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise MfpipeError(f"{path}: cannot read the credentials ({type(exc).__name__})") from None
    return Credentials.from_env(_parse(text), str(path)), created


#: Seconds a checked login is cached by the MLflow server: without it every request re-runs the PBKDF2
#: password hash, which made a flow run's MLflow logging take minutes instead of seconds (measured, 2 cores).
#: With the one worker mfpipe runs, a password changed through the API takes effect at once.
MLFLOW_AUTH_CACHE_SECONDS = 60


def write_mlflow_auth_config(path: Path, database_uri: str, default_permission: str = "READ") -> Path:
    """The `basic-auth` app's INI file: where its users live; the admin and password come from the environment.

    No secret goes into this file (MLFLOW_AUTH_ADMIN_PASSWORD carries the admin's), so it needs no
    protection beyond the auth database's own.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {database_uri}\n"
        f"authorization_function = {MLFLOW_AUTHORIZATION_FUNCTION}\n"
        f"auth_cache_ttl_seconds = {MLFLOW_AUTH_CACHE_SECONDS}\n"
    )
    return path
