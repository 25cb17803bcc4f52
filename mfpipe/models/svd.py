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
from typing import Any, ClassVar, NoReturn

import numpy as np
from pydantic import Field

from mfpipe.data.interactions import Interactions
from mfpipe.errors import MfpipeError
from mfpipe.models.base import FactorModel, ModelParams

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

    def _fit(self, train: Interactions, validation: Any = None) -> None:
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


def surprise_trainset(train: Interactions) -> Any:
    """A Surprise trainset whose raw and inner ids are both our train indices.

    Built from our arrays directly: Surprise's `Dataset.load_from_df(...).build_full_trainset()` walks
    the rows in Python and took longer than the SVD fit itself on 1M ratings. The rating scale (what
    Surprise clips predictions to) is the train ratings' range.
    """
    import surprise

    ratings = train.ratings.astype(np.float64)
    return surprise.Trainset(
        ur=_grouped(train.users, train.items, ratings, train.n_users),
        ir=_grouped(train.items, train.users, ratings, train.n_items),
        n_users=train.n_users,
        n_items=train.n_items,
        n_ratings=len(train),
        rating_scale=(float(ratings.min()), float(ratings.max())),
        raw2inner_id_users={i: i for i in range(train.n_users)},
        raw2inner_id_items={i: i for i in range(train.n_items)},
    )


def _grouped(keys: np.ndarray, others: np.ndarray, ratings: np.ndarray, n: int) -> dict[int, list[tuple[int, float]]]:
    """{key: [(other, rating), ...]} in row order, the layout of Surprise's `ur` / `ir`."""
    order = np.argsort(keys, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=n))]).tolist()
    pairs = list(zip(others[order].tolist(), ratings[order].tolist(), strict=True))
    return {key: pairs[bounds[key] : bounds[key + 1]] for key in range(n) if bounds[key + 1] > bounds[key]}
