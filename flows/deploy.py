"""Deployment `retrain/scheduled`: nightly retraining, served in-process or run by a process worker.

Two ways to run the same deployment (name, cron schedule, `config` parameter):
- `serve`: this process creates the deployment and executes its runs itself (`flow.serve`); it keeps
  the schedule when it stops, so the scheduled runs wait for the next `mfpipe deploy`.
- `register`: the deployment goes to a work pool of type `process` (created if missing) and
  `prefect worker start --pool NAME` executes its runs; `prefect.yaml` describes the same deployment.

The entrypoint is the module path `flows.retrain.retrain` (the installed package), so runs do not depend
on the directory a worker starts in; runs of a work pool start in the directory `mfpipe deploy` ran in,
so relative paths in the config (data files, `sqlite:///mlruns/mlflow.db`) mean the same as for `mfpipe run`.

Both modes give the deployment a concurrency limit of one run (collision strategy ENQUEUE): a nightly run
that is still going when the next is due, or a manual run on top of a scheduled one, waits for its turn
instead of training beside it on the same cores. Both modes also set up the alerts (`configure_alerts`):
with `alert_webhook_url` set, two Prefect automations call that webhook when a run of this deployment
fails or crashes, and when a run's promotion step leaves `champion` where it was; each says which run
and why. Redeploying updates them; deploying without the URL removes them.
"""

from __future__ import annotations

import contextlib
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from flows._plumbing import NOT_PROMOTED_EVENT
from mfpipe.auth import mask_uri
from mfpipe.config import Config
from mfpipe.errors import MfpipeError

FLOW_NAME = "retrain"
DEPLOYMENT_NAME = "scheduled"
DEFAULT_CRON = "0 3 * * *"
DEFAULT_TIMEZONE = "UTC"
DEFAULT_WORK_POOL = "mfpipe"
WORK_POOL_TYPE = "process"
DESCRIPTION = "Nightly retraining: load, validate, split, train, evaluate, register, promote `champion`."
#: Runs of the deployment at once; more wait (ENQUEUE) rather than being cancelled (CANCEL_NEW).
CONCURRENCY_LIMIT = 1
#: The Prefect event the promote task emits when `champion` did not move; the alert listens for it.
#: The Webhook block holding `alert_webhook_url` on the Prefect server (the URL carries a token).
ALERT_BLOCK = "mfpipe-retrain-alerts"
ALERT_FAILED = "mfpipe: retrain/scheduled failed"
ALERT_NOT_PROMOTED = "mfpipe: retrain/scheduled did not promote"
#: JSON bodies the webhook receives, rendered by the Prefect server (Jinja; `tojson` quotes and escapes).
#: `flow_run` is the run the triggering event names; a failure's reason is its state message.
FAILED_PAYLOAD = """{"alert": "retrain failed", "deployment": "retrain/scheduled",
 "flow_run": {{ flow_run.name|tojson }}, "flow_run_id": {{ flow_run.id|string|tojson }},
 "state": {{ event.payload.validated_state.name|tojson }},
 "reason": {{ event.payload.validated_state.message|default("", true)|tojson }},
 "url": {{ flow_run|ui_url|tojson }}}"""
NOT_PROMOTED_PAYLOAD = """{"alert": "retrain did not promote", "deployment": "retrain/scheduled",
 "flow_run": {{ flow_run.name|tojson }}, "flow_run_id": {{ flow_run.id|string|tojson }},
 "state": {{ flow_run.state.name|tojson }}, "reason": {{ event.payload.reason|tojson }},
 "registered_model": {{ event.payload.registered_model|tojson }},
 "champion_version": {{ event.payload.champion_version|tojson }},
 "candidate_version": {{ event.payload.candidate_version|tojson }},
 "url": {{ flow_run|ui_url|tojson }}}"""


@dataclass(frozen=True)
class Deployed:
    """What `register`/`serve` created: the deployment's full name and id, the pool a worker must poll
    (None when served), and the names of the alert automations (empty: alerts off)."""

    name: str
    deployment_id: str
    work_pool: str | None
    alerts: tuple[str, ...] = ()


