"""The store, the promotion rule, serialised promotion and moving the champion by hand."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mfpipe import tracking
from mfpipe.errors import MfpipeError
from tests.test_serving import register_tiny


def test_default_store_is_sqlite_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    store = tracking.open_store(None)
    assert store.uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert store.artifact_root == tmp_path / "mlruns" / "artifacts"
    assert tracking.resolve_uri("sqlite:///x.db", {"MLFLOW_TRACKING_URI": "http://h:1"}) == "sqlite:///x.db"
    assert tracking.resolve_uri(None, {"MLFLOW_TRACKING_URI": "http://h:1"}) == "http://h:1"


def test_experiment_artifacts_live_beside_a_sqlite_store(tmp_path):
    store = tracking.open_store(f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}")
    exp = store.client().get_experiment(tracking.experiment_id(store, "ml latest/small"))
    assert exp.name == "mfpipe-ml-latest-small"
    assert Path(exp.artifact_location.removeprefix("file://")).parent == tmp_path / "db" / "artifacts"


CANDIDATE = tracking.Candidate("bpr", "5", 0.30)
CHAMPION = tracking.VersionInfo("m", "2", None, {}, [tracking.CHAMPION])


@pytest.mark.parametrize(
    ("rule", "ci95", "diff", "promoted"),
    [
        ("significant", (0.01, 0.05), 0.03, True),
        ("significant", (-0.01, 0.05), 0.02, False),  # higher, but within resampling noise
        ("strict", (-0.01, 0.05), 0.02, True),
        ("strict", (-0.05, 0.01), -0.02, False),
        ("significant", (0.0, 0.0), 0.0, False),  # identical rerun: keep
    ],
)
def test_promotion_rules(rule, ci95, diff, promoted):
    decision = tracking.decide("m", CANDIDATE, CHAMPION, tracking.Rescore(0.30 - diff, diff, ci95), rule)
    assert decision.promoted is promoted
    assert decision.after_version == ("5" if promoted else "2")
    assert decision.before_version == "2" and decision.before_score == pytest.approx(0.30 - diff)
    assert decision.challenger == (None if promoted else "5")
    assert f"rule {rule}" in decision.reason and "95% interval" in decision.reason


def test_no_champion_promotes_the_best():
    decision = tracking.decide("m", CANDIDATE, None, None, "significant")
    assert decision.promoted and decision.after_version == "5" and decision.before_version is None


def test_concurrent_promotions_are_serialised_and_keep_the_better_model(tmp_path):
    """Two runs decide at once; the lock makes the second see the first's champion, so the best wins."""
    store, v1 = register_tiny(tmp_path, "mfpipe-race")
    _, weak = register_tiny(tmp_path, "mfpipe-race")
    _, strong = register_tiny(tmp_path, "mfpipe-race")
    tracking.move_alias(store, "mfpipe-race", tracking.CHAMPION, v1, {})
    scores = {v1: 0.10, weak: 0.20, strong: 0.30}
    inside: list[tuple[str, float, float]] = []

    def run(candidate: str, delay: float) -> None:
        def rescore(champion: tracking.VersionInfo) -> tracking.Rescore:
            entered = time.monotonic()
            time.sleep(delay)  # the weak run decides slowly: without the lock it would move champion last
            inside.append((candidate, entered, time.monotonic()))
            diff = scores[candidate] - scores[champion.version]
            return tracking.Rescore(scores[champion.version], diff, (diff - 0.01, diff + 0.01))

        tracking.promote(store, "mfpipe-race", tracking.Candidate("pop", candidate, scores[candidate]), rescore)

    threads = [threading.Thread(target=run, args=(weak, 0.8)), threading.Thread(target=run, args=(strong, 0.1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tracking.alias_version(store, "mfpipe-race", tracking.CHAMPION).version == strong
    (_, _, first_out), (_, second_in, _) = sorted(inside, key=lambda r: r[1])
    assert second_in >= first_out  # never two decisions at once


def test_promote_by_hand_and_roll_back(tmp_path):
    store, v1 = register_tiny(tmp_path, "mfpipe-hand")
    _, v2 = register_tiny(tmp_path, "mfpipe-hand")
    tracking.move_alias(store, "mfpipe-hand", tracking.CHAMPION, v1, {})
    decision = tracking.set_champion_by_hand(store, "mfpipe-hand", v2, "better offline test")
    assert (decision.before_version, decision.after_version) == (v1, v2)
    now = tracking.alias_version(store, "mfpipe-hand", tracking.CHAMPION)
    assert now.version == v2 and now.tags["champion.reason"] == "manual promotion by hand: better offline test"
    tracking.set_champion_by_hand(store, "mfpipe-hand", None, "bad in production", rollback=True)
    assert tracking.alias_version(store, "mfpipe-hand", tracking.CHAMPION).version == v1
    with pytest.raises(MfpipeError, match="no version 99"):
        tracking.set_champion_by_hand(store, "mfpipe-hand", "99", "")


def test_curves_are_logged_per_epoch(tmp_path):
    store = tracking.open_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tracking.start_run(store, tracking.experiment_id(store, "x"), "bpr", {})
    tracking.log_curves(store, run, {"epoch_loss": [0.7, 0.5, float("nan"), 0.3]})
    history = store.client().get_metric_history(run, "epoch_loss")
    assert [(h.step, h.value) for h in history] == [(1, 0.7), (2, 0.5), (4, 0.3)]
