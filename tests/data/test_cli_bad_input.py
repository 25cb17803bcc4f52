"""`mfpipe split BAD --out DIR`: exit 2, one line on stderr naming the file, no traceback, nothing written.

Every case runs through the real entry point (`mfpipe.cli.main`) in-process; one of them also runs as
a separate process, as a user would start it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mfpipe.cli import main
from tests.data.test_files import BAD_INPUTS

ROOT = Path(__file__).resolve().parents[2]


def _split_argv(path: Path, out: Path, options: dict) -> list[str]:
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    return ["split", str(path), "--out", str(out), *flags]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_split_command_rejects_bad_input(tmp_path, monkeypatch, capsys, case):
    make, options, problem = BAD_INPUTS[case]
    path = make(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["mfpipe", *_split_argv(path, out, options)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and problem in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("case", ["truncated last line"])
def test_split_command_in_a_subprocess(tmp_path, case):
    make, options, problem = BAD_INPUTS[case]
    path = make(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "mfpipe", *_split_argv(path, out, options)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mfpipe: error: ") and str(path) in lines[0], proc.stderr
    assert problem in lines[0]
    assert not out.exists()
