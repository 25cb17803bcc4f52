"""The BPR benchmark on tiny data, and the runner behind `mfpipe bench`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mfpipe.bench import BENCHMARKS, BenchResult, runner
from mfpipe.bench.bpr import Case, ImplicitBPR, bpr_benchmark
from mfpipe.errors import MfpipeError
from tests.models.conftest import planted


def test_bpr_benchmark_on_tiny_data() -> None:
    messages: list[str] = []
    result, defaults = bpr_benchmark(
        threads=1, repeats=1, cases=(Case("tiny", "synthetic:5000", 2, 2.0),), report=messages.append
    )
    assert result.benchmark == "bpr" and result.unit == "samples/s" and result.target == 2.0
    d = result.details
    assert d["epochs"] == 2 and d["repeats"] == 3  # never fewer than 3 timed runs per side
    assert result.ours == pytest.approx(2 * d["train_triples_per_epoch"] / d["ours_fit_s"])
    assert result.peer == pytest.approx(2 * d["train_triples_per_epoch"] / d["peer_fit_s"])
    assert d["ceiling_samples_per_s"] > 0 and 0 <= d["ndcg@10_ours"] <= 1 and 0 <= d["ndcg@10_peer"] <= 1
    assert d["negative_candidates"] == 1  # the target row does the peer's work per sample
    for side in ("ours", "peer"):  # one fit per round, each with its own seed: NDCG@10 is their mean
        per_seed = d[f"ndcg@10_{side}_per_seed"]
        assert len(per_seed) == 3 and d[f"ndcg@10_{side}"] == pytest.approx(np.mean(per_seed))
    assert d["ndcg_at_least_peer"] == (d["ndcg@10_ours"] >= d["ndcg@10_peer"])
    assert defaults.case == "tiny (defaults)" and defaults.target is None and defaults.peer == result.peer
    assert defaults.ours == pytest.approx(2 * d["train_triples_per_epoch"] / defaults.details["ours_fit_s"])
    assert any("timing" in m for m in messages)


def test_a_case_can_ask_for_more_rounds_than_the_caller() -> None:
    result, _ = bpr_benchmark(threads=1, repeats=1, cases=(Case("tiny", "synthetic:2000", 1, 2.0, min_rounds=4),))
    assert result.details["repeats"] == 4


def test_implicit_peer_rows_are_64_floats_and_its_product_is_its_score() -> None:
    data, _ = planted(n_users=30, n_items=20, per_user=5)
    peer = ImplicitBPR(threads=1, epochs=3).fit(data)
    assert peer.item_factors.shape == (20, 64) and np.all(peer.user_factors[:, -1] == 1.0)
    np.testing.assert_allclose(peer.score(np.arange(3)), peer.user_factors[:3] @ peer.item_factors.T, rtol=1e-6)


def test_runner_selects_runs_and_reports(tmp_path, monkeypatch) -> None:
    def good() -> list[BenchResult]:
        return [BenchResult("good", "case", "s", 1.0, 3.0, "peer", 2.0)]

    def broken(report) -> list[BenchResult]:
        report("half way")
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "registered", lambda: {"good": good, "broken": broken})
    with pytest.raises(MfpipeError, match="unknown benchmark 'nope'; choose from broken, good"):
        runner.select("nope")
    assert list(runner.select("good")) == ["good"]
    heard: list[tuple[str, str]] = []
    run = runner.run(runner.select(None), lambda name, message: heard.append((name, message)))
    assert [r.benchmark for r in run.results] == ["good"] and run.results[0].passed
    assert run.errors == {"broken": "RuntimeError: boom"}
    assert ("broken", "half way") in heard and ("broken", "failed") in heard
    runner.write_report(run, tmp_path / "out" / "bench.json")
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["results"][0]["ratio"] == 3.0 and report["errors"] == run.errors
    assert report["environment"]["cpu_count"] >= 1


def test_registered_imports_the_existing_modules() -> None:
    assert "bpr" in runner.registered() and BENCHMARKS["bpr"] is bpr_benchmark