def parameters(config: Config) -> dict[str, Any]:
    """The deployment's `config` parameter: only what the user set (file, MFPIPE_* env, flags).

    Defaults that depend on the machine (data cache folder, thread count) are left to the machine that
    runs the flow. A tracking URI that carries a password is left out too (the server would keep it, and
    masked it is useless): workers then take `MLFLOW_TRACKING_URI` and MLflow's credential variables.
    """
    values = config.model_dump(mode="json", exclude_unset=True)
    uri = config.tracking_uri.get_secret_value() if config.tracking_uri else None
    if uri is not None and mask_uri(uri) != uri:
        values.pop("tracking_uri")
    return {"config": values}


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
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    return {
        "name": DEPLOYMENT_NAME,
        "schedules": [cron_schedule(cron, timezone)],
        "parameters": parameters(config),
        "description": DESCRIPTION,
        "tags": ["mfpipe"],
        "entrypoint_type": EntrypointType.MODULE_PATH,
        "concurrency_limit": ConcurrencyLimitConfig(
            limit=CONCURRENCY_LIMIT, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
    }


def serve(
    config: Config,
    cron: str = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    on_ready: Callable[[Deployed], None] | None = None,
) -> None:
    """Create `retrain/scheduled` and its alerts, then execute its runs from this process until SIGINT/SIGTERM.

    The deployment is applied before serving so that the alerts can name its id (serving applies it
    again, to the same id); `on_ready` hears about both before this blocks.
    The schedule is not paused on shutdown (`pause_on_shutdown=False`): Prefect would otherwise delete
    the scheduled runs when serving stops. Runs load the flow from its module entrypoint in a fresh
    `python -m prefect.engine` process, as a worker does (`flow.serve` would instead pickle the flow
    function by value, which loses the names its postponed annotations refer to, such as `Config`).
    """
    from prefect import serve as serve_deployments

    from flows.retrain import retrain

    if config.alert_webhook_url is not None:
        api_url("alert_webhook_url")  # alerts live on a server; the ephemeral API ends with this process
    deployment = retrain.to_deployment(**_deployment_options(config, cron, timezone))
    # Set explicitly so the update clears a work pool left by an earlier `--work-pool` deploy;
    # otherwise the server keeps routing runs to that pool and this process never sees them.
    deployment.work_pool_name = None
    deployment.work_queue_name = None
    deployment_id = _prefect_call(lambda: deployment.apply())
    alerts = _prefect_call(lambda: configure_alerts(config, deployment_id))
    if on_ready is not None:
        on_ready(Deployed(f"{FLOW_NAME}/{DEPLOYMENT_NAME}", str(deployment_id), None, alerts))
    serve_deployments(deployment, pause_on_shutdown=False)


def _prefect_call(call: Callable[[], Any]) -> Any:
    """`call()`, with an unreachable or failing Prefect API as one user error naming the URL."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    try:
        return call()
    except (httpx.HTTPError, OSError) as exc:
        raise MfpipeError(f"Prefect API {PREFECT_API_URL.value() or '(ephemeral)'} unreachable or failing: {exc}"
                          ) from None  # fmt: skip


def api_url(needed_by: str = "--work-pool") -> str:
    """The Prefect server a work pool or an alert lives on; neither can use the ephemeral in-process API."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise MfpipeError(
            f"{needed_by} needs a Prefect server: set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api after `mfpipe up`)"
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
        alerts = configure_alerts(config, deployment_id)
    except (httpx.HTTPError, OSError) as exc:
        raise MfpipeError(f"Prefect API {url} unreachable or failing: {exc}") from None
    return Deployed(f"{FLOW_NAME}/{DEPLOYMENT_NAME}", str(deployment_id), work_pool, alerts)


def alert_automations(deployment_id: UUID, block_id: UUID) -> list[Any]:
    """The two alerts of deployment `deployment_id`, both calling the Webhook block `block_id`.

    Failed: a run of this deployment entering Failed or Crashed (the server's own state-change event,
    whatever stopped the run: bad data, an unreachable store, a killed worker). Not promoted: the
    `NOT_PROMOTED_EVENT` the promote task emits, with the decision's reason, from runs of this
    deployment only (the event names the deployment among its related resources), so an ad hoc
    `mfpipe run` on a laptop never pages anyone. Reactive, one call per event, per flow run.
    """
    from prefect.events.actions import CallWebhook
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    of_deployment = {"prefect.resource.id": f"prefect.deployment.{deployment_id}"}

    def automation(name: str, description: str, trigger: EventTrigger, payload: str) -> AutomationCore:
        action = CallWebhook(block_document_id=block_id, payload=payload)
        return AutomationCore(name=name, description=description, tags=["mfpipe"], trigger=trigger, actions=[action])

    return [
        automation(
            ALERT_FAILED, "A scheduled retraining run failed or crashed; the webhook gets its state message.",
            EventTrigger(match={"prefect.resource.id": "prefect.flow-run.*"}, match_related=of_deployment,
                         expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                         for_each={"prefect.resource.id"}, posture=Posture.Reactive, threshold=1),
            FAILED_PAYLOAD,
        ),
        automation(
            ALERT_NOT_PROMOTED, "A scheduled retraining run kept the old champion; the webhook gets the reason.",
            EventTrigger(match_related=of_deployment, expect={NOT_PROMOTED_EVENT},
                         for_each={"prefect.resource.id"}, posture=Posture.Reactive, threshold=1),
            NOT_PROMOTED_PAYLOAD,
        ),
    ]  # fmt: skip


def configure_alerts(config: Config, deployment_id: UUID) -> tuple[str, ...]:
    """Make the server's alerts match `config.alert_webhook_url`; the names of the automations now in place.

    Idempotent: the Webhook block is overwritten and each automation, found by name, updated in place
    (duplicates by that name, e.g. from a race of two deploys, are removed). Without a URL the
    automations and the block are deleted: the config is the one place alerts are decided.
    Not owned by the deployment (`owner_resource`): Prefect deletes a deployment's owned automations
    each time it is applied, and `serve` applies it after this.
    """
    from prefect import get_client
    from prefect.blocks.webhook import Webhook
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        wanted: list[Any] = []
        if config.alert_webhook_url is not None:
            block = Webhook(method="POST", url=config.alert_webhook_url, headers={"Content-Type": "application/json"})
            wanted = alert_automations(deployment_id, block.save(ALERT_BLOCK, overwrite=True))
        by_name = {a.name: a for a in wanted}
        for name in (ALERT_FAILED, ALERT_NOT_PROMOTED):
            existing = client.read_automations_by_name(name)
            if name in by_name and existing:
                client.update_automation(existing[0].id, by_name[name])
                existing = existing[1:]
            elif name in by_name:
                client.create_automation(by_name[name])
            for stale in existing:
                client.delete_automation(stale.id)
        if not wanted:
            with contextlib.suppress(ObjectNotFound):
                client.delete_block_document(client.read_block_document_by_name(ALERT_BLOCK, "webhook").id)
    return tuple(by_name)
