"""One contract, every registered model: the behaviour evaluation, serving and the flow rely on."""

from __future__ import annotations

import time
from collections.abc import Callable

import numba
import numpy as np
import pytest

from mfpipe.config import MODEL_NAMES
from mfpipe.errors import MfpipeError
from mfpipe.models import MODELS, Recommender, create, load
from mfpipe.models.base import TrainingTimeout
from mfpipe.ranking import top_k
from tests.models.conftest import make_interactions

NAMES = sorted(MODELS)


def fit(name: str, data, seed: int = 42) -> Recommender:
    # One thread: the deterministic mode every model offers (Hogwild BPR is only reproducible so).
    return create(name, threads=1, seed=seed).fit(data)


@pytest.fixture(scope="module", params=NAMES)
def fitted(request, small) -> Recommender:
    return fit(request.param, small)


def test_registry_covers_every_configurable_model() -> None:
    assert set(MODELS) == set(MODEL_NAMES)
    for name, cls in MODELS.items():
        assert cls.name == name


def test_unknown_model_and_bad_params_are_one_line_errors() -> None:
    with pytest.raises(MfpipeError, match="unknown model 'nope'"):
        create("nope")
    for name in NAMES:
        with pytest.raises(MfpipeError, match=f"{name}: invalid parameter 'no_such_param'"):
            create(name, {"no_such_param": 1})


@pytest.mark.parametrize("name", NAMES)
def test_unfitted_and_empty(name: str) -> None:
    model = create(name)
    with pytest.raises(MfpipeError, match="not fitted"):
        model.recommend(np.array([0]), 5)
    with pytest.raises(MfpipeError, match="empty"):
        model.fit(make_interactions([], [], [], n_users=0, n_items=0))


def test_shapes_and_dtypes(fitted: Recommender, small) -> None:
    users = np.arange(small.n_users)
    scores = fitted.score(users[:7])
    assert scores.shape == (7, small.n_items) and scores.dtype == np.float32
    items, values = fitted.recommend(users, k=5)
    assert items.shape == values.shape == (small.n_users, 5)
    assert items.dtype == np.int32 and values.dtype == np.float32
    assert ((items >= -1) & (items < small.n_items)).all()
    assert (items >= 0).all()  # every user has unseen items left to fill 5 slots
    assert (np.diff(values, axis=1) <= 0).all()  # best first


def test_recommendations_follow_scores(fitted: Recommender, small) -> None:
    """The lists are the top of `score` (factor models select from float32 BLAS blocks of their own, so
    values agree to float32 rounding, and only exact near-ties may order differently)."""
    users = np.arange(small.n_users)
    items, values = fitted.recommend(users, k=5)
    scores = fitted.score(users)
    np.testing.assert_allclose(values, np.take_along_axis(scores, items, axis=1), rtol=1e-5, atol=1e-6)
    scores[small.matrix.toarray() > 0] = -np.inf
    np.put_along_axis(scores, items, -np.inf, axis=1)
    assert (scores.max(axis=1) <= values[:, -1] + 1e-5 * np.abs(values[:, -1]) + 1e-6).all()  # nothing better left


def test_no_seen_items_and_no_duplicates(fitted: Recommender, small) -> None:
    users = np.arange(small.n_users)
    items, _ = fitted.recommend(users, k=small.n_items)
    seen = small.matrix
    for u, row in zip(users, items, strict=True):
        got = row[row >= 0]
        assert len(got) == len(set(got.tolist()))
        assert not set(got.tolist()) & set(seen.indices[seen.indptr[u] : seen.indptr[u + 1]].tolist())
        # Everything unseen is ranked, and nothing else: padding only where the catalogue runs out.
        assert len(got) == small.n_items - (seen.indptr[u + 1] - seen.indptr[u])


