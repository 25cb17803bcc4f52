"""Scale benchmark: one `mfpipe run` on synthetic data of a given size, under `/usr/bin/time -v`.

    .venv/bin/python benchmarks/scale.py 10M [--workdir /tmp/scale/10M] [--models svd,als,bpr,pop] [-- extra run args]

Why a script and not a test: speed and memory depend on the machine and on what else runs on it, so they
are measured and written down (docs/scaling.md), never asserted. The run happens in a scratch folder
(its own `mlruns`, MLflow on `sqlite:///<workdir>/mlflow.db` unless MLFLOW_TRACKING_URI is set), so it never
touches a project's store.

What it prints (and writes as JSON to `<workdir>/scale.json`):
- the machine load (`uptime`) before and after: on a shared 2-core machine the wall times mean little
  without it;
- `/usr/bin/time`'s wall time, user + system CPU seconds and maximum resident set size (the largest single
  process of the tree: the mfpipe process itself, or Surprise's forked child);
- per stage: seconds from the report's `timing` block, the peak RSS of the mfpipe process and the peak
  PSS of the whole tree (children included, shared pages counted once) sampled while that stage ran (the
  stage windows come from Prefect's task-run log lines, so they are approximate to
  the sampling interval);
- the training phase: its wall time, the models' summed `train_seconds` (`train_sum_seconds` on the
  MLflow parent run), the CPU seconds the process tree spent in that window, and wall / (CPU / cores),
  the ratio the issue asks to keep at or below 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("load", "validate", "split", "train", "evaluate", "tracking", "promote")
# a stage window ends when the last log line matching its pattern arrives ("tracking" gets the rest)
_ENDS = {
    "load": re.compile(r"Task run 'load data-\w+' - Finished"),
    "validate": re.compile(r"Task run 'validate-\w+' - Finished"),
    "split": re.compile(r"Task run 'split-\w+' - Finished"),
    "train": re.compile(r"Task run 'train \w+' - Finished"),
    "evaluate": re.compile(r"Task run 'evaluate \w+' - Finished"),
    "tracking": re.compile(r"Flow run '[^']+' - Finished"),
}
_BEGIN = re.compile(r"Beginning flow run")
GIB = 1024**3


@dataclass
class Samples:
    """RSS and CPU seconds of the mfpipe process over time (what `/usr/bin/time` cannot split by stage)."""

    times: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)  # the mfpipe process alone
    # PSS of mfpipe + its children (Prefect server, Surprise's fork): the pages they share (the fork's
    # copy-on-write frame) counted once, which a sum of RSS would count twice.
    tree_pss: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # mfpipe's own + reaped children's, + live children's

    def window(self, start: float, end: float) -> tuple[int, int, float]:
        """Peak RSS, peak tree PSS and CPU seconds spent between `start` and `end` (monotonic seconds)."""
        idx = [i for i, t in enumerate(self.times) if start <= t <= end]
        if not idx:  # a window shorter than the sampling interval: the last sample before its end
            idx = [i for i, t in enumerate(self.times) if t <= end][-1:]
        if not idx:
            return 0, 0, 0.0
        return max(self.rss[i] for i in idx), max(self.tree_pss[i] for i in idx), self.cpu[idx[-1]] - self.cpu[idx[0]]


def _mfpipe_process(time_pid: int) -> psutil.Process | None:
    """The process `/usr/bin/time` started (its only child)."""
    try:
        children = psutil.Process(time_pid).children()
    except psutil.NoSuchProcess:
        return None
    return children[0] if children else None


def _sample(time_pid: int, samples: Samples, stop: threading.Event, interval: float) -> None:
    """Poll the mfpipe process until the run ends; a process that vanished mid-poll is skipped."""
    proc = None
    while not stop.is_set():
        proc = proc or _mfpipe_process(time_pid)
        if proc is not None:
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    c = proc.cpu_times()
                    cpu = c.user + c.system + c.children_user + c.children_system
                tree = proc.memory_full_info().pss
                for child in proc.children(recursive=True):
                    try:
                        tree += child.memory_full_info().pss
                        cc = child.cpu_times()
                        cpu += cc.user + cc.system
                    except psutil.NoSuchProcess:
                        continue
                samples.times.append(time.monotonic())
                samples.rss.append(rss)
                samples.tree_pss.append(tree)
                samples.cpu.append(cpu)
            except psutil.NoSuchProcess:
                pass
        stop.wait(interval)


def _parse_time(text: str) -> dict[str, float]:
    """The figures of `/usr/bin/time -v` this benchmark reports."""
    wanted = {
        "User time (seconds)": "user_seconds",
        "System time (seconds)": "system_seconds",
        "Maximum resident set size (kbytes)": "max_rss_kb",
        "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall",
    }
    out: dict[str, float] = {}
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key in wanted:
            if wanted[key] == "wall":
                seconds = 0.0
                for part in value.split(":"):
                    seconds = seconds * 60 + float(part)
                out["wall_seconds"] = seconds
            else:
                out[wanted[key]] = float(value)
    return out


def _model(entry: dict[str, Any]) -> dict[str, Any]:
    """What the table shows of one model: status, train seconds, NDCG@10 (warm users)."""
    metrics = entry.get("metrics") or {}
    return {"status": entry["status"], "train_seconds": entry["train_seconds"], "ndcg@10": metrics.get("ndcg@10")}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def run(size: str, workdir: Path, models: str | None, extra: list[str], interval: float) -> dict[str, Any]:
    """Run `mfpipe run --data synthetic:<size>` in `workdir` and collect time, memory and CPU per stage."""
    if shutil.which("time", path="/usr/bin") is None:
        raise SystemExit("/usr/bin/time is missing: apt-get install time")
    if (workdir / "mlflow.db").exists() or (workdir / "prefect").exists():
        # its cached load/split and its champion (re-scored by promotion) would be timed instead
        raise SystemExit(f"{workdir}: holds an earlier run; remove it or pass another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    # a scratch Prefect home: no cached load/split result of an earlier run (the cache key is the data spec,
    # not the code), and the persisted results (a frame's worth per stage) are not left in ~/.prefect
    env.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    env["PYTHONUNBUFFERED"] = "1"  # log lines must arrive as they are written: they mark the stage windows
    report = workdir / "report.json"
    time_file = workdir / "time.txt"
    mfpipe = Path(sys.executable).parent / "mfpipe"
    cmd = ["/usr/bin/time", "-v", "-o", str(time_file), str(mfpipe), "run", "--data", f"synthetic:{size}",
           "--json-report", str(report), *(["--models", models] if models else []), *extra]  # fmt: skip
    load_before = _uptime()
    samples, stop = Samples(), threading.Event()
    marks: dict[str, float] = {}
    log = (workdir / "run.log").open("w", buffering=1)  # line-buffered: readable while it runs
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = threading.Thread(target=_sample, args=(proc.pid, samples, stop, interval), daemon=True)
    sampler.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.monotonic()
        log.write(line)
        if _BEGIN.search(line):
            marks.setdefault("begin", now)
        for stage, pattern in _ENDS.items():
            if pattern.search(line):
                marks[stage] = now  # the last match wins: the last model to finish training ends "train"
    code = proc.wait()
    stop.set()
    sampler.join()
    log.close()
    load_after = _uptime()
    if code != 0:
        raise SystemExit(f"mfpipe run failed (exit {code}); see {workdir / 'run.log'}")
    doc = json.loads(report.read_text())
    measured = _parse_time(time_file.read_text())
    cores = os.cpu_count() or 1
    stages: dict[str, dict[str, float]] = {}
    start = marks.get("begin", samples.times[0] if samples.times else 0.0)
    for stage in ("load", "validate", "split", "train", "evaluate", "tracking"):
        end = max(marks.get(stage, start), start)  # split runs beside validation and may end first
        peak, tree_peak, cpu = samples.window(start, end)
        stages[stage] = {"window_seconds": round(end - start, 1), "peak_rss_gib": round(peak / GIB, 2),
                         "peak_tree_pss_gib": round(tree_peak / GIB, 2), "cpu_seconds": round(cpu, 1)}  # fmt: skip
        start = end
    timing = doc["timing"]["stages"]
    train_sum = sum(m.get("train_seconds") or 0.0 for m in doc["models"])
    train_cpu = stages["train"]["cpu_seconds"]
    return {
        "size": size,
        "rows": doc["dataset"]["rows"],
        "digest": doc["dataset"]["digest"],
        "split_digest": doc["split"]["digest"],
        "models": {m["model"]: _model(m) for m in doc["models"]},
        "uptime_before": load_before,
        "uptime_after": load_after,
        "cores": cores,
        **measured,
        "max_rss_gib": round(measured["max_rss_kb"] / 1024**2, 2),
        "bytes_per_interaction": round(measured["max_rss_kb"] * 1024 / doc["dataset"]["rows"]),
        "report_wall_seconds": doc["timing"]["wall_seconds"],
        "stage_seconds": timing,
        "stages": stages,
        "train_sum_seconds": round(train_sum, 1),
        "train_cpu_seconds": train_cpu,
        "train_wall_over_cpu_per_core": round(timing["train"] / (train_cpu / cores), 2) if train_cpu else None,
    }


def table(result: dict[str, Any]) -> str:
    """The per-stage table (markdown, as pasted into docs/scaling.md)."""
    lines = [
        f"synthetic:{result['size']} ({result['rows']:,} rows, digest {result['digest']}, "
        f"split {result['split_digest']})",
        f"load before: {result['uptime_before']}",
        f"load after:  {result['uptime_after']}",
        "",
        "| stage | seconds (report) | peak RSS mfpipe (GiB) | peak PSS tree (GiB) | CPU s in window |",
        "|---|---:|---:|---:|---:|",
    ]
    secs = result["stage_seconds"]
    for stage in ("load", "validate", "split", "train", "evaluate"):
        s = result["stages"][stage]
        lines.append(f"| {stage} | {secs[stage]:.1f} | {s['peak_rss_gib']:.2f} | {s['peak_tree_pss_gib']:.2f} "
                     f"| {s['cpu_seconds']:.1f} |")  # fmt: skip
    s = result["stages"]["tracking"]
    lines.append(f"| tracking + promote | {secs['tracking'] + secs['promote']:.1f} | {s['peak_rss_gib']:.2f} "
                 f"| {s['peak_tree_pss_gib']:.2f} | {s['cpu_seconds']:.1f} |")  # fmt: skip
    cpu = result["user_seconds"] + result["system_seconds"]
    models = result["models"].items()
    lines += [
        "",
        f"/usr/bin/time: wall {result['wall_seconds']:.0f} s (flow {result['report_wall_seconds']:.0f} s), "
        f"CPU {cpu:.0f} s (user {result['user_seconds']:.0f} + sys {result['system_seconds']:.0f}), "
        f"max RSS {result['max_rss_gib']:.2f} GiB ({result['bytes_per_interaction']} bytes/interaction)",
        f"training: wall {secs['train']:.1f} s, models' summed train_seconds {result['train_sum_seconds']:.1f} s, "
        f"CPU in the window {result['train_cpu_seconds']:.1f} s on {result['cores']} cores -> "
        f"wall / (CPU / cores) = {result['train_wall_over_cpu_per_core']}",
        "models: " + ", ".join(f"{name} {m['train_seconds']} s NDCG@10 {m['ndcg@10']}" for name, m in models),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("size", help="synthetic size, e.g. 1M, 10M, 32M")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default /tmp/scale/<size>)")
    parser.add_argument("--models", help="comma-separated models (default: mfpipe run's)")
    parser.add_argument("--interval", type=float, default=0.2, help="RSS sampling interval in seconds")
    parser.add_argument("extra", nargs="*", help="further `mfpipe run` arguments (after --)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path("/tmp/scale") / args.size
    result = run(args.size, workdir, args.models, args.extra, args.interval)
    (workdir / "scale.json").write_text(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
