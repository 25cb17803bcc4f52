"""Alerts of `retrain/scheduled`: a failed run and a run that did not promote each call the webhook at once.

A tiny HTTP receiver on 127.0.0.1 (a free port) stands in for the team's chat hook. Serve mode:
`mfpipe deploy --alert-webhook-url` serves the deployment; a run on bad data fails, a first run promotes
(no alert), a second run on the same data keeps the champion; the receiver gets the failure and the
non-promotion, each naming its flow run, its state and its reason, and nothing for the run that promoted.
Work-pool mode: the automations are created from MFPIPE_ALERT_WEBHOOK_URL, updated in place from a TOML
config on redeploy, and removed by a deploy without a URL, which never reaches flow parameters or output.
The session's Prefect server runs everything `prefect server start` runs, its triggers and actions too.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from mfpipe import services

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = "retrain/scheduled"
RUN_TIMEOUT = 300
ALERT_TIMEOUT = 90

pytestmark = pytest.mark.slow


class Receiver:
    """Collects the JSON bodies POSTed to it; `url` is where to point the webhook."""

    def __init__(self) -> None:
        self.bodies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.arrivals: dict[str, datetime] = {}  # flow run id -> when its alert came
        received, arrivals = self.bodies, self.arrivals

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                alert = json.loads(body)
                arrivals[alert.get("flow_run_id", "")] = datetime.now(UTC)
                received.put(alert)
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((services.LOCALHOST, services.free_port()), Handler)
        self.url = f"http://{services.LOCALHOST}:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = ALERT_TIMEOUT) -> list[dict[str, Any]]:
        """The first `count` alerts, or fail after `timeout` with those that came."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                got.append(self.bodies.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"{len(got)} of {count} alerts within {timeout} s: {got}") from None
        return got


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    try:
        yield hook
    finally:
        hook.server.shutdown()
        hook.server.server_close()


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OPENBLAS_NUM_THREADS": "1", **extra}


def _automations() -> dict[str, list[Any]]:
    from prefect import get_client

    from flows import deploy

    with get_client(sync_client=True) as client:
        return {
            name: client.read_automations_by_name(name) for name in (deploy.ALERT_FAILED, deploy.ALERT_NOT_PROMOTED)
        }


