"""Surprise's biased SVD (Funk-style SGD on explicit ratings), scored with matrix algebra.

Surprise predicts one (user, item) pair at a time, which is far too slow for full-catalogue top-k. After
training we copy its parameters into numpy (the trainset is built so that Surprise's inner ids are our
train indices) and score a batch of users as `mean + bu + bi + pu @ qi.T` (equal to `predict(..., clip=False).est`;
the clipped prediction is useless for ranking because many items tie at the rating ceiling).

Tuned defaults (~50 trials on ml-latest-small, random-per-user 75/25, two split seeds): SVD fits
ratings, and its top-k quality falls as the rating fit improves (more epochs learn the long tail of
rarely rated items that the rating loss rewards). On `split_interactions(random-per-user, seed 42)`:
Surprise's defaults (100 factors, 20 epochs, reg 0.02) NDCG@10 0.086, RMSE 0.883; ours (20 factors,
10 epochs, reg 0.05) NDCG@10 0.121, RMSE 0.889. Stopping even earlier (3-5 epochs) reaches 0.17-0.20
but only by collapsing to the item biases, i.e. popularity (0.21), with RMSE 0.89-0.93; we keep SVD a
rating model and leave popularity to `pop`.

Deadline: Surprise runs every epoch inside one Cython call with no hook, and it cannot resume: each
`fit` draws fresh factors and zero biases, so it cannot be driven one epoch at a time. Re-implementing its
SGD loop would no longer be Surprise. So the fit runs in a forked child process (which inherits the
trainset, so nothing is pickled): the child's only output besides the result is Surprise's own verbose
line at the start of each epoch, which the parent reads to check the deadline between epochs; at the
deadline the child is killed (even mid-epoch) and the result pu, qi, bu, bi comes back through shared
memory. While the parent thread waits it holds no GIL, so other models keep training in their threads.
Surprise is single-threaded: `threads` does not apply. Without `os.fork` (Windows) the fit runs in-process
and the deadline is checked only before it.
"""

from __future__ import annotations

import gc
import mmap
import os
import select
import signal
import sys
import time
from functools import cache
from typing import Any, ClassVar, NoReturn

import numpy as np
from pydantic import Field

from mfpipe.data.interactions import Interactions
from mfpipe.errors import MfpipeError
from mfpipe.models.base import FactorModel, ModelParams, Recommender
from mfpipe.ranking import top_k_factors

EPOCH_LINE = b"Processing epoch "  # what Surprise's SVD prints at the start of each epoch when verbose


class SVDParams(ModelParams):
    """Defaults tuned on ml-latest-small, random-per-user (see the module docstring)."""

    n_factors: int = Field(20, ge=1)
    n_epochs: int = Field(10, ge=1)
    lr_all: float = Field(0.005, gt=0)
    reg_all: float = Field(0.05, ge=0)
    init_std_dev: float = Field(0.1, ge=0)


