"""Benchmark: serving an ALS champion trained on synthetic interactions (default 1M), as the issue measures it.

Three figures, each against its goal from the issue "Scale, speed and quality":
- batch: 10,000 users (every train user plus unknown ones, who get the popularity fallback) through the
  pyfunc loaded by `mlflow.pyfunc.load_model`, wall seconds (median of `repeats`; goal <= 1 s);
- HTTP: `mfpipe serve` under `clients` concurrent keep-alive clients for `seconds`, each request one
  user with k=10: requests/s, p50 and p99 latency (goals p50 <= 10 ms, p99 <= 50 ms) and errors (goal 0).
  The same load on `mlflow models serve --env-manager local` (MLflow's scoring server, same version) is
  the peer of the throughput figure, so the server's own overhead shows.

The load generator runs in this process (threads over `http.client`), so on a small machine it takes
CPU from the server it measures: the figures are an upper bound of the server's own latency.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mfpipe.bench import BenchResult, benchmark

BATCH_USERS = 10_000
GOAL_BATCH_S = 1.0
GOAL_P50_S = 0.010
GOAL_P99_S = 0.050
NAME = "mfpipe-bench-serving"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register_champion(folder: Path, n_interactions: int, seed: int) -> tuple[str, str, list[str]]:
    """Train ALS on synthetic data, log and register it as champion in a store under `folder`.

    Returns (tracking URI, model URI of the version, the train user ids).
    """
    from mfpipe import serving, tracking
    from mfpipe.config import SplitOptions
    from mfpipe.data.synthetic import generate
    from mfpipe.models import create
    from mfpipe.split import split_interactions

    train = split_interactions(generate(n_interactions, seed=seed), SplitOptions()).train
    model = create("als", seed=seed).fit(train)
    catalog = serving.Catalog.of(train)
    store = tracking.open_store(f"sqlite:///{folder / 'mlflow.db'}")
    run = tracking.start_run(store, tracking.experiment_id(store, train.name), "als", {})
    uri = serving.log_to_run(run, model.save(folder / "als.npz"), catalog.save(folder / "catalog.npz"))
    version = tracking.register(store, NAME, uri, run, {"model": "als"})
    tracking.move_alias(store, NAME, tracking.CHAMPION, version, {"reason": "benchmark"})
    return store.uri, f"models:/{NAME}/{version}", train.user_ids.astype(str).tolist()


def batch_seconds(model_uri: str, users: list[str], repeats: int) -> tuple[float, float, int]:
    """Median wall and CPU seconds of one `predict` of `users` through the MLflow-loaded pyfunc, and rows."""
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri)
    frame = pd.DataFrame({"user_id": users})
    walls, cpus, rows = [], [], 0
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        rows = len(model.predict(frame))
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), rows


def generate_load(port: int, users: list[str], clients: int, seconds: float, seed: int) -> dict[str, Any]:
    """`clients` threads posting one random user each (k=10) for `seconds`: throughput, latency, errors."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        rng = np.random.default_rng(seed + i)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < stop:
            body = json.dumps(
                {"dataframe_records": [{"user_id": users[rng.integers(len(users))]}], "params": {"k": 10}}
            )
            start = time.perf_counter()
            try:
                connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = response.read()
                if response.status != 200 or len(json.loads(answer)["predictions"]) != 10:
                    errors[i] += 1
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                errors[i] += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            latencies[i].append(time.perf_counter() - start)
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    every = np.concatenate([np.asarray(x) for x in latencies]) if any(latencies) else np.zeros(1)
    return {
        "requests": len(every), "errors": sum(errors), "requests_per_s": len(every) / elapsed,
        "p50_s": float(np.percentile(every, 50)), "p99_s": float(np.percentile(every, 99)),
    }  # fmt: skip


def _wait_ready(proc: subprocess.Popen, port: int, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/ping")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not answer /ping in time")


