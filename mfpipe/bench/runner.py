"""What `mfpipe bench` runs: import the benchmark modules, run the selected ones, table and JSON report.

The modules are an explicit list; one that does not exist (yet) is left out, but an existing module
that fails to import is an error, never hidden. A benchmark may take a `report(message)` callback
for progress; one that raises is recorded as failed and the others still run.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mfpipe.bench import BENCHMARKS, BenchResult
from mfpipe.errors import MfpipeError

MODULES = (
    "mfpipe.bench.bpr", "mfpipe.bench.evaluation", "mfpipe.bench.svd", "mfpipe.bench.fit", "mfpipe.bench.serving",
    "mfpipe.bench.foldin",
)  # fmt: skip


def registered() -> dict[str, Callable[..., list[BenchResult]]]:
    """Import every benchmark module that exists; the registry they filled."""
    for name in MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    return BENCHMARKS


def select(only: str | None) -> dict[str, Callable[..., list[BenchResult]]]:
    """All benchmarks, or the one named by `--only` (an unknown name lists the known ones)."""
    benchmarks = registered()
    if only is None:
        return dict(benchmarks)
    if only not in benchmarks:
        raise MfpipeError(f"unknown benchmark '{only}'; choose from {', '.join(sorted(benchmarks))}")
    return {only: benchmarks[only]}


@dataclass
class BenchRun:
    """Results of one `mfpipe bench` call, and the benchmarks that raised (name -> one-line error)."""

    results: list[BenchResult] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "results": [r.to_json() for r in self.results],
            "errors": self.errors,
            "seconds": self.seconds,
            "environment": environment(),
        }


def environment() -> dict[str, Any]:
    """Where the figures were measured (they mean little without it)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("mfpipe", "numpy", "numba", "implicit", "scikit-surprise"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()), "versions": versions,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip


def run(benchmarks: dict[str, Callable[..., list[BenchResult]]], progress: Callable[[str, str], None]) -> BenchRun:
    """Run each benchmark; `progress(name, message)` hears about every step."""
    out = BenchRun()
    for name, fn in benchmarks.items():
        progress(name, "starting")
        kwargs: dict[str, Any] = {}
        if "report" in inspect.signature(fn).parameters:
            kwargs["report"] = lambda message, name=name: progress(name, message)
        start = time.perf_counter()
        try:
            out.results.extend(fn(**kwargs))
        except Exception as exc:  # a broken benchmark must not hide the others' figures
            out.errors[name] = "".join(traceback.format_exception_only(exc)).strip()
        out.seconds[name] = time.perf_counter() - start
        progress(name, "failed" if name in out.errors else "done")
    return out


def write_report(run_: BenchRun, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run_.to_json(), indent=2, default=float) + "\n")
