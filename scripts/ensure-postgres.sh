#!/usr/bin/env bash
# Makes sure the machine's PostgreSQL answers on 127.0.0.1:5432, starting it when it is down.
set -euo pipefail
host=${MEDSYNC_PGHOST:-127.0.0.1}
port=${MEDSYNC_PGPORT:-5432}
if pg_isready -q -h "$host" -p "$port"; then exit 0; fi
if [ -d /etc/postgresql ]; then
  echo "PostgreSQL is down; starting it" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
fi
for _ in $(seq 1 30); do
  pg_isready -q -h "$host" -p "$port" && exit 0
  sleep 1
done
echo "PostgreSQL is not answering on $host:$port" >&2
exit 1
