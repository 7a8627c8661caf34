# medsync: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-slow lint bench bench-parse airflow presign check-source clean

install: $(STAMP)

# The in-repo provider distribution (medsync's connection types), installed from requirements.txt by path.
PROVIDER := providers/medsync-airflow-provider
PROVIDER_FILES := $(PROVIDER)/pyproject.toml $(wildcard $(PROVIDER)/medsync_airflow_provider/*.py)

# Re-installs only when a requirements file or the provider changed (the provider is rebuilt then:
# uv would keep a path package of an unchanged version); uv is pinned and fetched with pip.
$(STAMP): requirements.txt requirements-dev.txt $(PROVIDER_FILES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==0.13.8
	$(BIN)/uv pip install -q --python $(BIN)/python --reinstall-package medsync-airflow-provider \
		-r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

demo: install
	scripts/ensure-postgres.sh
	$(BIN)/python -m demo

test: lint
	scripts/ensure-postgres.sh
	scripts/ensure-chromium.sh
	scripts/ensure-orthanc.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick loop while developing: everything but the runs through real Airflow processes.
test-fast: install
	scripts/ensure-postgres.sh
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install
	scripts/ensure-postgres.sh
	scripts/ensure-chromium.sh
	scripts/ensure-orthanc.sh
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install
	scripts/ensure-postgres.sh
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

bench-parse: install
	$(BIN)/python benchmarks/parse_time.py $(BENCH_ARGS)

# A local Airflow (api-server on 127.0.0.1:8080, scheduler, dag-processor) with medsync loaded,
# the simulator of B, an S3 server and the demo connections. Ctrl-C stops it all.
airflow: install
	scripts/ensure-postgres.sh
	scripts/airflow-local.sh $(AIRFLOW_ARGS)

# Check a source's config and mapping; with the API connection in the environment, one page of
# each level is fetched and parsed (nothing written): make check-source SOURCE=c [FETCH=1]
check-source: install
	PYTHONPATH=plugins $(BIN)/python -m medsync.check_source $(SOURCE) $(if $(FETCH),--fetch)

# A presigned URL for instance ids, with the connections in the environment (see README).
presign: install
	PYTHONPATH=plugins $(BIN)/python -m medsync.presign_cli $(ID)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build
