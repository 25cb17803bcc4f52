"""Which registered version is `champion`: the fair comparison, the rule, the lock and the alias moves.

A run's best candidate is compared with the current champion re-scored on this run's validation split
(`rescore`), by the configured rule (DESIGN "Promotion"). Promotion is serialised by an exclusive
`fcntl.flock` on a lock file beside a local store (sqlite or file), which also covers several processes
on one host. For a remote store the lock file lives in the local state folder, which serialises the runs
of this host; across hosts the alias move is compare-and-set: just before moving `champion` we re-read
it, and if another run moved it meanwhile the decision is taken again against the new champion.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mfpipe import drift, serving, tracking
from mfpipe.config import Config
from mfpipe.data.interactions import Interactions
from mfpipe.errors import MfpipeError
from mfpipe.evaluation import (
    EvaluationReport,
    display_name,
    evaluate_model,
    finite_or_none,
    metric_key,
    paired_comparison,
)
from mfpipe.models.base import FactorModel, Recommender
from mfpipe.ranking import top_k_excluding, top_k_factors
from mfpipe.report import ModelResult, best
from mfpipe.split import Split
from mfpipe.tracking import CHALLENGER, CHAMPION, Store, VersionInfo

#: Version tag holding `drift.profile` of the version's training data.
PROFILE_TAG = "data_profile"


@dataclass(frozen=True)
class Candidate:
    """This run's best finished model: its registry version and validation NDCG@k of warm users."""

    model: str
    version: str
    score: float
    k: int = 10


@dataclass(frozen=True)
class Rescore:
    """The champion re-scored on this run's validation split, and the paired comparison with it.

    `block`: why the candidate may not replace the champion whatever the scores (training data that
    overlaps this validation slice, drift beyond the threshold); `drift`: the report's drift block.
    """

    score: float
    diff: float  # candidate - champion
    ci95: tuple[float, float]
    block: str | None = None
    drift: dict[str, Any] | None = None


