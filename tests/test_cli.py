"""The `mfpipe` command through its real entry point (`mfpipe.cli:main`): the installed console script in a
subprocess, or `main()` in-process with SystemExit. Pins the Contracts: exit codes 0/1/2, user errors as one
line `mfpipe: error: ...` on stderr, help text, `--json` layouts, and `run`'s report.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
import typing
from enum import Enum
from pathlib import Path

import pytest
import typer.main

from mfpipe import cli
from mfpipe.cli import app, main

MFPIPE = Path(sys.executable).with_name("mfpipe")  # the console script of this venv
REPO = Path(__file__).resolve().parent.parent
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]
# Small models: the run is about the CLI, not about quality.
SMALL = """
threads = 2
[model_params.als]
iterations = 3
factors = 8
[model_params.bpr]
epochs = 5
factors = 8
"""
DIVERGING = """
threads = 2
[model_params.bpr]
epochs = 5
factors = 8
learning_rate = 1e30
"""
REPORT_KEYS = {"dataset", "protocol", "split", "models", "champion", "timing"}
MODEL_KEYS = {"model", "status", "error", "metrics", "train_seconds", "run_id", "registered_model", "version"}
STAGES = {"load", "validate", "split", "train", "evaluate", "tracking", "promote"}


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`main(args)` in-process -> (exit code, stdout, stderr); main always ends in SystemExit."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 0), out, err


def run_script(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The installed `mfpipe` in a subprocess; the store and the data cache are the test's (conftest env)."""
    return subprocess.run([str(MFPIPE), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def one_error_line(stderr: str) -> str:
    """stderr holds exactly one line, the user error, and no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mfpipe: error: "), stderr
    return lines[0]


def squash(text: str) -> str:
    """Text without whitespace: help wraps lines (and may break at hyphens) wherever it likes."""
    return re.sub(r"\s+", "", text)


# -- usage errors and user errors: one line, exit 2 --------------------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["evaluate"], "mfpipe: error: Missing option '--recs'. (see 'mfpipe evaluate --help')"),
        (["validate"], "mfpipe: error: Missing argument 'DATA'. (see 'mfpipe validate --help')"),
        (["nope"], "mfpipe: error: No such command 'nope'. (see 'mfpipe --help')"),
        (["run", "--k", "many"], "mfpipe: error: Invalid value for '--k'"),
        (["run", "--protocol", "leave-last"], "mfpipe: error: Invalid value for '--protocol'"),
        (["run", "--task-runner", "ray"], "mfpipe: error: Invalid value for '--task-runner'"),
        (["run", "--no-such-flag"], "mfpipe: error: No such option: --no-such-flag"),
        (["promote"], "mfpipe: error: give exactly one of --version N or --rollback"),
        (["promote", "--version", "3", "--rollback"], "mfpipe: error: give exactly one of --version N or --rollback"),
        (["evaluate", "--recs", "none.csv", "--truth", "none.csv"], "mfpipe: error: none.csv: no such file"),
        (["run", "--config", "none.toml"], "mfpipe: error: none.toml"),
    ],
)
def test_usage_and_user_errors_are_one_line_on_stderr_with_exit_2(args, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(args, capsys)
    assert code == 2
    assert one_error_line(err).startswith(expected)
    assert out == ""


@pytest.mark.parametrize("args", [["evaluate"], ["split", "synthetic:2000"], ["run", "--protocol", "x"]])
def test_the_installed_script_says_usage_errors_in_one_line(args, tmp_path):
    done = run_script(args, tmp_path, timeout=120)
    assert done.returncode == 2
    one_error_line(done.stderr)
    assert "╭" not in done.stderr and done.stdout == ""


def test_bare_mfpipe_shows_the_help_and_exits_2(capsys):
    code, out, err = run_main([], capsys)
    assert code == 2 and out == ""
    assert err.startswith("Usage: mfpipe [OPTIONS] COMMAND [ARGS]...") and "Commands:" in err


def test_version_through_the_installed_script(tmp_path):
    from mfpipe import __version__

    done = run_script(["--version"], tmp_path, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"mfpipe {__version__}\n", "")


def test_run_with_a_missing_file_fails_before_prefect_is_imported(tmp_path):
    """The data spec is checked before the flow (and Prefect, whose API takes seconds to start) is imported."""
    modules = tmp_path / "modules.txt"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from mfpipe.cli import main
        try:
            main(["run", "--data", "missing.csv"])
        finally:
            Path({str(modules)!r}).write_text("\\n".join(sorted(sys.modules)))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert one_error_line(done.stderr) == "mfpipe: error: missing.csv: file not found"
    loaded = set(modules.read_text().split())
    assert "mfpipe.cli" in loaded
    assert not {m for m in loaded if m == "prefect" or m.startswith(("prefect.", "flows"))}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no/such/ratings.csv", "mfpipe: error: no/such/ratings.csv: file not found"),
        ("ml-7m", "mfpipe: error: ml-7m: not a file, a source name or synthetic[:N]; --data accepts"),
        ("synthetic:5", "mfpipe: error: synthetic:5: synthetic data needs at least 100 interactions"),
    ],
)
def test_run_rejects_a_data_spec_that_names_nothing(spec, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["run", "--data", spec], capsys)
    assert code == 2 and out == ""
    assert one_error_line(err).startswith(expected)


@pytest.mark.parametrize(
    "args",
    [
        ["split", "synthetic:2000", "--out", "blocker/parts"],
        ["run", "--data", "synthetic:3000", "--json-report", "blocker/report.json"],  # before the run starts
    ],
)
def test_an_output_path_that_cannot_be_written_is_one_line_with_exit_1(args, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file, not a folder")
    code, _, err = run_main(args, capsys)
    assert code == 1
    assert "blocker" in one_error_line(err)


# -- help --------------------------------------------------------------------------------------------
def _enum_choices(command: typing.Any) -> dict[str, list[str]]:
    """Parameter name -> the values of its Enum type, from the command's signature."""

    def enums(hint: typing.Any) -> list[type[Enum]]:
        if isinstance(hint, type) and issubclass(hint, Enum):
            return [hint]
        return [e for arg in typing.get_args(hint) for e in enums(arg)]

    found = {}
    for name, param in inspect.signature(command.callback).parameters.items():
        for enum in enums(param.annotation):
            found[name] = [member.value for member in enum]
    return found


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_with_every_word_of_its_texts_and_its_choices(name, capsys):
    code, out, err = run_main([name, "--help"], capsys)
    assert (code, err) == (0, "")
    assert out.startswith(f"Usage: mfpipe {name}")
    command = COMMANDS[name]
    # No word is lost (rich markup would swallow "[synthetic:100k]" and the like).
    assert squash(inspect.cleandoc(command.help or "")) in squash(out)
    for param in command.params:
        if param.help:
            assert squash(param.help) in squash(out), param.name
    for param, values in _enum_choices(command).items():
        assert "|".join(values) in squash(out), param


def test_protocol_and_task_runner_are_choices_listed_in_the_help(capsys):
    assert _enum_choices(COMMANDS["run"]) == {
        "protocol": ["temporal", "random-per-user", "random-per-item"],
        "task_runner": ["thread", "dask"],
    }
    for name in ("validate", "split"):
        assert "protocol" in _enum_choices(COMMANDS[name])
    _, out, _ = run_main(["deploy", "--help"], capsys)
    assert "(default synthetic:100k)" in " ".join(out.split())  # as one phrase, however the help wraps


def test_root_help_offers_version_and_shell_completion(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for flag in ("--version", "--install-completion", "--show-completion"):
        assert flag in out


def test_shell_completion_through_the_installed_script(tmp_path):
    script = run_script(["--show-completion", "bash"], tmp_path, timeout=120)
    assert script.returncode == 0 and "_mfpipe_completion" in script.stdout
    request = {"_MFPIPE_COMPLETE": "complete_bash", "COMP_WORDS": "mfpipe run --task-runner ", "COMP_CWORD": "3"}
    env = {**os.environ, **request}
    done = subprocess.run([str(MFPIPE)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["thread", "dask"]


# -- tables off a terminal -----------------------------------------------------------------------------
def _header_row(out: str, *columns: str) -> str:
    """The one output line holding every column name (the table kept its columns)."""
    rows = [line for line in out.splitlines() if all(c in line for c in columns)]
    assert rows, out
    return rows[0]


def test_validate_tables_keep_their_columns_in_a_pipe(capsys):
    code, out, _ = run_main(["validate", "synthetic:2000"], capsys)
    assert code == 0
    _header_row(out, "expectation", "column", "severity", "result", "detail")
    assert re.search(r"│ cutoff\s+│ \d{4}-\d\d-\d\dT", out)  # the split table, value unwrapped
    assert "OK: mfpipe run would accept this data" in out


def test_bench_table_keeps_its_columns_in_a_pipe(monkeypatch, capsys):
    """The table of `bench` (benchmarks themselves are minutes: one result stands in for their output)."""
    from mfpipe.bench import BenchResult, runner

    result = BenchResult("bpr", "ml-latest-small, 64 factors, 2 threads, verified negatives", "samples/s",
                         1.2e7, 7.5e6, "implicit", target=1.5)  # fmt: skip
    monkeypatch.setattr(runner, "select", lambda only: {"bpr": None})
    monkeypatch.setattr(runner, "run", lambda benchmarks, progress: runner.BenchRun(results=[result]))
    code, out, _ = run_main(["bench"], capsys)
    assert code == 0
    _header_row(out, "benchmark", "case", "ours", "peer", "unit", "ratio", "target", "pass")
    assert _header_row(out, "bpr", result.case, "1.60x", ">= 1.5x", "yes")


# -- run, champion and promote through the real entry point ------------------------------------------
@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> dict[str, typing.Any]:
    """`mfpipe run --json --json-report` in a subprocess on small data, the store in a temporary folder."""
    folder = tmp_path_factory.mktemp("run")
    (folder / "small.toml").write_text(SMALL)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "MFPIPE_DATA_HOME": str(folder)}
    args = ["run", "--data", "synthetic:3000", "--models", "pop,als", "--config", "small.toml",
            "--json", "--json-report", "out/report.json"]  # fmt: skip
    env.pop("PREFECT_API_URL", None)  # the embedded default: the run starts its own ephemeral Prefect API
    child = subprocess.Popen([str(MFPIPE), *args], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)  # fmt: skip
    stdout, stderr = child.communicate(timeout=900)
    done = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    return {"done": done, "folder": folder, "env": env, "group": child.pid}


def test_run_stops_the_prefect_api_it_started(first_run):
    """Nothing of the run's own ephemeral API outlives the command, and no MLflow tag links to its absent UI."""
    assert first_run["done"].returncode == 0, first_run["done"].stderr
    with pytest.raises(ProcessLookupError):
        os.killpg(first_run["group"], 0)  # no process left in the run's process group
    report = json.loads(first_run["done"].stdout)
    store = f"sqlite:///{first_run['folder'] / 'mlflow.db'}"
    from mlflow import MlflowClient

    child = MlflowClient(store).get_run(report["models"][0]["run_id"])
    parent = MlflowClient(store).get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["prefect.flow_run_id"] and "prefect.flow_run_url" not in parent.data.tags
    assert "View at" not in first_run["done"].stderr


def test_run_json_prints_the_report_on_stdout_and_logs_on_stderr(first_run):
    done = first_run["done"]
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)  # stdout is the document alone
    assert printed == json.loads((first_run["folder"] / "out" / "report.json").read_text())
    assert "Finished in state Completed" in done.stderr and "Traceback" not in done.stderr


def test_run_report_layout(first_run):
    report = json.loads(first_run["done"].stdout)
    assert set(report) == REPORT_KEYS
    assert report["dataset"]["name"] == "synthetic-3k" and report["dataset"]["rows"] == 3000
    assert report["protocol"] == "temporal" and report["split"]["protocol"] == "temporal"
    assert [m["model"] for m in report["models"]] == ["pop", "als"]
    for m in report["models"]:
        assert set(m) == MODEL_KEYS
        assert m["status"] == "ok" and m["error"] is None and m["registered_model"] == "mfpipe-synthetic-3k"
        assert 0 <= m["metrics"]["ndcg@10"] <= 1 and len(m["metrics"]["ndcg@10_ci95"]) == 2
    assert sorted(m["version"] for m in report["models"]) == ["1", "2"]
    champion = report["champion"]
    assert set(champion) == {"registered_model", "before", "after", "promoted", "reason"}
    assert champion["promoted"] and champion["before"] == {"version": None, "ndcg@10": None}
    timing = report["timing"]
    assert set(timing) == {"wall_seconds", "stages"} and set(timing["stages"]) == STAGES
    assert all(seconds >= 0 for seconds in timing["stages"].values())
    assert timing["wall_seconds"] >= sum(timing["stages"].values()) * 0.99


def test_run_leaderboard_keeps_its_columns_in_a_pipe(first_run, capsys):
    from mfpipe.report import RunOutcome

    report = json.loads(first_run["done"].stdout)
    cli._print_outcome(RunOutcome(report, 1.0, 1.5, None, "http://mlflow/run", "mlflow ui"), 10, None)
    out = capsys.readouterr().out
    _header_row(out, "model", "NDCG@10", "P@10", "R@10", "MAP@10", "train s", "version", "status")
    assert "stages (s): load" in out


def test_champion_json_layout(first_run, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first_run["env"]["MLFLOW_TRACKING_URI"])
    code, out, err = run_main(["champion", "--dataset", "synthetic-3k", "--json"], capsys)
    assert (code, err) == (0, "")
    shown = json.loads(out)
    assert set(shown) == {"registered_model", "champion", "challenger"}
    assert shown["registered_model"] == "mfpipe-synthetic-3k"
    report = json.loads(first_run["done"].stdout)
    best = next(m for m in report["models"] if m["version"] == report["champion"]["after"]["version"])
    champion = shown["champion"]
    assert set(champion) == {"version", "run_id", "model", "metrics", "tags"}
    ids = ("version", "run_id", "model")
    assert [champion[key] for key in ids] == [best[key] for key in ids]
    assert set(champion["metrics"]) == {"ndcg@10", "precision@10", "recall@10", "map@10", "hit_rate@10", "mrr@10"}
    assert champion["metrics"]["ndcg@10"] == pytest.approx(best["metrics"]["ndcg@10"])
    assert champion["tags"]["protocol"] == "temporal" and "ndcg_at_10_cold" in champion["tags"]
    assert shown["challenger"] is None  # the first run promoted its best: no challenger


def test_promote_json_layout_and_rollback(first_run, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first_run["env"]["MLFLOW_TRACKING_URI"])
    report = json.loads(first_run["done"].stdout)
    before = report["champion"]["after"]["version"]
    other = next(m["version"] for m in report["models"] if m["version"] != before)
    args = ["promote", "--dataset", "synthetic-3k", "--version", other, "--reason", "test", "--json"]
    code, out, err = run_main(args, capsys)
    assert (code, err) == (0, "")
    assert json.loads(out) == {"registered_model": "mfpipe-synthetic-3k", "before": {"version": before},
                               "after": {"version": other}, "reason": "manual promotion by hand: test"}  # fmt: skip
    code, out, _ = run_main(["promote", "--dataset", "synthetic-3k", "--rollback", "--json"], capsys)
    assert code == 0
    assert json.loads(out) == {"registered_model": "mfpipe-synthetic-3k", "before": {"version": other},
                               "after": {"version": before}, "reason": "rollback by hand"}  # fmt: skip
    code, _, err = run_main(["promote", "--dataset", "synthetic-3k", "--version", "99", "--json"], capsys)
    assert code == 2 and one_error_line(err).startswith("mfpipe: error: mfpipe-synthetic-3k: no version 99")


def test_champion_of_an_empty_store_is_a_one_line_error(capsys):
    code, out, err = run_main(["champion", "--dataset", "nothing-here", "--json"], capsys)
    assert code == 2 and out == ""
    assert one_error_line(err).startswith("mfpipe: error: mfpipe-nothing-here: no champion yet")


def test_run_where_every_model_fails_exits_1_with_one_line(tmp_path):
    (tmp_path / "diverging.toml").write_text(DIVERGING)
    args = ["run", "--data", "synthetic:3000", "--models", "bpr", "--config", "diverging.toml",
            "--json-report", "report.json"]  # fmt: skip
    done = run_script(args, tmp_path, timeout=900)
    assert done.returncode == 1
    line = one_error_line(done.stderr)
    assert line.startswith("mfpipe: error: every model failed (bpr: ") and "diverged" in line
    assert "Traceback" not in done.stdout
