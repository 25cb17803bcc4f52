"""Hyperparameter search (Optuna TPE) on an inner temporal split of the train part.

`search(name, train, n_trials, seed)` never sees the validation slice: it splits the train part it is
given once more, in time (`split_interactions(train, SplitOptions(protocol="temporal", ...))`), fits
every trial on the inner train and scores it by warm-user NDCG@k on the inner validation, exactly as
`evaluate_model` scores a run. The caller refits the best setting on the whole train part and evaluates
it once on validation (DESIGN.md, `mfpipe run --search N`), so the validation score stays an honest
estimate.

- Trial 0 is the model's defaults (enqueued), so the search reports how they do on the same inner split.
- The sampler is TPE seeded with `seed`; with deterministic models (pop, svd, als on one thread, bpr with
  `deterministic=True`) the same call gives the same trials and the same best setting.
- Pruning: a model that records a learning curve during its fit (BPR's `epoch_ndcg_at_10` at
  `eval_epoch`, measured on pairs its early stopping holds out of the inner train part: fits never see
  the inner validation either) reports each new point to Optuna from its between-epochs check
  (`check_deadline`, which every training loop calls), and the pruner (median of the earlier trials at
  the same epoch) stops a losing fit there.
- A trial that fails (diverged, over its time limit, an invalid combination) is recorded as failed and
  the search goes on; only a search in which no trial completed is an error.
- `on_trial(number, params, value, state)` is called after every trial (state "complete", "pruned" or
  "failed"; value None unless complete), so the caller can log each trial, e.g. as a nested MLflow run.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from mfpipe.config import SplitOptions
from mfpipe.data.interactions import Interactions
from mfpipe.errors import MfpipeError
from mfpipe.models import MODELS, create
from mfpipe.models.base import Recommender
from mfpipe.split import Split, split_interactions

TrialStatus = Literal["complete", "pruned", "failed"]
OnTrial = Callable[[int, dict[str, Any], float | None, TrialStatus], None]

#: Per-model search spaces. Every model's default lies inside its space (trial 0 replays the defaults).
SPACES: dict[str, dict[str, BaseDistribution]] = {
    "svd": {
        "n_factors": IntDistribution(5, 200, log=True),
        "n_epochs": IntDistribution(3, 60, log=True),
        "lr_all": FloatDistribution(0.001, 0.05, log=True),
        "reg_all": FloatDistribution(0.005, 0.5, log=True),
        "init_std_dev": FloatDistribution(0.01, 0.3, log=True),
    },
    "als": {
        "factors": IntDistribution(16, 256, log=True),
        "regularization": FloatDistribution(0.01, 200.0, log=True),
        "alpha": FloatDistribution(0.1, 50.0, log=True),
        "iterations": IntDistribution(5, 30),
        "binary": CategoricalDistribution([True, False]),
    },
    "bpr": {
        "factors": CategoricalDistribution([32, 64, 128]),
        "learning_rate": FloatDistribution(0.005, 0.5, log=True),
        "lr_decay": FloatDistribution(0.9, 1.0),
        "epochs": IntDistribution(30, 400, log=True),  # the cap: early stopping on the curve ends most fits
        "reg_user": FloatDistribution(1e-4, 1.0, log=True),
        "reg_item": FloatDistribution(1e-5, 0.1, log=True),
        "negative_candidates": IntDistribution(1, 4),
        "init_std": FloatDistribution(0.01, 0.3, log=True),
        "negative_sampling": CategoricalDistribution(["uniform", "popularity"]),
    },
    "pop": {
        "window_days": CategoricalDistribution([None, 30, 90, 180, 365, 730]),
        "min_rating": CategoricalDistribution([None, 3.0, 3.5, 4.0]),
    },
}

#: The inner split: the same temporal definition as the production protocol, inside the train part.
DEFAULT_INNER = SplitOptions(protocol="temporal", cutoff_quantile=0.8)


@dataclass(frozen=True)
class Trial:
    """One trial: its number, the params it set (over the defaults), how it ended and its inner score."""

    number: int
    params: dict[str, Any]
    state: TrialStatus
    value: float | None  # warm NDCG@k on the inner validation; None unless complete
    seconds: float
    error: str | None = None  # why a failed trial failed (one line)
    curve: dict[int, float] = field(default_factory=dict)  # epoch -> NDCG@10, where the model records one

    def to_json(self, k: int) -> dict[str, Any]:
        return {
            "number": self.number, "params": self.params, "state": self.state, f"ndcg@{k}": self.value,
            "seconds": self.seconds, "error": self.error, "curve": {str(e): v for e, v in self.curve.items()},
        }  # fmt: skip


@dataclass
class SearchResult:
    """Every trial in order and the inner split they were scored on; `best` is the highest complete one."""

    model: str
    k: int
    seed: int
    inner_split: dict[str, Any]  # the inner split's summary (protocol, cutoff, sizes, evaluable users)
    trials: list[Trial] = field(default_factory=list)

    @property
    def completed(self) -> list[Trial]:
        return [t for t in self.trials if t.state == "complete"]

    @property
    def best(self) -> Trial:
        """The complete trial with the highest inner score (the earliest among equals: trial 0 wins ties)."""
        done = self.completed
        if not done:
            reasons = "; ".join(sorted({t.error or t.state for t in self.trials}))
            raise MfpipeError(f"{self.model}: no search trial completed ({reasons})", exit_code=1)
        return max(done, key=lambda t: (t.value, -t.number))

    @property
    def best_params(self) -> dict[str, Any]:
        """What to pass to `create(model, ...)` to refit the best setting on the whole train part."""
        return dict(self.best.params)

    def to_json(self) -> dict[str, Any]:
        top = self.best if self.completed else None
        best = None if top is None else {"number": top.number, "params": top.params, f"ndcg@{self.k}": top.value}
        return {
            "model": self.model, "k": self.k, "seed": self.seed, "inner_split": self.inner_split, "best": best,
            "trials": [t.to_json(self.k) for t in self.trials],
        }  # fmt: skip


def defaults(name: str) -> dict[str, Any]:
    """The model's default value of every parameter in its search space (what trial 0 runs)."""
    fields = MODELS[name].Params.model_fields
    return {key: fields[key].default for key in space(name)}


