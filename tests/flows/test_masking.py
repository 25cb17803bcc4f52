"""A tracking URI that carries a password never shows it: config dumps, flow parameters, errors, logs,
run links, the UI command, deployment parameters. The flow itself still gets the real URI."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from flows.retrain import retrain
from mfpipe import tracking
from mfpipe.config import load_config
from mfpipe.services import free_port

SECRET = "s3cret-Pw"


@pytest.fixture
def uri() -> str:
    return f"http://admin:{SECRET}@127.0.0.1:{free_port()}"


def test_config_dumps_and_repr_mask_the_password(uri):
    config = load_config(overrides={"tracking_uri": uri})
    assert SECRET not in json.dumps(config.model_dump(mode="json")) and SECRET not in repr(config)
    assert config.model_dump(mode="json")["tracking_uri"] == uri.replace(SECRET, "***")
    assert tracking.resolve_uri(config.tracking_uri) == uri  # the store itself gets the real one


def test_store_links_and_commands_are_masked(uri):
    store = tracking.Store(uri=uri, artifact_root=None, lock_dir=None)
    assert SECRET not in store.run_link("1", "abc") and SECRET not in store.ui_command()


@pytest.mark.timeout(180)
def test_a_failing_flow_shows_no_password_anywhere(uri, caplog, monkeypatch):
    seen = []
    real_open = tracking.open_store
    monkeypatch.setattr(tracking, "open_store", lambda value=None: seen.append(value) or real_open(value))
    with caplog.at_level(logging.DEBUG):
        state = retrain(load_config(overrides={"tracking_uri": uri, "data": "synthetic:2000"}), return_state=True)
    assert state.is_failed() and "admin:***@127.0.0.1" in state.message and SECRET not in state.message
    assert SECRET not in caplog.text
    assert tracking.resolve_uri(seen[0]) == uri  # the flow had the real URI, only its outputs are masked

    from prefect import get_client

    async def parameters() -> dict:
        async with get_client() as client:
            return (await client.read_flow_run(state.state_details.flow_run_id)).parameters

    assert SECRET not in json.dumps(asyncio.run(parameters()), default=str)


def test_deployment_parameters_hold_no_password(uri):
    from flows import deploy

    stored = deploy.parameters(load_config(overrides={"tracking_uri": uri, "k": 5}))["config"]
    assert "tracking_uri" not in stored and stored["k"] == 5  # workers use their own MLFLOW_TRACKING_URI
    plain = deploy.parameters(load_config(overrides={"tracking_uri": "http://127.0.0.1:5000"}))["config"]
    assert plain["tracking_uri"] == "http://127.0.0.1:5000"
