"""Promotion: the rule, the decision and its record, serialised promotion, moving the champion by hand."""

from __future__ import annotations

import threading
import time

import pytest

from mfpipe import promotion, tracking
from mfpipe.config import load_config
from mfpipe.errors import MfpipeError
from mfpipe.report import ModelResult
from tests.test_serving import register_tiny

CANDIDATE = promotion.Candidate("bpr", "5", 0.30)
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
    decision = promotion.decide("m", CANDIDATE, CHAMPION, promotion.Rescore(0.30 - diff, diff, ci95), rule)
    assert decision.promoted is promoted
    assert decision.after_version == ("5" if promoted else "2")
    assert decision.before_version == "2" and decision.before_score == pytest.approx(0.30 - diff)
    assert decision.challenger == (None if promoted else "5")
    assert f"rule {rule}" in decision.reason and "95% interval" in decision.reason


def test_no_champion_promotes_the_best():
    decision = promotion.decide("m", CANDIDATE, None, None, "significant")
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
        def rescore(champion: tracking.VersionInfo) -> promotion.Rescore:
            entered = time.monotonic()
            time.sleep(delay)  # the weak run decides slowly: without the lock it would move champion last
            inside.append((candidate, entered, time.monotonic()))
            diff = scores[candidate] - scores[champion.version]
            return promotion.Rescore(scores[champion.version], diff, (diff - 0.01, diff + 0.01))

        promotion.promote(store, "mfpipe-race", promotion.Candidate("pop", candidate, scores[candidate]), rescore)

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
    decision = promotion.set_champion_by_hand(store, "mfpipe-hand", v2, "better offline test")
    assert (decision.before_version, decision.after_version) == (v1, v2)
    now = tracking.alias_version(store, "mfpipe-hand", tracking.CHAMPION)
    assert now.version == v2 and now.tags["champion.reason"] == "manual promotion by hand: better offline test"
    promotion.set_champion_by_hand(store, "mfpipe-hand", None, "bad in production", rollback=True)
    assert tracking.alias_version(store, "mfpipe-hand", tracking.CHAMPION).version == v1
    with pytest.raises(MfpipeError, match="no version 99"):
        promotion.set_champion_by_hand(store, "mfpipe-hand", "99", "")


def test_labels_and_tags_follow_k():
    decision = promotion.decide("m", promotion.Candidate("bpr", "5", 0.3, k=20), None, None, "significant")
    assert "NDCG@20" in decision.reason and "NDCG@10" not in decision.reason
    assert "promotion.candidate_ndcg_at_20" in decision.tags()
    block = decision.to_json()
    assert block["after"] == {"version": "5", "ndcg@20": 0.3} and block["before"] == {"version": None, "ndcg@20": None}


def test_no_finished_model_moves_nothing(tmp_path):
    store, v1 = register_tiny(tmp_path, "mfpipe-none")
    tracking.move_alias(store, "mfpipe-none", tracking.CHAMPION, v1, {})
    failed = [ModelResult("bpr", "failed", error="diverged")]
    decision = promotion.promote_best(store, "mfpipe-none", failed, None, load_config())
    assert not decision.promoted and decision.before_version == decision.after_version == v1
    assert tracking.alias_version(store, "mfpipe-none", tracking.CHAMPION).version == v1
