"""The hook for service A's PostgreSQL database, where medsync writes."""

from __future__ import annotations

from typing import Any

import psycopg
from airflow.providers.postgres.hooks.postgres import PostgresHook
from psycopg.rows import tuple_row


class ADatabaseHook(PostgresHook):
    """A ``PostgresHook`` for A's database that hands out connections medsync can rely on.

    ``get_conn()`` returns a psycopg 3 connection in autocommit mode with tuple rows:
    medsync's code opens its own transactions (``with conn.transaction():``) so that
    each batch commits on its own and no transaction stays open across a long pull.
    The connection is the caller's to close. The Airflow connection is an ordinary
    postgres one (host, port, login, password, schema = database name).
    """

    conn_name_attr = "postgres_conn_id"
    default_conn_name = "medsync_a_db"
    conn_type = "postgres"
    hook_name = "medsync: service A database"

    def __init__(self, postgres_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(postgres_conn_id=postgres_conn_id, **kwargs)

    def get_conn(self) -> psycopg.Connection:
        conn = super().get_conn()
        if not isinstance(conn, psycopg.Connection):
            raise TypeError("medsync needs psycopg 3 (install psycopg[binary]); got a psycopg2 connection")
        conn.autocommit = True
        conn.row_factory = tuple_row
        conn.execute("SET application_name = 'medsync'")
        return conn
