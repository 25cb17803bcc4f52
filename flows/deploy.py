"""Deployment `retrain/scheduled`: nightly retraining, served in-process or run by a process worker.

Two ways to run the same deployment (name, cron schedule, `config` parameter):
- `serve`: this process creates the deployment and executes its runs itself (`flow.serve`); it keeps
  the schedule when it stops, so the scheduled runs wait for the next `mfpipe deploy`.
- `register`: the deployment goes to a work pool of type `process` (created if missing) and
  `prefect worker start --pool NAME` executes its runs; `prefect.yaml` describes the same deployment.

The entrypoint is the module path `flows.retrain.retrain` (the installed package), so runs do not depend
on the directory a worker starts in; runs of a work pool start in the directory `mfpipe deploy` ran in,
so relative paths in the config (data files, `sqlite:///mlruns/mlflow.db`) mean the same as for `mfpipe run`.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mfpipe.config import Config
from mfpipe.errors import MfpipeError

FLOW_NAME = "retrain"
DEPLOYMENT_NAME = "scheduled"
DEFAULT_CRON = "0 3 * * *"
DEFAULT_TIMEZONE = "UTC"
DEFAULT_WORK_POOL = "mfpipe"
WORK_POOL_TYPE = "process"
DESCRIPTION = "Nightly retraining: load, validate, split, train, evaluate, register, promote `champion`."


@dataclass(frozen=True)
class Deployed:
    """What `register` created: the deployment's full name and id, and the pool a worker must poll."""

    name: str
    deployment_id: str
    work_pool: str


def parameters(config: Config) -> dict[str, Any]:
    """The deployment's `config` parameter: only what the user set (file, MFPIPE_* env, flags).

    Defaults that depend on the machine (data cache folder, thread count) are left to the machine that
    runs the flow.
    """
    return {"config": config.model_dump(mode="json", exclude_unset=True)}


def cron_schedule(cron: str, timezone: str) -> Any:
    """A Prefect cron schedule; a bad expression or time zone is a user error naming it."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron
    from pydantic import ValidationError

    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise MfpipeError(f"--timezone {timezone!r}: not an IANA time zone (e.g. UTC, Europe/Berlin)") from None
    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError:
        raise MfpipeError(f"--cron {cron!r}: not a valid cron expression (e.g. '0 3 * * *': 03:00 every day)") from None
    return Cron(cron, timezone=timezone)


def _deployment_options(config: Config, cron: str, timezone: str) -> dict[str, Any]:
    from prefect.types.entrypoint import EntrypointType

    return {
        "name": DEPLOYMENT_NAME,
        "schedules": [cron_schedule(cron, timezone)],
        "parameters": parameters(config),
        "description": DESCRIPTION,
        "tags": ["mfpipe"],
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }


def serve(config: Config, cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TIMEZONE) -> None:
    """Create `retrain/scheduled` and execute its runs from this process until SIGINT/SIGTERM.

    The schedule is not paused on shutdown (`pause_on_shutdown=False`): Prefect would otherwise delete
    the scheduled runs when serving stops. Runs load the flow from its module entrypoint in a fresh
    `python -m prefect.engine` process, as a worker does (`flow.serve` would instead pickle the flow
    function by value, which loses the names its postponed annotations refer to, such as `Config`).
    """
    from prefect import serve as serve_deployments

    from flows.retrain import retrain

    deployment = retrain.to_deployment(**_deployment_options(config, cron, timezone))
    # Set explicitly so the update clears a work pool left by an earlier `--work-pool` deploy;
    # otherwise the server keeps routing runs to that pool and this process never sees them.
    deployment.work_pool_name = None
    deployment.work_queue_name = None
    serve_deployments(deployment, pause_on_shutdown=False)


def api_url() -> str:
    """The Prefect server a work pool lives on; a worker cannot use the ephemeral in-process API."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise MfpipeError(
            "--work-pool needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api after `mfpipe up`)"
        )
    return url


def ensure_work_pool(name: str) -> None:
    """Create a `process` work pool `name` unless it exists; an existing pool of another type is an error."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type=WORK_POOL_TYPE, base_job_template=template))
            return
    if pool.type != WORK_POOL_TYPE:
        raise MfpipeError(f"work pool {name!r} has type {pool.type!r}; mfpipe needs a {WORK_POOL_TYPE!r} pool")


def register(
    config: Config,
    cron: str = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    work_pool: str = DEFAULT_WORK_POOL,
    working_dir: Path | None = None,
) -> Deployed:
    """Create or update `retrain/scheduled` on `work_pool` for `prefect worker start --pool work_pool`."""
    import httpx

    url = api_url()
    options = _deployment_options(config, cron, timezone)
    try:
        ensure_work_pool(work_pool)
        from flows.retrain import retrain

        deployment = retrain.to_deployment(
            **options, job_variables={"working_dir": str((working_dir or Path.cwd()).resolve())}
        )
        deployment_id = deployment.apply(work_pool_name=work_pool)
    except (httpx.HTTPError, OSError) as exc:
        raise MfpipeError(f"Prefect API {url} unreachable or failing: {exc}") from None
    return Deployed(f"{FLOW_NAME}/{DEPLOYMENT_NAME}", str(deployment_id), work_pool)
