"""Promotion: the rule, the decision and its record, serialised promotion, moving the champion by hand."""

from __future__ import annotations

import threading
import time

import numpy as np
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


# -- the fair comparison ------------------------------------------------------------------------------
def _grown_data():
    """Run 1 sees the earliest 85% of the interactions, run 2 all of them (the data grew in between)."""
    from mfpipe.data import synthetic, to_interactions
    from mfpipe.data.loader import synthetic_frame

    frame = synthetic_frame(synthetic.generate(20_000, seed=5))
    early = frame[frame["timestamp"] < frame["timestamp"].quantile(0.85)]
    early.attrs = frame.attrs
    return to_interactions(early), to_interactions(frame)


def _brute_force_top_k(model, catalog, train, users, k):
    """An independent ranking: score by id, this train's catalogue only, this train's history excluded."""
    champion_users = {u: i for i, u in enumerate(catalog.user_ids.tolist())}
    champion_items = {item: j for j, item in enumerate(catalog.item_ids.tolist())}
    seen = train.matrix
    lists = []
    for u in users:
        uid = str(train.user_ids[u])
        scores = model.score(np.array([champion_users[uid]]))[0] if uid in champion_users else model.popularity
        history = set(seen[u].indices.tolist())
        candidates = [
            (-float(scores[champion_items[iid]]), j)
            for j, iid in enumerate(train.item_ids.astype(str).tolist())
            if iid in champion_items and j not in history
        ]
        lists.append([j for _, j in sorted(candidates)[:k]])
    return lists


@pytest.mark.parametrize("model_name", ["als", "bpr", "svd", "pop"])
def test_the_champion_is_ranked_exactly_as_the_candidates(model_name):
    """Factor models are ranked block by block on factors reindexed to this catalogue (users they know),
    the others, and users a factor model never saw, from full score rows: both agree with a brute force."""
    from mfpipe import serving
    from mfpipe.config import SplitOptions
    from mfpipe.models import create
    from mfpipe.split import split_interactions

    old, new = _grown_data()
    old_split = split_interactions(old, SplitOptions())
    params = {"als": {"iterations": 3}, "bpr": {"epochs": 5, "early_stopping": False}, "svd": {"n_epochs": 3}}
    champion = create(model_name, params.get(model_name), threads=1).fit(old_split.train)
    catalog = serving.Catalog.of(old_split.train)
    split = split_interactions(new, SplitOptions())
    ranked = promotion.InThisSplit(champion, catalog, split.train)
    users = np.arange(0, split.train.n_users, 7)
    items, _ = ranked.recommend(users, 10)
    expected = _brute_force_top_k(champion, catalog, split.train, users, 10)
    assert [[int(i) for i in row if i >= 0] for row in items] == expected
    # Items the champion never saw are never recommended; this split's train history never comes back.
    unknown = set(np.flatnonzero(catalog.item_index(split.train.item_ids) < 0).tolist())
    assert unknown and not unknown & set(items.ravel().tolist())
    assert promotion.leaked_pairs(champion, catalog, split.validation) == 0


def test_a_champion_scored_ahead_decides_as_rescoring_does_and_only_while_it_is_champion(tmp_path, monkeypatch):
    """The flow scores the champion while the models train; promotion re-reads the champion under its lock
    and uses that score only for the same version (another run may have moved `champion` meanwhile)."""
    from prefect.utilities.collections import visit_collection

    from mfpipe.config import SplitOptions
    from mfpipe.evaluation import evaluate_model
    from mfpipe.models import create
    from mfpipe.split import split_interactions

    old, new = _grown_data()
    old_train = split_interactions(old, SplitOptions()).train
    store, v1 = register_tiny(tmp_path, "mfpipe-ahead", data=old_train)
    _, v2 = register_tiny(tmp_path, "mfpipe-ahead", data=old_train)
    tracking.move_alias(store, "mfpipe-ahead", tracking.CHAMPION, v1, {})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    config = load_config()
    split = split_interactions(new, SplitOptions())
    evaluation = evaluate_model(create("als", {"iterations": 3}, threads=1).fit(split.train), split, config.k)
    results = [ModelResult("als", "ok", evaluation=evaluation, version="9")]

    ahead = promotion.score_current_champion(store, "mfpipe-ahead", split, config)
    assert ahead is not None and ahead.version == v1 and ahead.leaked == 0
    visited: list[object] = []  # it reaches the promote task as an argument: cheap for Prefect to walk
    visit_collection(ahead, visited.append, return_data=False)
    assert len(ahead.loaded.catalog.titles) > 1000 and len(visited) < 400, len(visited)  # not one per title
    loads: list[str] = []
    real_load = promotion.load_version
    monkeypatch.setattr(
        promotion, "load_version", lambda name, version: loads.append(version) or real_load(name, version)
    )

    def decide(scored: promotion.ScoredChampion | None) -> dict:
        applied: list[promotion.Decision] = []  # decide only: leave the aliases where they are
        monkeypatch.setattr(promotion, "_apply", lambda store, decision: applied.append(decision))
        promotion.promote_best(store, "mfpipe-ahead", results, split, config, ahead=scored)
        return applied[0].to_json()

    assert decide(ahead) == decide(None) and loads == [v1]  # the same decision; loaded once, without `ahead`
    tracking.move_alias(store, "mfpipe-ahead", tracking.CHAMPION, v2, {})  # another run promoted meanwhile
    loads.clear()
    assert decide(ahead)["before"]["version"] == v2 and loads == [v2]
    assert promotion.score_current_champion(store, "mfpipe-none-yet", split, config) is None


