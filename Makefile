# Quick start: `make run` (set up + run the pipeline offline on synthetic data), `make test` (set up + full suite).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV := $(PYTHON) -m uv
STAMP := $(VENV)/.installed
CONSTRAINTS := ../shared/stack/constraints.txt
# requirements.lock: what runs (the Docker image installs only this); requirements-dev.lock: the test and
# lint tools on top, resolved against requirements.lock so they never move a runtime pin.
LOCKS := requirements.lock requirements-dev.lock
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup run test test-fast bench lint lock services-deps ui-deps clean

setup: $(STAMP)

# Idempotent: re-running installs nothing new; a changed lock or pyproject.toml reinstalls from both locks.
# Bytecode is compiled here, once: with PYTHONDONTWRITEBYTECODE set (as on this machine) Python would
# otherwise compile every module from source in every process (`mfpipe run` imports: 5.2 s -> 2.1 s).
$(STAMP): $(LOCKS) pyproject.toml
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv==0.13.9
	$(UV) venv --quiet --allow-existing -p $(PYTHON) $(VENV)
	$(UV) pip install --quiet -p $(VENV) --compile-bytecode $(addprefix -r ,$(LOCKS))
	$(UV) pip install --quiet -p $(VENV) --no-deps -e .
	$(BIN)/python -m compileall -q mfpipe flows
	@touch $@

run: setup
	$(BIN)/mfpipe run

# PostgreSQL binaries for the services tests (a throw-away cluster is started by the test fixtures).
services-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { echo "installing postgresql (Debian package) for the services tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	    || echo "warning: could not install postgresql; PostgreSQL tests will skip (fail under CI=true)"; }

# Debian's Chromium for the UI tests (tests/ui drive it headless over the DevTools protocol; no browser download).
ui-deps:
	@command -v chromium >/dev/null 2>&1 || \
	  { echo "installing chromium (Debian package) for the UI tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "warning: could not install chromium; UI tests will skip (fail under CI=true)"; }

test: setup services-deps ui-deps lint
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not services"

lint: setup
	$(BIN)/ruff check mfpipe flows tests benchmarks
	$(BIN)/ruff format --check mfpipe flows tests benchmarks

bench: setup
	$(BIN)/mfpipe bench --json-report reports/bench.json

# Both locks from pyproject.toml within the verified stack; the existing pins are kept where they still
# resolve (uv prefers the versions already in the output file). The dev lock lists only what dev adds.
LOCK_HEADER = \# Resolved pins: $(CONSTRAINTS) (verified stack) + what pyproject.toml adds. Regenerate: make lock
lock:
	$(UV) pip compile --quiet --no-header --no-annotate -p $(PYTHON) -c $(CONSTRAINTS) pyproject.toml \
	  -o requirements.lock
	sed -i '1i $(LOCK_HEADER) (runtime: what the image installs)' requirements.lock
	$(UV) pip compile --quiet --no-header --no-annotate -p $(PYTHON) -c $(CONSTRAINTS) -c requirements.lock \
	  pyproject.toml --extra dev -o requirements-dev.lock
	grep -vxF -f requirements.lock requirements-dev.lock > requirements-dev.lock.tmp
	{ echo "$(LOCK_HEADER) (dev extra, on top of requirements.lock)"; cat requirements-dev.lock.tmp; } > requirements-dev.lock
	rm requirements-dev.lock.tmp

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
