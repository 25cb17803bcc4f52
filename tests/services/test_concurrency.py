"""Promotion is one at a time across processes and hosts; runs of the deployment are one at a time too.

Two `mfpipe run` processes train different models on the same data for the same registered model, against
the session's MLflow server on PostgreSQL and Prefect server (PREFECT_API_URL set, so `promotion_slot`
takes the Prefect global concurrency limit). Each gets its own XDG_STATE_HOME and PREFECT_HOME, as two
hosts would: the library's file lock then lives in two different folders and cannot serialise them, so
only the global limit can. To make them collide for sure, the test itself holds the promotion slot until
both runs wait in their promote task, then lets go: both ask for the slot in the same second.

The deployment's own limit (one run at a time, ENQUEUE) is read back from the API for both ways of
deploying (`mfpipe deploy`'s code and `prefect deploy` of prefect.yaml) and exercised on the server's
orchestration: a second run proposed Pending while the first holds the slot is told to wait.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from mfpipe import services

ROOT = Path(__file__).resolve().parents[2]
DATA = "synthetic:20k"
TIMEOUT = 420

pytestmark = pytest.mark.slow


def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


def _host_env(tmp_path: Path, host: str) -> dict[str, str]:
    """A child's environment as if on its own host: own state folder (promotion file lock), own Prefect home."""
    home = tmp_path / host
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ, "PYTHONPATH": path, "OPENBLAS_NUM_THREADS": "1",
        "XDG_STATE_HOME": str(home / "state"), "XDG_CACHE_HOME": str(home / "cache"),
        "PREFECT_HOME": str(home / "prefect"),
    }  # fmt: skip


def _running_promotions(since: datetime) -> set[UUID]:
    """Flow runs whose `promote` task is running now (here: waiting for the promotion slot)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        TaskRunFilter,
        TaskRunFilterName,
        TaskRunFilterStartTime,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    running = TaskRunFilter(
        name=TaskRunFilterName(like_="promote"),
        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING])),
        start_time=TaskRunFilterStartTime(after_=since),
    )
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=running)
    # Task run names are the task's name plus a suffix ("promote-3f2"); `like_` matches any part.
    return {t.flow_run_id for t in runs if t.flow_run_id and t.name.rsplit("-", 1)[0] == "promote"}


def _slot_intervals(flow_run_id: UUID, limit_name: str) -> tuple[datetime, datetime, float]:
    """When the run took and released the promotion slot (its log lines, both inside the held slot), and its wait."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    taken = [log for log in logs if log.message.startswith(f"Promotion slot {limit_name} taken")]
    released = [log for log in logs if log.message.startswith(f"Promotion slot {limit_name} released")]
    assert len(taken) == len(released) == 1, [log.message for log in logs]
    waited = float(re.search(r"waiting ([\d.]+) s", taken[0].message).group(1))  # type: ignore[union-attr]
    return taken[0].timestamp, released[0].timestamp, waited


