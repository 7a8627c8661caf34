#!/usr/bin/env bash
# `make airflow`: a local Airflow 3.3 with the project loaded, until Ctrl-C.
#
# UI and REST API on http://127.0.0.1:${PORT:-8080} (user admin, password $MEDSYNC_AIRFLOW_PASSWORD,
# default "admin"). api-server, scheduler, dag-processor and triggerer run natively from .venv with
# dags/ and plugins/ of this checkout, LocalExecutor (--executor CeleryExecutor for Redis + workers),
# all bound to 127.0.0.1. The demo connections are set: medsync_a_db -> database medsync_a_local
# (A's schema), medsync_b_api -> the B simulator, medsync_b_aws -> a local S3 server holding B's
# files. The metadata database (medsync_airflow_local) and ./airflow_home persist between runs.
# This is the harness the end-to-end tests use (tests/airflow_stack.py): same commands, same
# settings. Extra arguments go to it: scripts/airflow-local.sh --help.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-postgres.sh
exec .venv/bin/python tests/airflow_stack.py serve --port "${PORT:-8080}" "$@"
