"""mfpipe: a retraining pipeline for matrix-factorization recommenders."""

import os

__version__ = "0.1.0"

#: Process settings of the libraries mfpipe drives, applied once when mfpipe is imported (before numpy
#: loads OpenBLAS). Values already in the environment win.
RUNTIME_DEFAULTS = {
    "OPENBLAS_NUM_THREADS": "1",  # implicit and numba bring their own threads; nested BLAS threads only fight
    "NUMBA_THREADING_LAYER": "omp",  # thread-safe layer: several models train at once
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # MLflow's HTTP client retries for minutes by default; mfpipe probes the store and retries whole tasks.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # offline machines log a failure per start
    # The ephemeral Prefect API starts in ~10 s, slower on a busy machine: give it room before failing.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
for _name, _value in RUNTIME_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
