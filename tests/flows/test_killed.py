"""The pipeline process SIGKILLed during training and during registration: the next run completes, ends
FAILED the runs the dead process left RUNNING, and `champion` still loads and serves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.retrain import retrain
from mfpipe import serving, tracking
from mfpipe.config import load_config

pytestmark = pytest.mark.slow

#: Runs `mfpipe run` with one stage made to hang after writing a marker file, so the test can kill it there.
HANG = """
import pathlib, sys, time
marker, stage = pathlib.Path(sys.argv[1]), sys.argv[2]
from mfpipe import tracking, training

def hang(*args, **kwargs):
    marker.write_text(stage)
    time.sleep(600)

if stage == "training":
    training.train_model = hang
else:
    tracking.register = hang
from mfpipe.cli import main
sys.argv = ["mfpipe", "run", *sys.argv[3:]]
main()
"""
NAME = "mfpipe-synthetic-5k"


def _kill_during(stage: str, store: str, tmp_path: Path) -> None:
    marker = tmp_path / f"{stage}.marker"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    args = ["--data", "synthetic:5000", "--models", "pop"]
    child = subprocess.Popen([sys.executable, "-c", HANG, str(marker), stage, *args], env=env, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, f"the run ended before reaching {stage}"
            assert time.monotonic() < deadline, f"the run never reached {stage}"
            time.sleep(0.5)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the process and its ephemeral Prefect API, no cleanup at all
        child.wait()


def _running(store: str) -> list[str]:
    s = tracking.open_store(store)
    runs = s.client().search_runs([tracking.experiment_id(s, "synthetic-5k")], "attributes.status = 'RUNNING'")
    return [r.info.run_id for r in runs]


def test_a_killed_run_leaves_a_working_champion(tmp_path):
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    config = load_config(overrides={"data": "synthetic:5000", "tracking_uri": store, "models": ["pop"]})
    champion = retrain(config).report["champion"]["after"]["version"]

    _kill_during("training", store, tmp_path)
    assert retrain(config).report["champion"]["after"]["version"] == champion  # identical data: kept

    _kill_during("registration", store, tmp_path)
    left = _running(store)
    assert left  # the dead process's parent and child runs
    retrain(config)
    assert _running(store) == []
    s = tracking.open_store(store)
    assert all(s.client().get_run(run).info.status == "FAILED" for run in left)
    assert "abandoned" in s.client().get_run(left[0]).data.tags["error"]
    answer, source = serving.recommend_for(serving.champion_version_uri(s, NAME), "1", 5)
    assert len(answer) == 5 and source in ("model", "popularity")
