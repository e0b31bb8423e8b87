# rnnflow: `make run` trains and registers the default forecaster, `make test` runs the tests.
# Each target creates .venv and installs the pinned project on first use.

PY       := .venv/bin/python
RNNFLOW  := .venv/bin/rnnflow
STAMP    := .venv/.installed-stamp
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_LOGGING_LEVEL ?= INFO
export MLFLOW_ENABLE_TELEMETRY ?= false
export DO_NOT_TRACK ?= true

PORT     ?= 5001
UI_PORT  ?= 5000
STORE    := sqlite:///$(CURDIR)/mlruns/mlflow.db
# mlflow execs uvicorn/gunicorn by name: the venv's bin must be on PATH
VENV_PATH := PATH=$(CURDIR)/.venv/bin:$$PATH MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-$(STORE)}

PREFECT_PORT ?= 4200
export PREFECT_SERVER_API_PORT ?= $(PREFECT_PORT)
# `run`, `charlm` and the sweep use $PREFECT_API_URL if set, else one local server shared by every
# run (flows/server.py starts it on first use, on this port, and leaves it up); `deploy` needs one
API_URL  := PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_PORT)/api}

.PHONY: run charlm test bench gpu-check install clean serve-model ui models server server-stop deploy worker tracking-server journeys

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@# ensemble members train as one batched network through a C++ operation: build it now (10-30
	@# s, once) rather than in the first run; without a compiler they train one by one
	-$(PY) -m rnn_models.grouped
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(RNNFLOW) forecast $(ARGS)

charlm: $(STAMP)
	$(RNNFLOW) charlm $(ARGS)

# Tests run in TEST_JOBS processes (pytest-xdist): a test spends much of its time waiting on a
# server or a subprocess, so two share two cores well (trainings at once share the cores through
# rnn_models.cores); TEST_JOBS=0 runs them in this one process.
TEST_JOBS ?= 2
PYTEST   := PREFECT_LOGGING_LEVEL=WARNING $(PY) -m pytest -n $(TEST_JOBS)

test: $(STAMP)
	$(PYTEST) -q -m "not journey" $(PYTEST_ARGS)

# What a user types, end to end (CI runs it after `make test`): the tests marked `journey` (command
# lines and signals too slow for make test's budget) and, beside them, the README as a test: every
# command in its code blocks, run as a user types it in a private copy of the working tree, each
# checked (scripts/journeys.py). The tests print a line each, prefixed "[journey tests]"; the
# target fails if either fails.
journeys: SHELL := /bin/bash
journeys: $(STAMP)
	@(set -o pipefail; $(PYTEST) -m journey -n 0 -v $(PYTEST_ARGS) 2>&1 | sed -u 's/^/[journey tests] /') & tests=$$!; \
	$(PY) scripts/journeys.py $(ARGS); readme=$$?; \
	wait $$tests; tests=$$?; \
	echo "make journeys: README $$([ $$readme = 0 ] && echo passed || echo FAILED), journey tests $$([ $$tests = 0 ] && echo passed || echo FAILED)"; \
	[ $$readme = 0 ] && [ $$tests = 0 ]

# The edit-run loop: unit and step tests only, no servers, subprocesses or whole flows (30-45 s
# on 2 cores, 10-15 s of it the Prefect test harness). `make test` stays the whole suite.
SLOW_TESTS := auth budget calendar cli console deployments flow_charlm flow_timeseries models_cli monitor pools reliability serving stores sweep tracking_server ui
.PHONY: test-fast readme-images
test-fast: $(STAMP)
	PREFECT_LOGGING_LEVEL=WARNING $(PY) -m pytest -q -m "not slow and not cuda" \
		$(SLOW_TESTS:%=--ignore=tests/test_%.py) $(PYTEST_ARGS)

# Refresh the README's pictures (both UIs, a forecast with intervals): docs/img/*.png, or ARGS=DIR (needs chromium, chromium-driver)
readme-images: $(STAMP)
	PREFECT_LOGGING_LEVEL=WARNING $(PY) scripts/readme-images.py $(ARGS)

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/bench_accuracy.py
	$(PY) benchmarks/bench_timeseries.py
	$(PY) benchmarks/bench_charlm.py
	$(PY) benchmarks/bench_serving.py
	$(PY) benchmarks/bench_sweep.py

# CUDA tests + GPU benchmarks into one report (gpu-report.md); needs only PyTorch, so no install
# step: on a GPU box without the venv it uses python3. On a machine without CUDA it runs nothing.
gpu-check:
	scripts/gpu-check.sh $(REPORT)

# A Prefect server (SQLite in ~/.prefect, analytics off); its UI is http://127.0.0.1:4200.
# The local server the command lines start in the background is the same one: server-stop stops it.
server: $(STAMP)
	PATH=$(CURDIR)/.venv/bin:$$PATH prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

server-stop: $(STAMP)
	PREFECT_SERVER_API_PORT=$(PREFECT_PORT) $(RNNFLOW) server stop

# Register and serve the retraining deployments against that server (keep it running); with
# POOL=NAME, register them to that Prefect process work pool instead, for `make worker` to run
deploy: $(STAMP)
	$(API_URL) $(RNNFLOW) deploy $(if $(POOL),--pool "$(POOL)") $(ARGS)

# A worker of `make deploy POOL=NAME`'s deployments, on any machine with this project installed: it
# runs each flow run from this checkout, in this folder. Point PREFECT_API_URL and MLFLOW_TRACKING_URI
# at the shared servers first.
worker: $(STAMP)
	@test -n "$(POOL)" || { echo "usage: make worker POOL=<work pool> (PREFECT_API_URL, MLFLOW_TRACKING_URI set)"; exit 2; }
	$(API_URL) $(RNNFLOW) worker --pool "$(POOL)"

# A shared tracking server on a throwaway PostgreSQL (needs PostgreSQL's initdb/pg_ctl, as root);
# AUTH=1: with logins (RNNFLOW_ADMIN_PASSWORD is the admin's password); SQLITE=1: no PostgreSQL
tracking-server: $(STAMP)
	$(RNNFLOW) tracking-server $(if $(filter 1 yes true,$(AUTH)),--auth) $(if $(filter 1 yes true,$(SQLITE)),--sqlite)

models: $(STAMP)
	$(RNNFLOW) models list

# REST scoring server for NAME@champion: make serve-model NAME=sine-forecaster [PORT=5001] [WORKERS=2]
# [TOKEN_ENV=VAR] (MLflow's scoring app and request format, uvicorn workers, a 5 MB body limit, with
# TOKEN_ENV a bearer token from $VAR on every request but /ping and /health: rnnflow serve --help)
WORKERS ?= 2
serve-model: $(STAMP)
	@test -n "$(NAME)" || { echo "usage: make serve-model NAME=<registered model> [PORT=5001] [WORKERS=2] [TOKEN_ENV=VAR]"; exit 2; }
	$(VENV_PATH) MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false $(RNNFLOW) serve "$(NAME)" --port $(PORT) \
		--workers $(WORKERS) $(if $(TOKEN_ENV),--token-env $(TOKEN_ENV))

# The MLflow UI on the project's store, lean enough for a laptop: one worker, no job runners
ui: $(STAMP)
	$(RNNFLOW) ui --port $(UI_PORT)

clean:
	rm -rf .venv mlruns/mlflow.db mlruns/artifacts .pytest_cache
