"""Our BPR (Rendle et al. 2009) in numba: the project's showcase, faster and better than implicit's.

Quality comes from the negatives: drawn uniformly over the catalogue and verified unseen (implicit
draws them in proportion to popularity, which on MovieLens costs most of its NDCG), and of two such
candidates the one the model currently scores higher is used (dynamic negative sampling): on
ml-latest-small, random-per-user, NDCG@10 0.317 -> 0.346 at the tuned defaults. Speed comes from the
kernels in `_bpr_kernels` (Hogwild threads, pipelined prefetch, one-cache-line exact membership sets).

Early stopping never sees the run's validation slice (it is what the candidate is scored and promoted
on; stopping on it would bias that score upwards against a champion re-scored without the advantage).
It uses data held out from the train part itself:
a seeded sample of `eval_users` users with at least two distinct train items gives up `holdout_share` of
them (at least one, never all): a seeded random share (`holdout="random"`, the default) or their latest
(`"latest"`, equal timestamps in seeded random order). Random, because it early-stopped better on every
protocol measured (deterministic, seeds 42/43, warm NDCG@10 on validation): ml-latest-small
random-per-item 0.338/0.346 against 0.304/0.346 for latest, synthetic:100k temporal 0.244/0.246 against
0.239/0.246. Users' latest train items are a burst the rest of their history predicts poorly (held-out
NDCG@10 ~0.05 on ml-latest-small, flat after ~20 epochs), so patience ran out on noise. The held-out
pairs are left out of sampling (positives and membership sets alike, so they may be drawn as negatives,
as validation items are), and every `eval_every` epochs NDCG@10 over them ranks the train catalogue minus
the pairs still sampled; after `patience` evaluations without improvement the loop stops. On large data
the evaluations come after every `eval_samples` sampled pairs instead (in whole epochs), because the
curve moves with the samples seen, not the epochs: at synthetic:32M (25M train pairs) it was flat from the
fifth epoch, and five-epoch steps spent 30 epochs of patience on noise (synthetic:10M, temporal, seed 42:
21 epochs, NDCG@10 0.166, against 70 + 40 refitted epochs and 0.165 before). When the
held-out pairs are at least `refit_share` of the train pairs (small data: on ml-latest-small every user is
sampled and a fifth of the pairs are held out), the model is then refitted from the same seeded start on
every train pair for the best evaluated number of epochs: the stopped state never learned those pairs, and
the refit trains exactly the model a fixed-epoch fit of the chosen length would (bit for bit in
deterministic mode), at the cost of one more fit. Below that share (large data: 1000 users of
synthetic:1M hold out 2% of its pairs, 0.2% at 10M) the refit would cost a third or more of the fit to
learn almost nothing, so the factors of the best evaluation are kept instead (synthetic:1M, temporal,
seeds 42/7: NDCG@10 0.192/0.193 kept against 0.193/0.193 refitted, in 40-70% of the time).
Early stopping is skipped (a plain fit of `epochs` epochs on everything) with `early_stopping=False`,
when `epochs` make at most one evaluation (it chooses nothing), or when no user has two train interactions.

Learning curves land in `history`: `epoch_loss` (mean -ln sigmoid(x_uij) of the sampled triples),
`epoch_auc` (share of sampled triples ranked right before their update: a sampled training AUC,
against the harder of the candidate negatives) and `epoch_ndcg_at_10` at the epochs in `eval_epoch`.
With early stopping all three are of the early-stopping run: loss and AUC over the train pairs it
samples, NDCG@10 on the held-out train pairs (never on validation); the refit's own curves are
`refit_epoch_loss` and `refit_epoch_auc`, one entry per epoch, so their length is the chosen epoch count.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numba
import numpy as np
import scipy.sparse as sp
from pydantic import Field

from mfpipe.data.interactions import Interactions
from mfpipe.errors import MfpipeError
from mfpipe.models import _bpr_kernels as kernels
from mfpipe.models.base import FactorModel, ModelParams
from mfpipe.parallel import numba_threads

CACHE_LINE_BYTES = 64


class BPRParams(ModelParams):
    """Defaults tuned on ml-latest-small, random-per-user 75/25 (seed 42), validation NDCG@10 of warm users;
    reg_user 0.1 -> 0.15, reg_item 0.001 -> 0.003, negative_candidates 2 -> 3: proposed by Optuna on inner
    splits of the train parts (benchmarks/tune_defaults.py), kept as the one candidate higher on both datasets
    and all three protocols, 2 seeds (ml-latest-small random-per-item 0.345 -> 0.350, synthetic:100k
    0.264 -> 0.282; benchmarks/TUNING.md). Then learning_rate 0.1 -> 0.05, lr_decay 0.98 -> 0.99, epochs
    150 -> 300, reg_bias 0 -> 0.003 (the same summed step, spread over more epochs): higher in all nine
    cells of an ML-100K-like dense proxy, ml-latest-small and synthetic:100k x three protocols (proxy
    random-per-item 0.358 -> 0.380; TUNING.md "A denser, ML-100K-like proxy")."""

    factors: int = Field(64, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    lr_decay: float = Field(0.99, gt=0, le=1)  # multiplier per epoch
    reg_user: float = Field(0.15, ge=0)
    reg_item: float = Field(0.003, ge=0)
    reg_bias: float = Field(0.003, ge=0)
    epochs: int = Field(300, ge=1)
    negative_sampling: Literal["uniform", "popularity"] = "uniform"
    negative_candidates: int = Field(3, ge=1, le=8)  # >1: keep the highest-scoring (dynamic negative sampling)
    # Positives in runs of this many consecutive pair rows (mostly one user's): the user's factor row is
    # loaded once per run, not once per sample (speed; every pair stays equally likely, see _bpr_kernels).
    positive_run: int = Field(4, ge=1, le=64)
    init_std: float = Field(0.1, gt=0)
    early_stopping: bool = True  # False: exactly `epochs` epochs on every train pair (fixed-epoch benchmarks)
    eval_every: int = Field(5, ge=1)  # epochs between early-stopping evaluations...
    eval_samples: int = Field(5_000_000, ge=1)  # ...or fewer: as many whole epochs as sample this many pairs
    patience: int = Field(6, ge=1)  # evaluations without improvement before stopping
    eval_users: int = Field(1000, ge=1)  # seeded sample of train users whose latest pairs are held out
    holdout_share: float = Field(0.2, gt=0, lt=1)  # share of each sampled user's train pairs held out
    holdout: Literal["random", "latest"] = "random"  # which of their pairs: a seeded random share, or the latest
    refit_share: float = Field(0.05, ge=0, le=1)  # refit only if the held-out pairs are at least this share of all
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
            p.reg_bias, p.negative_candidates, p.positive_run, learn, loss, correct, skipped,
        )  # fmt: skip
        return loss, correct, skipped

    def memory_pass(self, model: BPR, epochs: int, threads: int, seed: int) -> None:
        """`epochs` epochs of the training loop without its arithmetic, on `threads` threads.

        The same sampling, verification, prefetch and row loads as a one-candidate fit, no update: what
        memory alone allows, the ceiling the BPR benchmark measures the kernel against.
        """
        with numba_threads(threads):
            self.epochs(model, kernels.thread_states(seed, threads), np.zeros(epochs, np.float32), learn=False)


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
        for factors in (self.user_factors, self.item_factors):  # drawn in float32, in place: no float64 copy
            rng.standard_normal(dtype=np.float32, out=factors)
            factors *= np.float32(self.params.init_std)
        self.item_bias = np.zeros(n_items, np.float32)

    def _fit(self, train: Interactions) -> None:
        """Early-stop on held-out train pairs, then refit on every pair or keep the best state (module docstring)."""
        p = self.params
        seen = self._fitted_seen()
        popularity = p.negative_sampling == "popularity"
        self.history = {"epoch_loss": [], "epoch_auc": []}
        stopping = p.early_stopping and p.epochs > self.epochs_per_evaluation(seen.nnz)
        held_out = HeldOut.from_train(train, p, self.seed) if stopping else None
        self.init_state(*seen.shape)
        if held_out is None:
            self._train(Sampler(seen, popularity), p.epochs)
            return
        refit = held_out.share(seen) >= p.refit_share
        stopper = EarlyStopping(self, held_out, keep_best=not refit)
        self._train(Sampler(held_out.remaining, popularity), p.epochs, stopper)
        chosen = stopper.best_epoch
        if not refit:
            stopper.restore_best()
            return
        self.check_deadline(f"early stopping chose epoch {chosen}, refitting on every train pair")
        self.init_state(*seen.shape)  # the same seeded start: the refit is a plain fit of `chosen` epochs
        self._train(Sampler(seen, popularity), chosen, prefix="refit_")

    def epochs_per_evaluation(self, n_pairs: int) -> int:
        """Epochs between early-stopping evaluations: `eval_every`, fewer on large data (module docstring)."""
        return max(1, min(self.params.eval_every, self.params.eval_samples // max(n_pairs, 1)))

    def _train(self, sampler: Sampler, epochs: int, stopper: EarlyStopping | None = None, prefix: str = "") -> None:
        """`epochs` epochs in chunks of `epochs_per_evaluation` from a fresh seeded generator state (so a refit
        replays a plain fit exactly), evaluating `stopper` after each chunk and stopping when it says so.

        States are made for the most threads: a chunk runs on the first `n_threads` of them, re-read per
        chunk (the trainer may hand this fit more cores), so the deadline is checked between chunks too.
        """
        p = self.params
        states = kernels.thread_states(self.seed, numba.config.NUMBA_NUM_THREADS)
        label = "refit: " if prefix else ""
        chunk = self.epochs_per_evaluation(len(sampler.pairs))
        epoch = 0
        while epoch < epochs:
            n = min(chunk, epochs - epoch)
            learning_rates = p.learning_rate * p.lr_decay ** np.arange(epoch, epoch + n)
            n_threads = self.n_threads
            with numba_threads(n_threads):
                sums = sampler.epochs(self, states[:n_threads], learning_rates)
            self._record(epoch, len(sampler.pairs), *sums, prefix=prefix)
            epoch += n
            if stopper is not None and stopper.should_stop(epoch):
                break
            if epoch < epochs:
                self.check_deadline(f"{label}after epoch {epoch} of {epochs}")

    def _record(
        self,
        first_epoch: int,
        n_pairs: int,
        loss: np.ndarray,
        correct: np.ndarray,
        skipped: np.ndarray,
        prefix: str = "",
    ) -> None:
        """Append per-epoch mean loss and sampled AUC over the `n_pairs` triples sampled per epoch (under
        `prefix`: "refit_" for the refit); a non-finite loss fails the fit (exit code 1)."""
        used = np.maximum(n_pairs - skipped.sum(axis=0), 1)
        mean_loss = loss.sum(axis=0) / used
        bad = np.flatnonzero(~np.isfinite(mean_loss))
        if len(bad):
            raise MfpipeError(
                f"bpr: training diverged (loss {mean_loss[bad[0]]} at epoch {first_epoch + bad[0] + 1}); "
                f"lower learning_rate (now {self.params.learning_rate})",
                exit_code=1,
            )
        self.history.setdefault(f"{prefix}epoch_loss", []).extend(mean_loss.tolist())
        self.history.setdefault(f"{prefix}epoch_auc", []).extend((correct.sum(axis=0) / used).tolist())


class HeldOut:
    """What early stopping measures on, taken from the train part only (module docstring).

    `users` (sorted) are the sampled users, `truth` their held-out items (row r for `users[r]`), and
    `remaining` the user x item CSR of the train pairs still sampled while early stopping decides.
    """

    def __init__(self, users: np.ndarray, truth: sp.csr_matrix, remaining: sp.csr_matrix) -> None:
        self.users = users
        self.truth = truth
        self.remaining = remaining

    def share(self, seen: sp.csr_matrix) -> float:
        """The held-out pairs' share of all distinct train pairs."""
        return self.truth.nnz / max(seen.nnz, 1)

    @classmethod
    def from_train(cls, train: Interactions, params: BPRParams, seed: int) -> HeldOut | None:
        """Each of a seeded sample of `eval_users` users (with >= 2 distinct train items) gives up
        `holdout_share` of their distinct items (at least one, never all), at random or their latest
        (`params.holdout`); None if no user can give one.

        With "latest", ties (MovieLens users rate in bursts of one second) are broken at random, seeded,
        not by file order.
        """
        seen = train.matrix
        counts = np.diff(seen.indptr)  # distinct items per user
        eligible = np.flatnonzero(counts >= 2)
        if len(eligible) == 0:
            return None
        rng = np.random.default_rng(seed)
        users = eligible
        if len(users) > params.eval_users:
            users = np.sort(rng.choice(users, params.eval_users, replace=False))
        rows = np.flatnonzero(np.isin(train.users, users))
        recency = -train.timestamps[rows] if params.holdout == "latest" else np.zeros(len(rows), np.int64)
        order = np.lexsort((rng.random(len(rows)), recency, train.users[rows]))
        rows = rows[order]  # by user, then latest first ("latest") or at random ("random")
        # A repeated (user, item) counts once, at its latest row (the first one in this order).
        key = train.users[rows].astype(np.int64) * train.n_items + train.items[rows]
        rows = rows[np.sort(np.unique(key, return_index=True)[1])]
        row_users = train.users[rows]
        slot = np.searchsorted(users, row_users)  # the row of `truth` each pair belongs to
        rank = np.arange(len(rows)) - np.searchsorted(row_users, users)[slot]  # 0 = the user's latest pair
        n_held = np.maximum(1, np.floor(params.holdout_share * counts[users]).astype(np.int64))  # < count
        held = rank < n_held[slot]
        items = train.items[rows[held]]
        ones = np.ones(len(items), np.float32)
        truth = sp.csr_matrix((ones, (slot[held], items)), shape=(len(users), train.n_items))
        removed = sp.csr_matrix((ones, (row_users[held], items)), shape=seen.shape)
        binary = seen.copy()
        binary.data = np.ones_like(binary.data)
        remaining = sp.csr_matrix(binary - removed)
        remaining.eliminate_zeros()
        remaining.sort_indices()
        return cls(users, truth, remaining)