class ChampionUnavailable(MfpipeError):
    """The current champion's artifacts cannot be loaded (deleted, corrupt): it cannot be compared or served."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=1)


@dataclass(frozen=True)
class Decision:
    """Where `champion` points after a promotion step, and why (also what the report's block shows)."""

    registered_model: str
    promoted: bool
    reason: str
    rule: str
    candidate: Candidate | None = None
    before_version: str | None = None
    before_score: float | None = None
    after_version: str | None = None
    after_score: float | None = None
    diff: float | None = None
    ci95: tuple[float, float] | None = None
    challenger: str | None = None
    k: int = 10
    drift: dict[str, Any] | None = None

    @classmethod
    def unchanged(cls, name: str, reason: str, rule: str, champion: VersionInfo | None, k: int = 10) -> Decision:
        """Nothing moves (no model finished, data unchanged): the champion stays where it was."""
        version = champion.version if champion else None
        return cls(name, False, reason, rule, before_version=version, after_version=version, k=k)

    def tags(self) -> dict[str, Any]:
        """The decision as tags (parent run and the versions involved)."""
        score = metric_key("ndcg", self.k)
        return {
            "promotion.promoted": self.promoted,
            "promotion.rule": self.rule,
            "promotion.reason": self.reason,
            "promotion.candidate_version": self.candidate.version if self.candidate else None,
            f"promotion.candidate_{score}": self.candidate.score if self.candidate else None,
            "promotion.champion_before": self.before_version,
            f"promotion.champion_before_{score}": self.before_score,
            "promotion.champion_after": self.after_version,
            "promotion.diff": self.diff,
            "promotion.ci95": None if self.ci95 is None else f"[{self.ci95[0]:.5f}, {self.ci95[1]:.5f}]",
        }

    def to_json(self) -> dict[str, Any]:
        """The `champion` block of the run report (Contracts)."""
        key = display_name("ndcg", self.k)
        return {
            "registered_model": self.registered_model,
            "before": {"version": self.before_version, key: finite_or_none(self.before_score)},
            "after": {"version": self.after_version, key: finite_or_none(self.after_score)},
            "promoted": bool(self.promoted),
            "reason": self.reason,
        }


def decide(
    name: str, candidate: Candidate, champion: VersionInfo | None, rescore: Rescore | None, rule: str
) -> Decision:
    """The promotion rule (DESIGN "Promotion"): no champion -> promote; else `significant` or `strict`."""
    label = f"NDCG@{candidate.k}"
    if champion is None or rescore is None:
        return Decision(
            name, True,
            f"no champion yet: {candidate.model} v{candidate.version} ({label} {candidate.score:.4f}) becomes champion",
            rule, candidate, after_version=candidate.version, after_score=candidate.score, k=candidate.k,
        )  # fmt: skip
    if rescore.block:
        return Decision(
            name, False,
            f"{rescore.block}; nothing moves to champion, {candidate.model} v{candidate.version} becomes challenger",
            rule, candidate, before_version=champion.version, before_score=rescore.score,
            after_version=champion.version, after_score=rescore.score, challenger=candidate.version, k=candidate.k,
            drift=rescore.drift,
        )  # fmt: skip
    lo, hi = rescore.ci95
    head = (
        f"{candidate.model} v{candidate.version} {label} {candidate.score:.4f} vs champion v{champion.version} "
        f"{rescore.score:.4f} on this validation split: difference {rescore.diff:+.4f}, 95% interval "
        f"[{lo:+.4f}, {hi:+.4f}]"
    )
    if rule == "strict":
        promoted = rescore.diff > 0
        why = "higher (rule strict)" if promoted else "not higher (rule strict)"
    else:
        promoted = lo > 0
        why = "interval above zero (rule significant)" if promoted else "interval not above zero (rule significant)"
    after = (candidate.version, candidate.score) if promoted else (champion.version, rescore.score)
    return Decision(
        name, promoted, f"{head}: {why}; {'promoted' if promoted else 'champion kept'}", rule, candidate,
        before_version=champion.version, before_score=rescore.score, after_version=after[0], after_score=after[1],
        diff=rescore.diff, ci95=(lo, hi), challenger=None if promoted else candidate.version, k=candidate.k,
        drift=rescore.drift,
    )  # fmt: skip


@contextmanager
def promotion_lock(store: Store, name: str) -> Iterator[None]:
    """Exclusive lock per registered model: one promotion at a time (see the module docstring)."""
    path = store.lock_dir / f".mfpipe-promote-{tracking.dataset_slug(name)}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def promote(
    store: Store,
    name: str,
    candidate: Candidate,
    rescore: Callable[[VersionInfo], Rescore],
    rule: str = "significant",
    attempts: int = 3,
) -> Decision:
    """Compare the candidate with the current champion (re-scored by `rescore`) and move the aliases.

    Under the lock; the alias is re-read before it moves, and the decision retaken if it changed.
    """
    with promotion_lock(store, name):
        for _ in range(attempts):
            champion = tracking.alias_version(store, name, CHAMPION)
            if champion is not None and champion.version == candidate.version:
                return Decision(
                    name, False, f"v{candidate.version} is already champion", rule, candidate,
                    before_version=champion.version, before_score=candidate.score,
                    after_version=champion.version, after_score=candidate.score, k=candidate.k,
                )  # fmt: skip
            decision = _decide_against(store, name, candidate, champion, rescore, rule)
            now = tracking.alias_version(store, name, CHAMPION)
            if (now and now.version) != (champion and champion.version):
                continue  # another host moved the champion meanwhile: decide again against it
            _apply(store, decision)
            return decision
    raise MfpipeError(f"{name}: the champion kept moving during promotion; try again", exit_code=1)