def test_two_runs_at_once_promote_one_after_the_other(
    prefect_api: str, mlflow_tracking: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.exceptions import MlflowException
    from prefect import get_client
    from prefect.concurrency.sync import concurrency

    model = "mfpipe-services-concurrent"
    limit_name = f"mfpipe-promote-{model}"  # what promotion_slot takes
    # The same data and split; one run trains a popularity baseline, the other a barely trained BPR.
    configs = {
        "pop": f'registered_model = "{model}"\nmodels = ["pop"]\n',
        "bpr": f'registered_model = "{model}"\nmodels = ["bpr"]\n'
        "[model_params.bpr]\nepochs = 1\nlearning_rate = 0.0001\n",
    }
    client = _client(mlflow_tracking)
    with get_client(sync_client=True) as prefect:
        prefect.upsert_global_concurrency_limit_by_name(limit_name, limit=1)

    started = time.monotonic()
    since = datetime.now(UTC)
    processes: dict[str, subprocess.Popen] = {}
    with concurrency(limit_name, occupy=1, timeout_seconds=60, strict=True):  # the gate: held by this test
        for name, text in configs.items():
            (tmp_path / f"{name}.toml").write_text(text)
            config, report = tmp_path / f"{name}.toml", tmp_path / f"{name}.json"
            command = [sys.executable, "-m", "mfpipe", "run", "--data", DATA, "--config", str(config),
                       "--json-report", str(report)]  # fmt: skip
            with (tmp_path / f"{name}.log").open("wb") as log:
                processes[name] = subprocess.Popen(
                    command, env=_host_env(tmp_path, name), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
                )
        deadline = time.monotonic() + TIMEOUT
        while len(waiting := _running_promotions(since)) < 2:
            exited = {n: p.returncode for n, p in processes.items() if p.poll() is not None}
            assert not exited and time.monotonic() < deadline, (exited, _tails(tmp_path))
            time.sleep(1)
        gated = time.monotonic()
        # Both runs are in their promote task and have registered their versions; neither may promote yet.
        with pytest.raises(MlflowException):
            client.get_model_version_by_alias(model, "champion")
        time.sleep(3)  # a run that ignored the slot would have moved `champion` by now
        with pytest.raises(MlflowException):
            client.get_model_version_by_alias(model, "champion")
    for process in processes.values():
        assert process.wait(TIMEOUT) == 0, _tails(tmp_path)
    finished = time.monotonic()

    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in configs}
    [pop], [bpr] = reports["pop"]["models"], reports["bpr"]["models"]
    assert pop["metrics"]["ndcg@10"] > bpr["metrics"]["ndcg@10"] + 0.05  # clearly the better one

    # Each process's model registered exactly once: two versions, one per run, none lost or doubled.
    versions = client.search_model_versions(f"name = '{model}'")
    assert sorted(v.version for v in versions) == sorted([pop["version"], bpr["version"]])
    parents = {name: client.get_run(r["run_id"]).data.tags["mlflow.parentRunId"] for name, r in
               (("pop", pop), ("bpr", bpr))}  # fmt: skip
    assert len(set(parents.values())) == 2
    for version in versions:
        owner = client.get_run(version.run_id).data.tags["mlflow.parentRunId"]
        assert owner == parents[version.tags["model"]]

    # The better one is champion, whichever promoted first; the later run's decision names the rule.
    assert client.get_model_version_by_alias(model, "champion").version == pop["version"]
    flow_runs = {name: UUID(client.get_run(parents[name]).data.tags["prefect.flow_run_id"]) for name in configs}
    assert set(flow_runs.values()) == waiting
    slots = {name: _slot_intervals(flow_runs[name], limit_name) for name in configs}
    first, second = sorted(configs, key=lambda name: slots[name][0])
    assert slots[first][1] < slots[second][0], slots  # the two promotions did not overlap
    later = reports[second]["champion"]
    if second == "pop":
        assert later["promoted"] and later["before"]["version"] == bpr["version"], later
    else:
        assert not later["promoted"] and later["after"]["version"] == pop["version"], later
        assert "significant" in later["reason"]
    assert reports[first]["champion"]["promoted"]  # no champion before it: its best is promoted

    with get_client(sync_client=True) as prefect:
        for flow_run_id in flow_runs.values():
            assert prefect.read_flow_run(flow_run_id).state.is_completed()
    with capsys.disabled():
        print(
            f"\n[concurrency] gate reached after {gated - started:.1f} s, both done {finished - gated:.1f} s later; "
            f"{first} promoted first, {second} waited {slots[second][2]:.1f} s for the slot; "
            f"slots {first} {slots[first][0]:%H:%M:%S.%f}-{slots[first][1]:%H:%M:%S.%f}, "
            f"{second} {slots[second][0]:%H:%M:%S.%f}-{slots[second][1]:%H:%M:%S.%f}"
        )


def _tails(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(tmp_path.glob("*.log")))


def _assert_one_run_at_a_time(deployment_id: UUID) -> None:
    from prefect import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Completed, Pending, Running

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
        assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
        assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
        first, second = (client.create_flow_run_from_deployment(deployment_id) for _ in range(2))
        try:
            assert client.set_flow_run_state(first.id, Pending()).status == SetStateStatus.ACCEPT
            queued = client.set_flow_run_state(second.id, Pending())
            # ENQUEUE: told to wait (a Scheduled state named AwaitingConcurrencySlot), not cancelled.
            assert queued.status != SetStateStatus.ACCEPT
            assert client.read_flow_run(second.id).state.name == "AwaitingConcurrencySlot"
            client.set_flow_run_state(first.id, Running())
            client.set_flow_run_state(first.id, Completed())
            assert client.set_flow_run_state(second.id, Pending()).status == SetStateStatus.ACCEPT
        finally:  # give the slot back whatever happened: later tests run this deployment
            for run in (first, second):
                state = client.read_flow_run(run.id).state
                if state is not None and not state.is_final():
                    if state.is_pending():
                        client.set_flow_run_state(run.id, Running())
                    client.set_flow_run_state(run.id, Completed())


def test_the_deployment_runs_one_at_a_time_whichever_way_it_is_deployed(prefect_api: str, tmp_path: Path) -> None:
    from prefect import get_client

    from flows import deploy
    from mfpipe.config import Config

    deploy.ensure_work_pool(deploy.DEFAULT_WORK_POOL)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    result = subprocess.run(
        [services.executable("prefect"), "--no-prompt", "deploy", "--all"],
        env={**os.environ, "PYTHONPATH": path}, cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    with get_client(sync_client=True) as client:
        from_yaml = client.read_deployment_by_name("retrain/scheduled")
    _assert_one_run_at_a_time(from_yaml.id)

    deployed = deploy.register(Config(registered_model="mfpipe-services-queue"), work_pool="mfpipe-queue",
                               working_dir=tmp_path)  # fmt: skip
    assert deployed.alerts == ()  # no alert_webhook_url: no automations
    _assert_one_run_at_a_time(UUID(deployed.deployment_id))
