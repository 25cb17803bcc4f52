"""Promotion through the whole flow against a champion trained on other data (fewer rows, an earlier
cutoff): a clearly better candidate replaces it, a clearly worse one does not, under both rules."""

from __future__ import annotations

import pytest

from flows.retrain import retrain
from mfpipe import tracking
from mfpipe.config import load_config
from mfpipe.data import synthetic
from mfpipe.data.loader import synthetic_frame

WEAK_BPR = {"bpr": {"epochs": 1, "learning_rate": 1e-4, "factors": 8}}  # next to a random ranking


def _write(path, share: float) -> None:
    """The earliest `share` of a synthetic data set as a CSV file (the data grows between runs)."""
    frame = synthetic_frame(synthetic.generate(20_000, seed=11))
    frame = frame[frame["timestamp"] <= frame["timestamp"].quantile(share)]
    frame.assign(timestamp=frame["timestamp"].astype("int64")).to_csv(path, index=False)


@pytest.mark.parametrize("rule", ["significant", "strict"])
def test_better_replaces_and_worse_does_not(tmp_path, rule):
    data = tmp_path / "ratings.csv"
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"

    def run(models: list[str]):
        values = {"data": str(data), "tracking_uri": store, "models": models, "model_params": WEAK_BPR,
                  "promotion_rule": rule, "threads": 2}  # fmt: skip
        return retrain(load_config(overrides=values)).report

    _write(data, 0.85)
    first = run(["bpr"])
    assert first["champion"]["promoted"]  # no champion yet: the weak model becomes champion
    _write(data, 1.0)
    better = run(["pop"])
    champion = better["champion"]
    assert champion["promoted"], champion["reason"]
    assert champion["before"]["version"] == first["champion"]["after"]["version"]
    assert champion["after"]["ndcg@10"] > champion["before"]["ndcg@10"]
    assert f"rule {rule}" in champion["reason"] and "promoted" in champion["reason"]
    worse = run(["bpr"])
    kept = worse["champion"]
    assert not kept["promoted"], kept["reason"]
    assert kept["after"]["version"] == champion["after"]["version"]
    assert f"rule {rule}" in kept["reason"] and "champion kept" in kept["reason"]
    s = tracking.open_store(store)
    assert tracking.alias_version(s, "mfpipe-ratings", tracking.CHALLENGER).version == worse["models"][0]["version"]
    assert worse["drift"]["rows_before"] == better["dataset"]["rows"] or worse["drift"]["rows_before"] > 0
