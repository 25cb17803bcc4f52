"""Benchmark: training throughput of our numba BPR vs implicit's CPU BPR, and their NDCG@10.

Same setting on both sides: 64 floats per factor row (implicit stores its item bias inside the row, so it
gets `factors=63`; ours has 64 factors and the bias in its own array), the same threads, negatives
verified unseen on both (`verify_negative_samples=True`), the same number of epochs, where an epoch is
nnz sampled triples. Each side is timed through a whole `fit` (setup included), medians of >= 3
interleaved runs (round robin, round r with seed + r), after a warm-up fit on a small slice that loads or
compiles the numba kernels. Every fit is then scored by the same `recommend` + `per_user_metrics` on a
random-per-user validation split: NDCG@10 is each side's mean over the rounds' seeds.
Ours draws its positives in runs of consecutive pairs (`positive_run`, its default sampler; the same work
per sample: one positive, one verified negative, one update), implicit one at a time.
Two rows per case. The target row runs ours with one verified negative per triple, exactly the peer's
work per sample, so the ratio measures the kernels. The `defaults` row runs our shipped defaults, which
draw three candidate negatives per triple and train on the hardest (better NDCG, more work per
sample); it has no target. Details give the memory ceiling: our one-candidate sampling loop with the
arithmetic left out (`Sampler.memory_pass`: same sampling, verification, prefetch and row loads), i.e.
what memory allows. It is timed in the same round robin as the fits (after `ours` in each round, on its
factors), so the share of the ceiling compares runs that saw the same load on the machine.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mfpipe.bench import BenchResult, benchmark
from mfpipe.data.interactions import Interactions
from mfpipe.models.base import FactorModel, ModelParams

PEER = "implicit.cpu.bpr (verified negatives)"
FACTORS = 64
NDCG_USERS = 5000  # validation users scored per case (a seeded sample on the large cases)


@dataclass(frozen=True)
class Case:
    name: str
    data: str  # a data spec: a source name or synthetic:N
    epochs: int
    target: float
    min_rounds: int = 3  # timed runs per side at least (short fits need more to give a stable median)


CASES = (
    Case("ml-latest-small", "ml-latest-small", 100, 1.5, min_rounds=9),
    Case("synthetic 1M", "synthetic:1M", 20, 3.0, min_rounds=9),  # 3x: the goal of the scale issue
    Case("synthetic 10M", "synthetic:10M", 3, 1.5),
)


class ImplicitBPRParams(ModelParams):
    factors: int = FACTORS - 1  # + implicit's bias column = 64 floats per row
    learning_rate: float = 0.01
    regularization: float = 0.01
    epochs: int = 100


class ImplicitBPR(FactorModel):
    """implicit's CPU BPR behind our model protocol, so both sides are fitted and ranked the same way.

    implicit's user rows end with a constant 1 and its item rows with the item bias, so the product of
    its factor matrices is already its score (our item bias stays zero).
    """

    name: ClassVar[str] = "implicit-bpr"
    Params: ClassVar[type[ModelParams]] = ImplicitBPRParams
    params: ImplicitBPRParams

    def _fit(self, train: Interactions, validation: Any = None) -> None:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        model = BayesianPersonalizedRanking(
            factors=self.params.factors,
            learning_rate=self.params.learning_rate,
            regularization=self.params.regularization,
            iterations=self.params.epochs,
            num_threads=self.threads or 0,
            verify_negative_samples=True,
            random_state=self.seed,
        )
        model.fit(self._fitted_seen(), show_progress=False)
        self.user_factors = np.ascontiguousarray(model.user_factors, np.float32)
        self.item_factors = np.ascontiguousarray(model.item_factors, np.float32)
        self.item_bias = np.zeros(train.n_items, np.float32)


def load_case_data(spec: str, seed: int) -> Interactions:
    """Interactions for a case: generated directly, or read through the data layer (cache, download)."""
    from mfpipe.config import load_config
    from mfpipe.data import read_frame, synthetic, synthetic_size, to_interactions

    size = synthetic_size(spec)
    if size is not None:
        return synthetic.generate(size, seed)
    config = load_config(overrides={"data": spec, "seed": seed})
    return to_interactions(read_frame(config.data, config.data_options, config.data_home, seed))


def validation_ndcg(model: FactorModel, split: Any, users: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k over `users` (warm, with relevant items), ranked by the model's own recommend."""
    from mfpipe.evaluation import per_user_metrics, recommend_batched

    recommended = recommend_batched(model, users, k)
    return float(np.mean(per_user_metrics(recommended, split.truth("validation")[users], k)["ndcg"]))


def evaluation_users(split: Any, seed: int, limit: int = NDCG_USERS) -> np.ndarray:
    """Warm validation users with >= 1 relevant item; a seeded sample of `limit` when there are more."""
    truth = split.truth("validation")
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    users = users[users < split.train.n_users]
    if len(users) > limit:
        users = np.sort(np.random.default_rng(seed).choice(users, limit, replace=False))
    return users