def group_cpu_seconds(group: int) -> float:
    """CPU seconds (user + system) of every live process in process group `group` (Linux /proc).

    Server CPU per request does not depend on how busy the machine is, unlike the latencies.
    """
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == group:  # fields after the name: state, ppid, pgrp, ..., utime (11), stime (12)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def serve_and_load(command: list[str], env: dict[str, str], port: int, users: list[str], clients: int,
                   seconds: float, seed: int) -> dict[str, Any]:  # fmt: skip
    """Start a server process, wait until it answers, put the load on it, stop it."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        _wait_ready(proc, port)
        before = group_cpu_seconds(proc.pid)
        figures = generate_load(port, users, clients, seconds, seed)
        figures["server_cpu_ms_per_request"] = 1000 * (group_cpu_seconds(proc.pid) - before) / figures["requests"]
        figures["load_average"] = list(os.getloadavg())  # other work on the machine stretches the latencies
        return figures
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


@benchmark("serving")
def serving_benchmark(
    n_interactions: int = 1_000_000,
    clients: int = 8,
    seconds: float = 20.0,
    repeats: int = 3,
    with_peer: bool = True,
    seed: int = 42,
    report: Callable[[str], None] = lambda message: None,
) -> list[BenchResult]:
    """Batch and HTTP serving figures of an ALS champion against the issue's goals (see module docstring)."""
    with tempfile.TemporaryDirectory(prefix="mfpipe-bench-serving-") as tmp:
        folder = Path(tmp)
        report(f"training and registering ALS on {n_interactions} synthetic interactions")
        tracking_uri, model_uri, train_users = register_champion(folder, n_interactions, seed)
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}  # this process: `open_store` pointed MLflow there
        unknown = [f"new-user-{i}" for i in range(max(0, BATCH_USERS - len(train_users)))]
        batch = (train_users + unknown)[:BATCH_USERS]
        report(f"batch of {len(batch)} users through the loaded pyfunc, {repeats} times")
        wall, cpu, rows = batch_seconds(model_uri, batch, repeats)
        dataset = NAME.removeprefix("mfpipe-")
        ours_cmd = [sys.executable, "-m", "mfpipe", "serve", "--dataset", dataset, "--port", "PORT"]
        report(f"mfpipe serve: {clients} clients for {seconds:.0f} s")
        port = _free_port()
        ours = serve_and_load([a.replace("PORT", str(port)) for a in ours_cmd], env, port, train_users, clients,
                              seconds, seed)  # fmt: skip
        peer: dict[str, Any] | None = None
        if with_peer:
            report(f"mlflow models serve: {clients} clients for {seconds:.0f} s")
            port = _free_port()
            scripts = str(Path(sys.executable).parent)
            peer_env = {**env, "PATH": f"{scripts}{os.pathsep}{env.get('PATH', '')}"}
            peer_cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                        "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
            peer = serve_and_load(peer_cmd, peer_env, port, train_users, clients, seconds, seed)
    case = f"ALS synthetic-{n_interactions}"
    http_details = {"clients": clients, "seconds": seconds, "mfpipe_serve": ours, "mlflow_models_serve": peer}
    batch_details = {"users": len(batch), "known_users": min(len(train_users), len(batch)), "rows": rows,
                     "cpu_seconds": cpu, "load_average": list(os.getloadavg())}  # fmt: skip
    results = [
        BenchResult("serving", f"pyfunc batch of {len(batch)} users, {case}", "s", wall, GOAL_BATCH_S,
                    "goal (issue): <= 1 s", 1.0, batch_details),
        BenchResult("serving", f"mfpipe serve p50, {clients} clients, {case}", "s", ours["p50_s"], GOAL_P50_S,
                    "goal (issue): <= 10 ms", 1.0, http_details),
        BenchResult("serving", f"mfpipe serve p99, {clients} clients, {case}", "s", ours["p99_s"], GOAL_P99_S,
                    "goal (issue): <= 50 ms", 1.0, http_details),
    ]  # fmt: skip
    if peer is not None:
        results.append(BenchResult(
            "serving", f"requests/s, {clients} clients, {case}", "requests/s", ours["requests_per_s"],
            peer["requests_per_s"], "mlflow models serve --env-manager local (same version, same load)", None,
            http_details,
        ))  # fmt: skip
    return results
