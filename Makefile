# batchsvc: `make run` starts everything, `make test` runs the suite. `make help` lists the rest.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PORT ?= 8000
MODELS ?=
CONCURRENCY ?= 8
PYTEST_ARGS ?=
# make fuzz: e.g. FUZZ_ARGS="--url http://127.0.0.1:8000 --max-time 3600 --seed 7"
FUZZ_ARGS ?=
# make run is read by people: console logs, set here because under honcho stdout is no TTY.
LOG_FORMAT ?= console

.PHONY: help install run run-worker test test-unit test-integration test-slow fuzz lint check-deploy format bench lock clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# Every dependency's version is pinned in constraints.txt (make lock refreshes it), so each
# install, CI's included, gets the versions the suite last passed with.
CONSTRAINTS := constraints.txt
LOCK_VENV := .venv-lock

# pip byte-compiles what it installs (about 30 s of a fresh install here). Keep it: with
# PYTHONDONTWRITEBYTECODE set, as on this machine, nothing compiled later is cached, and every
# process the integration tests start would compile its imports again (--no-compile made the
# integration phase 542 s -> 751 s).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install batchsvc with its test tools

run: install ## start Redis, the API, workers, beat and Flower (Procfile, honcho)
	PATH="$(abspath $(BIN)):$$PATH" BATCHSVC_LOG_FORMAT="$(LOG_FORMAT)" $(BIN)/honcho --procfile Procfile --app-root . start --port $(PORT)

run-worker: install ## inference worker: make run-worker MODELS=a,b CONCURRENCY=64
	PATH="$(abspath $(BIN)):$$PATH" MODELS="$(MODELS)" CONCURRENCY="$(CONCURRENCY)" $(BIN)/batchsvc worker

# The unit tests share nothing, so they run on every core (-n auto); the integration tests run
# one at a time: each starts real processes, and several share the session's stack.
# mypy (about 20 s of one core on a fresh checkout) runs beside the unit tests; both must pass.
test: install check-deploy ## lint (ruff, mypy), check deploy/, then every test but the slow ones (installs Debian's chromium if missing)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	scripts/ensure-chromium
	@$(BIN)/mypy > $(VENV)/mypy.log 2>&1 & typing=$$!; \
	echo "$(BIN)/python -m pytest -m \"not slow\" -n auto tests/unit $(PYTEST_ARGS)  (and $(BIN)/mypy beside it)"; \
	$(BIN)/python -m pytest -m "not slow" -n auto tests/unit $(PYTEST_ARGS); units=$$?; \
	wait $$typing; typed=$$?; echo "$(BIN)/mypy:"; cat $(VENV)/mypy.log; \
	test $$units -eq 0 && test $$typed -eq 0
	$(BIN)/python -m pytest -m "not slow" tests/integration $(PYTEST_ARGS)

test-unit: install ## the fast unit tests only
	$(BIN)/python -m pytest -n auto tests/unit $(PYTEST_ARGS)

test-integration: install ## the integration tests (real redis-server, gunicorn, celery workers, chromium)
	scripts/ensure-chromium
	$(BIN)/python -m pytest -m "integration and not slow" $(PYTEST_ARGS)

test-slow: install ## the slow end-to-end tests
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

fuzz: install ## long schemathesis run (10 min) on a stack of its own, or make run's: FUZZ_ARGS="--url http://127.0.0.1:8000"
	$(BIN)/python -m tests.integration.fuzz $(FUZZ_ARGS)

lint: install ## ruff check, ruff format --check, mypy --strict (batchsvc, workers)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

check-deploy: install ## validate deploy/: hadolint, docker-compose config, kubernetes-validate, systemd-analyze verify
	scripts/ensure-deploy-tools
	VENV_BIN="$(BIN)" scripts/check-deploy

format: install ## ruff format + fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install ## benchmarks (never part of make test); one, small: make bench BENCH_ARGS="B1 --quick"
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[test,bench]'
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# pip-tools has a venv of its own: installed into .venv, its own dependencies (click) would move
# packages away from their pins.
lock: ## refresh constraints.txt: the newest versions pyproject.toml allows, every extra, pinned
	@test -x $(LOCK_VENV)/bin/pip-compile || ($(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/python -m pip install --quiet pip-tools)
	$(LOCK_VENV)/bin/pip-compile --quiet --upgrade --allow-unsafe --all-extras --strip-extras \
		--no-emit-index-url --no-emit-find-links --output-file $(CONSTRAINTS) pyproject.toml

clean: ## remove .venv, .venv-lock and var/
	rm -rf $(VENV) $(LOCK_VENV) var
