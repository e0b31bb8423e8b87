# rnnflow: `make run` trains and registers the default forecaster, `make test` runs the tests.
# Each target creates .venv and installs the pinned project on first use.

PY       := .venv/bin/python
STAMP    := .venv/.installed-stamp
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_LOGGING_LEVEL ?= INFO
export MLFLOW_ENABLE_TELEMETRY ?= false
export DO_NOT_TRACK ?= true

.PHONY: run charlm test bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m flows.timeseries $(ARGS)

charlm: $(STAMP)
	$(PY) -m flows.charlm $(ARGS)

test: $(STAMP)
	PREFECT_LOGGING_LEVEL=WARNING $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_timeseries.py

clean:
	rm -rf .venv mlruns/mlflow.db mlruns/artifacts .pytest_cache