def _wait_served(model: str, log: Path, process: subprocess.Popen, timeout: float = 180) -> Any:
    """The served deployment once it carries this test's config and its alerts exist."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name(DEPLOYMENT)
            if (
                deployment.parameters.get("config", {}).get("registered_model") == model
                and "Alerts: on" in log.read_text()
            ):
                return deployment
        except ObjectNotFound:
            pass
        time.sleep(1)
    raise AssertionError(f"not served within {timeout} s: {log.read_text()[-3000:]}")


def _run(parameters: dict[str, Any]) -> Any:
    from prefect.deployments import run_deployment

    return run_deployment(DEPLOYMENT, parameters=parameters, timeout=RUN_TIMEOUT, poll_interval=1, as_subflow=False)


def _decision_reason(tracking_uri: str, flow_run_id: UUID) -> str:
    """The promotion reason the run recorded on its MLflow parent run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    [parent] = client.search_runs(experiments, filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    return parent.data.tags["promotion.reason"]


def test_a_failed_run_and_a_run_that_keeps_the_champion_each_alert_with_their_reason(
    prefect_api: str, mlflow_tracking: str, tmp_path: Path, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    model = "mfpipe-services-alerts"
    config = tmp_path / "mfpipe.toml"
    config.write_text(f'registered_model = "{model}"\n')
    bad = tmp_path / "bad.csv"  # parses, but every rating is far outside [0.5, 5]: validation fails
    bad.write_text("user_id,item_id,rating,timestamp\n" + "".join(f"u{i},i{i % 7},42,{1_600_000_000 + i}\n"
                                                                    for i in range(200)))  # fmt: skip
    log = tmp_path / "serve.log"
    # A dataset no other services test uses: `--skip-unchanged` there compares with the dataset's last run.
    command = [sys.executable, "-m", "mfpipe", "deploy", "--data", "synthetic:12k", "--models", "pop",
               "--alert-webhook-url", receiver.url, "--config", str(config)]  # fmt: skip
    with log.open("wb") as out:
        serving = subprocess.Popen(command, env=_env(), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        deployment = _wait_served(model, log, serving)
        automations = _automations()
        assert [len(found) for found in automations.values()] == [1, 1]
        of_this_deployment = {"prefect.resource.id": f"prefect.deployment.{deployment.id}"}
        for [automation] in automations.values():
            assert automation.trigger.match_related.root == of_this_deployment
        good = deployment.parameters["config"]

        failed = _run({"config": {**good, "data": str(bad)}})
        assert failed.state.is_failed(), failed.state
        [alert] = receiver.wait_for(1)
        failed_seconds = (receiver.arrivals[str(failed.id)] - failed.state.timestamp).total_seconds()
        assert (alert["alert"], alert["flow_run"], alert["flow_run_id"], alert["state"]) == (
            "retrain failed", failed.name, str(failed.id), "Failed"
        )  # fmt: skip
        assert "rating" in alert["reason"] and alert["reason"] in failed.state.message, alert

        promoted = _run({"config": good})  # the first champion of this registered model: no alert
        assert promoted.state.is_completed(), log.read_text()[-3000:]
        kept = _run({"config": good})  # the same data and model again: not significantly better
        assert kept.state.is_completed(), log.read_text()[-3000:]
        [alert] = receiver.wait_for(1)
        kept_seconds = (receiver.arrivals[str(kept.id)] - kept.state.timestamp).total_seconds()
        assert (alert["alert"], alert["flow_run"], alert["flow_run_id"], alert["registered_model"]) == (
            "retrain did not promote", kept.name, str(kept.id), model
        )  # fmt: skip
        assert alert["state"] in ("Running", "Completed")  # the event comes from the promote task
        assert alert["reason"] == _decision_reason(mlflow_tracking, kept.id)
        assert "champion kept" in alert["reason"]
        time.sleep(3)
        assert receiver.bodies.empty(), receiver.bodies.get()  # nothing for the run that promoted
    finally:
        serving.send_signal(signal.SIGTERM)
        serving.wait(60)
    assert receiver.url not in log.read_text()  # the hook's URL (its token) is never printed
    with capsys.disabled():
        print(f"\n[alerts] webhook received {failed_seconds:+.1f} s after the Failed state, "
              f"{kept_seconds:+.1f} s after the kept-champion run's Completed state")  # fmt: skip


def test_deploy_creates_updates_and_removes_the_alerts(prefect_api: str, tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.blocks.webhook import Webhook

    from flows import deploy
    from mfpipe.config import load_config

    pool, first_url, second_url = "mfpipe-alerts", "http://127.0.0.1:9/first", "http://127.0.0.1:9/second"
    result = subprocess.run(
        [sys.executable, "-m", "mfpipe", "deploy", "--work-pool", pool, "--models", "pop"],
        env=_env(MFPIPE_ALERT_WEBHOOK_URL=first_url), cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Alerts: on failed / not promoted runs" in result.stdout
    assert first_url not in result.stdout + result.stderr
    created = {name: [a.id for a in found] for name, found in _automations().items()}
    assert [len(ids) for ids in created.values()] == [1, 1]
    assert Webhook.load(deploy.ALERT_BLOCK).url.get_secret_value() == first_url

    # Redeploy with the URL from a config file: the same automations, updated; the block points at the new URL.
    file = tmp_path / "mfpipe.toml"
    file.write_text(f'models = ["pop"]\nalert_webhook_url = "{second_url}"\n')
    deployed = deploy.register(load_config(file, environ={}), work_pool=pool, working_dir=tmp_path)
    assert deployed.alerts == (deploy.ALERT_FAILED, deploy.ALERT_NOT_PROMOTED)
    assert {name: [a.id for a in found] for name, found in _automations().items()} == created
    assert Webhook.load(deploy.ALERT_BLOCK).url.get_secret_value() == second_url
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(UUID(deployed.deployment_id))
    assert deployment.parameters == {"config": {"models": ["pop"]}}  # the URL is no flow parameter

    # Deploy without a URL: no alerts left, and no block holding the old URL.
    deployed = deploy.register(load_config(environ={}), work_pool=pool, working_dir=tmp_path)
    assert deployed.alerts == ()
    assert _automations() == {deploy.ALERT_FAILED: [], deploy.ALERT_NOT_PROMOTED: []}
    with pytest.raises(ValueError):
        Webhook.load(deploy.ALERT_BLOCK)
