"""What a run tells people: the leaderboard, the `--json-report` document, markdown for Prefect artifacts.

One `ModelResult` per model (finished or failed) feeds all three, so the CLI table, the JSON report and
the Prefect artifact always agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mfpipe.data.interactions import Interactions
from mfpipe.errors import MfpipeError
from mfpipe.evaluation import EvaluationReport, rating_metrics
from mfpipe.split import Split
from mfpipe.training import Trained

if TYPE_CHECKING:
    from mfpipe.prepare import Validated

LEADERBOARD_METRICS = ("ndcg", "precision", "recall", "map")
#: The stages of the `timing` block (Contracts), in the order they run.
STAGES = ("load", "validate", "split", "train", "evaluate", "tracking", "promote")


@dataclass
class ModelResult:
    """One line of the leaderboard (ok or failed)."""

    model: str
    status: str
    error: str | None = None
    train_seconds: float | None = None
    evaluation: EvaluationReport | None = None
    run_id: str | None = None
    run_link: str | None = None
    registered_model: str | None = None
    version: str | None = None
    history: dict[str, list[float]] = field(default_factory=dict)
    rating_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """Validation NDCG@k of warm users (NaN when the model failed or had no warm user)."""
        return self.evaluation.warm["ndcg"].mean if self.evaluation is not None else math.nan

    def to_json(self) -> dict[str, Any]:
        metrics = {**self.evaluation.warm.to_json(self.evaluation.k), **self.rating_metrics} if self.evaluation else {}
        return {
            "model": self.model,
            "status": self.status,
            "error": self.error,
            "metrics": metrics,
            "train_seconds": None if self.train_seconds is None else round(self.train_seconds, 3),
            "run_id": self.run_id,
            "registered_model": self.registered_model,
            "version": self.version,
        }


def best(results: list[ModelResult]) -> ModelResult | None:
    """The finished model with the highest validation NDCG@k (ties: the order of `--models`)."""
    finished = [r for r in results if r.status == "ok" and math.isfinite(r.score)]
    return max(finished, key=lambda r: r.score, default=None)


class Stages:
    """Wall time per stage, to tell compute (load ... evaluate) from orchestration and tracking.

    Stages time the run's critical path and never overlap: work done in the shadow of a longer one (the
    first models' evaluations and records while the last model trains) counts as the longer one.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def to_json(self) -> dict[str, Any]:
        """The report's `timing` block: wall time since the run began and seconds per stage."""
        stages = {name: round(value, 3) for name, value in self.seconds.items()}
        return {"wall_seconds": round(time.perf_counter() - self.started, 3), "stages": stages}


def split_json(split: Split) -> dict[str, Any]:
    """Exactly what `mfpipe split` writes to split.json (the report embeds it)."""
    return {**split.summary.to_json(), "digest": split.digest}


def build_report(
    data: Interactions, split: Split, results: list[ModelResult], champion: dict[str, Any], stages: Stages,
    drift: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The `--json-report` document, exactly the Contracts layout (`drift` once a champion exists)."""
    document = {
        "dataset": {"name": data.name, "digest": data.digest, "rows": len(data)},
        "protocol": split.summary.protocol,
        "split": split_json(split),
        "models": [r.to_json() for r in results],
        "champion": champion,
        "timing": stages.to_json(),
    }
    return document if drift is None else {**document, "drift": drift}


@dataclass
class RunOutcome:
    """What a retrain run returns: the `--json-report` document and the figures the CLI prints."""

    report: dict[str, Any]
    train_wall_seconds: float = 0.0
    train_sum_seconds: float = 0.0
    test_ndcg: float | None = None
    parent_run_link: str = ""
    ui_command: str = ""


def leaderboard_markdown(results: list[ModelResult], k: int) -> str:
    """Markdown leaderboard (Prefect artifact): model, NDCG/P/R/MAP@k, train time, MLflow link."""
    short = {"ndcg": "NDCG", "precision": "P", "recall": "R", "map": "MAP"}
    head = ["model", *[f"{short[m]}@{k}" for m in LEADERBOARD_METRICS], "train s", "status", "MLflow"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ordered = sorted(results, key=lambda r: -r.score if math.isfinite(r.score) else math.inf)
    for r in ordered:
        cells = [f"{r.evaluation.warm[m].mean:.4f}" if r.evaluation else "-" for m in LEADERBOARD_METRICS]
        link = f"[run]({r.run_link})" if r.run_link else "-"
        status = r.status if r.status == "ok" else f"failed: {r.error}"
        seconds = f"{r.train_seconds:.1f}" if r.train_seconds is not None else "-"
        lines.append("| " + " | ".join([r.model, *cells, seconds, status, link]) + " |")
    return "\n".join(lines)


def validation_markdown(validated: Validated) -> str:
    """Markdown summary of the Great Expectations result (Prefect artifact)."""
    rows = validated.summary.get("expectations", [])
    lines = [
        f"**{validated.summary.get('source')}**: {'passed' if validated.success else 'FAILED'} "
        f"({sum(1 for r in rows if r.get('success'))}/{len(rows)} expectations met)",
        "",
        "| expectation | column | severity | result |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('name')} | {r.get('column') or ''} | {r.get('severity')} | "
            f"{'pass' if r.get('success') else 'FAIL'} |"
        )
    return "\n".join(lines)


def model_result(
    name: str, trained: Trained | None, evaluation: EvaluationReport | None, error: str, split: Split
) -> ModelResult:  # fmt: skip
    """The result of one model: ok once trained and evaluated, else failed with `error`."""
    if trained is None or evaluation is None:
        return ModelResult(name, "failed", error=error)
    return ModelResult(
        name, "ok", train_seconds=trained.train_seconds, evaluation=evaluation, history=trained.model.history,
        rating_metrics=rating_metrics(trained.model, split),
    )  # fmt: skip


def raise_if_all_failed(results: list[ModelResult]) -> None:
    """A run in which no model finished is a failed run (exit 1), whatever was recorded."""
    if not any(r.status == "ok" for r in results):
        failures = "; ".join(f"{r.model}: {r.error}" for r in results)
        raise MfpipeError(f"every model failed ({failures})", exit_code=1)
