"""The svd-topk and fit benchmarks run end to end on tiny data and report what they claim to measure."""

from __future__ import annotations

import numpy as np

from mfpipe.bench import BENCHMARKS
from mfpipe.bench.fit import fit_benchmark
from mfpipe.bench.svd import predict_loop_top_k, svd_topk_benchmark
from mfpipe.models import create
from tests.models.conftest import planted


def test_registered() -> None:
    assert BENCHMARKS["svd-topk"] is svd_topk_benchmark
    assert BENCHMARKS["fit"] is fit_benchmark


def test_predict_loop_matches_recommend_including_padding() -> None:
    data, _ = planted(n_users=12, n_items=9, per_user=6, seed=3)
    model = create("svd", {"n_factors": 4, "n_epochs": 5}).fit(data)
    users = np.arange(data.n_users)
    peer = predict_loop_top_k(model.algo, users, data.n_items, data.matrix, k=5)
    np.testing.assert_array_equal(peer, model.recommend(users, 5)[0])
    assert (peer == -1).any()  # 9 items - 6 seen leaves 3 for 5 slots


def test_svd_topk_on_tiny_data() -> None:
    [result] = svd_topk_benchmark(n_interactions=3000, sample_users=4, repeats=1)
    assert result.benchmark == "svd-topk" and result.unit == "s" and result.target == 100.0
    assert result.details["top_k_identical"] and result.details["compared_users"] == 4
    assert result.peer == result.details["peer_sample_seconds"] * result.details["peer_scaled_by"]
    assert result.details["peer_scaled_by"] == result.details["users"] / 4


def test_fit_on_tiny_data() -> None:
    results = fit_benchmark(n_interactions=3000, models=("als", "svd", "pop"), repeats=1, threads=1)
    assert [r.case for r in results] == ["als synthetic-3k", "svd synthetic-3k", "pop synthetic-3k"]
    als = results[0]
    assert als.details["ours_s_per_iteration"] * als.details["params"]["iterations"] == als.ours
    assert all(r.ours > 0 and r.peer > 0 for r in results)