class EarlyStopping:
    """NDCG@10 on the held-out train pairs after each chunk of epochs, with patience; remembers the best epoch.

    Ranking excludes only the pairs still sampled (`remaining`), so the held-out items compete with the
    rest of the train catalogue as validation items do. With `keep_best` the factors of the best evaluation
    are copied (factors and biases: tens of MB at ml-32m's size) so `restore_best` can return to them;
    otherwise no state is copied, because the best epoch is refitted.
    """

    K = 10
    BATCH = 512  # users ranked at once (bounds the score block on large catalogues)

    def __init__(self, model: BPR, held_out: HeldOut, keep_best: bool = False) -> None:
        self.model = model
        self.held_out = held_out
        self.keep_best = keep_best
        self.best = -np.inf
        self.best_epoch = 0
        self.best_state: tuple[np.ndarray, ...] = ()
        self.waited = 0
        model.history["epoch_ndcg_at_10"] = []
        model.history["eval_epoch"] = []

    def ndcg(self) -> float:
        """Mean NDCG@10 of the held-out users on the model as it stands."""
        from mfpipe.evaluation import per_user_metrics
        from mfpipe.ranking import top_k_factors

        m, held = self.model, self.held_out
        values = []
        for start in range(0, len(held.users), self.BATCH):
            users = held.users[start : start + self.BATCH]
            recommended, _ = top_k_factors(
                m.user_factors[users], m.item_factors, self.K, users, held.remaining, m.item_bias
            )
            values.append(per_user_metrics(recommended, held.truth[start : start + self.BATCH], self.K)["ndcg"])
        return float(np.mean(np.concatenate(values)))

    def should_stop(self, epoch: int) -> bool:
        """Evaluate after `epoch` epochs; True once `patience` evaluations brought no improvement."""
        value = self.ndcg()
        self.model.history["epoch_ndcg_at_10"].append(value)
        self.model.history["eval_epoch"].append(float(epoch))
        if value > self.best:
            self.best, self.best_epoch, self.waited = value, epoch, 0
            if self.keep_best:
                self.best_state = tuple(a.copy() for a in self._state())
            return False
        self.waited += 1
        return self.waited >= self.model.params.patience

    def _state(self) -> tuple[np.ndarray, ...]:
        m = self.model
        return m.user_factors, m.item_factors, m.item_bias

    def restore_best(self) -> None:
        """Put the factors of the best evaluation back in place (rows stay cache-line aligned)."""
        for live, best in zip(self._state(), self.best_state, strict=True):
            live[:] = best
