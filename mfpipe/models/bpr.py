"""Our BPR (Rendle et al. 2009) in numba: the project's showcase, faster and better than implicit's.

Quality comes from the negatives: drawn uniformly over the catalogue and verified unseen (implicit
draws them in proportion to popularity, which on MovieLens costs most of its NDCG), and of two such
candidates the one the model currently scores higher is used (dynamic negative sampling): on
ml-latest-small, random-per-user, NDCG@10 0.317 -> 0.346 at the tuned defaults. Speed comes from the
kernels in `_bpr_kernels` (Hogwild threads, pipelined prefetch, one-cache-line exact membership sets).

Learning curves land in `history`: `epoch_loss` (mean -ln sigmoid(x_uij) of the sampled triples),
`epoch_auc` (share of sampled triples ranked right before their update: a sampled training AUC,
against the harder of the candidate negatives) and,
with a validation matrix, `epoch_ndcg_at_10` at the epochs in `eval_epoch`. Early stopping keeps the
best evaluated state.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numba
import numpy as np
import scipy.sparse as sp
from pydantic import Field

from mfpipe.data.interactions import Interactions
from mfpipe.errors import MfpipeError
from mfpipe.models import _bpr_kernels as kernels
from mfpipe.models.base import FactorModel, ModelParams

CACHE_LINE_BYTES = 64


class BPRParams(ModelParams):
    """Defaults tuned on ml-latest-small, random-per-user 75/25 (seed 42), validation NDCG@10 of warm users;
    reg_user 0.1 -> 0.15, reg_item 0.001 -> 0.003, negative_candidates 2 -> 3: proposed by Optuna on inner
    splits of the train parts (benchmarks/tune_defaults.py), kept as the one candidate higher on both datasets
    and all three protocols, 2 seeds (ml-latest-small random-per-item 0.345 -> 0.350, synthetic:100k
    0.264 -> 0.282; benchmarks/TUNING.md)."""

    factors: int = Field(64, ge=1)
    learning_rate: float = Field(0.1, gt=0)
    lr_decay: float = Field(0.98, gt=0, le=1)  # multiplier per epoch
    reg_user: float = Field(0.15, ge=0)
    reg_item: float = Field(0.003, ge=0)
    reg_bias: float = Field(0.0, ge=0)
    epochs: int = Field(150, ge=1)
    negative_sampling: Literal["uniform", "popularity"] = "uniform"
    negative_candidates: int = Field(3, ge=1, le=8)  # >1: keep the highest-scoring (dynamic negative sampling)
    init_std: float = Field(0.1, gt=0)
    eval_every: int = Field(5, ge=1)  # epochs between early-stopping evaluations
    patience: int = Field(6, ge=1)  # evaluations without improvement before stopping
    eval_users: int = Field(1000, ge=1)  # fixed seeded sample of validation users
    deterministic: bool = False  # one thread: exactly reproducible for a seed


def aligned_zeros(rows: int, cols: int) -> np.ndarray:
    """float32 (rows, cols) whose first row starts on a cache line (64-float rows span exactly 4 lines)."""
    nbytes = rows * cols * 4
    buffer = np.zeros(nbytes + CACHE_LINE_BYTES, np.uint8)
    start = -buffer.ctypes.data % CACHE_LINE_BYTES
    return buffer[start : start + nbytes].view(np.float32).reshape(rows, cols)


class Sampler:
    """What the kernels sample from, built once per fit: the pair rows and the membership sets.

    A pair row is (user, item, first membership bucket of the user, the user's bucket count): the one
    load that gives a positive also says where to check the user's negatives.
    """

    def __init__(self, seen: sp.csr_matrix, popularity: bool) -> None:
        self.n_items = seen.shape[1]
        self.pairs, self.slots, self.first, self.n_buckets = kernels.sampling_tables(
            seen.indptr.astype(np.int64), seen.indices.astype(np.int32)
        )
        self.popularity = popularity

    def is_seen(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The sampler's own membership test, vectorised (for checks)."""
        return kernels.is_seen_many(
            self.slots, self.first, self.n_buckets, np.asarray(users, np.int64), np.asarray(items, np.int64)
        )

    def negatives(self, users: np.ndarray, seed: int) -> np.ndarray:
        """One verified negative per user, drawn as in training (-1: the user left no negative)."""
        state = kernels.thread_states(seed, 1)[0]
        return kernels.draw_negatives(
            self.pairs, self.slots, self.first, self.n_buckets, self.n_items, self.popularity,
            np.asarray(users, np.int64), state,
        )  # fmt: skip

    def epochs(
        self, model: BPR, states: np.ndarray, learning_rates: np.ndarray, learn: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run the kernel for len(learning_rates) epochs; per-chunk (loss, correct, skipped) sums."""
        shape = (len(states), len(learning_rates))
        loss, correct, skipped = np.zeros(shape), np.zeros(shape, np.int64), np.zeros(shape, np.int64)
        p = model.params
        kernels.train_epochs(
            model.user_factors, model.item_factors, model.item_bias, self.pairs, self.slots, self.n_items,
            self.popularity, states, len(self.pairs), learning_rates.astype(np.float32), p.reg_user, p.reg_item,
            p.reg_bias, p.negative_candidates, learn, loss, correct, skipped,
        )  # fmt: skip
        return loss, correct, skipped

    def memory_pass(self, model: BPR, epochs: int, threads: int, seed: int) -> None:
        """`epochs` epochs of the training loop without its arithmetic, on `threads` threads.

        The same sampling, verification, prefetch and row loads as a one-candidate fit, no update: what
        memory alone allows, the ceiling the BPR benchmark measures the kernel against.
        """
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            self.epochs(model, kernels.thread_states(seed, threads), np.zeros(epochs, np.float32), learn=False)
        finally:
            numba.set_num_threads(previous)


class BPR(FactorModel):
    """Bayesian Personalized Ranking with item bias, Hogwild SGD in numba (see module docstring)."""

    name: ClassVar[str] = "bpr"
    Params: ClassVar[type[ModelParams]] = BPRParams
    params: BPRParams

    @property
    def n_threads(self) -> int:
        """Threads (= Hogwild chunks) this fit uses: 1 when deterministic, else `threads` or every core."""
        if self.params.deterministic:
            return 1
        return max(1, min(self.threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS))

    def init_state(self, n_users: int, n_items: int) -> None:
        """Seeded random factors (aligned rows) and zero item biases."""
        rng = np.random.default_rng(self.seed)
        k = self.params.factors
        self.user_factors = aligned_zeros(n_users, k)
        self.item_factors = aligned_zeros(n_items, k)
        self.user_factors[:] = rng.normal(0.0, self.params.init_std, (n_users, k))
        self.item_factors[:] = rng.normal(0.0, self.params.init_std, (n_items, k))
        self.item_bias = np.zeros(n_items, np.float32)

    def _fit(self, train: Interactions, validation: Any = None) -> None:
        p = self.params
        seen = self._fitted_seen()
        sampler = Sampler(seen, popularity=p.negative_sampling == "popularity")
        self.init_state(*seen.shape)
        self.history = {"epoch_loss": [], "epoch_auc": []}
        stopper = EarlyStopping(self, validation) if validation is not None else None
        # States for the most threads: a chunk of epochs runs on the first `n_threads` of them, re-read per
        # chunk (the trainer may hand this fit more cores), so the deadline is checked between chunks too.
        states = kernels.thread_states(self.seed, numba.config.NUMBA_NUM_THREADS)
        previous = numba.get_num_threads()
        try:
            epoch = 0
            while epoch < p.epochs:
                n = min(p.eval_every, p.epochs - epoch)
                learning_rates = p.learning_rate * p.lr_decay ** np.arange(epoch, epoch + n)
                n_threads = self.n_threads
                numba.set_num_threads(n_threads)
                self._record(epoch, *sampler.epochs(self, states[:n_threads], learning_rates))
                epoch += n
                if stopper is not None and stopper.should_stop(epoch):
                    break
                if epoch < p.epochs:
                    self.check_deadline(f"after epoch {epoch} of {p.epochs}")
        finally:
            numba.set_num_threads(previous)
        if stopper is not None:
            stopper.restore_best()

    def _record(self, first_epoch: int, loss: np.ndarray, correct: np.ndarray, skipped: np.ndarray) -> None:
        """Append per-epoch mean loss and sampled AUC; a non-finite loss fails the fit (exit code 1)."""
        used = np.maximum(len(self._fitted_seen().indices) - skipped.sum(axis=0), 1)
        mean_loss = loss.sum(axis=0) / used
        bad = np.flatnonzero(~np.isfinite(mean_loss))
        if len(bad):
            raise MfpipeError(
                f"bpr: training diverged (loss {mean_loss[bad[0]]} at epoch {first_epoch + bad[0] + 1}); "
                f"lower learning_rate (now {self.params.learning_rate})",
                exit_code=1,
            )
        self.history["epoch_loss"] += mean_loss.tolist()
        self.history["epoch_auc"] += (correct.sum(axis=0) / used).tolist()


class EarlyStopping:
    """NDCG@10 on a fixed seeded sample of validation users every `eval_every` epochs, with patience."""

    K = 10

    def __init__(self, model: BPR, validation: sp.spmatrix) -> None:
        truth = sp.csr_matrix(validation)
        n_users = model.n_users
        truth = truth[: min(truth.shape[0], n_users)]
        candidates = np.flatnonzero(np.diff(truth.indptr) > 0)
        if len(candidates) == 0:
            raise MfpipeError("bpr: the validation matrix has no relevant item for any train user")
        rng = np.random.default_rng(model.seed)
        if len(candidates) > model.params.eval_users:
            candidates = np.sort(rng.choice(candidates, model.params.eval_users, replace=False))
        self.model = model
        self.users = candidates
        self.truth = truth[candidates]
        self.best = -np.inf
        self.best_state: dict[str, np.ndarray] | None = None
        self.waited = 0
        model.history["epoch_ndcg_at_10"] = []
        model.history["eval_epoch"] = []

    def ndcg(self) -> float:
        from mfpipe.evaluation import per_user_metrics

        recommended, _ = self.model.recommend(self.users, self.K)
        return float(np.mean(per_user_metrics(recommended, self.truth, self.K)["ndcg"]))

    def should_stop(self, epoch: int) -> bool:
        """Evaluate after `epoch` epochs; True once `patience` evaluations brought no improvement."""
        value = self.ndcg()
        self.model.history["epoch_ndcg_at_10"].append(value)
        self.model.history["eval_epoch"].append(float(epoch))
        if value > self.best:
            self.best, self.waited = value, 0
            self.best_state = {k: v.copy() for k, v in self.model._state().items()}
            return False
        self.waited += 1
        return self.waited >= self.model.params.patience

    def restore_best(self) -> None:
        if self.best_state is not None:
            for name, value in self.best_state.items():
                getattr(self.model, name)[:] = value
