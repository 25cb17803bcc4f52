"""flows.deploy without a server: parameters, schedules, errors, and prefect.yaml in step with the code.

The deployment against a real Prefect server (both modes) is in tests/services/test_deploy.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import deploy
from mfpipe.config import Config, load_config
from mfpipe.errors import MfpipeError

ROOT = Path(__file__).resolve().parents[2]


def test_parameters_carry_only_what_the_user_set(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('models = "pop,als"\n[split]\nprotocol = "random-per-user"\n')
    config = load_config(file, overrides={"data": "synthetic:20k"}, environ={"MFPIPE_SKIP_UNCHANGED": "true"})
    params = deploy.parameters(config)
    assert params == {
        "config": {
            "data": "synthetic:20k",
            "models": ["pop", "als"],
            "split": {"protocol": "random-per-user"},
            "skip_unchanged": True,
        }
    }
    # The worker rebuilds the same config, with its own machine-dependent defaults.
    assert Config.model_validate(params["config"]) == config


def test_cron_schedule_keeps_expression_and_time_zone() -> None:
    schedule = deploy.cron_schedule("30 2 * * 1-5", "Europe/Berlin")
    assert (schedule.cron, schedule.timezone) == ("30 2 * * 1-5", "Europe/Berlin")


@pytest.mark.parametrize(
    ("cron", "timezone", "message"),
    [("0 3 * *", "UTC", "--cron '0 3 \\* \\*': not a valid cron"), ("0 3 * * *", "Mars/Olympus", "--timezone")],
)
def test_bad_schedules_are_user_errors(cron: str, timezone: str, message: str) -> None:
    with pytest.raises(MfpipeError, match=message):
        deploy.cron_schedule(cron, timezone)


def test_work_pool_mode_needs_a_prefect_server() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(MfpipeError, match="PREFECT_API_URL"):
        deploy.register(Config(), work_pool="mfpipe")


def test_cli_deploy_to_a_pool_without_server_is_one_line_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    result = subprocess.run(
        [sys.executable, "-m", "mfpipe", "deploy", "--work-pool", "mfpipe"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("mfpipe: error: --work-pool needs a Prefect server: set PREFECT_API_URL")
    assert len(result.stderr.strip().splitlines()) == 1


def test_prefect_yaml_describes_the_deployment_mfpipe_deploy_creates() -> None:
    from prefect.flows import load_flow_from_entrypoint

    from flows.retrain import retrain

    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [spec] = project["deployments"]
    assert f"{load_flow_from_entrypoint(spec['entrypoint']).name}/{spec['name']}" == "retrain/scheduled"
    assert load_flow_from_entrypoint(spec["entrypoint"]) is retrain
    assert spec["work_pool"]["name"] == deploy.DEFAULT_WORK_POOL
    assert spec["schedules"] == [{"cron": deploy.DEFAULT_CRON, "timezone": deploy.DEFAULT_TIMEZONE}]
    assert spec["parameters"] == deploy.parameters(Config())
    assert spec["description"] == deploy.DESCRIPTION
