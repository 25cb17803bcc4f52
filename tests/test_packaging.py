"""Packaging: the wheel carries everything mfpipe reads at run time, so an installed mfpipe works from any
folder. The GX suites live in the repository's top-level `expectations/` and ship as package data,
mapped to `mfpipe/expectations/` (pyproject.toml); `flows` ships beside `mfpipe` (DESIGN "Packaging").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
SUITES = ["interactions.json", "ratings.json"]
# What the wheel is built from: the build reads only these (README is the long description).
SOURCES = ["pyproject.toml", "README.md", "mfpipe", "flows", "expectations"]


def test_the_package_list_names_every_package_of_the_tree():
    """pyproject lists packages by hand (a mapped folder rules out `find`): a new subpackage must be added."""
    tree = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("mfpipe", "flows")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert SETUPTOOLS["package-dir"] == {"mfpipe.expectations": "expectations"}
    assert set(SETUPTOOLS["packages"]) == tree | {"mfpipe.expectations"}
    assert SETUPTOOLS["package-data"] == {"mfpipe.expectations": ["*.json"]}
    assert sorted(p.name for p in (ROOT / "expectations").glob("*.json")) == SUITES


def test_a_checkout_reads_the_top_level_suites():
    from mfpipe.validation import EXPECTATIONS_DIR

    assert EXPECTATIONS_DIR == ROOT / "expectations"


def _uv() -> list[str]:
    python = shutil.which("python3.11")
    found = (
        python is not None and subprocess.run([python, "-m", "uv", "--version"], capture_output=True).returncode == 0
    )
    require(found, "python3.11 -m uv is needed to build and install the wheel")
    return [str(python), "-m", "uv"]


def _check(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, args))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_wheel_installed_from_the_lock_runs_from_an_empty_folder(tmp_path):
    uv = _uv()
    seconds: dict[str, float] = {}

    def timed(stage: str, args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
        start = time.monotonic()
        done = _check(args, **kwargs)
        seconds[stage] = round(time.monotonic() - start, 1)
        return done

    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    timed("build", [*uv, "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(source)])
    (wheel,) = (tmp_path / "dist").glob("mfpipe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"mfpipe/expectations/{suite}" for suite in SUITES} <= names
    assert {"flows/retrain.py", "flows/_plumbing.py", "mfpipe/cli.py"} <= names

    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    timed("venv", [*uv, "venv", "--quiet", "-p", "python3.11", str(venv)], env=env)
    timed("install lock", [*uv, "pip", "install", "--quiet", "-p", str(venv), "-r", str(ROOT / "requirements.lock")],
          env=env)  # fmt: skip
    timed("install wheel", [*uv, "pip", "install", "--quiet", "-p", str(venv), "--no-deps", str(wheel)], env=env)

    empty = tmp_path / "empty"
    empty.mkdir()
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", "MFPIPE_DATA_HOME": str(tmp_path)}
    (tmp_path / "store").mkdir()
    mfpipe = str(venv / "bin" / "mfpipe")
    where = _check([str(venv / "bin" / "python"), "-c", "import mfpipe.validation as v; print(v.EXPECTATIONS_DIR)"],
                   cwd=empty, env=env)  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # the wheel's copy, not the checkout's

    validated = timed("validate", [mfpipe, "validate", "synthetic:2000"], cwd=empty, env=env)
    assert "OK: mfpipe run would accept this data" in validated.stdout
    timed("run", [mfpipe, "run", "--data", "synthetic:3000", "--models", "pop", "--json-report", "report.json"],
          cwd=empty, env=env)  # fmt: skip
    report = json.loads((empty / "report.json").read_text())
    assert [(m["model"], m["status"]) for m in report["models"]] == [("pop", "ok")]
    assert report["champion"]["promoted"]
    assert sorted(p.name for p in empty.iterdir()) == ["report.json"]  # the store and caches went to tmp
    print(f"\npackaging durations (s): {seconds}")