def _decide_against(
    store: Store, name: str, candidate: Candidate, champion: VersionInfo | None,
    rescore: Callable[[VersionInfo], Rescore], rule: str,
) -> Decision:  # fmt: skip
    """`decide` against the current champion; one that cannot be loaded is tagged and treated as absent."""
    if champion is None:
        return decide(name, candidate, None, None, rule)
    try:
        return decide(name, candidate, champion, rescore(champion), rule)
    except ChampionUnavailable as exc:
        store.client().set_model_version_tag(name, champion.version, "load_error", str(exc))
        decision = decide(name, candidate, None, None, rule)
        note = f"champion v{champion.version} cannot be loaded ({exc}), so it is treated as absent; "
        return replace(decision, reason=note + decision.reason, before_version=champion.version)


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _apply(store: Store, decision: Decision) -> None:
    record = {"reason": decision.reason, "at": _stamp(), "rule": decision.rule}
    if decision.promoted and decision.after_version:
        record["previous"] = decision.before_version
        tracking.move_alias(store, decision.registered_model, CHAMPION, decision.after_version, record)
    elif decision.challenger:
        tracking.move_alias(store, decision.registered_model, CHALLENGER, decision.challenger, record)


def set_champion_by_hand(store: Store, name: str, version: str | None, reason: str, rollback: bool = False) -> Decision:
    """`mfpipe promote`: move `champion` to `version`, or back to the previous champion (`rollback`)."""
    with tracking.tracking_errors(store), promotion_lock(store, name):
        current = tracking.alias_version(store, name, CHAMPION)
        if rollback:
            previous = (current.tags.get(f"{CHAMPION}.previous") if current else None) or None
            if current is None or previous in (None, "None"):
                raise MfpipeError(f"{name}: no earlier champion recorded to roll back to")
            version = previous
        target = tracking.get_version(store, name, str(version))
        try:
            load_version(name, target.version)
        except ChampionUnavailable as exc:
            raise MfpipeError(f"{exc}; champion not moved") from None
        action = "rollback" if rollback else "manual promotion"
        text = f"{action} by hand: {reason}" if reason else f"{action} by hand"
        record = {"reason": text, "at": _stamp(), "rule": "manual"}
        # A rollback must not be undone by the next rollback: keep the older lineage on the target.
        if not rollback:
            record["previous"] = current.version if current else None
        tracking.move_alias(store, name, CHAMPION, target.version, record)
        before = current.version if current else None
        return Decision(name, True, text, "manual", before_version=before, after_version=target.version)


