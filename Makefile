# Quick start: `make run` (set up + run the pipeline offline on synthetic data), `make test` (set up + full suite).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV := $(PYTHON) -m uv
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup run test test-fast bench lint lock services-deps clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv==0.13.9
	$(UV) venv --quiet --allow-existing -p $(PYTHON) $(VENV)
	$(UV) pip install --quiet -p $(VENV) -r requirements.lock
	$(UV) pip install --quiet -p $(VENV) --no-deps -e .
	@touch $@

run: setup
	$(BIN)/mfpipe run

# PostgreSQL binaries for the services tests (a throw-away cluster is started by the test fixtures).
services-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { echo "installing postgresql (Debian package) for the services tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	    || echo "warning: could not install postgresql; PostgreSQL tests will skip (fail under CI=true)"; }

test: setup services-deps lint
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not services"

lint: setup
	$(BIN)/ruff check mfpipe flows tests

bench: setup
	$(BIN)/mfpipe bench --json-report reports/bench.json

lock:
	$(UV) pip compile --quiet -p $(PYTHON) -c ../shared/stack/constraints.txt pyproject.toml --extra dev -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
