"""The one load -> validate -> split chain that `validate`, `split` and the flow share (no Prefect needed)."""

from __future__ import annotations

import pytest

from mfpipe import prepare
from mfpipe.config import load_config
from mfpipe.errors import MfpipeError


def _write(path, bad_rating: bool = False):
    rows = [
        f"{u},{i},{(u + i) % 10 / 2 + 0.5},{1_300_000_000 + 1000 * (i * 30 + u)}" for u in range(30) for i in range(40)
    ]
    text = "user_id,item_id,rating,timestamp\n" + "\n".join(rows) + "\n"
    path.write_text(text.replace(",0.5,", ",99,", 1) if bad_rating else text)
    return path


def test_prepare_loads_validates_and_splits(tmp_path):
    data, parts = prepare.prepare(load_config(overrides={"data": str(_write(tmp_path / "good.csv"))}))
    assert len(data) == 1200 and data.n_users == 30
    assert parts.summary.n_train + parts.summary.n_validation == len(data)


def test_a_critical_failure_stops_every_entry_point_alike(tmp_path):
    """`mfpipe split` (prepare), `mfpipe validate` (check) and the flow (validate) refuse the same file."""
    config = load_config(overrides={"data": str(_write(tmp_path / "bad.csv", bad_rating=True))})
    with pytest.raises(MfpipeError, match=r"bad\.csv"):
        prepare.prepare(config)
    checked = prepare.check(config)
    assert not checked.ok and checked.split is None and "critical" in checked.split_error
    validated = prepare.validate(prepare.load(config), config, tmp_path / "gx")
    assert not validated.success and "bad.csv" in validated.error
    assert (tmp_path / "gx").exists()  # the GX result is kept even when the data fails
    with pytest.raises(MfpipeError, match="validation failed, nothing was trained"):
        validated.raise_if_failed()


def test_synthetic_data_goes_through_the_same_suite(tmp_path):
    config = load_config(overrides={"data": "synthetic:2000"})
    validated = prepare.validate(prepare.load(config), config, tmp_path / "gx")
    assert validated.success and validated.summary["expectations"]
    data, parts = prepare.prepare(config)
    assert data.digest == prepare.split(prepare.load(config), config)[0].digest
    assert parts.digest == prepare.split(prepare.load(config), config)[1].digest  # deterministic


def test_check_reports_an_infeasible_split(tmp_path):
    config = load_config(overrides={"data": str(_write(tmp_path / "good.csv")), "split": {"cutoff": "2100-01-01"}})
    checked = prepare.check(config)
    assert not checked.ok and checked.split_error
    assert checked.to_json()["ok"] is False
