"""Prefect plumbing of the retrain flow: console logs, retry condition, cache keys, the task runner.

Kept apart so `retrain.py` reads as the pipeline diagram. Nothing here computes anything.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from mfpipe.config import Config
from mfpipe.errors import MfpipeError
from mfpipe.lineage import stable_hash


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
    """Retry network and file-system hiccups, never a user error (bad file, bad config)."""
    exc = state.result(raise_on_failure=False)
    while exc is not None:
        if isinstance(exc, OSError | ConnectionError | TimeoutError):
            return True
        exc = exc.__cause__
    return False


def cache_key(stage: str, *sections: str) -> Any:
    """Cache key from the source key and the config sections the stage reads."""

    def key(context: Any, parameters: dict[str, Any]) -> str:
        config: Config = parameters["config"]
        parts = {name: getattr(config, name) for name in sections}
        return f"{stage}-{parameters['key']}-{stable_hash({k: str(v) for k, v in parts.items()})}"

    return key


def task_runner(config: Config, n_tasks: int) -> Any:
    """Threads by default; Dask on request, which needs a Prefect server (PREFECT_API_URL)."""
    if config.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=max(1, n_tasks))
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise MfpipeError("--task-runner dask needs a Prefect server: set PREFECT_API_URL (e.g. start `mfpipe up`)")
    from prefect_dask import DaskTaskRunner

    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address)
    local = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}  # never listen beyond this machine
    return DaskTaskRunner(cluster_kwargs={"n_workers": min(n_tasks, config.threads), "threads_per_worker": 1, **local})