def test_exclude_seen_false_ranks_the_whole_catalogue(fitted: Recommender, small) -> None:
    items, _ = fitted.recommend(np.arange(small.n_users), k=small.n_items, exclude_seen=False)
    assert (items >= 0).all()
    assert all(len(set(row.tolist())) == small.n_items for row in items)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_seed(name: str, small) -> None:
    users = np.arange(small.n_users)
    a = fit(name, small, seed=3).recommend(users, 10)
    b = fit(name, small, seed=3).recommend(users, 10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_save_load_round_trip(fitted: Recommender, small, tmp_path) -> None:
    users = np.array([-1, *range(small.n_users), small.n_users + 3])
    path = fitted.save(tmp_path / "m" / "model.npz")
    for restored in (type(fitted).load(path), load(path)):
        assert type(restored) is type(fitted)
        assert restored.params == fitted.params and restored.seed == fitted.seed
        for got, want in zip(restored.recommend(users, 7), fitted.recommend(users, 7), strict=True):
            np.testing.assert_array_equal(got, want)


def test_load_rejects_other_models_and_junk(fitted: Recommender, tmp_path) -> None:
    path = fitted.save(tmp_path / "model.npz")
    other = next(cls for name, cls in MODELS.items() if name != fitted.name)
    with pytest.raises(MfpipeError, match=f"holds a '{fitted.name}' model"):
        other.load(path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a model")
    with pytest.raises(MfpipeError, match="not a readable saved model"):
        load(junk)
    with pytest.raises(MfpipeError, match="not a readable saved model"):
        load(tmp_path / "missing.npz")


def test_unknown_users_get_the_popularity_fallback(fitted: Recommender, small) -> None:
    items, _ = fitted.recommend(np.array([-1, small.n_users, 0]), k=6)
    expected, _ = top_k(fitted.popularity[None, :], 6)
    np.testing.assert_array_equal(items[0], expected[0])
    np.testing.assert_array_equal(items[1], expected[0])
    # The fallback follows item popularity: the most frequent train item comes first.
    counts = np.bincount(small.items, minlength=small.n_items)
    assert counts[items[0, 0]] == counts.max()


# -- tiny and degenerate data: a clear MfpipeError or a sensible result ------------------------------
DEGENERATE = {
    "one user": make_interactions([0, 0, 0], [0, 1, 2], [4.0, 3.0, 5.0], n_items=5),
    "one item": make_interactions([0, 1, 2], [0, 0, 0], [4.0, 3.0, 5.0]),
    "one interaction": make_interactions([0], [0], [4.0]),
    "user saw every item": make_interactions([0, 0, 0, 1, 2], [0, 1, 2, 0, 1], [5.0, 4.0, 3.0, 4.0, 2.0]),
    "no ratings": make_interactions([0, 0, 1, 2, 2], [0, 1, 1, 2, 0]),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
@pytest.mark.parametrize("name", NAMES)
def test_degenerate_data(name: str, case: str) -> None:
    data = DEGENERATE[case]
    try:
        model = fit(name, data)
    except MfpipeError as exc:
        assert name in str(exc) and "\n" not in str(exc)
        return
    users = np.arange(-1, data.n_users)
    items, values = model.recommend(users, k=4)
    assert items.shape == values.shape == (len(users), 4)
    assert np.isfinite(values[items >= 0]).all()
    assert (values[items < 0] == -np.inf).all()
    seen = data.matrix
    for u, row in zip(users[1:], items[1:], strict=True):
        n_unseen = data.n_items - (seen.indptr[u + 1] - seen.indptr[u])
        assert (row >= 0).sum() == min(4, n_unseen)  # -1 padded exactly where nothing is left
    assert (items[0] >= 0).sum() == min(4, data.n_items)  # the unknown user gets the whole fallback


@pytest.mark.parametrize("name", NAMES)
def test_k_larger_than_the_catalogue(name: str, small) -> None:
    model = fit(name, small)
    k = small.n_items + 7
    items, values = model.recommend(np.array([-1, 0, 1]), k=k)
    assert items.shape == (3, k)
    assert (items[0] >= 0).sum() == small.n_items
    assert (items[:, small.n_items :] == -1).all() and (values[:, small.n_items :] == -np.inf).all()


# -- training control: deadline, threads changed mid-fit, divergence -----------------------------------
# Many epochs/iterations, so a fit that ignored the deadline would visibly run to the end.
LONG = {"svd": {"n_epochs": 50}, "als": {"iterations": 50}, "bpr": {"epochs": 50, "eval_every": 1}, "pop": {}}
LOOPING = [name for name in NAMES if name != "pop"]  # pop counts once: there is no loop to interrupt


def on_check(model: Recommender, monkeypatch: pytest.MonkeyPatch, action: Callable[[int], None]) -> list[str]:
    """Make model.check_deadline run `action(call number)` first; returns the progress texts it was called with."""
    calls: list[str] = []
    original = model.check_deadline

    def check(progress: str) -> None:
        calls.append(progress)
        action(len(calls))
        original(progress)

    monkeypatch.setattr(model, "check_deadline", check)
    return calls


@pytest.mark.parametrize("name", NAMES)
def test_a_passed_deadline_stops_the_fit_before_training(name: str, small, monkeypatch) -> None:
    model = create(name, LONG[name], threads=1)
    calls = on_check(model, monkeypatch, lambda n: None)
    with pytest.raises(TrainingTimeout, match=f"^{name}: stopped before training: over its time limit$") as info:
        model.fit(small, deadline=time.monotonic() - 1.0)
    assert isinstance(info.value, MfpipeError) and info.value.exit_code == 1
    assert calls == ["before training"]  # no epoch ran
    with pytest.raises(MfpipeError, match="not fitted"):
        model.recommend(np.array([0]), 5)


@pytest.mark.parametrize("name", LOOPING)
def test_the_deadline_is_checked_between_epochs(name: str, small, monkeypatch) -> None:
    """The deadline passes during the 3rd epoch: the fit stops after it, not after all 50."""
    model = create(name, LONG[name], threads=1)

    def expire_after_three(call: int) -> None:
        if call == 4:  # calls: before training, then after epochs 1, 2, 3
            model.deadline = 0.0

    calls = on_check(model, monkeypatch, expire_after_three)
    with pytest.raises(
        TrainingTimeout, match=rf"^{name}: stopped after (epoch|iteration) 3 of 50: over its time limit$"
    ):
        model.fit(small, deadline=time.monotonic() + 600)
    assert calls[1:] == [f"after {'iteration' if name == 'als' else 'epoch'} {n} of 50" for n in (1, 2, 3)]
    if name == "bpr":
        assert len(model.history["epoch_loss"]) == 3
    assert model.seen is None  # a stopped fit leaves the model unfitted


def test_svd_is_stopped_at_the_deadline_even_within_its_epochs(small) -> None:
    """Surprise runs in a child process that is killed at the deadline (it has no hook of its own)."""
    model = create("svd", {"n_epochs": 1_000_000})  # minutes of work on the small data
    with pytest.raises(
        TrainingTimeout, match=r"^svd: stopped after epoch \d+ of 1000000: over its time limit$"
    ) as info:
        model.fit(small, deadline=time.monotonic() + 0.5)
    assert int(str(info.value).split()[4]) < 1_000_000


@pytest.mark.parametrize("name", NAMES)
def test_changing_threads_mid_fit_works(name: str, small, monkeypatch) -> None:
    """The trainer hands cores to a model while it trains: the fit goes on and its result is sound."""
    model = create(name, LONG[name] if name != "bpr" else {"epochs": 6, "eval_every": 1}, threads=1)

    def more_threads(call: int) -> None:
        model.threads = 2 if call % 2 else 1

    on_check(model, monkeypatch, more_threads)
    model.fit(small)
    items, values = model.recommend(np.arange(small.n_users), 5)
    assert (items >= 0).all() and np.isfinite(values).all()


def test_als_passes_changed_threads_to_implicit_per_iteration(small, monkeypatch) -> None:
    from implicit.cpu.als import AlternatingLeastSquares

    used: list[int] = []
    solver = AlternatingLeastSquares.solver

    def recording(self):
        inner = solver.fget(self)

        def solve(*args, num_threads: int, **kwargs):
            used.append(num_threads)
            return inner(*args, num_threads=num_threads, **kwargs)

        return solve

    monkeypatch.setattr(AlternatingLeastSquares, "solver", property(recording))
    model = create("als", {"iterations": 4}, threads=1)
    on_check(model, monkeypatch, lambda call: setattr(model, "threads", 2) if call == 2 else None)
    model.fit(small)
    assert used == [1, 1] + [2] * 6  # two solves per iteration; changed after iteration 1, used from the 2nd


def test_bpr_runs_each_epoch_chunk_on_the_current_threads(small, monkeypatch) -> None:
    from mfpipe.models.bpr import Sampler

    seen: list[tuple[int, int]] = []
    epochs = Sampler.epochs

    def recording(self, model, states, *args, **kwargs):
        seen.append((len(states), numba.get_num_threads()))
        return epochs(self, model, states, *args, **kwargs)

    monkeypatch.setattr(Sampler, "epochs", recording)
    model = create("bpr", {"epochs": 3, "eval_every": 1, "early_stopping": False}, threads=1)
    on_check(model, monkeypatch, lambda call: setattr(model, "threads", 2) if call == 2 else None)
    model.fit(small)
    more = min(2, numba.config.NUMBA_NUM_THREADS)  # a chunk never runs on more threads than numba has
    assert seen == [(1, 1), (more, more), (more, more)]


@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_learned_array_fails_the_fit(name: str, small, monkeypatch) -> None:
    """Top-k drops NaN scores silently, so the fit itself must refuse a diverged state."""
    cls = MODELS[name]
    learn = cls._fit
    poisoned: list[str] = []

    def diverging(self, train) -> None:
        learn(self, train)
        state = self._state()
        key = next(iter(state))
        values = np.array(state[key], np.float64)
        values.flat[-1] = np.nan
        self._set_state({**state, key: values})
        poisoned.append(key)

    monkeypatch.setattr(cls, "_fit", diverging)
    model = create(name, threads=1)
    with pytest.raises(MfpipeError, match=r"training diverged \(non-finite \w+\); check its parameters") as info:
        model.fit(small)
    assert str(info.value).startswith(f"{name}: training diverged (non-finite {poisoned[0]})")
    assert info.value.exit_code == 1 and model.seen is None


@pytest.mark.parametrize(("name", "params"), [("svd", {"lr_all": 1.0}), ("bpr", {"learning_rate": 1e4})])
def test_an_absurd_learning_rate_fails_the_fit(name: str, params: dict, small) -> None:
    with pytest.raises(MfpipeError, match=f"^{name}: training diverged") as info:
        create(name, params, threads=1).fit(small)
    assert info.value.exit_code == 1
