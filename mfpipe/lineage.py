"""What a result depends on, as short digests and facts: config, data source, code and environment.

The registry tags every version with these, the flow's caches key on them, and `--skip-unchanged`
compares them, so a result can always be traced to the data, settings and code that made it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from mfpipe import __version__
from mfpipe.config import Config

#: Config fields that say where or how a run executes, not what it computes.
RUNTIME_FIELDS = {
    "tracking_uri",
    "task_runner",
    "dask_address",
    "threads",
    "data_home",
    "registered_model",
    "train_timeout_seconds",
    "skip_unchanged",
}
#: The lineage tags that must all match the last finished run for `--skip-unchanged` to skip.
SAME_INPUTS = ("dataset_digest", "config_hash", "git_commit", "mfpipe_version")


def stable_hash(value: Any) -> str:
    """Short sha256 of a JSON-able value (config sections, cache keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(config: Config) -> str:
    """What a result depends on (data, options, models, params, k, seed), not where or how it ran."""
    return stable_hash(config.model_dump(mode="json", exclude=RUNTIME_FIELDS))


def source_key(config: Config) -> str:
    """Cache key of the loaded data: the spec, the read options, the file's size and mtime, the version.

    A file that changes on disk gets a new key; a named source is checksum-verified by the loader.
    """
    path = Path(config.data).expanduser()
    stat = path.stat() if path.exists() else None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if stat else []
    stamps = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return stable_hash(
        {
            "data": config.data,
            "options": config.data_options.model_dump(mode="json"),
            "seed": config.seed,
            "files": stamps,
            "version": __version__,
        }
    )


def git_commit() -> str | None:
    """The commit of the mfpipe source tree, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    """What ran: Python, platform and every installed distribution with its version."""
    packages = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]})
    return {"python": sys.version.split()[0], "platform": sys.platform, "mfpipe": __version__, "packages": packages}