def round_robin(fns: tuple[Callable[[int], Any], ...], repeats: int) -> tuple[list[float], list[list[Any]]]:
    """Median wall seconds of each fn, run in turn (a, b, c, a, b, c, ...): drift hits every side alike.

    Each fn gets the round number (its seed offset); what it returns is kept per round, in order.
    `mfpipe.bench.interleaved` for more than two sides (ours, the peer, our defaults, the ceiling).
    """
    times: list[list[float]] = [[] for _ in fns]
    outputs: list[list[Any]] = [[] for _ in fns]
    for round_number in range(repeats):
        for fn, spent, kept in zip(fns, times, outputs, strict=True):
            start = time.perf_counter()
            kept.append(fn(round_number))
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times], outputs


def run_case(case: Case, threads: int, repeats: int, seed: int, report: Callable[[str], None]) -> list[BenchResult]:
    """Time the fits and our memory ceiling interleaved, then the fits' validation NDCG@10.

    Round r fits every side with seed + r, so NDCG@10 is a mean over `repeats` seeds per side (a single
    Hogwild fit moves it by more than the sides differ on the short cases)."""
    from mfpipe.config import SplitOptions
    from mfpipe.models.bpr import BPR, Sampler
    from mfpipe.split import split_interactions

    report(f"{case.name}: loading and splitting")
    split = split_interactions(load_case_data(case.data, seed), SplitOptions(protocol="random-per-user", seed=seed))
    train = split.train

    latest: dict[str, FactorModel] = {}  # the ceiling pass runs on the factors of its round's fit

    def ours(r: int) -> FactorModel:
        model = BPR(threads=threads, seed=seed + r, epochs=case.epochs, negative_candidates=1, early_stopping=False)
        latest["ours"] = model.fit(train)
        return model

    def peer(r: int) -> FactorModel:
        return ImplicitBPR(threads=threads, seed=seed + r, epochs=case.epochs).fit(train)

    def ours_defaults(r: int) -> FactorModel:
        return BPR(threads=threads, seed=seed + r, epochs=case.epochs, early_stopping=False).fit(train)

    sampler = Sampler(train.matrix, popularity=False)  # what ours samples from (uniform negatives)

    def ceiling_pass(r: int) -> None:
        sampler.memory_pass(latest["ours"], case.epochs, threads, seed + r)

    BPR(threads=threads, seed=seed, epochs=1).fit(_slice(train))  # JIT compile (or cache load) excluded
    report(
        f"{case.name}: timing {repeats} x ours / implicit / defaults / memory ceiling, "
        f"{case.epochs} epochs x {len(train):,} triples"
    )
    (ours_s, peer_s, defaults_s, ceiling_s), models = round_robin((ours, peer, ours_defaults, ceiling_pass), repeats)
    samples = case.epochs * len(train)
    ceiling = samples / ceiling_s
    report(f"{case.name}: NDCG@10 of {repeats} seeds per side")
    users = evaluation_users(split, seed)
    ndcg_ours, ndcg_peer, ndcg_defaults = (
        [validation_ndcg(model, split, users) for model in side] for side in models[:3]
    )  # fmt: skip
    mean_ours, mean_peer, mean_defaults = map(statistics.mean, (ndcg_ours, ndcg_peer, ndcg_defaults))
    details = {
        "epochs": case.epochs, "train_triples_per_epoch": len(train), "users": train.n_users,
        "items": train.n_items, "threads": threads, "repeats": repeats, "floats_per_row": FACTORS,
        "ours_fit_s": ours_s, "peer_fit_s": peer_s,
        "ceiling_samples_per_s": ceiling, "ours_share_of_ceiling": samples / ours_s / ceiling,
        "ndcg@10_ours": mean_ours, "ndcg@10_peer": mean_peer,
        "ndcg@10_ours_per_seed": ndcg_ours, "ndcg@10_peer_per_seed": ndcg_peer, "ndcg_users": len(users),
        "ndcg_at_least_peer": mean_ours >= mean_peer, "negative_candidates": 1,
    }  # fmt: skip
    defaults = {
        **details, "ours_fit_s": defaults_s, "ndcg@10_ours": mean_defaults,
        "ndcg@10_ours_per_seed": ndcg_defaults,
        "ndcg_at_least_peer": mean_defaults >= mean_peer,
        "negative_candidates": "default (3, hardest kept)", "ours_share_of_ceiling": samples / defaults_s / ceiling,
    }  # fmt: skip
    return [
        BenchResult("bpr", case.name, "samples/s", samples / ours_s, samples / peer_s, PEER, case.target, details),
        BenchResult(
            "bpr", f"{case.name} (defaults)", "samples/s", samples / defaults_s, samples / peer_s, PEER, None, defaults
        ),
    ]


def _slice(train: Interactions, n: int = 2000) -> Interactions:
    """The first n interactions with train's id maps (same dtypes: the same compiled kernels)."""
    return Interactions(
        user_ids=train.user_ids, item_ids=train.item_ids, users=train.users[:n], items=train.items[:n],
        ratings=None, timestamps=train.timestamps[:n], name="warm-up",
    )  # fmt: skip


@benchmark("bpr")
def bpr_benchmark(
    threads: int = 2,
    repeats: int = 3,
    seed: int = 42,
    cases: tuple[Case, ...] = CASES,
    report: Callable[[str], None] = lambda message: None,
) -> list[BenchResult]:
    """Samples/s of our BPR vs implicit's on ml-latest-small, synthetic 1M and 10M (targets per case)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    return [
        result for case in cases for result in run_case(case, threads, max(3, repeats, case.min_rounds), seed, report)
    ]
