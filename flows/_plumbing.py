"""Prefect plumbing of the retrain flow: the process it runs in, console logs, retry condition, cache keys,
the task runner.

Kept apart so `retrain.py` reads as the pipeline diagram. Nothing here computes anything.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from mfpipe import services
from mfpipe.config import Config
from mfpipe.errors import MfpipeError, is_transient
from mfpipe.lineage import stable_hash

#: How long a run waits for another run's promotion of the same model before it fails.
PROMOTION_WAIT_SECONDS = 1800


class _UserErrorOnce(logging.Filter):
    """Keep a user error (MfpipeError) off the console: the CLI prints it once, as one line, no traceback.

    Prefect would log it with a traceback for the task and again for the flow. The records still reach
    the Prefect API (this filter sits on the console handlers only), so the UI keeps the whole story.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, MfpipeError) and "MfpipeError" not in record.getMessage()


def console_logs_to_stdout() -> None:
    """Prefect's console logs go to stdout beside the leaderboard; stderr is left to errors of mfpipe.

    The handlers are bound to `sys.stdout` as it is now: `mfpipe run --json`, whose stdout is the report
    alone, calls this with `sys.stdout` pointed at stderr, so there the logs go to stderr.
    """
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()
    loggers = [
        logging.getLogger(),
        *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)),
    ]
    for handler in {h for logger in loggers for h in logger.handlers if isinstance(h, PrefectConsoleHandler)}:
        handler.setStream(sys.stdout)
        handler.console.file = sys.stdout  # the rich console it prints through keeps its own stream
        handler.addFilter(_UserErrorOnce())


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Retry network and server hiccups (TransientError, OS errors), never a user error (bad file, bad config)."""
    return is_transient(state.result(raise_on_failure=False))


if TYPE_CHECKING:  # mfpipe.promotion imports MLflow: seconds that `mfpipe deploy` does not need
    from mfpipe.promotion import Decision

#: The event a run that kept the old champion emits; `mfpipe deploy`'s not-promoted alert matches it.
NOT_PROMOTED_EVENT = "mfpipe.retrain.not-promoted"

#: Options of the tasks that talk to the tracking store: retried on connection failures only.
STORE_TASK: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 3, "retry_condition_fn": retry_on_io,
                              "cache_policy": NO_CACHE}  # fmt: skip


def cache_key(stage: str, *sections: str) -> Any:
    """Cache key from the source key and the config sections the stage reads."""

    def key(context: Any, parameters: dict[str, Any]) -> str:
        config: Config = parameters["config"]
        parts = {name: getattr(config, name) for name in sections}
        return f"{stage}-{parameters['key']}-{stable_hash({k: str(v) for k, v in parts.items()})}"

    return key


#: The API of the ephemeral Prefect server this process started for itself (`own_api`).
_OWN_APIS: set[str] = set()


def shared_api() -> str | None:
    """The Prefect API that other processes share (PREFECT_API_URL); None without one, or with this process's own."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return url if url and url not in _OWN_APIS else None


