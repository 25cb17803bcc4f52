"""The serving benchmark runs end to end on small data and reports what it claims to measure."""

from __future__ import annotations

import pytest

from mfpipe.bench import BENCHMARKS
from mfpipe.bench.runner import registered
from mfpipe.bench.serving import serving_benchmark


def test_registered() -> None:
    assert registered()["serving"] is serving_benchmark is BENCHMARKS["serving"]


@pytest.mark.slow
def test_serving_on_small_data() -> None:
    results = serving_benchmark(n_interactions=20_000, clients=2, seconds=2, repeats=1, with_peer=False)
    batch, p50, p99 = results
    assert batch.unit == "s" and batch.peer == 1.0 and batch.details["users"] == 10_000
    assert batch.details["rows"] == 10 * batch.details["users"]  # every user, unknown ones too, gets k items
    assert batch.details["known_users"] < batch.details["users"]
    served = p50.details["mfpipe_serve"]
    assert served["errors"] == 0 and served["requests"] > 0 and served["server_cpu_ms_per_request"] > 0
    assert 0 < p50.ours <= p99.ours and (p50.peer, p99.peer) == (0.010, 0.050)
