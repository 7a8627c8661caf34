"""Read-only connections to A's database for the medsync page, through medsync's own connection.

The page reads with the Airflow connection the source's DAG writes with (``db_conn_id`` of its
config), in sessions that cannot write (``default_transaction_read_only``) and whose every
statement is bounded (``statement_timeout``), so a slow query on a busy A fails fast instead of
holding a backend, and a page can never change A.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg

from medsync.errors import MedsyncError
from medsync.hooks.a_database import ADatabaseHook

STATEMENT_TIMEOUT_MS = int(os.environ.get("MEDSYNC_UI_STATEMENT_TIMEOUT_MS", "5000"))
CONNECT_TIMEOUT_SECONDS = int(os.environ.get("MEDSYNC_UI_CONNECT_TIMEOUT_SECONDS", "5"))


class ConnectionMissingError(MedsyncError):
    """The source's database connection is not defined in this Airflow (API server's environment)."""


class ReadOnlyADatabaseHook(ADatabaseHook):
    """``ADatabaseHook`` whose sessions are read-only, with a statement and a connect timeout."""

    hook_name = "medsync: service A database, read-only (UI)"

    def __init__(self, postgres_conn_id: str = ADatabaseHook.default_conn_name, **kwargs: Any) -> None:
        options = "-c default_transaction_read_only=on"
        super().__init__(
            postgres_conn_id=postgres_conn_id,
            options=options,
            connect_timeout_seconds=CONNECT_TIMEOUT_SECONDS,
            # ADatabaseHook sets it per session; whole seconds, at least one.
            statement_timeout_seconds=max(1, STATEMENT_TIMEOUT_MS // 1000),
            **kwargs,
        )

    def get_conn(self) -> psycopg.Connection:
        conn = super().get_conn()
        conn.execute("SET application_name = 'medsync-ui'")
        return conn


def connect_readonly(conn_id: str) -> psycopg.Connection:
    """A read-only session of A's database through the Airflow connection ``conn_id``; the caller closes it."""
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return ReadOnlyADatabaseHook(conn_id).get_conn()
    except AirflowNotFoundException as exc:
        raise ConnectionMissingError(f"the Airflow connection {conn_id!r} is not defined in the API server") from exc
