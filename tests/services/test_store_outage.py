"""The MLflow server goes away in the middle of a run: the run fails cleanly (one line naming the server,
exit 1, no version without its artifacts, no moved alias); once the server is back, the next run succeeds
and ends FAILED the run the outage left RUNNING."""

from __future__ import annotations

import pytest

from flows.retrain import retrain
from mfpipe import recording, services, tracking
from mfpipe.config import load_config
from mfpipe.errors import MfpipeError

NAME = "mfpipe-synthetic-5k"


@pytest.mark.timeout(600)
def test_a_store_outage_mid_run_fails_cleanly_and_the_next_run_recovers(tmp_path, monkeypatch):
    port = services.free_port()
    backend = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def start() -> services.Service:
        server = services.mlflow_server(port, backend, tmp_path / "artifacts", tmp_path / "mlflow.log")
        services.wait_healthy([server], timeout=240)
        return server

    server = start()
    uri = server.url
    try:
        first = retrain(load_config(overrides={"data": "synthetic:5000", "tracking_uri": uri, "models": ["pop"]}))
        champion = first.report["champion"]["after"]["version"]

        real = recording.record_model

        def outage(*args, **kwargs):
            server.stop()  # the server dies once this run's parent run is open
            return real(*args, **kwargs)

        monkeypatch.setattr(recording, "record_model", outage)
        grown = load_config(overrides={"data": "synthetic:5000", "seed": 3, "tracking_uri": uri, "models": ["pop"]})
        state = retrain(grown, return_state=True)
        assert state.is_failed() and f"MLflow store {uri}" in state.message
        with pytest.raises(MfpipeError) as caught:
            state.result()
        assert caught.value.exit_code == 1
        monkeypatch.undo()

        server = start()
        store = tracking.open_store(uri)
        assert [v.version for v in tracking.list_versions(store, NAME)] == [champion]  # nothing half-written
        assert tracking.alias_version(store, NAME, tracking.CHAMPION).version == champion
        exp = tracking.experiment_id(store, "synthetic-5k")
        [left] = store.client().search_runs([exp], "attributes.status = 'RUNNING'")  # the outage's parent run

        again = retrain(grown)
        assert all(m["status"] == "ok" for m in again.report["models"])
        assert store.client().get_run(left.info.run_id).info.status == "FAILED"
        assert store.client().search_runs([exp], "attributes.status = 'RUNNING'") == []
    finally:
        server.stop()