class SVD(FactorModel):
    """Biased SVD; state: user/item factors, user/item biases, global mean, rating scale (float64)."""

    name: ClassVar[str] = "svd"
    Params: ClassVar[type[ModelParams]] = SVDParams
    params: SVDParams

    def _fit(self, train: Interactions) -> None:
        import surprise

        if train.ratings is None:
            raise MfpipeError(f"svd: needs explicit ratings, and '{train.name}' has none (use als, bpr or pop)")
        self.algo = surprise.SVD(**self.params.model_dump(), biased=True, random_state=self.seed, verbose=False)
        trainset = surprise_trainset(train)
        if hasattr(os, "fork"):
            self.algo.trainset = trainset  # what AlgoBase.fit sets; the child computes the rest
            self.algo.bu, self.algo.bi, self.algo.pu, self.algo.qi = self._fit_in_child(trainset)
        else:
            self.algo.fit(trainset)
        self._import_parameters(trainset)
        trainset.release_rows()  # predict needs only sizes, scale and mean; a Dask worker sends the model back

    def _fit_in_child(self, trainset: Any) -> list[np.ndarray]:
        """Surprise's fit in a forked child, killed at the deadline; returns its bu, bi, pu, qi."""
        k = self.params.n_factors
        shapes = [(trainset.n_users,), (trainset.n_items,), (trainset.n_users, k), (trainset.n_items, k)]
        sizes = [int(np.prod(shape)) for shape in shapes]
        shared = mmap.mmap(-1, 8 * sum(sizes))  # anonymous and shared: what the child writes, we read
        offsets = np.cumsum([0, *sizes[:-1]]).tolist()
        arrays = [
            np.frombuffer(shared, np.float64, size, 8 * offset).reshape(shape)
            for shape, size, offset in zip(shapes, sizes, offsets, strict=True)
        ]
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            os.close(read_end)
            _child_fit(self.algo, trainset, arrays, write_end)
        os.close(write_end)
        try:
            error = self._follow_epochs(read_end)
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        except BaseException:  # timed out or interrupted: stop the child's work now
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        finally:
            os.close(read_end)
        if status != 0:
            raise MfpipeError(f"svd: Surprise's fit failed ({error or f'exit status {status}'})", exit_code=1)
        return [array.copy() for array in arrays]

    def _follow_epochs(self, read_end: int) -> str | None:
        """Read the child's epoch lines until it exits, checking the deadline between epochs (and at it).

        Returns the child's error line, if it sent one.
        """
        total = self.params.n_epochs
        done, pending, error = 0, b"", None
        while True:
            wait = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            if not select.select([read_end], [], [], wait)[0]:
                self.check_deadline(f"after epoch {done} of {total}")
                continue
            chunk = os.read(read_end, 4096)
            if not chunk:
                return error
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if line.startswith(EPOCH_LINE):
                    done = int(line[len(EPOCH_LINE) :])  # epoch `done` starts: that many are finished
                    if done:
                        self.check_deadline(f"after epoch {done} of {total}")
                elif line.startswith(b"error: "):
                    error = line[len(b"error: ") :].decode(errors="replace")

    def _import_parameters(self, trainset: Any) -> None:
        """Copy pu, qi, bu, bi (inner ids = our indices by construction of the trainset) into our state."""
        self.user_factors = np.asarray(self.algo.pu, np.float64)
        self.item_factors = np.asarray(self.algo.qi, np.float64)
        self.user_bias = np.asarray(self.algo.bu, np.float64)
        self.item_bias = np.asarray(self.algo.bi, np.float64)
        self.global_mean = np.array(trainset.global_mean)
        self.rating_scale = np.array(trainset.rating_scale, np.float64)

    def predict(self, users: np.ndarray, items: np.ndarray, clip: bool = True) -> np.ndarray:
        """Rating estimates (float64) for warm (user, item) pairs; clipped to the train rating range."""
        est = (
            self.global_mean
            + self.user_bias[users]
            + self.item_bias[items]
            + np.einsum("ij,ij->i", self.user_factors[users], self.item_factors[items])
        )
        return np.clip(est, *self.rating_scale) if clip else est

    def recommend(self, users: np.ndarray, k: int = 10, exclude_seen: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Ranked block by block like the other factor models, on the float32 item part of the estimate
        (p_u . q_i + b_i): the global mean and the user's bias shift all of a user's items alike. They are
        added back, so the values are the rating estimates `score` gives. A full float64 score block per
        batch made SVD's evaluation the slowest of the four at ml-32m's catalogue."""
        users = np.asarray(users, dtype=np.int64)
        if not ((users >= 0) & (users < self.n_users)).all():
            return Recommender.recommend(self, users, k, exclude_seen)
        user_factors, item_factors, item_bias = self._ranking_factors()
        seen = self.seen if exclude_seen else None
        items, values = top_k_factors(user_factors[users], item_factors, k, users, seen, item_bias)
        return items, values + (self.user_bias[users] + self.global_mean).astype(np.float32)[:, None]

    def _ranking_factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 copies of p, q and b_i, made once per fitted state (kept with the arrays they copy)."""
        source = (self.user_factors, self.item_factors, self.item_bias)
        cached = getattr(self, "_float32", None)
        if cached is None or any(a is not b for a, b in zip(cached[0], source, strict=True)):
            cached = (source, tuple(np.ascontiguousarray(a, np.float32) for a in source))
            self._float32 = cached
        return cached[1]

    def score(self, users: np.ndarray) -> np.ndarray:
        scores = self.user_factors[users] @ self.item_factors.T
        scores += self.item_bias[None, :]
        scores += self.user_bias[users, None] + self.global_mean
        return scores.astype(np.float32)

    def rating_metrics(self, validation: Interactions) -> dict[str, float]:
        """RMSE and MAE of clipped predictions on validation ratings of warm (user, item) pairs.

        Pairs with a cold user or item are left out (Surprise's accuracy module would score them
        with its fallback); `n` says how many pairs were scored.
        """
        if validation.ratings is None:
            raise MfpipeError(f"svd: validation '{validation.name}' has no ratings to compute RMSE on")
        warm = (validation.users < self.n_users) & (validation.items < self.n_items)
        if not warm.any():
            return {"rmse": float("nan"), "mae": float("nan"), "n": 0}
        errors = self.predict(validation.users[warm], validation.items[warm]) - validation.ratings[warm]
        return {
            "rmse": float(np.sqrt(np.mean(errors**2))),
            "mae": float(np.mean(np.abs(errors))),
            "n": int(warm.sum()),
        }

    def _state(self) -> dict[str, np.ndarray]:
        return {
            **super()._state(),
            "user_bias": self.user_bias,
            "global_mean": self.global_mean,
            "rating_scale": self.rating_scale,
        }

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        super()._set_state(state)
        self.user_bias = state["user_bias"]
        self.global_mean = state["global_mean"]
        self.rating_scale = state["rating_scale"]


def _child_fit(algo: Any, trainset: Any, arrays: list[np.ndarray], write_end: int) -> NoReturn:
    """In the forked child: fit with Surprise's per-epoch line on the pipe, copy bu, bi, pu, qi out, exit.

    `os._exit` skips the parent's atexit handlers and buffered output, which the child must not run twice.
    """
    gc.disable()  # garbage the parent left must not be finalised here (its sockets, database handles)
    code = 1
    try:
        sys.stdout = open(write_end, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process exits next)
        algo.verbose = True
        algo.fit(trainset)
        for out, name in zip(arrays, ("bu", "bi", "pu", "qi"), strict=True):
            out[...] = getattr(algo, name)
        code = 0
    except BaseException as exc:  # whatever it is, the parent reports it
        os.write(write_end, f"\nerror: {type(exc).__name__}: {' '.join(str(exc).split())}\n".encode())
    finally:
        os._exit(code)


#: Ratings handed to Surprise's SGD loop per `tolist` call: big enough that the per-chunk overhead vanishes,
#: small enough that the transient Python objects stay a few MB.
ALL_RATINGS_CHUNK = 1 << 16


def surprise_trainset(train: Interactions) -> Any:
    """A Surprise trainset whose raw and inner ids are both our train indices, backed by numpy arrays.

    Surprise's own `Trainset` holds `ur` and `ir` as dicts of lists of (id, rating) tuples: about 300
    bytes of Python objects per rating, twice (by user and by item), i.e. ~2.4 GB for 8M train ratings,
    and the forked fit child copied those pages again as soon as its loop touched their reference
    counts. Surprise's SVD reads only `all_ratings()`, `global_mean`, `n_users`, `n_items` and, to
    predict, `knows_*`/`to_inner_*`/`rating_scale`; `_ArrayTrainset` serves those from the train arrays
    (12-16 bytes per rating, none when the rows are already grouped by user) in the order Surprise's
    dict layout gave, so the SGD visits the same ratings in the same order and the factors are the same.
    `ur` and `ir` are still there, built on first use, for code that wants them (tests, other algorithms).
    """
    return _array_trainset_type()(train.users, train.items, train.ratings, train.n_users, train.n_items)


@cache
def _array_trainset_type() -> type:
    """`_ArrayRatings` + `surprise.Trainset`, made on first use and published as this module's
    `_ArrayTrainset`, so a trainset pickles by reference (a Dask worker sends the fitted model back)."""
    import surprise

    cls = type("_ArrayTrainset", (_ArrayRatings, surprise.Trainset), {"__module__": __name__})
    globals()["_ArrayTrainset"] = cls
    return cls


def __getattr__(name: str) -> Any:
    """Unpickling an `_ArrayTrainset` in a fresh process finds the class here."""
    if name == "_ArrayTrainset":
        return _array_trainset_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _by_user(users: np.ndarray, items: np.ndarray, ratings: np.ndarray) -> tuple[np.ndarray, ...]:
    """The rows grouped by user in row order (a stable sort), without a copy when they already are."""
    if len(users) < 2 or bool(np.all(users[1:] >= users[:-1])):
        return users, items, ratings
    order = np.argsort(users, kind="stable")
    return users[order], items[order], ratings[order]


class _ArrayRatings:
    """The part of `surprise.Trainset` over numpy arrays (see `surprise_trainset`); inner id = raw id = index.

    A mixin placed before `surprise.Trainset` (in `_array_trainset_type`) so Surprise stays a lazy import.
    """

    def __init__(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray, n_users: int, n_items: int
                 ) -> None:  # fmt: skip
        # not Trainset.__init__: it stores ur/ir, which are lazy properties here
        self._rows = (users, items, ratings)  # row order, for `ir` (references: no copy)
        self._users, self._items, self._ratings = _by_user(users, items, ratings)
        self.n_users, self.n_items, self.n_ratings = int(n_users), int(n_items), len(users)
        self.rating_scale = (float(ratings.min()), float(ratings.max())) if len(ratings) else (0.0, 0.0)
        self._global_mean = None
        self._ur: dict[int, list[tuple[int, float]]] | None = None
        self._ir: dict[int, list[tuple[int, float]]] | None = None

    def release_rows(self) -> None:
        """Drop the references to the rows once the fit is done: `predict` reads only sizes, scale and mean
        (kept), and a fitted model pickled back from a Dask worker should not carry its train set."""
        _ = self.global_mean
        self._rows = self._users = self._items = self._ratings = None
        self._ur = self._ir = None

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._users is None:
            raise RuntimeError("this trainset's rows were released after the fit (see release_rows)")
        return self._users, self._items, self._ratings

    def all_ratings(self) -> Any:
        """(user, item, rating) as Python int, int, float, in user order then row order (Surprise's own)."""
        users, items, ratings = self._arrays()
        for s in range(0, self.n_ratings, ALL_RATINGS_CHUNK):
            e = s + ALL_RATINGS_CHUNK
            chunk = ratings[s:e].astype(np.float64).tolist()
            yield from zip(users[s:e].tolist(), items[s:e].tolist(), chunk, strict=True)

    @property
    def global_mean(self) -> float:
        """Surprise's value: np.mean over the ratings in `all_ratings` order (float64, same summation)."""
        if self._global_mean is None:
            self._global_mean = np.mean(self._ratings.astype(np.float64))
        return self._global_mean

    @property
    def ur(self) -> dict[int, list[tuple[int, float]]]:
        if self._ur is None:
            users, items, ratings = self._arrays()
            self._ur = _grouped(users, items, ratings.astype(np.float64), self.n_users)
        return self._ur

    @property
    def ir(self) -> dict[int, list[tuple[int, float]]]:
        if self._ir is None:
            self._arrays()
            users, items, ratings = self._rows
            self._ir = _grouped(items, users, ratings.astype(np.float64), self.n_items)
        return self._ir

    def _inner(self, raw: Any, n: int, what: str) -> int:
        if isinstance(raw, int | np.integer) and not isinstance(raw, bool) and 0 <= raw < n:
            return int(raw)
        raise ValueError(f"{what} {raw} is not part of the trainset.")

    def knows_user(self, uid: Any) -> bool:
        """Every train index has a rating (the train part's maps are compact), unknown ids are strings."""
        return isinstance(uid, int | np.integer) and not isinstance(uid, bool) and 0 <= uid < self.n_users

    def knows_item(self, iid: Any) -> bool:
        return isinstance(iid, int | np.integer) and not isinstance(iid, bool) and 0 <= iid < self.n_items

    def to_inner_uid(self, ruid: Any) -> int:
        return self._inner(ruid, self.n_users, "User")

    def to_inner_iid(self, riid: Any) -> int:
        return self._inner(riid, self.n_items, "Item")

    def to_raw_uid(self, iuid: Any) -> int:
        return self._inner(iuid, self.n_users, "User")

    def to_raw_iid(self, iiid: Any) -> int:
        return self._inner(iiid, self.n_items, "Item")

    @property
    def _raw2inner_id_users(self) -> dict[int, int]:
        return {i: i for i in range(self.n_users)}

    @property
    def _raw2inner_id_items(self) -> dict[int, int]:
        return {i: i for i in range(self.n_items)}


def _grouped(keys: np.ndarray, others: np.ndarray, ratings: np.ndarray, n: int) -> dict[int, list[tuple[int, float]]]:
    """{key: [(other, rating), ...]} in row order, the layout of Surprise's `ur` / `ir`."""
    order = np.argsort(keys, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=n))]).tolist()
    pairs = list(zip(others[order].tolist(), ratings[order].tolist(), strict=True))
    return {key: pairs[bounds[key] : bounds[key + 1]] for key in range(n) if bounds[key + 1] > bounds[key]}