@contextmanager
def own_api(api: services.Service | None) -> Iterator[None]:
    """Run against `api`, the ephemeral Prefect server `mfpipe run` started early, unless Prefect has one.

    Prefect is pointed at it through PREFECT_API_URL (its threads read the process-wide settings),
    with an empty PREFECT_UI_URL: the server has no UI, so no "View at" link is logged, as with
    Prefect's own ephemeral API; `shared_api` still says there is no shared server. Its log and event
    workers are drained before the caller stops the server, as Prefect's own test harness does:
    nothing is sent to a gone server.
    """
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if api is None or PREFECT_API_URL.value():  # a server named in a Prefect profile: the early one is not needed
        if api is not None:
            api.process.terminate()
        yield
        return
    url = f"{api.url}/api"
    prior = {name: os.environ.get(name) for name in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    _OWN_APIS.add(url)
    os.environ["PREFECT_API_URL"] = url
    os.environ.setdefault("PREFECT_UI_URL", "")
    refresh_global_settings_context()
    try:
        services.wait_healthy([api], timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        yield
    finally:
        _drain_prefect_workers()
        for name, value in prior.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        refresh_global_settings_context()
        _OWN_APIS.discard(url)


@contextmanager
def in_this_process(config: Config, api: services.Service | None) -> Iterator[None]:
    """Ready this process for a run of the flow on `api` (see `own_api`), its console logs on stdout.

    MLflow and matplotlib take seconds to import and the store seconds to open; a background thread
    does that while the API finishes starting (a separate process), so the waits overlap. Then what
    is in memory is frozen out of the garbage collector: the run's full collections no longer walk
    the million objects of the imported libraries (seconds per run, and again at exit).
    """
    from mfpipe import recording  # imports MLflow: seconds that `mfpipe deploy` does not need

    threading.Thread(target=recording.warm_up, args=(config,), name="mfpipe-warm-up", daemon=True).start()
    with own_api(api), no_heartbeats():
        console_logs_to_stdout()
        gc.freeze()
        yield


@contextmanager
def no_heartbeats() -> Iterator[None]:
    """No flow-run heartbeats from this process unless they are configured.

    Prefect's flow engine sends one every 180 s by default from a thread that sleeps a second at a time,
    and joins that thread when the run ends: every `mfpipe run` waited up to a second (half on average)
    for it. Heartbeats only feed an automation that marks silent runs crashed, which mfpipe does not
    create. A frequency set in the environment or a profile is kept; runs that a worker starts (the
    deployments) never come through here and keep Prefect's default.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _drain_prefect_workers() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()


def task_runner(config: Config, n_tasks: int) -> Any:
    """Threads by default; Dask on request, which needs a Prefect server (PREFECT_API_URL)."""
    if config.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=max(1, n_tasks))
    if shared_api() is None:
        raise MfpipeError("--task-runner dask needs a Prefect server: set PREFECT_API_URL (e.g. start `mfpipe up`)")
    from prefect_dask import DaskTaskRunner

    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address)
    local = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}  # never listen beyond this machine
    return DaskTaskRunner(cluster_kwargs={"n_workers": min(n_tasks, config.threads), "threads_per_worker": 1, **local})


@contextmanager
def promotion_slot(registered_model: str) -> Iterator[None]:
    """One promotion of `registered_model` at a time across hosts: a Prefect global concurrency limit.

    Only with a Prefect server (PREFECT_API_URL): the ephemeral API lives in this process, where the
    library's file lock already serialises promotions on this host. The run's log says when the slot
    was taken (and how long the run waited for another's promotion) and when it is given back: both
    lines fall inside the held slot, so the logs of two runs show that their promotions did not overlap.
    """
    if shared_api() is None:
        yield
        return
    from prefect import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import MissingContextError

    name = f"mfpipe-promote-{registered_model}"
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    try:
        logger: logging.Logger | logging.LoggerAdapter = get_run_logger()  # its lines reach the Prefect API
    except MissingContextError:  # called outside a flow or task run
        logger = logging.getLogger("mfpipe.promotion")
    asked = time.monotonic()
    with concurrency(name, occupy=1, timeout_seconds=PROMOTION_WAIT_SECONDS, strict=True):
        taken = time.monotonic()
        logger.info(f"Promotion slot {name} taken after waiting {taken - asked:.1f} s")
        try:
            yield
        finally:
            logger.info(f"Promotion slot {name} released after {time.monotonic() - taken:.1f} s")


def emit_not_promoted(decision: Decision) -> None:
    """Tell the Prefect server that this run left `champion` where it was, and why (the alert's trigger).

    Called from the promote task, so Prefect attaches the flow run, its flow and its deployment as
    related resources; the not-promoted alert matches on the deployment.
    """
    from prefect.events import emit_event

    name = decision.registered_model
    emit_event(
        NOT_PROMOTED_EVENT,
        resource={"prefect.resource.id": f"mfpipe.registered-model.{name}", "prefect.resource.name": name},
        payload={
            "reason": decision.reason,
            "registered_model": name,
            "rule": decision.rule,
            "candidate_version": decision.candidate.version if decision.candidate else None,
            "champion_version": decision.after_version,
        },
    )
