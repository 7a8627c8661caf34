#!/usr/bin/env bash
# docker compose's airflow-init: migrates the metadata database and sets the admin password.
# Runs once before the other Airflow services start (they depend on it completing).
set -euo pipefail

# SimpleAuthManager reads passwords from this file and generates (and prints) one for any
# user it lacks: writing it first gives the documented password and prints none.
passwords_file=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?}
mkdir -p "$(dirname "$passwords_file")"
python - "$passwords_file" <<'PY'
import json, os, sys
path = sys.argv[1]
with open(path, "w") as f:
    json.dump({"admin": os.environ.get("MEDSYNC_AIRFLOW_PASSWORD") or "admin"}, f)
os.chmod(path, 0o600)
PY

# The same command the native test harness runs (tests/airflow_stack.py, "db-migrate").
airflow db migrate
echo "airflow-init: metadata database migrated; connections come from AIRFLOW_CONN_* env vars"
