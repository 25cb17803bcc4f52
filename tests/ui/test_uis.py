"""The MLflow and Prefect UIs after one `mfpipe run`, read in headless Chromium as a person reads them.

Both UIs are single-page apps: every check waits for the rendered text (`innerText`), never for the
HTML the server sends. Each test saves a screenshot under reports/ui/ and prints its path.

MLflow 3.17's UI opens an experiment in its GenAI view ("Overview", "Detect Issues", traces) unless
the browser is in its "Model training" mode: `?workflowType=machine_learning` in the link, or the
toggle a person clicked before (kept in the browser's localStorage). The experiment tag
`mlflow.experimentKind` is what MLflow offers to declare an experiment's kind; mfpipe's experiments
must carry `custom_model_development`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.ui.browser import Browser, plain
from tests.ui.conftest import Stack

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
#: What MLflow's GenAI experiment view shows and its training-runs view does not.
GENAI_VIEW_MARKERS = ("Detect Issues", "Token Usage", "Tool calls")
PREFECT_NO_API = "Can't connect to Server API"

Screenshot = Callable[..., Path]


def _close_mlflow_assistant(browser: Browser) -> None:
    """MLflow opens its "Assistant" side panel on a first visit; close it so the screenshot shows the page."""
    browser.evaluate(
        "document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click() ?? null"
    )


def _links_to(browser: Browser, fragment: str) -> list[str]:
    """Visible texts of the page's links whose href contains `fragment`."""
    return browser.evaluate(
        f"[...document.querySelectorAll('a[href*=\"{fragment}\"]')].map(a => a.innerText.trim()).filter(t => t)"
    )


def test_mlflow_experiment_opens_in_training_runs_view_with_parent_and_child_runs(
    stack: Stack, browser: Browser, screenshot: Screenshot
) -> None:
    browser.goto(f"{stack.mlflow_url}/#/experiments/{stack.experiment_id}?workflowType=machine_learning")
    text = browser.wait_for_text([stack.parent_run_name, "matching runs"])
    _close_mlflow_assistant(browser)
    assert "/runs" in browser.evaluate("location.hash"), browser.evaluate("location.href")
    assert not [marker for marker in GENAI_VIEW_MARKERS if marker in text], plain(text)[:1500]
    assert _links_to(browser, f"/runs/{stack.parent_run_id}") == [stack.parent_run_name]

    # Child runs are folded under their parent: unfold it as a person would (the "+" in the run-name cell).
    clicked = browser.evaluate(
        "(() => { const b = document.querySelector('button[data-component-id$=\"runnamecellrenderer.tsx_46\"]');"
        " if (b) { b.click(); return true; } return false; })()"
    )
    assert clicked, "no button to unfold the parent run's children"
    browser.wait_for_text(list(stack.child_runs))
    for model, run_id in stack.child_runs.items():
        assert _links_to(browser, f"/runs/{run_id}") == [model], f"child run {model} ({run_id}) not listed"
    screenshot("mlflow-experiment-runs")


def test_mlflow_experiment_declares_model_training_kind(stack: Stack) -> None:
    """The experiment says what it holds: MLflow's kind tag is `custom_model_development` (mfpipe/tracking.py)."""
    from mlflow import MlflowClient

    tags = MlflowClient(stack.mlflow_url).get_experiment(stack.experiment_id).tags
    assert tags.get(EXPERIMENT_KIND_TAG) == MODEL_TRAINING, (
        f"experiment {stack.experiment_id} tags {tags}: mfpipe must set {EXPERIMENT_KIND_TAG}={MODEL_TRAINING} "
        "when it creates the experiment"
    )


def test_mlflow_registered_model_page_shows_the_champion_alias(
    stack: Stack, browser: Browser, screenshot: Screenshot
) -> None:
    browser.goto(f"{stack.mlflow_url}/#/models/{stack.registered_model}?workflowType=machine_learning")
    browser.wait_for_text([stack.registered_model, *(f"Version {v}" for v in stack.versions), "Aliases"])
    _close_mlflow_assistant(browser)
    rows: list[str] = browser.evaluate("[...document.querySelectorAll('tr, [role=row]')].map(r => r.innerText)")
    by_version = {
        match[1]: plain(row) for row in rows if (match := re.match(r"\s*Version (\d+)\b", row.replace("\xa0", " ")))
    }
    assert sorted(by_version) == stack.versions, rows
    assert "@ champion" in by_version[stack.champion_version], by_version[stack.champion_version][:500]
    others = [v for v in stack.versions if v != stack.champion_version]
    assert all("@ champion" not in by_version[v] for v in others)
    # The versions table scrolls inside the page: bring the champion's row into view for the picture.
    browser.evaluate(
        "[...document.querySelectorAll('tr, [role=row]')]"
        f".find(r => /^\\s*Version {stack.champion_version}\\b/.test(r.innerText.replace(/\\u00a0/g, ' ')))"
        "?.scrollIntoView({block: 'start'}) ?? null"
    )
    screenshot("mlflow-registered-model")

    browser.goto(
        f"{stack.mlflow_url}/#/models/{stack.registered_model}/versions/{stack.champion_version}"
        "?workflowType=machine_learning"
    )
    text = plain(browser.wait_for_text([f"Version {stack.champion_version}", "Aliases"]))
    _close_mlflow_assistant(browser)
    assert re.search(r"Aliases : @ champion\b", text), text[:800]
    screenshot("mlflow-champion-version")


def _api_calls(browser: Browser) -> list[str]:
    """URLs of the API requests the page made (the Performance API records every fetch)."""
    return browser.evaluate(
        "performance.getEntriesByType('resource').map(e => e.name).filter(u => u.includes('/api/'))"
    )


def test_prefect_ui_on_its_port_shows_the_retrain_flow_run(
    stack: Stack, browser: Browser, screenshot: Screenshot
) -> None:
    assert not stack.prefect_url.endswith(":4200")
    browser.goto(f"{stack.prefect_url}/runs")
    text = browser.wait_for_text(["retrain", stack.flow_run_name, "Completed"])
    assert PREFECT_NO_API not in plain(text)
    calls = _api_calls(browser)
    assert calls and all(url.startswith(f"{stack.prefect_url}/api/") for url in calls), calls
    screenshot("prefect-runs")

    browser.goto(f"{stack.prefect_url}/runs/flow-run/{stack.flow_run_id}")
    text = browser.wait_for_text([stack.flow_run_name, "Completed", "promote"])
    assert PREFECT_NO_API not in plain(text)
    screenshot("prefect-flow-run")


@pytest.mark.parametrize(
    ("page", "shown"), [("/dashboard", ["Flow Runs", "1 total", "Completed"]), ("/flows", ["retrain"])]
)
def test_prefect_ui_reaches_its_api_on_every_page(stack: Stack, browser: Browser, page: str, shown: list[str]) -> None:
    """The pages a person opens first show the one run and its flow; the UI never lost its API."""
    browser.goto(f"{stack.prefect_url}{page}")
    text = browser.wait_for_text(shown)
    assert PREFECT_NO_API not in plain(text)
