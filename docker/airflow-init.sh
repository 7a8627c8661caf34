#!/usr/bin/env bash
# docker compose's airflow-init: migrates the metadata database and sets the admin password.
# Runs once before the other Airflow services start (they depend on it completing), as the
# image's user (uid 50000) like them; run as root it hands what it wrote to that user.
set -euo pipefail

airflow_uid=${AIRFLOW_UID:-50000}

# SimpleAuthManager reads passwords from this file and generates (and prints) one for any
# user it lacks: writing it first gives the documented password and prints none.
passwords_file=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?}
auth_dir=$(dirname "$passwords_file")
mkdir -p "$auth_dir"
if [[ ! -w "$auth_dir" ]]; then
    echo "airflow-init: $auth_dir is not writable by uid $(id -u) (owner: $(stat -c %u:%g "$auth_dir"));" \
        "the image makes it uid $airflow_uid's: remove the airflow-auth volume and start again" >&2
    exit 1
fi
python - "$passwords_file" <<'PY'
import json, os, sys
path = sys.argv[1]
# Created with its final mode: the password is never readable by others, not even for a moment.
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as f:
    json.dump({"admin": os.environ.get("MEDSYNC_AIRFLOW_PASSWORD") or "admin"}, f)
os.chmod(path, 0o600)
PY
if [[ $(id -u) == 0 ]]; then
    # Started as root: the services run as the image's user and must read (and rewrite) the file.
    chown "$airflow_uid:0" "$auth_dir" "$passwords_file"
fi

# The same command the native test harness runs (tests/airflow_stack.py, "db-migrate").
airflow db migrate
echo "airflow-init: metadata database migrated; connections come from AIRFLOW_CONN_* env vars"