def space(name: str) -> dict[str, BaseDistribution]:
    """The search space of model `name` (an MfpipeError for a model without one)."""
    if name not in SPACES:
        raise MfpipeError(f"no search space for model '{name}'; choose from {', '.join(SPACES)}")
    return SPACES[name]


def inner_split(train: Interactions, options: SplitOptions = DEFAULT_INNER) -> Split:
    """The split of the train part that trials are fitted and scored on (temporal unless told otherwise)."""
    try:
        return split_interactions(train, options)
    except MfpipeError as exc:
        raise MfpipeError(f"search: the inner split of the train part is unusable: {exc}") from None


class _Pruning:
    """Reports a model's learning curve to its Optuna trial between epochs and prunes a losing fit.

    It wraps the model's `check_deadline`, which every training loop calls between epochs/iterations
    (after BPR has evaluated that chunk), so no model needs to know about Optuna.
    """

    def __init__(self, model: Recommender, trial: optuna.Trial, reported: dict[int, float]) -> None:
        self.model = model
        self.trial = trial
        self.reported = reported  # epoch -> value, filled as points are reported
        check = model.check_deadline

        def check_then_prune(progress: str) -> None:
            check(progress)
            if self.sync() and trial.should_prune():
                raise optuna.TrialPruned(f"pruned {progress}")

        model.check_deadline = check_then_prune  # type: ignore[method-assign]

    def sync(self) -> bool:
        """Report the curve points not reported yet; True if there was one."""
        values = self.model.history.get("epoch_ndcg_at_10", [])
        epochs = self.model.history.get("eval_epoch", [])
        new = False
        for epoch, value in zip(epochs, values, strict=False):
            step = int(epoch)
            if step not in self.reported:
                self.trial.report(float(value), step)
                self.reported[step] = float(value)
                new = True
        return new


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, MfpipeError) else f"{type(exc).__name__}: {text}"


def search(
    name: str,
    train: Interactions,
    n_trials: int = 20,
    seed: int = 42,
    k: int = 10,
    *,
    threads: int | None = None,
    trial_timeout: float | None = None,
    inner: SplitOptions = DEFAULT_INNER,
    pruner: optuna.pruners.BasePruner | None = None,
    fixed: Mapping[str, Any] | None = None,
    on_trial: OnTrial | None = None,
) -> SearchResult:
    """Tune model `name` with `n_trials` Optuna TPE trials (seeded) on an inner temporal split of `train`.

    `train` is the train part of the outer split; its validation slice is not an argument and is never
    used. Each trial fits on the inner train only (as `train_model` fits on the outer train only) and is
    scored by warm-user NDCG@k on the inner validation. `threads` is each fit's thread count (BLAS
    limited to the same), `trial_timeout` (seconds) the deadline of each fit; `fixed` are params set on
    every trial and not searched (e.g. `deterministic`, or `epochs`); `pruner` defaults to a median
    pruner over learning curves. Returns every trial and the best.
    """
    from threadpoolctl import threadpool_limits

    from mfpipe.evaluation import evaluate_model

    fixed = dict(fixed or {})
    distributions = {key: dist for key, dist in space(name).items() if key not in fixed}
    if n_trials < 1:
        raise MfpipeError(f"--search needs at least 1 trial, got {n_trials}")
    create(name, fixed)  # an invalid fixed parameter is the caller's error, not a failed trial
    split = inner_split(train, inner)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=max(3, min(10, n_trials // 3)), multivariate=True
        )
    study = optuna.create_study(
        direction="maximize",
        sampler=sampler,
        pruner=pruner if pruner is not None else optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=20),
    )
    study.enqueue_trial({key: value for key, value in defaults(name).items() if key in distributions})
    result = SearchResult(name, k, seed, split.summary.to_json())
    for _ in range(n_trials):
        trial = study.ask(distributions)
        params = dict(trial.params)
        started = time.perf_counter()
        value: float | None = None
        error: str | None = None
        reported: dict[int, float] = {}
        try:
            model = create(name, {**fixed, **params}, threads=threads, seed=seed)
            pruning = _Pruning(model, trial, reported)
            deadline = None if trial_timeout is None else time.monotonic() + trial_timeout
            with threadpool_limits(limits=threads, user_api="blas"):
                model.fit(split.train, deadline=deadline)
            value = float(evaluate_model(model, split, k, seed=seed).warm["ndcg"].mean)
            if not np.isfinite(value):
                raise MfpipeError(f"{name}: inner validation NDCG@{k} is undefined")
            pruning.sync()
            state: TrialStatus = "complete"
            study.tell(trial, value)
        except optuna.TrialPruned:
            state = "pruned"
            study.tell(trial, state=TrialState.PRUNED)
        except Exception as exc:  # diverged, timed out, an invalid combination: this trial failed, not the search
            state, value, error = "failed", None, _one_line(exc)
            study.tell(trial, state=TrialState.FAIL)
        record = Trial(trial.number, params, state, value, time.perf_counter() - started, error, reported)
        result.trials.append(record)
        if on_trial is not None:
            on_trial(record.number, dict(params), value, state)
    return result
