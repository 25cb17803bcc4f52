"""The command that starts the local servers: `up`.

Each is a plain function; `mfpipe.cli` registers it on the app. Heavy imports stay inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mfpipe.auth import mask_uri
from mfpipe.commands.options import (
    ConfigFile,
)


# -- up --
def up(
    prefect_port: Annotated[int, typer.Option("--prefect-port", help="Port of the Prefect server.")] = 4200,
    mlflow_port: Annotated[int, typer.Option("--mlflow-port", help="Port of the MLflow UI.")] = 5000,
    config: ConfigFile = None,
    auth: Annotated[
        bool,
        typer.Option("--auth", help="Require logins (MLflow basic-auth, Prefect auth string); see .mfpipe/auth.env."),
    ] = False,
) -> None:
    """Start a local Prefect server and the MLflow UI on 127.0.0.1 (project's store); Ctrl-C stops both."""
    from mfpipe import auth as credentials_file
    from mfpipe import services, tracking
    from mfpipe.config import load_config

    store = tracking.open_store(load_config(config).tracking_uri)
    artifacts = store.artifact_root or Path("mlruns/artifacts")
    credentials = None
    if auth:
        credentials, created = credentials_file.load_or_create(services.UP_STATE_DIR / "auth.env")
        state = "created with new random secrets" if created else "existing"
        typer.echo(f"Auth on: credentials in {services.UP_STATE_DIR / 'auth.env'} ({state}, mode 600).")

    def ready(result: services.UpResult) -> None:
        prefect, mlflow = result.services
        typer.echo(f"Prefect UI  {prefect.url}    (API {services.prefect_api_url(prefect)})")
        typer.echo(f"MLflow UI   {mlflow.url}    (store {mask_uri(store.uri)})")
        typer.echo(f"Both answered in {result.seconds_to_healthy:.1f} s. In another shell:")
        typer.echo(f"  export PREFECT_API_URL={services.prefect_api_url(prefect)}")
        if credentials is not None:  # the file's path, never its secrets
            typer.echo(f"  set -a; . {services.UP_STATE_DIR / 'auth.env'}; set +a   # log in (UIs: the same user)")
        typer.echo("Ctrl-C stops both.")

    typer.echo(f"Starting the Prefect server and the MLflow UI (logs in {services.UP_LOG_DIR}) ...")
    services.up(prefect_port, mlflow_port, store.uri, artifacts, services.UP_LOG_DIR, ready, auth=credentials)
    typer.echo("Stopped the Prefect server and the MLflow UI.")