# -- the fair comparison ------------------------------------------------------------------------------
class InThisSplit:
    """A registered model ranked exactly as this run's candidates are (DESIGN "Fair re-scoring").

    Over this split's train catalogue only (a train item the model does not know scores -inf: it can never
    be recommended), with this split's train-seen items excluded (not the model's own training history,
    which would waste slots on what users consumed since), for this split's users matched by id; a user
    the model never saw gets its popularity fallback. Ids are matched as strings. A factor model's known
    users are scored and selected block by block (`top_k_factors`) on its item factors reindexed to this
    catalogue, as the candidates are: gathering full score rows into this catalogue was 4-8x slower (17.5 s
    against 2.2 s for 44k users at synthetic:10M).
    """

    def __init__(self, model: Recommender, catalog: serving.Catalog, train: Interactions) -> None:
        self.model = model
        self.users = catalog.user_index(np.asarray(train.user_ids))
        self.items = catalog.item_index(np.asarray(train.item_ids))
        self.known = np.flatnonzero(self.items >= 0)
        self.seen = train.matrix
        self.factors = self._factors_in_this_catalogue(model)

    def _factors_in_this_catalogue(self, model: Recommender) -> tuple[np.ndarray, np.ndarray] | None:
        """A factor model's item vectors and biases reindexed to this catalogue (float32; an item it does not
        know gets bias -inf); None for another model."""
        if not isinstance(model, FactorModel):
            return None
        theirs = np.clip(self.items, 0, None)
        vectors = np.ascontiguousarray(model.item_factors[theirs], np.float32)
        bias = np.where(self.items >= 0, np.asarray(model.item_bias, np.float32)[theirs], np.float32(-np.inf))
        return vectors, bias

    @property
    def n_items(self) -> int:
        """Items ranked: this split's train catalogue (what evaluation sizes its score blocks by)."""
        return len(self.items)

    def recommend(self, users: np.ndarray, k: int = 10, exclude_seen: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of this catalogue. A factor model's values are its scores less their per-user constant
        (SVD's mean and user bias), which ranks alike."""
        users = np.asarray(users, np.int64)
        warm = (users >= 0) & (users < len(self.users))
        theirs = np.where(warm, self.users[np.clip(users, 0, max(len(self.users) - 1, 0))], -1)
        users = np.where(warm, users, -1)  # a row past this split's users has no train items to exclude
        seen = self.seen if exclude_seen else None
        if self.factors is None:
            return self._from_score_rows(users, theirs, k, seen)
        items = np.full((len(users), k), -1, np.int32)
        values = np.full((len(users), k), -np.inf, np.float32)
        known = theirs >= 0
        if known.any():
            user_vectors = np.asarray(self.model.user_factors[theirs[known]], np.float32)
            item_vectors, item_bias = self.factors
            items[known], values[known] = top_k_factors(user_vectors, item_vectors, k, users[known], seen, item_bias)
        if not known.all():
            items[~known], values[~known] = self._from_score_rows(users[~known], theirs[~known], k, seen)
        return items, values

    def _from_score_rows(
        self, users: np.ndarray, theirs: np.ndarray, k: int, seen: Any
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """The model's full score rows mapped into this catalogue (a user it never saw: its popularity);
        `users` are rows of this split's seen matrix, -1 for none."""
        own = np.empty((len(users), self.model.n_items), np.float32)
        known_users = theirs >= 0
        own[~known_users] = self.model.popularity
        if known_users.any():
            own[known_users] = self.model.score(theirs[known_users])
        scores = np.full((len(users), len(self.items)), -np.inf, np.float32)
        scores[:, self.known] = own[:, self.items[self.known]]
        return top_k_excluding(scores, k, users, seen)


def leaked_pairs(model: Recommender, catalog: serving.Catalog, validation: Interactions) -> int:
    """How many of this run's validation (user, item) pairs the model was trained on (its train-seen matrix).

    Ids are mapped once per distinct user and item, and the pairs looked up in the CSR directly: `np.isin`
    over pair keys took 14 s at synthetic:10M, against 0.1 s.
    """
    users = catalog.user_index(np.asarray(validation.user_ids))[validation.users]
    items = catalog.item_index(np.asarray(validation.item_ids))[validation.items]
    both = (users >= 0) & (items >= 0)
    if not both.any():
        return 0
    return int(np.count_nonzero(np.asarray(model.seen[users[both], items[both]])))


def rescore(
    loaded: serving.RecommenderModel, split: Split, config: Config, part: str = "validation"
) -> EvaluationReport:
    """Evaluate a registered model on this run's split, ranked as the candidates are."""
    ranked = InThisSplit(loaded.model, loaded.catalog, split.train)
    return evaluate_model(ranked, split, config.k, part=part, seed=config.seed)


@dataclass(frozen=True, eq=False)
class ScoredChampion:
    """A registered version scored on this run's split: all that the comparison needs of it.

    It depends on the version and the split, not on the candidates, so the flow finds it once every model
    is evaluated, while the last is recorded (`score_current_champion`), and promotion only pairs it with
    the best candidate.
    """

    version: str
    loaded: serving.RecommenderModel
    report: EvaluationReport  # validation, ranked as the candidates are
    leaked: int  # this run's validation pairs the version was trained on
    drift: dict[str, Any]  # the report's drift block: its training data against this train


def score_champion(name: str, champion: VersionInfo, split: Split, config: Config) -> ScoredChampion:
    """Load `champion` and score it on this split; one that does not load is `ChampionUnavailable`."""
    loaded = load_version(name, champion.version)
    return ScoredChampion(
        champion.version,
        loaded,
        rescore(loaded, split, config),
        leaked_pairs(loaded.model, loaded.catalog, split.validation),
        drift_since(champion, loaded.catalog, split.train),
    )


def _still(ahead: ScoredChampion | None, version: str) -> ScoredChampion | None:
    """`ahead` if it scored `version`: another run may have moved `champion` since."""
    return ahead if ahead is not None and ahead.version == version else None


def score_current_champion(store: Store, name: str, split: Split, config: Config) -> ScoredChampion | None:
    """The current champion scored on this split ahead of promotion; None without one.

    Also None when it cannot be read or loaded now: promotion reads the champion again under its lock
    and reports such a failure where it decides.
    """
    try:
        with tracking.tracking_errors(store):
            champion = tracking.alias_version(store, name, CHAMPION)
        return None if champion is None else score_champion(name, champion, split, config)
    except MfpipeError:
        return None


def compare(candidate: EvaluationReport, champion: EvaluationReport, seed: int) -> tuple[float, tuple[float, float]]:
    """Paired bootstrap of per-user NDCG@k on the warm users both were scored on."""
    a = candidate.per_user.set_index("user_id")
    b = champion.per_user.set_index("user_id")
    users = a.index[a["warm"]].intersection(b.index)
    result = paired_comparison(a.loc[users, "ndcg"].to_numpy(), b.loc[users, "ndcg"].to_numpy(), seed)
    return result.mean_diff, result.ci95


def drift_since(champion: VersionInfo, catalog: serving.Catalog, train: Interactions) -> dict[str, Any]:
    """The report's drift block: the champion's training data (its profile tag, its ids) against this train."""
    text = champion.tags.get(PROFILE_TAG)
    return drift.compare(json.loads(text) if text else None, catalog.user_ids, catalog.item_ids, train)


def _blocked(champion: VersionInfo, leaked: int, changes: dict[str, Any], config: Config) -> str | None:
    """Why no candidate of this run may replace the champion, whatever the scores (None: the scores decide)."""
    if leaked:
        return (
            f"champion v{champion.version} was trained on {leaked} of this run's validation interactions "
            "(data re-ingested or the cutoff moved): not comparable"
        )
    worst = changes.get("max_psi")
    if config.drift_threshold is not None and worst is not None and worst > config.drift_threshold:
        return f"the data drifted since champion v{champion.version} (PSI {worst:.3f} > {config.drift_threshold:g})"
    return None


def load_version(name: str, version: str) -> serving.RecommenderModel:
    """A registered version's model and catalogue; one that does not load is `ChampionUnavailable`."""
    try:
        return serving.load_pyfunc(f"models:/{name}/{version}")
    except MfpipeError as exc:
        raise ChampionUnavailable(f"{name} v{version} does not load: {exc}") from None


def promote_best(
    store: Store, name: str, results: list[ModelResult], split: Split, config: Config,
    ahead: ScoredChampion | None = None,
) -> Decision:  # fmt: skip
    """Compare this run's best candidate with the champion re-scored on this split; move the aliases.

    `ahead`: the champion as `score_current_champion` found it while the last model was recorded, used if
    that version is still champion. With no finished model nothing moves.
    """
    top = best(results)
    with tracking.tracking_errors(store):
        if top is None or top.version is None or top.evaluation is None:
            champion = tracking.alias_version(store, name, CHAMPION)
            reason = "no model finished: the champion stays where it was"
            return Decision.unchanged(name, reason, config.promotion_rule, champion, config.k)
        evaluation = top.evaluation

        def rescore_champion(champion: VersionInfo) -> Rescore:
            scored = _still(ahead, champion.version) or score_champion(name, champion, split, config)
            diff, ci95 = compare(evaluation, scored.report, config.seed)
            block = _blocked(champion, scored.leaked, scored.drift, config)
            return Rescore(scored.report.warm["ndcg"].mean, diff, ci95, block, scored.drift)

        candidate = Candidate(top.model, top.version, top.score, config.k)
        return promote(store, name, candidate, rescore_champion, config.promotion_rule)


def champion_test_score(
    name: str, decision: Decision, fitted: dict[str, Recommender], results: list[ModelResult], split: Split,
    config: Config, ahead: ScoredChampion | None = None,
) -> float | None:  # fmt: skip
    """The honest final figure: the champion scored once on the test slice (None without a test slice)."""
    if split.test is None or decision.after_version is None:
        return None
    mine = {r.version: r.model for r in results if r.version is not None}
    if decision.after_version in mine:
        report = evaluate_model(fitted[mine[decision.after_version]], split, config.k, part="test", seed=config.seed)
    else:
        kept = _still(ahead, decision.after_version)
        loaded = kept.loaded if kept else load_version(name, decision.after_version)
        report = rescore(loaded, split, config, part="test")
    return report.warm["ndcg"].mean