def test_a_champion_trained_on_this_validation_data_is_not_comparable():
    from mfpipe import serving
    from mfpipe.config import SplitOptions
    from mfpipe.models import create
    from mfpipe.split import split_interactions

    _, new = _grown_data()
    champion = create("pop").fit(new)  # trained on everything, this run's validation slice included
    split = split_interactions(new, SplitOptions())
    leaked = promotion.leaked_pairs(champion, serving.Catalog.of(new), split.validation)
    assert leaked == split.summary.n_validation
    block = promotion._blocked(CHAMPION, leaked, {}, load_config())
    decision = promotion.decide("m", CANDIDATE, CHAMPION, promotion.Rescore(0.1, 0.2, (0.1, 0.3), block), "strict")
    assert not decision.promoted and decision.challenger == "5" and decision.after_version == "2"
    assert f"trained on {leaked} of this run's validation interactions" in decision.reason


def test_drift_beyond_the_threshold_blocks_promotion():
    changes = {"max_psi": 0.4}
    assert promotion._blocked(CHAMPION, 0, changes, load_config()) is None  # no threshold: reported only
    block = promotion._blocked(CHAMPION, 0, changes, load_config(overrides={"drift_threshold": 0.25}))
    decision = promotion.decide("m", CANDIDATE, CHAMPION, promotion.Rescore(0.1, 0.2, (0.1, 0.3), block, changes),
                                "strict")  # fmt: skip
    assert not decision.promoted and "PSI 0.400 > 0.25" in decision.reason and decision.drift == changes


def test_an_unloadable_champion_is_tagged_and_treated_as_absent(tmp_path):
    store, v1 = register_tiny(tmp_path, "mfpipe-broken")
    _, v2 = register_tiny(tmp_path, "mfpipe-broken")
    tracking.move_alias(store, "mfpipe-broken", tracking.CHAMPION, v1, {})

    def unloadable(champion):
        raise promotion.ChampionUnavailable(f"v{champion.version} does not load: artifact missing")

    decision = promotion.promote(store, "mfpipe-broken", promotion.Candidate("pop", v2, 0.2), unloadable)
    assert decision.promoted and decision.before_version == v1 and decision.after_version == v2
    assert "cannot be loaded" in decision.reason
    assert tracking.get_version(store, "mfpipe-broken", v1).tags["load_error"].endswith("artifact missing")
    assert tracking.alias_version(store, "mfpipe-broken", tracking.CHAMPION).version == v2


def test_promote_by_hand_refuses_a_version_that_does_not_load(tmp_path):
    import shutil

    store, v1 = register_tiny(tmp_path, "mfpipe-gone")
    _, v2 = register_tiny(tmp_path, "mfpipe-gone")
    tracking.move_alias(store, "mfpipe-gone", tracking.CHAMPION, v1, {})
    model_id = store.client().get_model_version("mfpipe-gone", v2).source.removeprefix("models:/")
    shutil.rmtree(store.client().get_logged_model(model_id).artifact_location.removeprefix("file://"))
    with pytest.raises(MfpipeError, match="does not load"):
        promotion.set_champion_by_hand(store, "mfpipe-gone", v2, "try")
    assert tracking.alias_version(store, "mfpipe-gone", tracking.CHAMPION).version == v1


def test_rollback_edge_cases(tmp_path):
    store, v1 = register_tiny(tmp_path, "mfpipe-roll")
    _, v2 = register_tiny(tmp_path, "mfpipe-roll")
    _, v3 = register_tiny(tmp_path, "mfpipe-roll")
    with pytest.raises(MfpipeError, match="no earlier champion"):  # no champion at all
        promotion.set_champion_by_hand(store, "mfpipe-roll", None, "", rollback=True)
    first = promotion.promote(store, "mfpipe-roll", promotion.Candidate("pop", v1, 0.1), lambda c: None)
    assert first.promoted
    with pytest.raises(MfpipeError, match="no earlier champion"):  # the first champion has no predecessor
        promotion.set_champion_by_hand(store, "mfpipe-roll", None, "", rollback=True)
    better = promotion.Rescore(0.1, 0.1, (0.05, 0.15))
    for version in (v2, v3):  # two automatic promotions: v1 -> v2 -> v3
        candidate = promotion.Candidate("pop", version, 0.3)
        assert promotion.promote(store, "mfpipe-roll", candidate, lambda c: better).promoted
    promotion.set_champion_by_hand(store, "mfpipe-roll", None, "bad", rollback=True)  # after an automatic promotion
    assert tracking.alias_version(store, "mfpipe-roll", tracking.CHAMPION).version == v2
    promotion.set_champion_by_hand(store, "mfpipe-roll", None, "still bad", rollback=True)  # twice in a row
    assert tracking.alias_version(store, "mfpipe-roll", tracking.CHAMPION).version == v1


def test_protocols_register_apart():
    assert tracking.registered_model_name("ml-100k") == "mfpipe-ml-100k"
    assert tracking.registered_model_name("ml-100k", "random-per-item") == "mfpipe-ml-100k-random-per-item"
    assert tracking.registered_model_name("ml-100k", "random-per-user", "mine") == "mine"
