"""Fit one model on a split's train part: its share of the cores, its deadline, the `Trained` result.

The flow runs one `train_model` per model in parallel (a Prefect task each). They share one `CoreBudget`:
each model starts with an even share of the cores, and when one is trained and evaluated its cores go
to the models still training (ALS re-reads its thread count every iteration, BPR every few epochs), so
the machine stays busy while the slowest model finishes. Every training loop checks its deadline between
epochs or iterations, so a model over `train_timeout_seconds` stops itself and is reported failed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numba

from mfpipe.config import Config
from mfpipe.models import create
from mfpipe.models.base import Recommender
from mfpipe.parallel import numba_threads
from mfpipe.split import Split

if TYPE_CHECKING:  # Optuna takes a second to import: only a search needs it
    from mfpipe.models.search import SearchResult

#: Models whose fit is too light to need a share of the cores.
LIGHT_MODELS = frozenset({"pop"})


class CoreBudget:
    """The cores of this process shared by the models training at once (thread task runner).

    With a process-based runner (Dask) each worker gets its own budget and the split is static.
    """

    def __init__(self, cores: int, models: list[str]) -> None:
        self.cores = max(1, cores)
        self._waiting = {m for m in models if m not in LIGHT_MODELS}
        self._training: dict[str, Recommender] = {}
        self._lock = threading.Lock()

    def share(self) -> int:
        """Threads each heavy model gets now: the cores over the models not finished yet."""
        return max(1, self.cores // max(1, len(self._waiting | set(self._training))))

    def start(self, name: str, model: Recommender) -> int:
        with self._lock:
            self._training[name] = model
            model.threads = 1 if name in LIGHT_MODELS else self.share()
            return model.threads

    def trained(self, name: str) -> None:
        """`name` has fitted: no longer reported, its cores kept for its evaluation (`evaluation`)."""
        with self._lock:
            self._training.pop(name, None)

    @contextmanager
    def evaluation(self, name: str) -> Iterator[None]:
        """Evaluate `name` on its share of the cores (numba's threads in this thread), then `finish` it.

        An evaluation on every core while others still train oversubscribed them: at synthetic:32M,
        training and evaluation took 449 s together against 364 s one after the other.
        """
        try:
            with numba_threads(min(self.share(), numba.config.NUMBA_NUM_THREADS)):
                yield
        finally:
            self.finish(name)

    def finish(self, name: str) -> None:
        """`name` is done: give its cores to the heavy models still training."""
        with self._lock:
            self._training.pop(name, None)
            self._waiting.discard(name)
            for other, model in self._training.items():
                if other not in LIGHT_MODELS:
                    model.threads = self.share()

    def snapshot(self) -> dict[str, str]:
        """Each model still training: where its loop is, its latest loss when it keeps one, its threads."""
        with self._lock:
            running = dict(self._training)
        return {name: _describe(model) for name, model in running.items()}

    def __reduce__(self) -> tuple[Any, ...]:
        """A budget sent to another process (Dask) starts afresh there: cores are per machine."""
        return (CoreBudget, (self.cores, sorted(self._waiting)))


def _describe(model: Recommender) -> str:
    loss = model.history.get("epoch_loss") or []
    tail = f", loss {loss[-1]:.4f}" if loss else ""
    return f"{model.progress}{tail} ({model.threads} thread(s))"


def watch(budget: CoreBudget, report: Callable[[dict[str, str]], None], every: float = 10.0) -> threading.Event:
    """Call `report(budget.snapshot())` every `every` seconds until the returned event is set."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            if snapshot := budget.snapshot():
                report(snapshot)

    threading.Thread(target=loop, name="mfpipe-training-progress", daemon=True).start()
    return stop


@dataclass
class Trained:
    """A fitted model, what it took to fit it, and the search that chose its setting (`--search N`)."""

    name: str
    model: Recommender
    train_seconds: float
    threads: int
    params: dict[str, Any]
    search: SearchResult | None = None


def tune(name: str, split: Split, config: Config, budget: CoreBudget) -> SearchResult | None:
    """`config.search_trials` Optuna trials on an inner temporal split of the train part (None: no search).

    The popularity baseline has nothing to tune; the user's own `model_params` stay fixed.
    """
    if config.search_trials == 0 or name in LIGHT_MODELS:
        return None
    from mfpipe.models.search import search

    return search(
        name, split.train, config.search_trials, config.seed, config.k, threads=budget.share(),
        trial_timeout=config.train_timeout_seconds, fixed=config.model_params.get(name),
    )  # fmt: skip


def train_model(name: str, split: Split, config: Config, budget: CoreBudget) -> Trained:
    """Fit one model on the train slice within its deadline, its threads taken from `budget`.

    With `--search N` the best setting of the search (never chosen on validation) is refit on the whole
    train part. A fit that diverges (non-finite state) or overruns its deadline raises a one-line
    MfpipeError (exit 1).
    """
    from threadpoolctl import threadpool_limits

    searched = tune(name, split, config, budget)
    params = {**config.model_params.get(name, {}), **(searched.best_params if searched else {})}
    model = create(name, params, seed=config.seed)
    threads = budget.start(name, model)
    started = time.perf_counter()
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            # Only the train slice: validation is what the candidate is scored and promoted on, so no model
            # may see it while fitting (BPR early-stops on pairs it holds out of train itself).
            model.fit(split.train, deadline=time.monotonic() + config.train_timeout_seconds)
    except BaseException:
        budget.finish(name)
        raise
    budget.trained(name)  # its cores stay its own until it is evaluated
    seconds = time.perf_counter() - started
    return Trained(name, model, seconds, threads, model.params.model_dump(mode="json"), searched)
